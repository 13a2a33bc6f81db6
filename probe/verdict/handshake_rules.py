"""Rules for a broken TLS or QUIC handshake: SNI filtering, ClientHello filtering, MITM.

A handshake that broke before the server answered, reproduced, while a neutral SNI gets
through on the same address, is SNI filtering (B3); the ClientHello swaps say what else
the filter keys on (B4).  A certificate that does not verify where the control's does is
a MITM.  A handshake the server answered (`server_progress`) met a slow path, not a filter.
"""

from __future__ import annotations

from ..evidence import (
    CertificateEvidence,
    QuicDatagrams,
    QuicEvidence,
    TlsEvidence,
    TransferEvidence,
)
from ..model import Failure
from .context import Context, endpoint_down
from .observations import Observation, describe, describe_control
from .vocabulary import CERTAIN, FAIR, GOOD, NONE, STRONG, WEAK, Finding, Verdict

# A certificate that did not verify: on a public service, a MITM unless the control sees it too
CERTIFICATE_FAILURES = frozenset(
    {Failure.SSL_INVALID_HOSTNAME, Failure.SSL_UNKNOWN_AUTHORITY, Failure.SSL_INVALID_CERTIFICATE}
)
# The handshake broke after the ClientHello: reset, silence, FIN, or an alert
TLS_INTERFERENCE = frozenset(
    {Failure.CONNECTION_RESET, Failure.GENERIC_TIMEOUT, Failure.EOF, Failure.SSL_FAILED_HANDSHAKE}
)
# Nothing came back in time
SILENCE = frozenset({Failure.GENERIC_TIMEOUT, Failure.UDP_NO_RESPONSE})


# Server messages that prove the handshake got past the ClientHello: the server answered
# it.  An alert or non-TLS bytes alone do not (a censor can inject those).
_PROGRESS_MESSAGES = frozenset(
    {"server_hello", "certificate", "encrypted", "server_key_exchange", "server_hello_done"}
)
_QUIC_PROGRESS = frozenset({"initial", "handshake", "0RTT", "1RTT"})


def server_progress(o: Observation) -> str | None:
    """What the server sent in a failed TLS/QUIC handshake, when it proves the handshake
    got past the ClientHello (``None``: no server byte, only an alert, or not recorded).
    An SNI filter (B3) or a QUIC v1 filter (B8) acts right after the first packet; a
    handshake the server answered and that then ran out of time met a slow path."""
    ev = o.evidence
    if isinstance(ev, QuicEvidence):
        return _quic_progress(o, ev.datagrams)
    hs = ev.handshake if isinstance(ev, TlsEvidence | TransferEvidence) else None
    if hs is None:
        return None
    messages, received = hs.server_messages, hs.bytes_received
    if _PROGRESS_MESSAGES & set(messages):
        return f"{received} server bytes ({', '.join(messages[:4])})"
    if not messages and received > 0 and o.kind in SILENCE:
        return f"{received} server bytes"  # a record without message names
    return None


def _quic_progress(o: Observation, datagrams: QuicDatagrams | None) -> str | None:
    if datagrams is None:
        return None
    types = datagrams.server_packet_types
    if types is None:
        # a record from before packet types were kept: the datagram count stands in
        received = datagrams.datagrams_received
        if received > 0 and "quic_vn_lists_our_version" not in o.flags:
            return f"{received} datagrams from the server"
        return None
    # A version negotiation is no handshake progress (a v1 filter lets it through)
    handshake = [t for t in types if t in _QUIC_PROGRESS]
    return f"QUIC {', '.join(handshake)} packets from the server" if handshake else None


def progressed(o: Observation, progress: str) -> Finding:
    why = f"the server answered ({progress}), then the handshake ran out of time or broke"
    why += ": a slow path or an outage, not a filter acting on the first packet"
    return Finding(Verdict.INCONCLUSIVE, NONE, (describe(o), why))


def tls_interference_rule(ctx: Context, o: Observation) -> Finding:
    """B3 and B4: the handshake broke after the ClientHello; the neutral-SNI swap says
    whether the name is the trigger, the ClientHello swaps what else the filter keys on."""
    return _client_hello_tests(ctx, o, _handshake_interference(ctx, o))


def _handshake_interference(ctx: Context, o: Observation) -> Finding:
    """B3: reset/silence/FIN/alert after the ClientHello; the neutral-SNI swap decides."""
    ctl = ctx.control_for(o)
    if ctl is not None and not ctl.ok:
        return endpoint_down(o, ctl)
    progress = server_progress(o)
    if progress is not None:
        return progressed(o, progress)
    unreproduced = _unreproduced_handshake_failure(ctx, o)
    if unreproduced is not None:
        return unreproduced
    handshake = o.evidence.handshake if isinstance(o.evidence, TlsEvidence) else None
    stage = handshake.stage if handshake is not None else None
    lines = [describe(o) + (f", {stage}" if stage else "")]
    if ctl is not None:
        lines.append(describe_control(ctl))
    swaps = ctx.swaps("tls", "neutral_sni", o)
    lines += [describe(s) for s in swaps]
    # A certificate error in the swap still proves the handshake got through: the
    # server answered a neutral name with its own (mismatching) certificate.
    through = [s for s in swaps if s.ok or s.kind in CERTIFICATE_FAILURES]
    if through:
        confidence = CERTAIN if ctl is not None else STRONG
        if any(s.ok for s in through):
            lines.append("the same address completes the handshake with a neutral SNI")
        else:
            lines.append(
                "a neutral SNI gets the server's certificate (name mismatch): the handshake "
                "gets through without the blocked name"
            )
        return Finding(Verdict.TLS_SNI_FILTERING, confidence, tuple(lines))
    if swaps:
        if ctl is None:
            lines.append("a neutral SNI fails too and no control: a broken server looks the same")
            return Finding(Verdict.INCONCLUSIVE, NONE, tuple(lines))
        lines.append(
            "a neutral SNI fails too: not SNI-specific (ClientHello fingerprint, "
            "address-wide filter, or residual blocking)"
        )
        return Finding(Verdict.PROTOCOL_FILTERING, FAIR, tuple(lines))
    if ctl is None:
        lines.append("no neutral-SNI swap and no control")
        return Finding(Verdict.INCONCLUSIVE, NONE, tuple(lines))
    lines.append("no neutral-SNI swap: SNI filtering is the usual cause, not proven")
    return Finding(Verdict.TLS_SNI_FILTERING, FAIR, tuple(lines))


def _unreproduced_handshake_failure(ctx: Context, o: Observation) -> Finding | None:
    """Agreement before accusation, across every handshake with the same name to the same
    address and port in the round (``tls``, its repeat, ``transfer``'s connections): one
    that completed, or a failure nothing reproduced, is no filter (random loss can starve
    one handshake of every server byte).  None when the failures agree."""
    same = [
        r
        for r in ctx.results
        if r.base in ("tls", "transfer")
        and r.is_attempt
        and (r.address, r.port) == (o.address, o.port)
        and _same_name(r, o)
    ]
    completed = [
        r for r in same if r.ok or r.failed_operation not in (None, "connect", "tls_handshake")
    ]
    if completed:
        why = "the same name's handshake completes on this address in this round: not a filter"
        return Finding(Verdict.INCONCLUSIVE, NONE, (describe(o), describe(completed[0]), why))
    failed = [
        r
        for r in same
        if r.failed_operation == "tls_handshake"
        and r.kind in TLS_INTERFERENCE
        and server_progress(r) is None
    ]
    if len(failed) < 2:
        why = "one handshake failed and nothing reproduced it (no repeat failed alike)"
        return Finding(Verdict.INCONCLUSIVE, NONE, (describe(o), why))
    return None


def _offered_name(o: Observation) -> tuple[bool, str | None]:
    """(whether the attempt recorded what it offered, the SNI it offered: None for none)."""
    ev = o.evidence
    offer = ev.offer if isinstance(ev, TlsEvidence) else None
    request = ev.request if isinstance(ev, TransferEvidence) else None
    if offer is not None:
        return True, offer.sni
    if request is not None:
        return True, request.sni
    return False, None


def _same_name(a: Observation, b: Observation) -> bool:
    """Two handshakes offered the same SNI, as far as their records say."""
    (a_known, a_sni), (b_known, b_sni) = _offered_name(a), _offered_name(b)
    return not (a_known and b_known) or a_sni == b_sni


def _client_hello_tests(ctx: Context, o: Observation, finding: Finding) -> Finding:
    """B4: the same SNI in another ClientHello shape (``tls/other_shape``) and the same
    ClientHello in two TCP segments (``tls/split_hello``), read next to the neutral-SNI
    swap: SNI-keyed or fingerprint-keyed, and does the censor reassemble?"""
    shape = ctx.swaps("tls", "other_shape", o)
    split = ctx.swaps("tls", "split_hello", o)
    if (not shape and not split) or finding.verdict in (Verdict.OK, Verdict.ENDPOINT_DOWN):
        return finding
    notes: list[str] = []  # read first: the evidence list is bounded
    verdict, confidence = finding.verdict, finding.confidence
    shape_through = any(s.ok or s.kind in CERTIFICATE_FAILURES for s in shape)
    if shape and finding.verdict == Verdict.TLS_SNI_FILTERING:
        notes.append(
            "another ClientHello shape with the same SNI gets through: the filter keys on "
            "the ClientHello fingerprint together with the SNI"
            if shape_through
            else "another ClientHello shape with the same SNI is blocked too: the filter "
            "keys on the SNI"
        )
    elif shape_through:
        # The neutral SNI failed as well (or did not run), yet the blocked name passes in
        # another ClientHello: only the shape differs, so the shape is the trigger (B4).
        notes.append(
            "another ClientHello shape (other cipher suites and extensions) with the same "
            "SNI gets through: the filter keys on the ClientHello fingerprint (B4)"
        )
        verdict = Verdict.PROTOCOL_FILTERING
        confidence = CERTAIN if ctx.control_for(o) is not None else STRONG
    if any(s.ok or s.kind in CERTIFICATE_FAILURES for s in split):
        notes.append(
            "the same ClientHello split across two TCP segments gets through: the censor "
            "matches per packet and does not reassemble"
        )
    elif split:
        notes.append(
            "the same ClientHello split across two TCP segments is blocked too: the censor "
            "reassembles, or what it keys on sits in one segment"
        )
    tried = [describe(s) for s in (*shape, *split)]
    head, rest = finding.evidence[:1], finding.evidence[1:]
    return Finding(verdict, confidence, (*head, *notes, *tried, *rest))


def _certificate(o: Observation) -> CertificateEvidence | None:
    ev = o.evidence
    return ev.certificate if isinstance(ev, TlsEvidence | QuicEvidence) else None


def _fingerprint(o: Observation) -> str | None:
    certificate = _certificate(o)
    return certificate.sha256 if certificate is not None and certificate.sha256 else None


def certificate_rule(ctx: Context, o: Observation) -> Finding:
    """A certificate that does not verify where the control sees a valid one: MITM."""
    ctl = ctx.control_for(o)
    mine = _fingerprint(o)
    lines = [describe(o)]
    certificate = _certificate(o)
    if certificate is not None and certificate.issuer:
        lines.append(f"certificate issuer {certificate.issuer[:80]}")
    if ctl is None:
        if o.kind == Failure.SSL_UNKNOWN_AUTHORITY:
            lines.append("untrusted issuer on a public service; no control to compare")
            return Finding(Verdict.TLS_MITM, WEAK, tuple(lines))
        lines.append("no control to tell a MITM from a misconfigured server")
        return Finding(Verdict.INCONCLUSIVE, NONE, tuple(lines))
    lines.append(describe_control(ctl))
    theirs = _fingerprint(ctl)
    differ = bool(mine and theirs and mine != theirs)
    if mine and theirs and differ:
        lines.append(f"certificate sha256 {mine[:16]}… differs from the control's {theirs[:16]}…")
    if ctl.ok:
        if mine is not None and mine == theirs:
            lines.append("same certificate as the control: this vantage's trust store differs")
            return Finding(Verdict.INCONCLUSIVE, WEAK, tuple(lines))
        return Finding(Verdict.TLS_MITM, CERTAIN if differ else STRONG, tuple(lines))
    if differ and ctl.kind in CERTIFICATE_FAILURES:
        return Finding(Verdict.TLS_MITM, GOOD, tuple(lines))
    return endpoint_down(o, ctl)
