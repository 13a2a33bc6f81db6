"""The rule table: which rule judges a failed attempt, and what it may conclude.

Each rule reads the evidence of one failure next to the swap tests and repeats on the
same address and port and the control vantage's run of the same probe, and returns a
`Finding` (the rules live by what they judge: `handshake_rules`, `udp_rules`,
`tcp_rules`; the evidence that triggers each verdict is in ``docs/verdicts.md``).

Which rule applies is data, not control flow: `RULES` is an ordered table of rows (the
probes, transport, failed operation and failures a row applies to; the function that
judges; the censorship verdicts it may give), and the first row that applies wins
(`rule_for`).  `udp_rules.sustained_loss` is the one rule for an attempt that worked.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from ..model import Failure
from .context import Context
from .handshake_rules import (
    CERTIFICATE_FAILURES,
    TLS_INTERFERENCE,
    certificate_rule,
    tls_interference_rule,
)
from .observations import Observation
from .tcp_rules import application_rule, connect_rule, held_connection_rule, transfer_rule
from .udp_rules import quic_rule, quic_vn_rule, stun_rule
from .vocabulary import Finding, Verdict

Judge = Callable[[Context, Observation], Finding]


@dataclass(frozen=True)
class Rule:
    """One row of `RULES`: which failed attempts it judges, how, and what it may conclude.

    A condition left empty matches every attempt.  ``verdicts`` are the censorship
    verdicts the rule can give; any rule may also say ``endpoint_down`` (the control fails
    too) or ``inconclusive`` (the evidence cannot tell censorship from an outage).
    """

    name: str
    judge: Judge
    verdicts: tuple[Verdict, ...]
    probes: tuple[str, ...] = ()  # base probe names (``tls`` for ``tls/repeat``)
    transport: str | None = None  # ``tcp`` or ``udp`` (`Observation.l4`)
    operation: str | None = None  # the operation that failed
    failures: frozenset[Failure] = frozenset()  # what it failed with

    def applies(self, o: Observation) -> bool:
        return (
            (not self.probes or o.base in self.probes)
            and (self.transport is None or o.l4 == self.transport)
            and (self.operation is None or o.failed_operation == self.operation)
            and (not self.failures or o.kind in self.failures)
        )


# The first row that applies judges a failed attempt.  Probe-specific rows come first:
# QUIC, its version negotiation and STUN over UDP are judged by what UDP can show, never
# by the generic connect or TLS rows below them.  The last row applies to everything.
RULES: tuple[Rule, ...] = (
    Rule(
        "quic certificate",
        certificate_rule,
        (Verdict.TLS_MITM,),
        probes=("quic",),
        failures=CERTIFICATE_FAILURES,
    ),
    Rule(
        "quic handshake",
        quic_rule,
        (Verdict.QUIC_FILTERING, Verdict.UDP_BLOCKING),
        probes=("quic",),
    ),
    Rule(
        "quic version negotiation",
        quic_vn_rule,
        (Verdict.UDP_BLOCKING, Verdict.QUIC_FILTERING),
        probes=("quic_vn",),
    ),
    Rule(
        "stun over udp",
        stun_rule,
        (Verdict.UDP_BLOCKING, Verdict.PROTOCOL_FILTERING),
        probes=("stun",),
        transport="udp",
    ),
    Rule("connect", connect_rule, (Verdict.IP_BLOCKING,), operation="connect"),
    Rule(
        "tls certificate",
        certificate_rule,
        (Verdict.TLS_MITM,),
        operation="tls_handshake",
        failures=CERTIFICATE_FAILURES,
    ),
    Rule(
        "tls interference",
        tls_interference_rule,
        (Verdict.TLS_SNI_FILTERING, Verdict.PROTOCOL_FILTERING),
        operation="tls_handshake",
        failures=TLS_INTERFERENCE,
    ),
    Rule(
        "transfer",
        transfer_rule,
        (Verdict.STALL_AFTER_BYTES, Verdict.THROTTLING, Verdict.PROTOCOL_FILTERING),
        probes=("transfer",),
    ),
    Rule("held connection", held_connection_rule, (Verdict.IP_BLOCKING,), probes=("tcp",)),
    Rule("application exchange", application_rule, (Verdict.PROTOCOL_FILTERING,)),
)


def rule_for(o: Observation) -> Rule:
    """The rule that judges the failed attempt ``o``: the first row of `RULES` that applies."""
    return next(rule for rule in RULES if rule.applies(o))


def judge_failure(ctx: Context, o: Observation) -> Finding:
    return rule_for(o).judge(ctx, o)
