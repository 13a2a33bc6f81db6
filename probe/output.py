"""Rendering a round for people (table) and for programs (JSON Lines)."""

from __future__ import annotations

import json
from collections.abc import Iterator, Sequence

from .model import ProbeResult
from .records import iso_z, result_record, verdict_line
from .round import RoundReport
from .verdict.vocabulary import EndpointVerdict, ServiceVerdict


def json_lines(report: RoundReport) -> Iterator[str]:
    """Result records, then verdict records; the ``type`` field tells them apart."""
    for result in report.results:
        record = result_record(result, report.vantage.name, report.state.state)
        yield json.dumps(record, sort_keys=True)
    t = iso_z(report.started)
    for verdict in report.verdicts:
        yield json.dumps(verdict_line(verdict, report.vantage.name, t), sort_keys=True)


_COLUMNS = ("service", "endpoint", "address", "port", "probe", "result", "failure", "ms")


def _row(result: ProbeResult) -> tuple[str, ...]:
    t = result.target
    where = t.address or (t.resolver or "-")
    outcome = {"ok": "ok", "failed": "FAIL", "skipped": "skip"}[result.status]
    failure = result.failure or (str(result.skipped) if result.skipped else "")
    if result.failed_operation:
        failure = f"{failure} ({result.failed_operation})"
    if result.flags:
        failure = " ".join([failure, *(f"[{f}]" for f in result.flags)]).strip()
    ms = "" if result.skipped else f"{result.duration_s * 1000:.0f}"
    return (t.service, t.endpoint.name, where, str(t.port or ""), t.label, outcome, failure, ms)


def _printable(text: str) -> str:
    """Control characters as ``\\xNN``: failure messages and evidence can quote a peer, and
    an escape sequence or a carriage return would drive the terminal or forge a row."""
    if text.isprintable():
        return text
    return "".join(c if c.isprintable() else f"\\x{ord(c):02x}" for c in text)


def _aligned(columns: tuple[str, ...], rows: Sequence[tuple[str, ...]]) -> list[str]:
    """A header, a rule and the rows, each column padded to its widest cell."""
    rows = [tuple(_printable(cell) for cell in row) for row in rows]
    every = [columns, *rows]
    widths = [max(len(row[i]) for row in every) for i in range(len(columns))]
    lines = [
        "  ".join(cell.ljust(w) for cell, w in zip(row, widths, strict=True)).rstrip()
        for row in every
    ]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return lines


_VERDICT_COLUMNS = ("service", "endpoint", "verdict", "confidence", "blocked")


def verdict_lines(verdicts: tuple[EndpointVerdict | ServiceVerdict, ...]) -> list[str]:
    """One row per verdict (``(service)`` for the service's own), its evidence below it."""
    if not verdicts:
        return []
    rows = [
        (
            v.service,
            v.endpoint if v.endpoint is not None else "(service)",
            str(v.verdict),
            f"{v.confidence:.2f}",
            f"{v.blocked_fraction:.2f}" if v.blocked_fraction is not None else "",
        )
        for v in verdicts
    ]
    aligned = _aligned(_VERDICT_COLUMNS, rows)
    lines = aligned[:2]
    for row, v in zip(aligned[2:], verdicts, strict=True):
        lines.append(row)
        lines += [f"    {_printable(e)}" for e in shown_evidence(v.evidence)]
    return lines


MAX_SHOWN_EVIDENCE = 12


def shown_evidence(evidence: Sequence[str], limit: int = MAX_SHOWN_EVIDENCE) -> list[str]:
    """What a person reads: the first LIMIT-1 lines and a count of the rest.  Only the
    table shortens evidence; JSON and the API carry every line."""
    if len(evidence) <= limit:
        return list(evidence)
    return [*evidence[: limit - 1], f"… and {len(evidence) - limit + 1} more"]


def table(report: RoundReport) -> str:
    """The results table, then the verdicts with their evidence, then the summary line."""
    lines = _aligned(_COLUMNS, [_row(r) for r in report.results])
    if report.verdicts:
        lines += ["", *verdict_lines(report.verdicts), ""]
    return "\n".join(lines) + "\n" + summary(report) + "\n"


def summary(report: RoundReport) -> str:
    counts = {"ok": 0, "failed": 0, "skipped": 0}
    for r in report.results:
        counts[r.status] += 1
    v6 = "yes" if report.state.ipv6 else "no"
    return (
        f"vantage {report.vantage.name}: {report.state.state}, ipv6 {v6}; "
        f"{counts['ok']} ok, {counts['failed']} failed, {counts['skipped']} skipped "
        f"in {report.duration_s:.1f} s"
    )
