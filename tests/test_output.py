"""`probe once` output for people: the table never passes control characters through."""

from __future__ import annotations

from datetime import UTC, datetime

from probe.model import Operation, Vantage, VantageState
from probe.output import table
from probe.probes.base import Recorder
from probe.round import RoundReport
from probe.verdict import judge_round
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
