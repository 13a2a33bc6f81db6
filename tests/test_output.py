"""`probe once` output for people: the table never passes control characters through."""

from __future__ import annotations

import json
from datetime import UTC, datetime

from probe.model import Operation, Vantage, VantageState
from probe.output import MAX_SHOWN_EVIDENCE, json_lines, table
from probe.probes.base import Recorder
from probe.round import RoundReport
from probe.verdict.aggregate import judge_round
from tests.helpers import target


def test_the_table_escapes_control_characters_from_the_network() -> None:
    """A failure message can quote a peer (a QUIC close reason, an exception text): an
    escape sequence in it must not drive the operator's terminal, a \\r not forge a row."""
    rec = Recorder(target("quic", "192.0.2.1", 443, name="web", service="lab"))
    hostile = "unknown_failure closed: \x1b[2J\x1b]0;pwned\x07 \rFAKE ROW"
    result = rec.fail(hostile, Operation.READ)
    now = datetime.now(UTC)
    report = RoundReport(
        Vantage(),
        VantageState(online=True, ipv6=False, t=now),
        (result,),
        now,
        0.1,
        verdicts=judge_round([result]),
    )
    out = table(report)
    assert "\x1b" not in out and "\x07" not in out and "\r" not in out
    assert "\\x1b[2J" in out  # shown, harmlessly


def _many_failures_report() -> RoundReport:
    results = tuple(
        Recorder(target("tcp", f"192.0.2.{i}", 443, name="dc", service="lab")).fail(
            "generic_timeout_error", Operation.CONNECT
        )
        for i in range(1, 31)
    )
    now = datetime.now(UTC)
    return RoundReport(
        Vantage(),
        VantageState(online=True, ipv6=False, t=now),
        results,
        now,
        0.1,
        verdicts=judge_round(list(results)),
    )


def test_json_keeps_every_evidence_line_the_table_shortens_them() -> None:
    """JSON is for machines: no display truncation; the table shows a count instead."""
    report = _many_failures_report()
    records = [json.loads(line) for line in json_lines(report)]
    verdicts = [r for r in records if r.get("type") == "verdict"]
    assert verdicts
    longest = max(len(r["evidence"]) for r in verdicts)
    assert longest >= 30  # one line per failing address at least
    assert not any(e.startswith("… and ") for r in verdicts for e in r["evidence"])
    out = table(report)
    assert f"… and {longest - MAX_SHOWN_EVIDENCE + 1} more" in out
