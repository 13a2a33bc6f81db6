"""The rule table (`probe.verdict.rules.RULES`) read as data: which row judges which failed
attempt, and that each row only ever gives the verdicts it declares.

The corpus is the verdict tests' own hand-built endpoints (`tests.test_verdict`), so
every failed attempt those tests judge is checked here against its row.
"""

from __future__ import annotations

from typing import Any

import pytest

from probe.model import Operation
from probe.verdict.context import Context
from probe.verdict.observations import from_result, normalise
from probe.verdict.rules import RULES, judge_failure, rule_for
from probe.verdict.vocabulary import Verdict
from tests.test_verdict import CASES, DOC_ROWS, Case, run

# What any rule may say besides its own censorship verdicts.
NOT_AN_ACCUSATION = (Verdict.ENDPOINT_DOWN, Verdict.INCONCLUSIVE)


def failed_attempts(case: Case) -> tuple[Context, list[Any]]:
    """The context `judge_endpoint` builds for the case, and its failed non-DNS attempts."""
    measured = tuple(o for o in normalise(case.results) if o.skipped is None)
    control = tuple(o for o in normalise(case.control) if o.skipped is None)
    ctx = Context(measured, control, case.others_ok)
    return ctx, [o for o in measured if not o.ok and o.is_attempt and o.base != "dns"]


def test_every_rule_gives_only_the_verdicts_its_row_declares_and_every_row_is_reached() -> None:
    reached: set[str] = set()
    for case in (*CASES, *DOC_ROWS):
        ctx, failed = failed_attempts(case)
        for o in failed:
            rule = rule_for(o)
            reached.add(rule.name)
            finding = judge_failure(ctx, o)
            allowed = (*rule.verdicts, *NOT_AN_ACCUSATION)
            assert finding.verdict in allowed, (case.id, rule.name, finding)
    assert reached == {rule.name for rule in RULES}


def test_the_last_row_applies_to_every_failed_attempt() -> None:
    last = RULES[-1]
    assert not (last.probes or last.transport or last.operation or last.failures)
    assert len({rule.name for rule in RULES}) == len(RULES)  # names identify rows


HS, READ, CONN = Operation.TLS_HANDSHAKE, Operation.READ, Operation.CONNECT


@pytest.mark.parametrize(
    ("result", "row"),
    [
        # QUIC is judged by what UDP can show, even when the failure is a certificate's
        (
            run("quic", failure="ssl_invalid_hostname", op=Operation.QUIC_HANDSHAKE),
            "quic certificate",
        ),
        (run("quic", failure="generic_timeout_error", op=CONN), "quic handshake"),
        (run("quic_vn", failure="udp_no_response", op=READ), "quic version negotiation"),
        (
            run("stun", port=3478, failure="udp_no_response", op=READ, transport="udp"),
            "stun over udp",
        ),
        # STUN over TCP is a TCP connection like any other
        (run("stun", failure="connection_refused", op=CONN, transport="tcp"), "connect"),
        (run("mtproto", failure="generic_timeout_error", op=CONN), "connect"),
        (run("transfer", failure="ssl_unknown_authority", op=HS), "tls certificate"),
        (run("tls", failure="connection_reset", op=HS), "tls interference"),
        (run("transfer", failure="stall_after_bytes", op=READ), "transfer"),
        (run("tcp", failure="connection_reset", op=READ, hold_s=5.0), "held connection"),
        (run("whatsapp", failure="eof_error", op=READ), "application exchange"),
        # a TLS failure that is neither a certificate nor interference falls through
        (run("tls", failure="unknown_failure boom", op=HS), "application exchange"),
    ],
)
def test_the_first_row_that_applies_judges_the_attempt(result: Any, row: str) -> None:
    assert rule_for(from_result(result)).name == row
