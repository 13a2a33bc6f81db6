"""Rules for UDP: a silent QUIC handshake, version negotiation, STUN, call-like flows.

Silence alone proves nothing (FIELD.md section 1): a QUIC v1 handshake dropped while version
negotiation is answered is QUIC filtering (B8); UDP silent while TCP to the same address
works, or while the control or random UDP is answered, is UDP blocking (B9); so is a call
flow cut off, or losing packets the control's flow does not.

An ICMP error instead of silence (`_icmp_reject`) is the same block by another mechanism:
the censor rejects instead of dropping.  Who sent it matters (``icmp_errors[].reporter``):
a router on the path rejecting UDP to an address that accepts TCP is a block; the target
itself saying "port unreachable" is its UDP service being down.  Either way the control
reaching the service makes it a block, and the control failing too an outage.
"""

from __future__ import annotations

from collections.abc import Sequence

from ..evidence import (
    DnsEvidence,
    IcmpReport,
    QuicEvidence,
    QuicVnEvidence,
    StunEvidence,
    StunFlow,
)
from ..model import Failure
from .context import Context, by_control, endpoint_down
from .handshake_rules import SILENCE, progressed, server_progress
from .observations import Observation, describe, describe_control
from .vocabulary import CERTAIN, FAIR, GOOD, NONE, STRONG, Finding, Verdict

# ICMP answered a UDP datagram: the address/port is dropped, whatever the payload was
_ICMP = frozenset(
    {Failure.CONNECTION_REFUSED, Failure.HOST_UNREACHABLE, Failure.NETWORK_UNREACHABLE}
)


_ICMP_NAMES = {
    Failure.CONNECTION_REFUSED: "port unreachable",
    Failure.HOST_UNREACHABLE: "host unreachable",
    Failure.NETWORK_UNREACHABLE: "network unreachable",
}


def icmp_reports(o: Observation) -> tuple[IcmpReport, ...]:
    """The ICMP errors a UDP probe recorded (none for records older than the field)."""
    ev = o.evidence
    if isinstance(ev, DnsEvidence | QuicEvidence | QuicVnEvidence | StunEvidence):
        return ev.icmp_errors or ()
    return ()


def icmp_line(o: Observation) -> str:
    """``ICMP host unreachable (icmp type 3 code 1) from 10.0.0.1``; what the record says."""
    name = _ICMP_NAMES.get(o.kind or Failure.UNKNOWN, "error")
    reports = icmp_reports(o)
    if not reports:
        return f"ICMP {name} (type and sender not recorded)"
    r = reports[0]
    sender = f" from {r.reporter}" if r.reporter else ""
    return f"ICMP {name} ({r.icmp} type {r.type} code {r.code}){sender}"


def _from_target(o: Observation) -> bool:
    """The ICMP error came from the target itself (not a router on the path).  Unknown
    sender (an older record): a port unreachable is the host's own answer as a rule."""
    reports = icmp_reports(o)
    if reports and reports[0].reporter:
        return reports[0].reporter == o.address
    return o.kind == Failure.CONNECTION_REFUSED


def _icmp_reject(
    ctx: Context, o: Observation, lines: list[str], ctl: Observation | None, with_control: float
) -> Finding:
    """UDP answered with ICMP unreachable (the control, if any, got through: the rules
    check that first).  With the control: blocking by rejection.  Without: blocking only
    if a router rejects UDP to an address that accepts TCP (the host is up, so the reject
    is the path's); the target itself refusing UDP is its UDP service down."""
    lines = [*lines, icmp_line(o)]
    if ctl is not None:
        lines.append("the control gets through: the path rejects UDP")
        return Finding(Verdict.UDP_BLOCKING, with_control, tuple(lines))
    tcp = ctx.tcp_connected(o.address)
    if tcp and not _from_target(o):
        lines += [describe(tcp[0]), "a router rejects UDP to an address that accepts TCP"]
        return Finding(Verdict.UDP_BLOCKING, GOOD, tuple(lines))
    if tcp:
        lines += [describe(tcp[0]), "the target itself refuses UDP on that port: its service"]
        return Finding(Verdict.INCONCLUSIVE, NONE, tuple(lines))
    lines.append("an unreachable without a control or working TCP proves nothing")
    return Finding(Verdict.INCONCLUSIVE, NONE, tuple(lines))


def quic_rule(ctx: Context, o: Observation) -> Finding:
    """B8: the v1 handshake is silent while a version-negotiation probe is answered."""
    ctl = ctx.control_for(o)
    if ctl is not None and not ctl.ok:
        return endpoint_down(o, ctl)
    progress = server_progress(o)
    if progress is not None and o.kind in SILENCE:
        return progressed(o, progress)
    vn = ctx.runs_at("quic_vn", o)
    lines = [describe(o), *(describe(v) for v in vn)]
    if ctl is not None:
        lines.append(describe_control(ctl))
    answered = [v for v in vn if v.ok]
    if o.kind in SILENCE:
        if answered:
            offers_v1 = [_offers_quic_v1(v) for v in answered]
            if False in offers_v1 and True not in offers_v1:
                lines.append("the server does not offer QUIC v1")
                return Finding(Verdict.INCONCLUSIVE, NONE, tuple(lines))
            lines.append("version negotiation answered while the v1 handshake is dropped")
            confidence = CERTAIN if ctl is not None else (STRONG if True in offers_v1 else FAIR)
            return Finding(Verdict.QUIC_FILTERING, confidence, tuple(lines))
        if vn:
            return _udp_silence(ctx, o, lines, ctl)
        if ctl is not None:
            lines.append("no version-negotiation probe: QUIC filtering not told from UDP blocking")
            return Finding(Verdict.QUIC_FILTERING, FAIR, tuple(lines))
        return Finding(Verdict.INCONCLUSIVE, NONE, (*lines, "silence alone proves nothing"))
    if o.kind in _ICMP:
        return _icmp_reject(ctx, o, lines, ctl, GOOD)
    if ctl is not None:
        lines.append("the control completes the QUIC handshake")
        return Finding(Verdict.QUIC_FILTERING, GOOD, tuple(lines))
    return Finding(Verdict.INCONCLUSIVE, NONE, (*lines, "no control vantage to compare"))


def _udp_silence(
    ctx: Context, o: Observation, lines: list[str], ctl: Observation | None
) -> Finding:
    """QUIC v1 and version negotiation both silent: UDP to the address is dropped if TCP
    to it works (or the control gets answers), else nothing can be said."""
    tcp = ctx.tcp_connected(o.address)
    if tcp:
        lines.append(describe(tcp[0]))
        lines.append("UDP silent while TCP to the same address works")
        return Finding(Verdict.UDP_BLOCKING, STRONG if ctl is not None else GOOD, tuple(lines))
    if ctl is not None:
        return Finding(Verdict.UDP_BLOCKING, GOOD, (*lines, "the control is answered"))
    return Finding(Verdict.INCONCLUSIVE, NONE, (*lines, "UDP silence alone proves nothing"))


def _offers_quic_v1(o: Observation) -> bool | None:
    """Whether a version negotiation listed QUIC v1 (None: not recorded)."""
    return o.evidence.offers_quic_v1 if isinstance(o.evidence, QuicVnEvidence) else None


def quic_vn_rule(ctx: Context, o: Observation) -> Finding:
    ctl = ctx.control_for(o)
    if ctl is not None and not ctl.ok:
        return endpoint_down(o, ctl)
    if o.kind in SILENCE or o.kind in _ICMP:
        lines = [describe(o)] + ([describe_control(ctl)] if ctl is not None else [])
        if o.kind in _ICMP:
            with_control = STRONG if ctx.tcp_connected(o.address) else GOOD  # as silence
            return _icmp_reject(ctx, o, lines, ctl, with_control)
        return _udp_silence(ctx, o, lines, ctl)
    return by_control(
        ctx, o, Verdict.QUIC_FILTERING, with_control=FAIR, without=None, why="unexpected reply"
    )


def _flow(o: Observation) -> StunFlow | None:
    """A call-like flow's tally (``stun`` in ``mode: flow``), or None."""
    ev = o.evidence
    return ev.flow if isinstance(ev, StunEvidence) and ev.mode == "flow" else None


def _random_udp_replied(o: Observation) -> bool:
    """Random UDP of the STUN request's size, to the same port, was answered."""
    ev = o.evidence
    return isinstance(ev, StunEvidence) and ev.control is not None and ev.control.replied


def stun_rule(ctx: Context, o: Observation) -> Finding:
    """B9: STUN silence, a flow cut off after t seconds, STUN-shaped vs random UDP."""
    flow = _flow(o)
    cutoff = flow.cutoff_s if flow is not None else None
    if cutoff is not None and cutoff > 0:
        why = f"replies stopped for good {cutoff} s into the flow"
        return by_control(ctx, o, Verdict.UDP_BLOCKING, with_control=CERTAIN, without=GOOD, why=why)
    if o.kind != Failure.UDP_NO_RESPONSE:
        if o.kind in _ICMP:
            ctl = ctx.control_for(o)
            if ctl is not None and not ctl.ok:
                return endpoint_down(o, ctl)
            lines = [describe(o)] + ([describe_control(ctl)] if ctl is not None else [])
            return _icmp_reject(ctx, o, lines, ctl, GOOD)
        return by_control(
            ctx,
            o,
            Verdict.PROTOCOL_FILTERING,
            with_control=FAIR,
            without=None,
            why="not a STUN reply",
        )
    if ctx.control_for(o) is not None:
        return by_control(
            ctx, o, Verdict.UDP_BLOCKING, with_control=STRONG, without=None, why="STUN silence"
        )
    lines = [describe(o)]
    random_udp = [o, *ctx.swaps("stun", "random_udp", o)]
    for r in random_udp[1:]:
        lines.append(describe(r))
    replied = [r for r in random_udp if _random_udp_replied(r)]
    if replied:
        lines.append("random UDP of the same size to the same port is answered, STUN is not")
        return Finding(Verdict.UDP_BLOCKING, GOOD, tuple(lines))
    if any(r.ok for r in random_udp[1:]):
        lines.append("STUN answered on the follow-up: the first silence was transient")
        return Finding(Verdict.INCONCLUSIVE, NONE, tuple(lines))
    lines.append("STUN silence alone proves nothing without a control vantage")
    return Finding(Verdict.INCONCLUSIVE, NONE, tuple(lines))


# B9's "30-60% loss" on call traffic: a call-like flow that loses at least this share of
# its packets (and at least LOSS_MIN_LOST packets, so a short flow's noise cannot
# trigger it) while the control's flow to the same peer loses at most CONTROL_LOSS_MAX.
# Only with a control: loss alone is as likely a bad uplink as a censor.
LOSS_THRESHOLD = 0.15
LOSS_MIN_LOST = 10
CONTROL_LOSS_MAX = 0.05


def _flow_loss(o: Observation) -> tuple[float, int] | None:
    """(loss share, packets sent) of a completed call-like flow, or None."""
    flow = _flow(o)
    if flow is None or flow.loss is None or flow.sent <= 0:
        return None
    return flow.loss, flow.sent


def sustained_loss(ctx: Context, attempts: Sequence[Observation]) -> Finding | None:
    """A call flow that worked, but lost a sustained share of packets the control did not."""
    for o in attempts:
        mine = _flow_loss(o) if o.base == "stun" else None
        if mine is None or mine[0] < LOSS_THRESHOLD or mine[0] * mine[1] < LOSS_MIN_LOST:
            continue
        ctl = ctx.control_for(o)
        theirs = _flow_loss(ctl) if ctl is not None and ctl.ok else None
        if theirs is None or theirs[0] > CONTROL_LOSS_MAX:
            continue
        why = (
            f"sustained loss: {mine[0]:.0%} of {mine[1]} packets of a call-like flow lost "
            f"(threshold {LOSS_THRESHOLD:.0%}); the control lost {theirs[0]:.0%} of {theirs[1]}"
        )
        assert ctl is not None  # theirs came from it
        return Finding(Verdict.UDP_BLOCKING, STRONG, (describe(o), describe_control(ctl), why))
    return None
