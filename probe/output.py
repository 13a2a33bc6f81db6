"""Rendering a round for people (table) and for programs (JSON Lines)."""

from __future__ import annotations

import json
from collections.abc import Iterator, Mapping
from typing import Any

from .model import ProbeResult
from .round import RoundReport


def result_record(result: ProbeResult, vantage: str, vantage_state: str) -> dict[str, Any]:
    """The flat JSON record of one result (stable field names: scripts depend on them)."""
    t = result.target
    return {
        "t": result.t.isoformat().replace("+00:00", "Z"),
        "vantage": vantage,
        "vantage_state": vantage_state,
        "service": t.service,
        "endpoint": t.endpoint.name,
        "role": t.endpoint.role,
        "probe": t.label,
        "address": t.address,
        "port": t.port,
        "resolver": t.resolver,
        "address_source": t.address_source or None,
        "status": result.status,
        "ok": result.ok,
        "failure": result.failure,
        "failed_operation": str(result.failed_operation) if result.failed_operation else None,
        "skipped": str(result.skipped) if result.skipped else None,
        "duration_s": round(result.duration_s, 6),
        "phases": {k: round(v, 6) for k, v in result.phases.items()},
        "flags": list(result.flags),
        "details": jsonable(result.details),
    }


def jsonable(value: Any) -> Any:
    if isinstance(value, Mapping):
        return {str(k): jsonable(v) for k, v in value.items()}
    if isinstance(value, list | tuple | set | frozenset):
        return [jsonable(v) for v in value]
    if isinstance(value, bytes):
        return value.hex()
    if value is None or isinstance(value, bool | int | float | str):
        return value
    return str(value)


def json_lines(report: RoundReport) -> Iterator[str]:
    for result in report.results:
        record = result_record(result, report.vantage.name, report.state.state)
        yield json.dumps(record, sort_keys=True)


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


def table(report: RoundReport) -> str:
    rows = [_COLUMNS, *(_row(r) for r in report.results)]
    widths = [max(len(row[i]) for row in rows) for i in range(len(_COLUMNS))]
    lines = [
        "  ".join(cell.ljust(w) for cell, w in zip(row, widths, strict=True)).rstrip()
        for row in rows
    ]
    lines.insert(1, "  ".join("-" * w for w in widths))
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
