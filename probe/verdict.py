"""The verdict engine: one round's observations in, per-endpoint and per-service verdicts out.

Pure functions, no I/O.  Input is whatever a round produced -- `ProbeResult`s from
`probe.round`, `Observation`s built by the lab, or the JSON records of ``/api/results``
(`probe.statuspage.results_json`) from a *control* vantage -- so the engine does not care
how results were gathered.  The rules and the evidence that triggers each are in
``docs/verdicts.md``; this docstring only draws the shape.

How an endpoint is judged
-------------------------
1. ``ipv6_unavailable`` skips are dropped (never counted); only ``vantage_offline``
   skips -> ``vantage_offline``.
2. DNS results (every resolver, swaps included) give one DNS finding: tampering when
   the system/UDP resolver lies while TCP/DoH (or the control vantage) answer.
3. Every other result belongs to a *path*: (l4, address, port).  On a path, each
   probe's first run and its repeats are *attempts*; swap results (``tls/neutral_sni``,
   ``quic_vn/swap``, ``stun/random_udp``) are only consulted by the rules.  A failed
   attempt is judged by the rule for what failed (connect, TLS handshake, certificate,
   QUIC, STUN silence, transfer stall/throttle, application exchange), with the
   control vantage's result for the same probe/address/port when there is one.
4. Endpoint: DNS tampering wins; otherwise blocked paths next to working paths of the
   same kind (tcp or udp) -> ``partial`` with the blocked fraction; all blocked -> the
   dominant blocking verdict; none blocked -> ``ok``, ``endpoint_down`` or
   ``inconclusive``.

A service is ``partial`` as soon as some endpoints are blocked and others work --
never OONI's "ok if any endpoint works".

Confidence is an ordering, not a probability: a verdict isolated by a swap test or a
control vantage ranks above a bare signature, which ranks above "consistent with
censorship but equally with an outage".
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from enum import StrEnum
from typing import Any

from .model import Failure, ProbeResult, SkipReason, failure_kind, freeze

__all__ = [
    "ALLOWLIST_FLAG",
    "BLOCKING",
    "EndpointVerdict",
    "Observation",
    "ServiceVerdict",
    "Verdict",
    "from_api",
    "from_record",
    "from_result",
    "judge_endpoint",
    "judge_round",
    "judge_service",
    "normalise",
]


class Verdict(StrEnum):
    """Closed verdict vocabulary (one exported series per value)."""

    OK = "ok"
    DNS_TAMPERING = "dns_tampering"  # nxdomain / bogon / inconsistent / injected
    IP_BLOCKING = "ip_blocking"  # blackhole or reset on connect
    TLS_SNI_FILTERING = "tls_sni_filtering"
    TLS_MITM = "tls_mitm"
    # ours beyond the brief's list: TCP connects, the application's first bytes kill
    # the flow (MTProto, WhatsApp Noise, TLS with any SNI) while the control completes
    PROTOCOL_FILTERING = "protocol_filtering"
    QUIC_FILTERING = "quic_filtering"
    UDP_BLOCKING = "udp_blocking"
    THROTTLING = "throttling"
    STALL_AFTER_BYTES = "stall_after_bytes"
    PARTIAL = "partial"  # some paths/endpoints blocked, others not (blocked_fraction)
    ENDPOINT_DOWN = "endpoint_down"  # the control vantage fails the same way
    VANTAGE_OFFLINE = "vantage_offline"
    # only domestic destinations answer (FIELD.md B10): a state of the network, not a block
    ALLOWLIST_REGIME = "allowlist_regime"
    INCONCLUSIVE = "inconclusive"


# Which blocking verdict names an endpoint when several hold, most telling first: a DNS
# lie stops an ordinary client before any packet reaches the service; a MITM is worse
# than a block; IP blocks are coarser than the filters below them.
_PRIORITY: tuple[Verdict, ...] = (
    Verdict.DNS_TAMPERING,
    Verdict.TLS_MITM,
    Verdict.IP_BLOCKING,
    Verdict.TLS_SNI_FILTERING,
    Verdict.PROTOCOL_FILTERING,
    Verdict.QUIC_FILTERING,
    Verdict.UDP_BLOCKING,
    Verdict.STALL_AFTER_BYTES,
    Verdict.THROTTLING,
)
BLOCKING: frozenset[Verdict] = frozenset(_PRIORITY)

# Confidence levels (see the module docstring: an ordering a dashboard can threshold).
CERTAIN = 0.95  # a swap test or the control isolates the cause
STRONG = 0.85  # a direct signature with one corroboration
GOOD = 0.7  # a signature with one corroboration missing
FAIR = 0.6  # consistent with censorship; an outage explains it less well
WEAK = 0.45  # consistent with censorship; an outage explains it as well
NONE = 0.3  # inconclusive
_AGREE_BONUS = 0.05  # a repeat on a fresh connection failed the same way
_MAX_CONFIDENCE = 0.99

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
_NEGATIVE_DNS = frozenset({Failure.DNS_NXDOMAIN, Failure.DNS_NO_ANSWER})
_UDP_PROBES = frozenset({"quic", "quic_vn", "stun"})
_CLEAN_RESOLVERS = frozenset({"tcp", "doh"})  # what a censor cannot (or hardly) rewrite
_DNS_MISMATCH = frozenset({"dns_udp_tcp_mismatch", "dns_doh_mismatch", "dns_system_mismatch"})


# --------------------------------------------------------------------------- input


@dataclass(frozen=True)
class Observation:
    """The normalised form of one result, whoever produced it.

    ``probe`` is the label as shown and exported (``tls`` or ``tls/neutral_sni``).
    ``details`` and ``flags`` are optional: rules that need them (certificate
    fingerprints, DNS answers, stall byte counts) degrade to lower confidence without.
    """

    service: str
    endpoint: str
    probe: str
    address: str | None
    port: int | None
    ok: bool
    failure: str | None = None
    failed_operation: str | None = None
    resolver: str | None = None
    skipped: str | None = None
    role: str = ""
    details: Mapping[str, Any] = field(default_factory=freeze)
    flags: tuple[str, ...] = ()

    @property
    def base(self) -> str:
        return self.probe.split("/", 1)[0]

    @property
    def variant(self) -> str:
        return self.probe.partition("/")[2]

    @property
    def kind(self) -> Failure | None:
        return failure_kind(self.failure)

    @property
    def l4(self) -> str:
        if self.base == "dns":
            return "dns"
        if self.base in _UDP_PROBES and self.details.get("transport", "udp") != "tcp":
            return "udp"
        return "tcp"

    @property
    def path(self) -> tuple[str, str, int | None]:
        return (self.l4, self.address or "", self.port)

    @property
    def connected(self) -> bool:
        """A TCP handshake completed (the probe got past ``connect``)."""
        return self.l4 == "tcp" and (self.ok or self.failed_operation not in (None, "connect"))


def from_result(result: ProbeResult) -> Observation:
    t = result.target
    return Observation(
        service=t.service,
        endpoint=t.endpoint.name,
        probe=t.label,
        address=t.address,
        port=t.port,
        ok=result.ok,
        failure=result.failure,
        failed_operation=str(result.failed_operation) if result.failed_operation else None,
        resolver=t.resolver,
        skipped=str(result.skipped) if result.skipped else None,
        role=t.endpoint.role,
        details=result.details,
        flags=result.flags,
    )


def _flags(value: Any) -> tuple[str, ...]:
    """Flags from a JSON record: a list of strings (a lone string is one flag, not letters)."""
    if isinstance(value, str):
        return (value,)
    if isinstance(value, list | tuple):
        return tuple(str(v) for v in value)
    return ()


def from_record(record: Mapping[str, Any]) -> Observation:
    """From a flat result record (`probe.output.result_record`, ``/api/results``, JSON Lines)."""
    port = record.get("port")
    return Observation(
        service=str(record["service"]),
        endpoint=str(record["endpoint"]),
        probe=str(record["probe"]),
        address=record.get("address"),
        port=int(port) if port is not None else None,
        ok=bool(record.get("ok")),
        failure=record.get("failure"),
        failed_operation=record.get("failed_operation"),
        resolver=record.get("resolver"),
        skipped=record.get("skipped"),
        role=str(record.get("role") or ""),
        details=freeze(record.get("details") or {}),
        flags=_flags(record.get("flags")),
    )


def from_api(payload: Mapping[str, Any]) -> list[Observation]:
    """Every result of a control agent's ``/api/results`` document."""
    return [
        from_record(r) for r in payload.get("results", ()) if r.get("type", "result") == "result"
    ]


Item = ProbeResult | Observation | Mapping[str, Any]


def normalise(items: Iterable[Item]) -> list[Observation]:
    out = []
    for item in items:
        if isinstance(item, Observation):
            out.append(item)
        elif isinstance(item, ProbeResult):
            out.append(from_result(item))
        else:
            out.append(from_record(item))
    return out


# --------------------------------------------------------------------------- output


@dataclass(frozen=True)
class EndpointVerdict:
    """`probe.results.VerdictLike` for one endpoint."""

    service: str
    endpoint: str
    verdict: Verdict
    confidence: float
    evidence: tuple[str, ...] = ()
    blocked_fraction: float | None = None  # only for ``partial``


@dataclass(frozen=True)
class ServiceVerdict:
    """`probe.results.VerdictLike` for a whole service (``endpoint`` is always None)."""

    service: str
    verdict: Verdict
    confidence: float
    evidence: tuple[str, ...] = ()
    blocked_fraction: float | None = None  # only for ``partial``
    endpoint: None = None


@dataclass(frozen=True)
class _Finding:
    verdict: Verdict
    confidence: float
    evidence: tuple[str, ...] = ()

    @property
    def blocking(self) -> bool:
        return self.verdict in BLOCKING

    def stronger(self, note: str) -> _Finding:
        confidence = min(_MAX_CONFIDENCE, self.confidence + _AGREE_BONUS)
        return _Finding(self.verdict, confidence, (*self.evidence, note))


# --------------------------------------------------------------------------- evidence


def _hostport(address: str | None, port: int | None) -> str:
    if address is None:
        return "-" if port is None else f"port {port}"
    host = f"[{address}]" if ":" in address else address
    return host if port is None else f"{host}:{port}"


def describe(o: Observation) -> str:
    """One short evidence line: ``tls 10.0.0.5:443 connection_reset (tls_handshake)``."""
    where = (o.resolver or "system") if o.base == "dns" else _hostport(o.address, o.port)
    if o.skipped:
        return f"{o.probe} {where} skipped ({o.skipped})"
    if o.ok:
        text = f"{o.probe} {where} ok"
    else:
        failure = (o.failure or "")[:60]
        text = f"{o.probe} {where} {failure} ({o.failed_operation or '-'})"
    if o.base == "dns":
        answers = _answers(o)
        if answers:
            text += " " + ",".join(sorted(answers)[:2]) + (" …" if len(answers) > 2 else "")
    return text


def _control(o: Observation) -> str:
    return "control " + describe(o)


def _bounded(lines: Iterable[str]) -> tuple[str, ...]:
    """Evidence lines without repeats, in order.  Never truncated here: JSON output and the
    API are for machines; the table shortens what it shows (``output.shown_evidence``)."""
    return tuple(dict.fromkeys(lines))


def _mapping(o: Observation, key: str) -> Mapping[str, Any]:
    """``details[key]`` if it is a mapping: archived or hand-made records may differ."""
    value = o.details.get(key)
    return value if isinstance(value, Mapping) else {}


def _sequence(value: object) -> Sequence[Any]:
    return value if isinstance(value, list | tuple) else ()


def _answers(o: Observation) -> frozenset[str]:
    answers = _mapping(o, "answers")
    return frozenset(str(a) for qt in ("A", "AAAA") for a in _sequence(answers.get(qt)))


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
    hs = _mapping(o, "handshake")
    messages = [str(m) for m in _sequence(hs.get("server_messages"))]
    received = hs.get("bytes_received")
    if _PROGRESS_MESSAGES & set(messages):
        return f"{received} server bytes ({', '.join(messages[:4])})"
    if not messages and isinstance(received, int) and received > 0 and o.kind in _SILENCE:
        return f"{received} server bytes"  # a record without message names
    return None


def _progressed(o: Observation, progress: str) -> _Finding:
    why = f"the server answered ({progress}), then the handshake ran out of time or broke"
    why += ": a slow path or an outage, not a filter acting on the first packet"
    return _Finding(Verdict.INCONCLUSIVE, NONE, (describe(o), why))


# --------------------------------------------------------------------------- context


Passes = Callable[[Observation], bool]  # did the control get through (for this rule)?


def _succeeded(c: Observation) -> bool:
    return c.ok


def _connected(c: Observation) -> bool:
    # a failure without its operation (a trimmed control record) proves no connect
    return c.ok or c.failed_operation not in (None, "connect")


@dataclass(frozen=True)
class _Context:
    """Everything the rules may consult for one endpoint."""

    results: tuple[Observation, ...]  # this endpoint, this vantage, measured
    control: tuple[Observation, ...]  # this endpoint, the control vantage, measured
    others_ok: bool  # another endpoint succeeded from this vantage (it is not dead)

    def swaps(self, base: str, variant: str, o: Observation) -> list[Observation]:
        """Swap results of ``base/variant`` on the same address and port as ``o``."""
        return [
            r
            for r in self.results
            if r.base == base
            and r.variant == variant
            and (r.address, r.port) == (o.address, o.port)
        ]

    def runs_at(self, base: str, o: Observation) -> list[Observation]:
        """Every run of probe ``base`` (first, repeat or swap) on ``o``'s address and port."""
        return [
            r for r in self.results if r.base == base and (r.address, r.port) == (o.address, o.port)
        ]

    def sibling_connects(self, o: Observation) -> bool:
        """Another address of this same endpoint accepts TCP from this vantage: the service
        is up and reachable here, so this address failing is not a dead vantage."""
        return any(r.connected and r.address != o.address for r in self.results)

    def tcp_connected(self, address: str | None) -> list[Observation]:
        return [r for r in self.results if r.address == address and r.connected]

    def control_for(self, o: Observation, prefer: Passes = _succeeded) -> Observation | None:
        """The control's run of the same probe and port: the same address if it has one
        (seed addresses are probed from both vantages), else any address (hostname
        endpoints resolve differently per vantage); one that ``prefer``s is preferred,
        then one that failed like ``o`` (so the pick does not depend on input order)."""
        runs = [c for c in self.control if c.base == o.base and not c.variant and c.port == o.port]
        exact = [c for c in runs if c.address == o.address]
        pool = exact or runs
        for wanted in (prefer, lambda c: _same_failure(o, c)):
            found = next((c for c in pool if wanted(c)), None)
            if found is not None:
                return found
        return pool[0] if pool else None


def _same_failure(a: Observation, b: Observation) -> bool:
    return a.kind == b.kind and a.failed_operation == b.failed_operation


def _down(o: Observation, ctl: Observation) -> _Finding:
    """The control fails too: the endpoint (or the service there) is down, not blocked."""
    confidence = STRONG if _same_failure(o, ctl) else FAIR
    return _Finding(Verdict.ENDPOINT_DOWN, confidence, (describe(o), _control(ctl)))


def _inconclusive(o: Observation, why: str) -> _Finding:
    return _Finding(Verdict.INCONCLUSIVE, NONE, (describe(o), why))


def _by_control(
    ctx: _Context,
    o: Observation,
    verdict: Verdict,
    *,
    with_control: float,
    without: float | None,
    why: str,
    passes: Passes = _succeeded,
) -> _Finding:
    """The common shape: the control passing confirms ``verdict``; the control failing
    makes it an outage; no control leaves the signature alone (``without`` confidence,
    or inconclusive when the signature alone proves nothing)."""
    ctl = ctx.control_for(o, passes)
    if ctl is not None:
        if passes(ctl):
            return _Finding(verdict, with_control, (describe(o), _control(ctl), why))
        return _down(o, ctl)
    if without is None:
        return _inconclusive(o, f"{why}; no control vantage to tell censorship from an outage")
    return _Finding(verdict, without, (describe(o), why))


# --------------------------------------------------------------------------- rules


def _connect_rule(ctx: _Context, o: Observation) -> _Finding:
    """B2: SYN dropped (timeout) or answered by RST (refused) / ICMP (unreachable).

    Without a control, a connect failure counts (weakly) only when something shows this
    vantage is alive: another endpoint works, or another address of this one does --
    the latter is how a partial block inside one endpoint is not hidden."""
    through = [r for r in ctx.results if r.connected and (r.address, r.port) == (o.address, o.port)]
    if through:
        # an IP block stops every connection to the address and port, not one of several
        why = "another connection to the same address and port got through in this round"
        return _Finding(Verdict.INCONCLUSIVE, NONE, (describe(o), describe(through[0]), why))
    sibling = ctx.sibling_connects(o)
    alive = ctx.others_ok or sibling
    why = "connect fails"
    if sibling:
        why += "; another address of this endpoint connects"
    elif ctx.others_ok:
        why += "; other endpoints reachable from this vantage"
    return _by_control(
        ctx,
        o,
        Verdict.IP_BLOCKING,
        with_control=STRONG,
        without=WEAK if alive else None,
        why=why,
        passes=_connected,
    )


def _tls_interference_rule(ctx: _Context, o: Observation) -> _Finding:
    """B3: reset/silence/FIN/alert after the ClientHello; the neutral-SNI swap decides."""
    ctl = ctx.control_for(o)
    if ctl is not None and not ctl.ok:
        return _down(o, ctl)
    progress = _server_progress(o)
    if progress is not None:
        return _progressed(o, progress)
    unreproduced = _unreproduced_handshake_failure(ctx, o)
    if unreproduced is not None:
        return unreproduced
    stage = _mapping(o, "handshake").get("stage")
    lines = [describe(o) + (f", {stage}" if stage else "")]
    if ctl is not None:
        lines.append(_control(ctl))
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
        return _Finding(Verdict.TLS_SNI_FILTERING, confidence, tuple(lines))
    if swaps:
        if ctl is None:
            lines.append("a neutral SNI fails too and no control: a broken server looks the same")
            return _Finding(Verdict.INCONCLUSIVE, NONE, tuple(lines))
        lines.append(
            "a neutral SNI fails too: not SNI-specific (ClientHello fingerprint, "
            "address-wide filter, or residual blocking)"
        )
        return _Finding(Verdict.PROTOCOL_FILTERING, FAIR, tuple(lines))
    if ctl is None:
        lines.append("no neutral-SNI swap and no control")
        return _Finding(Verdict.INCONCLUSIVE, NONE, tuple(lines))
    lines.append("no neutral-SNI swap: SNI filtering is the usual cause, not proven")
    return _Finding(Verdict.TLS_SNI_FILTERING, FAIR, tuple(lines))


def _unreproduced_handshake_failure(ctx: _Context, o: Observation) -> _Finding | None:
    """Agreement before accusation, across every handshake with the same name to the same
    address and port in the round (``tls``, its repeat, ``transfer``'s connections): one
    that completed, or a failure nothing reproduced, is no filter (random loss can starve
    one handshake of every server byte).  None when the failures agree."""
    same = [
        r
        for r in ctx.results
        if r.base in ("tls", "transfer")
        and _is_repeat(r)
        and (r.address, r.port) == (o.address, o.port)
        and r.details.get("sni", o.details.get("sni")) == o.details.get("sni", r.details.get("sni"))
    ]
    completed = [
        r for r in same if r.ok or r.failed_operation not in (None, "connect", "tls_handshake")
    ]
    if completed:
        why = "the same name's handshake completes on this address in this round: not a filter"
        return _Finding(Verdict.INCONCLUSIVE, NONE, (describe(o), describe(completed[0]), why))
    failed = [
        r
        for r in same
        if r.failed_operation == "tls_handshake"
        and r.kind in _TLS_INTERFERENCE
        and _server_progress(r) is None
    ]
    if len(failed) < 2:
        why = "one handshake failed and nothing reproduced it (no repeat failed alike)"
        return _Finding(Verdict.INCONCLUSIVE, NONE, (describe(o), why))
    return None


def _client_hello_tests(ctx: _Context, o: Observation, finding: _Finding) -> _Finding:
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
    return _Finding(verdict, confidence, (*head, *notes, *tried, *rest))


def _fingerprint(o: Observation) -> str | None:
    sha = _mapping(o, "certificate").get("sha256")
    return str(sha) if sha else None


def _certificate_rule(ctx: _Context, o: Observation) -> _Finding:
    """A certificate that does not verify where the control sees a valid one: MITM."""
    ctl = ctx.control_for(o)
    mine = _fingerprint(o)
    lines = [describe(o)]
    issuer = _mapping(o, "certificate").get("issuer")
    if issuer:
        lines.append(f"certificate issuer {str(issuer)[:80]}")
    if ctl is None:
        if o.kind == Failure.SSL_UNKNOWN_AUTHORITY:
            lines.append("untrusted issuer on a public service; no control to compare")
            return _Finding(Verdict.TLS_MITM, WEAK, tuple(lines))
        lines.append("no control to tell a MITM from a misconfigured server")
        return _Finding(Verdict.INCONCLUSIVE, NONE, tuple(lines))
    lines.append(_control(ctl))
    theirs = _fingerprint(ctl)
    differ = bool(mine and theirs and mine != theirs)
    if mine and theirs and differ:
        lines.append(f"certificate sha256 {mine[:16]}… differs from the control's {theirs[:16]}…")
    if ctl.ok:
        if mine is not None and mine == theirs:
            lines.append("same certificate as the control: this vantage's trust store differs")
            return _Finding(Verdict.INCONCLUSIVE, WEAK, tuple(lines))
        return _Finding(Verdict.TLS_MITM, CERTAIN if differ else STRONG, tuple(lines))
    if differ and ctl.kind in _CERT:
        return _Finding(Verdict.TLS_MITM, GOOD, tuple(lines))
    return _down(o, ctl)


def _quic_rule(ctx: _Context, o: Observation) -> _Finding:
    """B8: the v1 handshake is silent while a version-negotiation probe is answered."""
    if o.kind in _CERT:
        return _certificate_rule(ctx, o)
    ctl = ctx.control_for(o)
    if ctl is not None and not ctl.ok:
        return _down(o, ctl)
    progress = _server_progress(o)
    if progress is not None and o.kind in _SILENCE:
        return _progressed(o, progress)
    vn = ctx.runs_at("quic_vn", o)
    lines = [describe(o), *(describe(v) for v in vn)]
    if ctl is not None:
        lines.append(_control(ctl))
    answered = [v for v in vn if v.ok]
    if o.kind in _SILENCE:
        if answered:
            offers_v1 = [v.details.get("offers_quic_v1") for v in answered]
            if False in offers_v1 and True not in offers_v1:
                lines.append("the server does not offer QUIC v1")
                return _Finding(Verdict.INCONCLUSIVE, NONE, tuple(lines))
            lines.append("version negotiation answered while the v1 handshake is dropped")
            confidence = CERTAIN if ctl is not None else (STRONG if True in offers_v1 else FAIR)
            return _Finding(Verdict.QUIC_FILTERING, confidence, tuple(lines))
        if vn:
            return _udp_silence(ctx, o, lines, ctl)
        if ctl is not None:
            lines.append("no version-negotiation probe: QUIC filtering not told from UDP blocking")
            return _Finding(Verdict.QUIC_FILTERING, FAIR, tuple(lines))
        return _Finding(Verdict.INCONCLUSIVE, NONE, (*lines, "silence alone proves nothing"))
    if ctl is not None:
        lines.append("the control completes the QUIC handshake")
        verdict = Verdict.UDP_BLOCKING if o.kind in _ICMP else Verdict.QUIC_FILTERING
        return _Finding(verdict, GOOD, tuple(lines))
    return _Finding(Verdict.INCONCLUSIVE, NONE, (*lines, "no control vantage to compare"))


def _udp_silence(
    ctx: _Context, o: Observation, lines: list[str], ctl: Observation | None
) -> _Finding:
    """QUIC v1 and version negotiation both silent: UDP to the address is dropped if TCP
    to it works (or the control gets answers), else nothing can be said."""
    tcp = ctx.tcp_connected(o.address)
    if tcp:
        lines.append(describe(tcp[0]))
        lines.append("UDP silent while TCP to the same address works")
        return _Finding(Verdict.UDP_BLOCKING, STRONG if ctl is not None else GOOD, tuple(lines))
    if ctl is not None:
        return _Finding(Verdict.UDP_BLOCKING, GOOD, (*lines, "the control is answered"))
    return _Finding(Verdict.INCONCLUSIVE, NONE, (*lines, "UDP silence alone proves nothing"))


def _quic_vn_rule(ctx: _Context, o: Observation) -> _Finding:
    ctl = ctx.control_for(o)
    if ctl is not None and not ctl.ok:
        return _down(o, ctl)
    if o.kind in _SILENCE or o.kind in _ICMP:
        lines = [describe(o)] + ([_control(ctl)] if ctl is not None else [])
        return _udp_silence(ctx, o, lines, ctl)
    return _by_control(
        ctx, o, Verdict.QUIC_FILTERING, with_control=FAIR, without=None, why="unexpected reply"
    )


def _stun_rule(ctx: _Context, o: Observation) -> _Finding:
    """B9: STUN silence, a flow cut off after t seconds, STUN-shaped vs random UDP."""
    cutoff = o.details.get("cutoff_s")
    if o.details.get("mode") == "flow" and isinstance(cutoff, int | float) and cutoff > 0:
        why = f"replies stopped for good {cutoff} s into the flow"
        return _by_control(
            ctx, o, Verdict.UDP_BLOCKING, with_control=CERTAIN, without=GOOD, why=why
        )
    if o.kind != Failure.UDP_NO_RESPONSE:
        if o.kind in _ICMP:
            return _by_control(
                ctx,
                o,
                Verdict.UDP_BLOCKING,
                with_control=GOOD,
                without=None,
                why="ICMP unreachable",
            )
        return _by_control(
            ctx,
            o,
            Verdict.PROTOCOL_FILTERING,
            with_control=FAIR,
            without=None,
            why="not a STUN reply",
        )
    if ctx.control_for(o) is not None:
        return _by_control(
            ctx, o, Verdict.UDP_BLOCKING, with_control=STRONG, without=None, why="STUN silence"
        )
    lines = [describe(o)]
    random_udp = [o, *ctx.swaps("stun", "random_udp", o)]
    for r in random_udp[1:]:
        lines.append(describe(r))
    replied = [r for r in random_udp if _mapping(r, "control").get("replied")]
    if replied:
        lines.append("random UDP of the same size to the same port is answered, STUN is not")
        return _Finding(Verdict.UDP_BLOCKING, GOOD, tuple(lines))
    if any(r.ok for r in random_udp[1:]):
        lines.append("STUN answered on the follow-up: the first silence was transient")
        return _Finding(Verdict.INCONCLUSIVE, NONE, tuple(lines))
    lines.append("STUN silence alone proves nothing without a control vantage")
    return _Finding(Verdict.INCONCLUSIVE, NONE, tuple(lines))


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


def _sustained_loss(ctx: _Context, attempts: Sequence[Observation]) -> _Finding | None:
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
        return _Finding(Verdict.UDP_BLOCKING, STRONG, (describe(o), _control(ctl), why))
    return None


def _transfer_rule(ctx: _Context, o: Observation) -> _Finding:
    """B7 freeze, B5 post-handshake stall, B6 throttling."""
    d = o.details
    if o.kind == Failure.STALL_AFTER_BYTES:
        stalled = _sequence(d.get("stalled_at_wire_bytes") or d.get("stalled_at_bytes"))
        count, attempted = d.get("stalled_connections"), d.get("connections_attempted")
        why = f"{count if count is not None else '?'} of {attempted or '?'} "
        why += f"connections stalled at {', '.join(str(b) for b in stalled[:4])} bytes"
        if count == 1 and isinstance(attempted, int) and attempted > 1:
            return _lone_stall(o, why)
        return _by_control(
            ctx, o, Verdict.STALL_AFTER_BYTES, with_control=CERTAIN, without=GOOD, why=why
        )
    if o.kind == Failure.THROTTLED:
        why = f"median {d.get('median_kbps')} kbps below {d.get('throttle_kbps')} kbps"
        return _by_control(ctx, o, Verdict.THROTTLING, with_control=STRONG, without=FAIR, why=why)
    if o.kind == Failure.GENERIC_TIMEOUT:
        why = "handshake done, then no application data (B5 stall)"
        return _by_control(
            ctx, o, Verdict.STALL_AFTER_BYTES, with_control=GOOD, without=WEAK, why=why
        )
    return _by_control(
        ctx, o, Verdict.PROTOCOL_FILTERING, with_control=GOOD, without=None, why="transfer broken"
    )


def _lone_stall(o: Observation, why: str) -> _Finding:
    """One confirmed stall next to connections that did not stall: not reproduced, so no
    freeze is claimed.  On a slow path (their median rate below the threshold) the
    silence is the path's congestion: throttling."""
    d = o.details
    median, limit = d.get("median_kbps"), d.get("throttle_kbps")
    why += "; the other connections did not stall: not reproduced"
    if isinstance(median, int | float) and isinstance(limit, int | float) and median < limit:
        why += f"; they ran at a median {median} kbps, below {limit} kbps: a slow path"
        return _Finding(Verdict.THROTTLING, FAIR, (describe(o), why))
    return _Finding(Verdict.INCONCLUSIVE, NONE, (describe(o), why))


def _app_rule(ctx: _Context, o: Observation) -> _Finding:
    """TCP connected, then the first application bytes (MTProto, Noise) kill the flow."""
    if o.base == "tcp":  # a held connection reset or closed right after the handshake
        reset = o.kind == Failure.CONNECTION_RESET
        return _by_control(
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
    return _by_control(
        ctx,
        o,
        Verdict.PROTOCOL_FILTERING,
        with_control=STRONG,
        without=WEAK if telling and ctx.others_ok else None,
        why="TCP connects; the application's first message is not answered",
    )


def _judge_failure(ctx: _Context, o: Observation) -> _Finding:
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


def _judge_attempts(ctx: _Context, attempts: Sequence[Observation]) -> _Finding:
    """First run and repeats of one probe on one path; censors are inconsistent, so a
    disagreement is reported (and lowers confidence), never averaged away."""
    failed = [a for a in attempts if not a.ok]
    passed = [a for a in attempts if a.ok]
    if not failed:
        lossy = _sustained_loss(ctx, attempts)
        return lossy or _Finding(Verdict.OK, CERTAIN, tuple(describe(a) for a in attempts))
    findings = [_judge_failure(ctx, a) for a in failed]
    finding = _strongest(findings)
    if passed:
        # Agreement before accusation: a failure the repeat does not reproduce is what
        # loss or congestion produce as well, so it accuses no one (docs/verdicts.md).
        note = f"{len(failed)} of {len(attempts)} attempts failed: not reproduced"
        note += f" ({describe(passed[0])})"
        if finding.blocking:
            return _Finding(Verdict.INCONCLUSIVE, NONE, (*finding.evidence, note))
        return _Finding(Verdict.OK, FAIR, (*finding.evidence, note))
    if len(failed) == 1:
        return finding
    same = all(_same_failure(a, failed[0]) for a in failed)
    if same and finding.blocking and any(f.verdict != finding.verdict for f in findings):
        # e.g. the first handshake got no server byte and the repeat's did: not reproduced
        note = f"{len(failed)} of {len(attempts)} attempts failed, judged differently"
        return _Finding(Verdict.INCONCLUSIVE, NONE, (*finding.evidence, note))
    if same:
        return finding.stronger(f"{len(failed)} of {len(attempts)} attempts failed the same way")
    note = f"{len(failed)} of {len(attempts)} attempts failed, in different ways"
    if finding.blocking:  # the repeat does not reproduce the failure class: no accusation
        return _Finding(Verdict.INCONCLUSIVE, NONE, (*finding.evidence, note))
    return _Finding(finding.verdict, finding.confidence, (*finding.evidence, note))


def _rank(f: _Finding) -> tuple[int, float]:
    order = _PRIORITY.index(f.verdict) if f.blocking else len(_PRIORITY)
    return (order, -f.confidence)


def _strongest(findings: Sequence[_Finding]) -> _Finding:
    """Blocking beats down beats ok beats inconclusive; among blocking, `_PRIORITY`."""
    blocking = [f for f in findings if f.blocking]
    if blocking:
        best = min(blocking, key=_rank)
        return _Finding(best.verdict, best.confidence, _merge(best, findings))
    for verdict in (Verdict.ENDPOINT_DOWN, Verdict.OK, Verdict.INCONCLUSIVE):
        same = [f for f in findings if f.verdict == verdict]
        if same:
            best = max(same, key=lambda f: f.confidence)
            confidence = best.confidence
            if verdict == Verdict.OK and any(f.verdict == Verdict.INCONCLUSIVE for f in findings):
                confidence *= 0.8  # a probe on the same path could not say
            return _Finding(verdict, confidence, _merge(best, findings))
    return findings[0]


def _merge(first: _Finding, findings: Sequence[_Finding]) -> tuple[str, ...]:
    return _bounded([*first.evidence, *(e for f in findings for e in f.evidence)])


def _is_repeat(o: Observation) -> bool:
    return not o.variant or o.variant.startswith("repeat")


def _judge_path(ctx: _Context, path: Sequence[Observation]) -> _Finding | None:
    """None for a path holding only swap results: they are consulted, not judged."""
    groups: dict[str, list[Observation]] = {}
    for o in path:
        if _is_repeat(o):
            groups.setdefault(o.base, []).append(o)
    if not groups:
        return None
    return _strongest([_judge_attempts(ctx, attempts) for attempts in groups.values()])


# --------------------------------------------------------------------------- DNS


def _resolver_kind(o: Observation) -> str:
    return (o.resolver or "system").split(":", 1)[0]


def _dns_lie(o: Observation, clean: Sequence[Observation]) -> tuple[str, float] | None:
    """What a system/UDP answer got wrong, and how sure we are, given clean answers."""
    kind = o.kind
    in_prefix = [c for c in clean if c.ok and "dns_answer_outside_prefixes" not in c.flags]
    if kind in _NEGATIVE_DNS:
        return (
            ("nxdomain" if kind == Failure.DNS_NXDOMAIN else "no answer", STRONG) if clean else None
        )
    if kind == Failure.DNS_BOGON:
        return ("bogon", CERTAIN if clean else FAIR)
    if not o.ok:
        return None
    if "dns_answer_outside_prefixes" in o.flags:
        return ("answer outside the service's prefixes", GOOD) if in_prefix else None
    mine = _answers(o)
    disjoint = all(not (mine & _answers(c)) for c in in_prefix)
    if _DNS_MISMATCH & set(o.flags) and in_prefix and disjoint:
        return ("inconsistent with the clean resolvers", FAIR)
    return None


def _injection_note(injected: Sequence[Observation]) -> str | None:
    """``3 differing replies to one A query (…): injected``, from the kept replies: more
    than one forged reply means more than one injector (or one that repeats itself)."""
    best: tuple[int, str, list[str]] | None = None
    for o in injected:
        by_type: dict[str, list[str]] = {}
        for reply in _sequence(o.details.get("replies")):
            if isinstance(reply, Mapping) and reply.get("answers"):
                text = ",".join(str(a) for a in _sequence(reply["answers"]))
                by_type.setdefault(str(reply.get("qtype", "?")), []).append(text)
        for qtype, texts in by_type.items():
            distinct = list(dict.fromkeys(texts))
            if len(distinct) > 1 and (best is None or len(distinct) > best[0]):
                best = (len(distinct), qtype, distinct)
    if best is None:
        return None
    n, qtype, distinct = best
    shown = "; ".join(distinct[:4]) + (" …" if n > 4 else "")
    return f"{n} differing replies to one {qtype} query ({shown}): injected"


_RESOLVER_NAME = {"doh": "DoH", "tcp": "TCP"}


def _clean_note(clean: Sequence[Observation], control: Sequence[Observation]) -> str:
    """Which clean resolvers answered, and which of them lied too (a censor that also
    rewrites DNS over TCP leaves DoH as the only truthful path)."""
    answered = [o for o in clean if o.ok]
    names = sorted({_RESOLVER_NAME.get(_resolver_kind(o), _resolver_kind(o)) for o in answered})
    if any(o.ok for o in control):
        names.append("the control")
    note = f"; {' and '.join(names)} answer" if names else ""
    liars = [o for o in clean if not o.ok and _dns_lie(o, answered) is not None]
    if liars:
        kinds = sorted({_RESOLVER_NAME.get(_resolver_kind(o), _resolver_kind(o)) for o in liars})
        shown = ",".join(sorted(_answers(liars[0]))) or str(liars[0].failure)
        note += f"; {'/'.join(kinds)} lies too ({shown})"
    return note


def _judge_dns(ctx: _Context) -> _Finding | None:
    dns = [o for o in ctx.results if o.base == "dns"]
    if not dns:
        return None
    suspect = [o for o in dns if _resolver_kind(o) not in _CLEAN_RESOLVERS]
    clean = [o for o in dns if _resolver_kind(o) in _CLEAN_RESOLVERS]
    control = [o for o in ctx.control if o.base == "dns"]
    answered = [o for o in clean + control if o.ok]
    evidence = [describe(o) for o in dns] + [_control(o) for o in control]
    injected = [o for o in dns if "dns_injection_suspected" in o.flags]
    if injected:
        why = _injection_note(injected) or "two differing replies to one query: injected"
        return _Finding(Verdict.DNS_TAMPERING, STRONG, _bounded([*evidence, why]))
    lies = [(o, lie) for o in suspect if (lie := _dns_lie(o, answered)) is not None]
    if lies:
        what, confidence = max((lie for _, lie in lies), key=lambda lie: lie[1])
        why = f"{what} from the system/UDP resolver"
        why += _clean_note(clean, control) if answered else "; no clean resolver to compare"
        return _Finding(Verdict.DNS_TAMPERING, confidence, _bounded([*evidence, why]))
    failed = [o for o in dns if not o.ok]
    if not failed:
        return _Finding(Verdict.OK, CERTAIN, _bounded(evidence))
    if all(o.kind in _NEGATIVE_DNS for o in failed) and not answered and clean:
        why = "every resolver, DoH/TCP included, says the name has no address"
        return _Finding(Verdict.ENDPOINT_DOWN, GOOD, _bounded([*evidence, why]))
    why = "resolver failures" if answered or clean else "no DoH/TCP resolver or control to compare"
    return _Finding(Verdict.INCONCLUSIVE, NONE, _bounded([*evidence, why]))


# --------------------------------------------------------------------------- endpoint


def _one_endpoint(items: Sequence[Observation]) -> tuple[str, str]:
    keys = {(o.service, o.endpoint) for o in items}
    if len(keys) != 1:
        raise ValueError(f"judge_endpoint wants the results of one endpoint, got {sorted(keys)}")
    return keys.pop()


def judge_endpoint(
    results: Iterable[Item],
    control: Iterable[Item] | None = None,
    *,
    others_ok: bool = False,
) -> EndpointVerdict:
    """Judge one endpoint from all its results (first runs, swaps and repeats, any rounds).

    ``control``: the same endpoint's results from a control vantage (others are ignored).
    ``others_ok``: other endpoints work from this vantage; without a control this is
    what lets a connect failure count as a (low-confidence) block at all.
    """
    obs = normalise(results)
    if not obs:
        raise ValueError("judge_endpoint needs at least one result")
    service, endpoint = _one_endpoint(obs)
    counted = [o for o in obs if o.skipped != SkipReason.IPV6_UNAVAILABLE]
    measured = [o for o in counted if o.skipped is None]
    if not measured:
        if counted:  # every remaining result is a vantage_offline skip
            why = "the offline gate reached no control target: nothing was measured"
            return EndpointVerdict(service, endpoint, Verdict.VANTAGE_OFFLINE, 1.0, (why,))
        why = "nothing measured: every target is IPv6 and this vantage has no IPv6"
        return EndpointVerdict(service, endpoint, Verdict.INCONCLUSIVE, 0.0, (why,))
    ctl = tuple(
        c
        for c in normalise(control or ())
        if (c.service, c.endpoint) == (service, endpoint) and c.skipped is None
    )
    ctx = _Context(tuple(measured), ctl, others_ok)
    return _under_allowlist(_endpoint_verdict(service, endpoint, ctx), measured)


def _endpoint_verdict(service: str, endpoint: str, ctx: _Context) -> EndpointVerdict:
    paths: dict[tuple[str, str, int | None], list[Observation]] = {}
    for o in ctx.results:
        if o.base != "dns":
            paths.setdefault(o.path, []).append(o)
    judged = {k: f for k, p in paths.items() if (f := _judge_path(ctx, p)) is not None}
    findings = list(judged.values())
    dns = _judge_dns(ctx)

    def verdict(f: _Finding, fraction: float | None = None) -> EndpointVerdict:
        conf = round(max(0.0, min(1.0, f.confidence)), 2)
        return EndpointVerdict(service, endpoint, f.verdict, conf, _bounded(f.evidence), fraction)

    if dns is not None and (dns.verdict == Verdict.DNS_TAMPERING or not findings):
        # A DNS lie stops an ordinary client first; path findings are kept as evidence.
        return verdict(_Finding(dns.verdict, dns.confidence, _merge(dns, findings)))
    if not findings:
        return verdict(_Finding(Verdict.INCONCLUSIVE, 0.0, ("only swap results",)))
    blocked = [(k, f) for k, f in judged.items() if f.blocking]
    passed = [(k, f) for k, f in judged.items() if f.verdict == Verdict.OK]
    if {k[0] for k, _ in blocked} & {k[0] for k, _ in passed}:
        # Some paths of a kind (tcp or udp) work and others of the same kind do not.
        # A whole kind failing next to another that works (QUIC filtered, TLS fine)
        # is that kind's filter, not partial blocking: it falls through to below.
        total = len(blocked) + len(passed)
        worst = _strongest([f for _, f in blocked])
        summary = f"{len(blocked)} of {total} paths blocked ({worst.verdict})"
        summary += _blocked_family([k for k, _ in blocked], [k for k, _ in passed])
        confidence = sum(f.confidence for _, f in blocked) / len(blocked)
        evidence = _bounded([summary, *(e for _, f in blocked + passed for e in f.evidence)])
        return verdict(
            _Finding(Verdict.PARTIAL, confidence, evidence), round(len(blocked) / total, 3)
        )
    best = _strongest(findings)
    extra = dns.evidence if dns is not None else ()
    return verdict(_Finding(best.verdict, best.confidence, (*best.evidence, *extra)))


# --------------------------------------------------------------------------- allowlist

ALLOWLIST_FLAG = "vantage_allowlist"  # set by the round on every result (FIELD.md B10)
# What the regime does not explain: a resolver's lie is an act of its own.
_NOT_THE_REGIME = frozenset({Verdict.OK, Verdict.DNS_TAMPERING})


def _under_allowlist(v: EndpointVerdict, measured: Sequence[Observation]) -> EndpointVerdict:
    """On a vantage where only domestic controls answer, a failing endpoint is the
    regime's doing, not a block of that service: ``allowlist_regime``, with what the
    rules would have said kept as evidence.  A working endpoint is allowlisted: ``ok``."""
    if v.verdict in _NOT_THE_REGIME or not any(ALLOWLIST_FLAG in o.flags for o in measured):
        return v
    why = (
        "allowlist regime: only domestic controls answer from this vantage (FIELD.md B10)",
        f"the rules alone would say {v.verdict} {v.confidence:.2f}",
    )
    return EndpointVerdict(
        v.service, v.endpoint, Verdict.ALLOWLIST_REGIME, STRONG, _bounded([*why, *v.evidence])
    )


def _allowlist_service(
    service: str, measured: Sequence[EndpointVerdict], evidence: tuple[str, ...]
) -> ServiceVerdict | None:
    """Any endpoint failing under the regime makes the service's state the regime's."""
    regime = [v for v in measured if v.verdict == Verdict.ALLOWLIST_REGIME]
    if not regime:
        return None
    return ServiceVerdict(
        service, Verdict.ALLOWLIST_REGIME, _mean(v.confidence for v in regime), evidence
    )


def _family(path: tuple[str, str, int | None]) -> str:
    return "IPv6" if ":" in path[1] else "IPv4"


def _blocked_family(
    blocked: Sequence[tuple[str, str, int | None]], passed: Sequence[tuple[str, str, int | None]]
) -> str:
    """``: only IPv6 is blocked, IPv4 works`` when the split follows the address family
    (a censor, or a broken IPv6 path, that treats the families apart), else nothing."""
    down, up = {_family(k) for k in blocked}, {_family(k) for k in passed}
    if len(down) == 1 and len(up) == 1 and down != up:
        return f": only {down.pop()} is blocked, {up.pop()} works"
    return ""


# --------------------------------------------------------------------------- service


def _share(v: EndpointVerdict) -> float:
    """How much of an endpoint is blocked: 1 for a block, its fraction for partial."""
    if v.verdict == Verdict.PARTIAL:
        return v.blocked_fraction if v.blocked_fraction is not None else 0.5
    return 1.0 if v.verdict in BLOCKING else 0.0


def _mean(values: Iterable[float]) -> float:
    values = list(values)
    return round(sum(values) / len(values), 2) if values else 0.0


def judge_service(endpoint_verdicts: Sequence[EndpointVerdict]) -> ServiceVerdict:
    """All endpoints agree -> that verdict; blocked next to working -> ``partial`` with the
    fraction of blocked endpoints (a partial endpoint counts with its own fraction);
    down and inconclusive endpoints are left out of the fraction."""
    if not endpoint_verdicts:
        raise ValueError("judge_service needs at least one endpoint verdict")
    service = endpoint_verdicts[0].service
    evidence = _bounded(
        f"{v.endpoint}: {v.verdict} {v.confidence:.2f}"
        + (f" blocked {v.blocked_fraction:.2f}" if v.blocked_fraction is not None else "")
        for v in endpoint_verdicts
    )
    measured = [v for v in endpoint_verdicts if v.verdict != Verdict.VANTAGE_OFFLINE]
    if not measured:
        return ServiceVerdict(service, Verdict.VANTAGE_OFFLINE, 1.0, evidence)
    regime = _allowlist_service(service, measured, evidence)
    if regime is not None:
        return regime
    kinds = {v.verdict for v in measured}
    blocked = [v for v in measured if v.verdict in BLOCKING or v.verdict == Verdict.PARTIAL]
    passed = [v for v in measured if v.verdict == Verdict.OK]
    if len(kinds) == 1:
        (only,) = kinds
        fraction = _mean(_share(v) for v in measured) if only == Verdict.PARTIAL else None
        return ServiceVerdict(
            service, only, _mean(v.confidence for v in measured), evidence, fraction
        )
    if blocked and (passed or Verdict.PARTIAL in kinds):
        judged = blocked + passed
        fraction = round(sum(_share(v) for v in judged) / len(judged), 3)
        return ServiceVerdict(
            service, Verdict.PARTIAL, _mean(v.confidence for v in judged), evidence, fraction
        )
    if blocked:
        counts = Counter(v.verdict for v in blocked)
        top = min(counts, key=lambda k: (-counts[k], _PRIORITY.index(k)))
        # down or inconclusive endpoints next to blocked ones: name the block, but the
        # confidence says how much of the service shows it (as for ``ok`` below)
        confidence = _mean(v.confidence for v in blocked if v.verdict == top)
        confidence *= len(blocked) / len(measured)
        return ServiceVerdict(service, top, round(confidence, 2), evidence)
    if passed:
        # down or inconclusive endpoints next to working ones: the service works; the
        # confidence says how much of it could be seen
        confidence = _mean(v.confidence for v in passed) * len(passed) / len(measured)
        return ServiceVerdict(service, Verdict.OK, round(confidence, 2), evidence)
    if kinds == {Verdict.ENDPOINT_DOWN}:
        return ServiceVerdict(
            service, Verdict.ENDPOINT_DOWN, _mean(v.confidence for v in measured), evidence
        )
    return ServiceVerdict(service, Verdict.INCONCLUSIVE, NONE, evidence)


# --------------------------------------------------------------------------- round


def _as_control_vantage(v: EndpointVerdict, others_ok: bool) -> EndpointVerdict:
    """On a control vantage a failure is never censorship: nothing censors a control
    (that is what makes it one), so what would read as a block is the endpoint being
    down, or, when nothing else works from here either, the control itself broken."""
    if v.verdict not in BLOCKING and v.verdict != Verdict.PARTIAL:
        return v
    if others_ok:
        verdict, confidence = Verdict.ENDPOINT_DOWN, FAIR
        why = "control vantage: a failure here means the endpoint is down, never censorship"
    else:
        verdict, confidence = Verdict.INCONCLUSIVE, NONE
        why = "control vantage and nothing else works from here: the control may be broken"
    return EndpointVerdict(v.service, v.endpoint, verdict, confidence, _bounded((why, *v.evidence)))


def judge_round(
    results: Iterable[Item],
    control: Iterable[Item] | None = None,
    *,
    vantage_role: str = "test",
) -> tuple[EndpointVerdict | ServiceVerdict, ...]:
    """Every endpoint's verdict, then its service's, service by service (sorted).

    Works on any set of results: one round, several rounds, or the lab's; ``control``
    is the control vantage's results for the same endpoints, in any accepted form.
    ``vantage_role`` ``control``: these results come from a control vantage, whose
    failures mean ``endpoint_down`` / ``inconclusive``, never a censorship verdict.
    """
    obs = normalise(results)
    ctl = [c for c in normalise(control or ()) if c.skipped is None]
    by_endpoint: dict[tuple[str, str], list[Observation]] = {}
    for o in obs:
        by_endpoint.setdefault((o.service, o.endpoint), []).append(o)
    # grouped once: a scan of every control result per endpoint is O(endpoints x results)
    ctl_by_endpoint: dict[tuple[str, str], list[Observation]] = {}
    for c in ctl:
        ctl_by_endpoint.setdefault((c.service, c.endpoint), []).append(c)
    # Which endpoints show this vantage can reach *something*: a success beyond DNS.
    reached = {(o.service, o.endpoint) for o in obs if o.ok and o.base != "dns"}
    out: list[EndpointVerdict | ServiceVerdict] = []
    services = sorted({s for s, _ in by_endpoint})
    for service in services:
        verdicts = [
            judge_endpoint(
                by_endpoint[key],
                ctl_by_endpoint.get(key, []),
                others_ok=bool(reached - {key}),
            )
            for key in sorted(k for k in by_endpoint if k[0] == service)
        ]
        if vantage_role == "control":
            verdicts = [
                _as_control_vantage(v, bool(reached - {(v.service, v.endpoint)})) for v in verdicts
            ]
        out += verdicts
        out.append(judge_service(verdicts))
    return tuple(out)
