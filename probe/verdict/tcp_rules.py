"""Rules for TCP beyond the handshake: connect, held connections, application exchanges,
transfers.

A connect that fails (B2) where the control connects is an IP block; a connection killed
right after the handshake, or an application's first message (MTProto, WhatsApp Noise)
left unanswered, is protocol filtering; a transfer that stalls after some bytes (B5, B7)
or crawls (B6) is a stall or throttling.
"""

from __future__ import annotations

from ..evidence import ExchangeEvidence, TransferEvidence, TransferSummary
from ..model import Failure
from .context import Context, by_control, control_connected
from .handshake_rules import progressed
from .observations import Observation, describe
from .vocabulary import CERTAIN, FAIR, GOOD, NONE, STRONG, WEAK, Finding, Verdict


def connect_rule(ctx: Context, o: Observation) -> Finding:
    """B2: SYN dropped (timeout) or answered by RST (refused) / ICMP (unreachable).

    Without a control, a connect failure counts (weakly) only when something shows this
    vantage is alive: another endpoint works, or another address of this one does --
    the latter is how a partial block inside one endpoint is not hidden."""
    through = [r for r in ctx.results if r.connected and (r.address, r.port) == (o.address, o.port)]
    if through:
        # an IP block stops every connection to the address and port, not one of several
        why = "another connection to the same address and port got through in this round"
        return Finding(Verdict.INCONCLUSIVE, NONE, (describe(o), describe(through[0]), why))
    sibling = ctx.sibling_connects(o)
    alive = ctx.others_ok or sibling
    why = "connect fails"
    if sibling:
        why += "; another address of this endpoint connects"
    elif ctx.others_ok:
        why += "; other endpoints reachable from this vantage"
    return by_control(
        ctx,
        o,
        Verdict.IP_BLOCKING,
        with_control=STRONG,
        without=WEAK if alive else None,
        why=why,
        passes=control_connected,
    )


def transfer_rule(ctx: Context, o: Observation) -> Finding:
    """B7 freeze, B5 post-handshake stall, B6 throttling."""
    summary = o.evidence.summary if isinstance(o.evidence, TransferEvidence) else None
    if o.kind == Failure.STALL_AFTER_BYTES:
        why = _stalls(summary)
        if summary and summary.stalled_connections == 1 and summary.connections_attempted > 1:
            return _lone_stall(o, summary, why)
        return by_control(
            ctx, o, Verdict.STALL_AFTER_BYTES, with_control=CERTAIN, without=GOOD, why=why
        )
    if o.kind == Failure.THROTTLED:
        median, limit = (summary.median_kbps, summary.throttle_kbps) if summary else (None, None)
        why = f"median {median} kbps below {limit} kbps"
        return by_control(ctx, o, Verdict.THROTTLING, with_control=STRONG, without=FAIR, why=why)
    if o.kind == Failure.GENERIC_TIMEOUT:
        why = "handshake done, then no application data (B5 stall)"
        return by_control(
            ctx, o, Verdict.STALL_AFTER_BYTES, with_control=GOOD, without=WEAK, why=why
        )
    return by_control(
        ctx, o, Verdict.PROTOCOL_FILTERING, with_control=GOOD, without=None, why="transfer broken"
    )


def _stalls(summary: TransferSummary | None) -> str:
    """``2 of 3 connections stalled at 15000, 15000 bytes`` (wire bytes when recorded)."""
    if summary is None:
        return "connections stalled (no summary recorded)"
    stalled = summary.stalled_at_wire_bytes or summary.stalled_at_bytes
    at = f" at {', '.join(str(b) for b in stalled[:4])} bytes" if stalled else ""
    attempted = summary.connections_attempted or "?"
    return f"{summary.stalled_connections} of {attempted} connections stalled{at}"


def _lone_stall(o: Observation, summary: TransferSummary, why: str) -> Finding:
    """One confirmed stall next to connections that did not stall: not reproduced, so no
    freeze is claimed.  On a slow path (their median rate below the threshold) the
    silence is the path's congestion: throttling."""
    median, limit = summary.median_kbps, summary.throttle_kbps
    why += "; the other connections did not stall: not reproduced"
    if median is not None and median < limit:
        why += f"; they ran at a median {median} kbps, below {limit} kbps: a slow path"
        return Finding(Verdict.THROTTLING, FAIR, (describe(o), why))
    return Finding(Verdict.INCONCLUSIVE, NONE, (describe(o), why))


def held_connection_rule(ctx: Context, o: Observation) -> Finding:
    """A held TCP connection (``tcp`` with ``hold_s``) reset or closed right after the
    handshake: the address is cut off, whatever was to be sent."""
    reset = o.kind == Failure.CONNECTION_RESET
    return by_control(
        ctx,
        o,
        Verdict.IP_BLOCKING,
        with_control=GOOD,
        without=WEAK if reset and ctx.others_ok else None,
        why="connection killed after the TCP handshake",
    )


def application_rule(ctx: Context, o: Observation) -> Finding:
    """TCP connected, then the first application bytes (MTProto, Noise) kill the flow."""
    received = o.evidence.bytes_received if isinstance(o.evidence, ExchangeEvidence) else None
    if o.kind == Failure.GENERIC_TIMEOUT and received is not None and received > 0:
        # part of the server's answer arrived before the time ran out: a slow path
        return progressed(o, f"{received} bytes of the reply")
    telling = o.kind in (Failure.CONNECTION_RESET, Failure.GENERIC_TIMEOUT)
    return by_control(
        ctx,
        o,
        Verdict.PROTOCOL_FILTERING,
        with_control=STRONG,
        without=WEAK if telling and ctx.others_ok else None,
        why="TCP connects; the application's first message is not answered",
    )
