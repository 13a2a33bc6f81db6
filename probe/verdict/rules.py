"""The rules: what one failed attempt means, given what else the endpoint and the control saw.

Each rule reads the evidence of one failure (connect, TLS handshake, certificate, QUIC,
QUIC version negotiation, STUN, transfer, application exchange) next to the swap tests
and repeats on the same address and port and the control vantage's run of the same probe,
and returns a `Finding`.  The evidence that triggers each verdict is in
``docs/verdicts.md``.
"""

from __future__ import annotations

from collections.abc import Sequence

from ..model import Failure
from .context import Context, by_control, connected, endpoint_down
from .observations import Observation, as_sequence, describe, describe_control, detail_mapping
from .vocabulary import CERTAIN, FAIR, GOOD, NONE, STRONG, WEAK, Finding, Verdict

_CERT = frozenset(
    {Failure.SSL_INVALID_HOSTNAME, Failure.SSL_UNKNOWN_AUTHORITY, Failure.SSL_INVALID_CERTIFICATE}
)
_TLS_INTERFERENCE = frozenset(
    {Failure.CONNECTION_RESET, Failure.GENERIC_TIMEOUT, Failure.EOF, Failure.SSL_FAILED_HANDSHAKE}
)
_SILENCE = frozenset({Failure.GENERIC_TIMEOUT, Failure.UDP_NO_RESPONSE})
# ICMP answered a UDP datagram: the address/port is dropped, whatever the payload was
_ICMP = frozenset(
    {Failure.CONNECTION_REFUSED, Failure.HOST_UNREACHABLE, Failure.NETWORK_UNREACHABLE}
)

# Server messages that prove the handshake got past the ClientHello: the server answered
# it.  An alert or non-TLS bytes alone do not (a censor can inject those).
_PROGRESS_MESSAGES = frozenset(
    {"server_hello", "certificate", "encrypted", "server_key_exchange", "server_hello_done"}
)


_QUIC_PROGRESS = frozenset({"initial", "handshake", "0RTT", "1RTT"})


def _server_progress(o: Observation) -> str | None:
    """What the server sent in a failed TLS/QUIC handshake, when it proves the handshake
    got past the ClientHello (``None``: no server byte, only an alert, or not recorded).
    An SNI filter (B3) or a QUIC v1 filter (B8) acts right after the first packet; a
    handshake the server answered and that then ran out of time met a slow path."""
    if o.base == "quic":
        # A version negotiation is no handshake progress (a v1 filter lets it through)
        types = o.details.get("server_packet_types")
        if isinstance(types, list | tuple):
            handshake = [str(t) for t in types if t in _QUIC_PROGRESS]
            return f"QUIC {', '.join(handshake)} packets from the server" if handshake else None
        received = o.details.get("datagrams_received")  # a record without packet types
        vn_only = "quic_vn_lists_our_version" in o.flags
        if isinstance(received, int) and received > 0 and not vn_only:
            return f"{received} datagrams from the server"
        return None
    hs = detail_mapping(o, "handshake")
    messages = [str(m) for m in as_sequence(hs.get("server_messages"))]
    received = hs.get("bytes_received")
    if _PROGRESS_MESSAGES & set(messages):
        return f"{received} server bytes ({', '.join(messages[:4])})"
    if not messages and isinstance(received, int) and received > 0 and o.kind in _SILENCE:
        return f"{received} server bytes"  # a record without message names
    return None


def _progressed(o: Observation, progress: str) -> Finding:
    why = f"the server answered ({progress}), then the handshake ran out of time or broke"
    why += ": a slow path or an outage, not a filter acting on the first packet"
    return Finding(Verdict.INCONCLUSIVE, NONE, (describe(o), why))


def _connect_rule(ctx: Context, o: Observation) -> Finding:
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
        passes=connected,
    )


def _tls_interference_rule(ctx: Context, o: Observation) -> Finding:
    """B3: reset/silence/FIN/alert after the ClientHello; the neutral-SNI swap decides."""
    ctl = ctx.control_for(o)
    if ctl is not None and not ctl.ok:
        return endpoint_down(o, ctl)
    progress = _server_progress(o)
    if progress is not None:
        return _progressed(o, progress)
    unreproduced = _unreproduced_handshake_failure(ctx, o)
    if unreproduced is not None:
        return unreproduced
    stage = detail_mapping(o, "handshake").get("stage")
    lines = [describe(o) + (f", {stage}" if stage else "")]
    if ctl is not None:
        lines.append(describe_control(ctl))
    swaps = ctx.swaps("tls", "neutral_sni", o)
    lines += [describe(s) for s in swaps]
    # A certificate error in the swap still proves the handshake got through: the
    # server answered a neutral name with its own (mismatching) certificate.
    through = [s for s in swaps if s.ok or s.kind in _CERT]
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
        and r.details.get("sni", o.details.get("sni")) == o.details.get("sni", r.details.get("sni"))
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
        and r.kind in _TLS_INTERFERENCE
        and _server_progress(r) is None
    ]
    if len(failed) < 2:
        why = "one handshake failed and nothing reproduced it (no repeat failed alike)"
        return Finding(Verdict.INCONCLUSIVE, NONE, (describe(o), why))
    return None


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
    shape_through = any(s.ok or s.kind in _CERT for s in shape)
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
    if any(s.ok or s.kind in _CERT for s in split):
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


def _fingerprint(o: Observation) -> str | None:
    sha = detail_mapping(o, "certificate").get("sha256")
    return str(sha) if sha else None


def _certificate_rule(ctx: Context, o: Observation) -> Finding:
    """A certificate that does not verify where the control sees a valid one: MITM."""
    ctl = ctx.control_for(o)
    mine = _fingerprint(o)
    lines = [describe(o)]
    issuer = detail_mapping(o, "certificate").get("issuer")
    if issuer:
        lines.append(f"certificate issuer {str(issuer)[:80]}")
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
    if differ and ctl.kind in _CERT:
        return Finding(Verdict.TLS_MITM, GOOD, tuple(lines))
    return endpoint_down(o, ctl)


def _quic_rule(ctx: Context, o: Observation) -> Finding:
    """B8: the v1 handshake is silent while a version-negotiation probe is answered."""
    if o.kind in _CERT:
        return _certificate_rule(ctx, o)
    ctl = ctx.control_for(o)
    if ctl is not None and not ctl.ok:
        return endpoint_down(o, ctl)
    progress = _server_progress(o)
    if progress is not None and o.kind in _SILENCE:
        return _progressed(o, progress)
    vn = ctx.runs_at("quic_vn", o)
    lines = [describe(o), *(describe(v) for v in vn)]
    if ctl is not None:
        lines.append(describe_control(ctl))
    answered = [v for v in vn if v.ok]
    if o.kind in _SILENCE:
        if answered:
            offers_v1 = [v.details.get("offers_quic_v1") for v in answered]
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
    if ctl is not None:
        lines.append("the control completes the QUIC handshake")
        verdict = Verdict.UDP_BLOCKING if o.kind in _ICMP else Verdict.QUIC_FILTERING
        return Finding(verdict, GOOD, tuple(lines))
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


def _quic_vn_rule(ctx: Context, o: Observation) -> Finding:
    ctl = ctx.control_for(o)
    if ctl is not None and not ctl.ok:
        return endpoint_down(o, ctl)
    if o.kind in _SILENCE or o.kind in _ICMP:
        lines = [describe(o)] + ([describe_control(ctl)] if ctl is not None else [])
        return _udp_silence(ctx, o, lines, ctl)
    return by_control(
        ctx, o, Verdict.QUIC_FILTERING, with_control=FAIR, without=None, why="unexpected reply"
    )


def _stun_rule(ctx: Context, o: Observation) -> Finding:
    """B9: STUN silence, a flow cut off after t seconds, STUN-shaped vs random UDP."""
    cutoff = o.details.get("cutoff_s")
    if o.details.get("mode") == "flow" and isinstance(cutoff, int | float) and cutoff > 0:
        why = f"replies stopped for good {cutoff} s into the flow"
        return by_control(ctx, o, Verdict.UDP_BLOCKING, with_control=CERTAIN, without=GOOD, why=why)
    if o.kind != Failure.UDP_NO_RESPONSE:
        if o.kind in _ICMP:
            return by_control(
                ctx,
                o,
                Verdict.UDP_BLOCKING,
                with_control=GOOD,
                without=None,
                why="ICMP unreachable",
            )
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
    replied = [r for r in random_udp if detail_mapping(r, "control").get("replied")]
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
    d = o.details
    loss, sent = d.get("loss"), d.get("sent")
    if d.get("mode") != "flow" or not isinstance(loss, int | float):
        return None
    if not isinstance(sent, int) or isinstance(sent, bool) or sent <= 0:
        return None
    return float(loss), sent


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


def _transfer_rule(ctx: Context, o: Observation) -> Finding:
    """B7 freeze, B5 post-handshake stall, B6 throttling."""
    d = o.details
    if o.kind == Failure.STALL_AFTER_BYTES:
        stalled = as_sequence(d.get("stalled_at_wire_bytes") or d.get("stalled_at_bytes"))
        count, attempted = d.get("stalled_connections"), d.get("connections_attempted")
        why = f"{count if count is not None else '?'} of {attempted or '?'} "
        why += f"connections stalled at {', '.join(str(b) for b in stalled[:4])} bytes"
        if count == 1 and isinstance(attempted, int) and attempted > 1:
            return _lone_stall(o, why)
        return by_control(
            ctx, o, Verdict.STALL_AFTER_BYTES, with_control=CERTAIN, without=GOOD, why=why
        )
    if o.kind == Failure.THROTTLED:
        why = f"median {d.get('median_kbps')} kbps below {d.get('throttle_kbps')} kbps"
        return by_control(ctx, o, Verdict.THROTTLING, with_control=STRONG, without=FAIR, why=why)
    if o.kind == Failure.GENERIC_TIMEOUT:
        why = "handshake done, then no application data (B5 stall)"
        return by_control(
            ctx, o, Verdict.STALL_AFTER_BYTES, with_control=GOOD, without=WEAK, why=why
        )
    return by_control(
        ctx, o, Verdict.PROTOCOL_FILTERING, with_control=GOOD, without=None, why="transfer broken"
    )


def _lone_stall(o: Observation, why: str) -> Finding:
    """One confirmed stall next to connections that did not stall: not reproduced, so no
    freeze is claimed.  On a slow path (their median rate below the threshold) the
    silence is the path's congestion: throttling."""
    d = o.details
    median, limit = d.get("median_kbps"), d.get("throttle_kbps")
    why += "; the other connections did not stall: not reproduced"
    if isinstance(median, int | float) and isinstance(limit, int | float) and median < limit:
        why += f"; they ran at a median {median} kbps, below {limit} kbps: a slow path"
        return Finding(Verdict.THROTTLING, FAIR, (describe(o), why))
    return Finding(Verdict.INCONCLUSIVE, NONE, (describe(o), why))


def _app_rule(ctx: Context, o: Observation) -> Finding:
    """TCP connected, then the first application bytes (MTProto, Noise) kill the flow."""
    if o.base == "tcp":  # a held connection reset or closed right after the handshake
        reset = o.kind == Failure.CONNECTION_RESET
        return by_control(
            ctx,
            o,
            Verdict.IP_BLOCKING,
            with_control=GOOD,
            without=WEAK if reset and ctx.others_ok else None,
            why="connection killed after the TCP handshake",
        )
    received = o.details.get("bytes_received")
    if o.kind == Failure.GENERIC_TIMEOUT and isinstance(received, int) and received > 0:
        # part of the server's answer arrived before the time ran out: a slow path
        return _progressed(o, f"{received} bytes of the reply")
    telling = o.kind in (Failure.CONNECTION_RESET, Failure.GENERIC_TIMEOUT)
    return by_control(
        ctx,
        o,
        Verdict.PROTOCOL_FILTERING,
        with_control=STRONG,
        without=WEAK if telling and ctx.others_ok else None,
        why="TCP connects; the application's first message is not answered",
    )


def judge_failure(ctx: Context, o: Observation) -> Finding:
    if o.base == "quic":
        return _quic_rule(ctx, o)
    if o.base == "quic_vn":
        return _quic_vn_rule(ctx, o)
    if o.base == "stun" and o.l4 == "udp":
        return _stun_rule(ctx, o)
    if o.failed_operation == "connect":
        return _connect_rule(ctx, o)
    if o.failed_operation == "tls_handshake":
        if o.kind in _CERT:
            return _certificate_rule(ctx, o)
        if o.kind in _TLS_INTERFERENCE:
            return _client_hello_tests(ctx, o, _tls_interference_rule(ctx, o))
    if o.base == "transfer":
        return _transfer_rule(ctx, o)
    return _app_rule(ctx, o)
