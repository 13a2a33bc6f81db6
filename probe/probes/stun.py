"""STUN call-relay probe: does a Binding request reach a relay and an answer come back?

WhatsApp and Telegram calls ride on UDP STUN/TURN relays (WhatsApp UDP 3478, web 3480;
Telegram 1400) and Telegram reflectors (UDP 596-599).  Any well-formed STUN response
with our transaction id -- an error such as 401 included -- proves the UDP path works
both ways; silence alone proves nothing without a control vantage (FIELD.md 1 and 3).

Modes (``target.params``):

``mode: binding`` (default)
    ``count`` Binding requests (default 3) over a ``connect()``-ed UDP socket, each
    retransmitted on RFC 5389's schedule (RTO 500 ms, doubling, at most 7 sends), all
    bounded by ``settings.timeouts.udp_s``.  ``transport: tcp`` sends them over one TCP
    connection instead, framed per RFC 4571 (``framing: rfc4571``, default) or as bare
    self-delimiting STUN (``framing: none``, what TURN servers on TCP expect).
    ``control: true`` first sends random datagrams of the same sizes to the same
    address and port from another socket and records whether anything came back: with
    a peer that answers random payloads (an echo: our own relay, the lab), STUN-shaped
    silence next to a random-payload answer points at content filtering, not an
    address block.
``mode: flow``
    A call-like flow to an echoing peer: ``stun_packets`` Binding requests, then
    RTP-shaped random payloads with a sequence number, ``rate_pps`` a second (default
    50) for ``duration_s``.  Reports loss, RFC 3550 jitter and ``cutoff_s``: a flow whose
    replies stop for good fails with ``udp_no_response`` and says when.
``mode: reflector``
    Telegram's reflector hello (``peer_tag``: 32 hex digits, random by default); any
    reply is success.

Failure strings: ``udp_no_response`` (ours: datagrams sent, nothing came back),
``bad_response`` (a reply that is not a STUN response to us), ``connection_refused``
(ICMP port unreachable), ``network_unreachable`` / ``host_unreachable``; over TCP also
``generic_timeout_error``, ``connection_reset``, ``eof_error``.
"""

from __future__ import annotations

import asyncio
import itertools
import math
import secrets
import statistics
import time
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field, fields, replace
from typing import Any, ClassVar, Literal, Self

from ..classify import classify, scrub
from ..config.settings import ProbeSettings
from ..evidence import (
    StunBinding,
    StunControl,
    StunEvidence,
    StunFlow,
    StunReflector,
    StunReflectorReply,
    StunResponse,
    StunTransaction,
    StunTxnReply,
)
from ..model import Failure, Operation, ProbeParams, ProbeResult, Target
from ..wire import WireError
from ..wire import stun as wire
from ._net.tcp import close_streams, connect, open_streams
from ._net.udp import UdpChannel, icmp_evidence
from .base import Recorder
from .params import ParamError, check_keys, number_param, shown

__all__ = ["StunParams", "budget_s", "probe", "retransmit_offsets"]

RTO_S = 0.5  # RFC 5389 7.2.1 initial retransmission timeout
MAX_SENDS = 7  # Rc
STAGGER_S = 0.05  # spacing between the N transactions, so they do not leave as one burst
_RTP_PAYLOAD_TYPE = 111  # dynamic PT that WebRTC uses for Opus
_RTP_HEADER = 12
_PEER_TEXT = 128  # chars of the relay's free text (SOFTWARE, error reason) kept


# ---------------------------------------------------------------- parameters


@dataclass(frozen=True)
class StunParams(ProbeParams):
    """The probe's parameters; `parse` rejects unknown keys and bad values."""

    PROBE: ClassVar[str] = "stun"
    mode: Literal["binding", "flow", "reflector"] = "binding"
    transport: Literal["udp", "tcp"] = "udp"
    framing: Literal["rfc4571", "none"] = "rfc4571"
    count: int = 3
    control: bool = False
    username: str | None = None
    software: str | None = None
    fingerprint: bool = True
    duration_s: float = 5.0
    rate_pps: float = 50.0
    stun_packets: int = 3
    payload_size: int = 160
    peer_tag: str | None = None
    record_mapped_address: bool = False

    @classmethod
    def parse(cls, params: Mapping[str, Any], base: Self | None = None) -> Self:
        """Parse and validate (over ``base``, a follow-up's overrides over the spec's)."""
        check_keys("stun", params, [f.name for f in fields(cls)])
        p = replace(base if base is not None else cls(), **{str(k): v for k, v in params.items()})
        p.validate()
        # YAML's 5 is an int: the fields say float
        return replace(p, duration_s=float(p.duration_s), rate_pps=float(p.rate_pps))

    def validate(self) -> None:
        _choice("mode", self.mode, ("binding", "flow", "reflector"))
        _choice("transport", self.transport, ("udp", "tcp"))
        _choice("framing", self.framing, ("rfc4571", "none"))
        _number("count", self.count, 1, 20, integer=True)
        _number("duration_s", self.duration_s, 0.1, 600)
        _number("rate_pps", self.rate_pps, 1, 500)
        _number("stun_packets", self.stun_packets, 0, 100, integer=True)
        _number("payload_size", self.payload_size, _RTP_HEADER, 1200, integer=True)
        for name in ("control", "fingerprint", "record_mapped_address"):
            value = getattr(self, name)
            if not isinstance(value, bool):
                raise ParamError("stun", name, f"must be true or false, got {shown(value)}")
        # RFC 5389 15.3 / 15.10: USERNAME < 513 bytes, SOFTWARE < 128 characters
        _text("username", self.username, max_bytes=512)
        _text("software", self.software, max_chars=127)
        if self.transport == "tcp" and (self.mode != "binding" or self.control):
            raise ParamError("stun", "transport", "tcp supports mode binding without control")
        if self.mode == "flow" and self.duration_s * self.rate_pps > 0xFFFF:
            raise ParamError(
                "stun", "duration_s", "a flow is at most 65535 packets (16-bit sequence)"
            )
        if self.peer_tag is not None:
            try:
                tag = bytes.fromhex(self.peer_tag)
            except (TypeError, ValueError):
                tag = b""
            if len(tag) != 16:
                raise ParamError(
                    "stun", "peer_tag", f"must be 32 hex digits, got {shown(self.peer_tag)}"
                )


def _choice(name: str, value: object, allowed: tuple[str, ...]) -> None:
    if not isinstance(value, str) or value not in allowed:
        raise ParamError("stun", name, f"must be one of {', '.join(allowed)}, got {shown(value)}")


def _number(name: str, value: object, low: float, high: float, *, integer: bool = False) -> None:
    number_param("stun", {name: value}, name, low, low, high, integer=integer)


def _text(
    name: str, value: object, *, max_bytes: int | None = None, max_chars: int | None = None
) -> None:
    """None, or a non-empty string within the RFC's size limit that UTF-8 can encode."""
    if value is None:
        return
    encoded = _utf8(value)
    fits = (
        isinstance(value, str)
        and encoded
        and (max_bytes is None or len(encoded) <= max_bytes)
        and (max_chars is None or len(value) <= max_chars)
    )
    if not fits:
        limit = f"{max_bytes} UTF-8 bytes" if max_bytes is not None else f"{max_chars} characters"
        raise ParamError(
            "stun", name, f"must be a non-empty string of at most {limit}, got {shown(value)}"
        )


def _utf8(value: object) -> bytes | None:
    if not isinstance(value, str):
        return None
    try:
        return value.encode("utf-8")
    except UnicodeEncodeError:  # a lone surrogate cannot go on the wire
        return None


def budget_s(p: StunParams, settings: ProbeSettings) -> float:
    """The longest correct run (`probes.ProbeType.budget`) of each mode: a flow lasts
    ``duration_s`` plus its grace for the last answers; over TCP the connect, the write
    and the read have their own clocks; over UDP the requests (a reflector's hello too)
    share ``udp_s``, and the control runs on its own ``udp_s`` before them."""
    t = settings.timeouts
    if p.mode == "flow":
        return p.duration_s + min(t.udp_s, 1.0)  # the grace of `_flow`
    if p.transport == "tcp":
        return t.connect_s + 2 * t.udp_s + 1.0  # the close waits 1 s at most (`close_streams`)
    return (t.udp_s if p.control else 0.0) + t.udp_s


def retransmit_offsets(
    budget_s: float, rto_s: float = RTO_S, max_sends: int = MAX_SENDS
) -> tuple[float, ...]:
    """Send times of one transaction relative to its first send (RFC 5389 7.2.1).

    0, RTO, 3 RTO, 7 RTO, ... (the interval doubles), at most ``max_sends`` of them,
    and only those that still leave some time for an answer inside ``budget_s``.
    """
    offsets = [0.0]
    interval = rto_s
    while len(offsets) < max_sends and offsets[-1] + interval < budget_s:
        offsets.append(offsets[-1] + interval)
        interval *= 2
    return tuple(offsets)


# ---------------------------------------------------------------- retransmission (RFC 5389)


class _Retransmitter:
    """Sends a set of requests on RFC 5389's schedule until each is resolved by a reply
    (``handle`` returns the indexes a datagram resolves) or the budget runs out, over a
    `_net.udp.UdpChannel` (connected; datagrams stamped on arrival; ICMP errors raised)."""

    def __init__(self, packets: list[bytes], budget_s: float) -> None:
        self.packets = packets
        self.budget_s = budget_s
        self.offsets = retransmit_offsets(budget_s)
        self.sends = [0] * len(packets)
        self.first_sent: list[float | None] = [None] * len(packets)

    async def run(
        self, channel: UdpChannel, handle: Callable[[float, bytes], Iterable[int]]
    ) -> None:
        start = time.monotonic()
        deadline = start + self.budget_s
        pending = set(range(len(self.packets)))
        while pending and time.monotonic() < deadline:
            due_times = []
            for i in sorted(pending):
                if self.sends[i] >= len(self.offsets):
                    continue
                due = start + i * STAGGER_S + self.offsets[self.sends[i]]
                if time.monotonic() >= due:
                    sent_at = channel.send(self.packets[i])
                    self.first_sent[i] = self.first_sent[i] or sent_at
                    self.sends[i] += 1
                    if self.sends[i] >= len(self.offsets):
                        continue
                    due = start + i * STAGGER_S + self.offsets[self.sends[i]]
                due_times.append(due)
            item = await channel.recv(min([*due_times, deadline]))
            if item is not None:
                pending.difference_update(handle(*item))


# ---------------------------------------------------------------- STUN reply tally


@dataclass
class _Transaction:
    packet: bytes
    tid: bytes
    outcome: str = "lost"  # answered | malformed | reflected | lost
    rtt_s: float | None = None
    response: wire.Message | None = None
    error: str | None = None

    def evidence(self, sends: int | None = None) -> StunTransaction:
        reply = None
        if self.response is not None:
            err = self.response.error_code
            reply = StunTxnReply(
                msg_class=self.response.msg_class.name.lower(), error_code=err.code if err else None
            )
        return StunTransaction(
            outcome=self.outcome,
            rtt_s=_round(self.rtt_s),
            sent=sends,
            reply=reply,
            error=self.error,
        )


@dataclass
class _Tally:
    """Sorts every reply into answered / malformed / reflected / stray, by transaction id."""

    transactions: list[_Transaction]
    record_mapped: bool = False  # keep the vantage's public address (opt-in)
    malformed_stray: int = 0
    unmatched: int = 0
    duplicates: int = 0
    first_error: str | None = None
    by_tid: dict[bytes, int] = field(default_factory=dict)

    def __post_init__(self) -> None:
        self.by_tid = {t.tid: i for i, t in enumerate(self.transactions)}

    def handle(
        self, arrived: float, data: bytes, sent_at: Callable[[int], float | None]
    ) -> list[int]:
        index = self.by_tid.get(data[8:20], -1) if len(data) >= wire.HEADER_LENGTH else -1
        txn = self.transactions[index] if index >= 0 else None
        if txn is not None and txn.outcome != "lost":
            self.duplicates += 1  # an answer to a retransmission, or a repeat
            return []
        try:
            message = wire.parse(data)
        except WireError as exc:
            self.first_error = self.first_error or str(exc)
            if txn is None:
                self.malformed_stray += 1
                return []
            txn.outcome, txn.error = "malformed", str(exc)
            return [index]
        if txn is None:
            self.unmatched += 1
            return []
        if data == txn.packet:
            # Our own request came back: an echo or a reflecting middlebox, not STUN.
            txn.outcome, txn.error = "reflected", "the request came back unchanged"
        elif message.msg_class in (wire.Class.SUCCESS, wire.Class.ERROR) and (
            message.method == wire.Method.BINDING
        ):
            txn.outcome, txn.response = "answered", message
            first = sent_at(index)
            txn.rtt_s = arrived - first if first is not None else None
        else:
            txn.outcome = "malformed"
            txn.error = f"a STUN {message.msg_class.name.lower()} is not a Binding response"
        self.first_error = self.first_error or txn.error
        return [index]

    @property
    def answered(self) -> list[_Transaction]:
        return [t for t in self.transactions if t.outcome == "answered"]

    @property
    def bad(self) -> bool:
        return self.malformed_stray > 0 or any(
            t.outcome in ("malformed", "reflected") for t in self.transactions
        )

    def evidence(self, local: tuple[str, int] | None, sends: list[int] | None) -> StunBinding:
        answered = self.answered
        count = len(self.transactions)
        return StunBinding(
            count=count,
            answered=len(answered),
            loss=round(1 - len(answered) / count, 4),
            rtt_s=tuple(_round(t.rtt_s) for t in answered),
            transactions=tuple(
                t.evidence(sends[i] if sends else None) for i, t in enumerate(self.transactions)
            ),
            malformed=self.malformed_stray
            + sum(t.outcome == "malformed" for t in self.transactions),
            reflected=sum(t.outcome == "reflected" for t in self.transactions),
            unmatched=self.unmatched,
            duplicates=self.duplicates,
            parse_error=self.first_error or None,
            response=(
                _response_evidence(answered[0].response, local, self.record_mapped)
                if answered
                else None
            ),
        )


def _response_evidence(
    message: wire.Message | None, local: tuple[str, int] | None, record_mapped: bool
) -> StunResponse | None:
    if message is None:
        return None
    err = message.error_code
    mapped = message.xor_mapped_address or message.mapped_address
    # The mapped address is the vantage's public address as the relay saw it: it
    # identifies the volunteer running the agent, so it is kept only on request.  Family,
    # port and whether a NAT rewrote us are evidence enough by default.
    return StunResponse(
        response_class=message.msg_class.name.lower(),
        error_code=err.code if err is not None else None,
        error_reason=_peer_text(err.reason) if err is not None else None,
        mapped_family=mapped.family if mapped is not None else None,
        mapped_port=mapped.port if mapped is not None else None,
        mapped_address=str(mapped) if mapped is not None and record_mapped else None,
        nat=(
            (mapped.host, mapped.port) != local
            if mapped is not None and local is not None
            else None
        ),
        software=_peer_text(message.software) if message.software is not None else None,
    )


def _peer_text(text: str) -> str:
    """The relay's free text as evidence: short, and without addresses (it may name the
    one it saw us at, which `record_mapped_address` keeps opt-in)."""
    return scrub(text[: 8 * _PEER_TEXT])[:_PEER_TEXT]


def _round(value: float | None) -> float | None:
    return None if value is None else round(value, 6)


def _requests(p: StunParams, n: int) -> list[_Transaction]:
    out = []
    for _ in range(n):
        msg = wire.binding_request(username=p.username, software=p.software)
        out.append(_Transaction(wire.encode(msg, fingerprint=p.fingerprint), msg.transaction_id))
    return out


def _verdict(
    rec: Recorder[StunEvidence], tally: _Tally, silent: Failure, binding: StunBinding
) -> ProbeResult:
    evidence = replace(rec.evidence, binding=binding)
    if tally.answered:
        return rec.ok(evidence)
    if tally.bad:
        return rec.fail(Failure.BAD_RESPONSE, Operation.READ, evidence)
    return rec.fail(silent, Operation.READ, evidence)


# ---------------------------------------------------------------- binding over UDP


async def _udp_binding(
    rec: Recorder[StunEvidence], address: str, port: int, p: StunParams, budget: float
) -> ProbeResult:
    tally = _Tally(_requests(p, p.count), p.record_mapped_address)
    if p.control:
        with rec.phase("control"):
            control = await _control(address, port, tally, budget)
        rec.evidence = replace(rec.evidence, control=control)
    try:
        channel = await UdpChannel.open(address, port)
    except OSError as exc:
        return rec.fail_exc(exc, Operation.CONNECT)
    local = channel.local
    sender = _Retransmitter([t.packet for t in tally.transactions], budget)
    try:
        with rec.phase("stun"):
            await sender.run(
                channel, lambda at, data: tally.handle(at, data, lambda i: sender.first_sent[i])
            )
    except OSError as exc:
        rec.evidence = _with_icmp(rec.evidence, channel)
        binding = replace(tally.evidence(None, sender.sends), datagrams_sent=channel.sent)
        if tally.answered:
            return rec.ok(replace(rec.evidence, binding=replace(binding, icmp_error=str(exc))))
        return rec.fail_exc(exc, Operation.READ, replace(rec.evidence, binding=binding))
    finally:
        channel.close()
    rec.evidence = _with_icmp(rec.evidence, channel)
    binding = replace(
        tally.evidence(local, sender.sends),
        datagrams_sent=channel.sent,
        datagrams_received=channel.received,
        datagrams_dropped=channel.dropped or None,
    )
    return _verdict(rec, tally, Failure.UDP_NO_RESPONSE, binding)


def _with_icmp(evidence: StunEvidence, channel: UdpChannel) -> StunEvidence:
    """``evidence`` with the ICMP errors the probe's channel received (not the control's)."""
    icmp_errors, icmp_stray = icmp_evidence([channel.icmp])
    return replace(evidence, icmp_errors=icmp_errors, icmp_stray=icmp_stray)


async def _control(address: str, port: int, tally: _Tally, budget: float) -> StunControl:
    """Random datagrams, sized like our STUN requests, to the same address and port.

    Sent before the STUN requests and from another socket: a censor that blackholes a
    destination after seeing STUN must not be able to silence the control too.  The
    first byte is 0xC0-0xFF, a range no call protocol uses (RFC 7983), so the control
    cannot be mistaken for STUN, DTLS or RTP.
    """
    payloads = [_random_payload(len(t.packet)) for t in tally.transactions]
    out = StunControl(sizes=tuple(len(x) for x in payloads))
    replies: list[tuple[float, bytes]] = []

    def handle(arrived: float, data: bytes) -> range:
        replies.append((arrived, data))
        return range(len(payloads))  # anything back answers the question

    try:
        channel = await UdpChannel.open(address, port)
    except OSError as exc:
        return replace(out, error=str(classify(exc, Operation.CONNECT)))
    sender = _Retransmitter(payloads, budget)
    try:
        await sender.run(channel, handle)
    except OSError as exc:
        out = replace(out, error=str(classify(exc, Operation.WRITE)))
    finally:
        channel.close()
    out = replace(out, sent=channel.sent)
    if replies:
        arrived, data = replies[0]
        first = min((t for t in sender.first_sent if t is not None), default=arrived)
        out = replace(out, replied=True, rtt_s=_round(arrived - first), echoed=data in payloads)
    return out


def _random_payload(size: int) -> bytes:
    body = bytearray(secrets.token_bytes(size))
    if body:
        body[0] = 0xC0 | (body[0] & 0x3F)
    return bytes(body)


# ---------------------------------------------------------------- binding over TCP


async def _tcp_binding(
    rec: Recorder[StunEvidence], address: str, port: int, p: StunParams, settings: ProbeSettings
) -> ProbeResult:
    tally = _Tally(_requests(p, p.count), p.record_mapped_address)
    try:
        with rec.phase("connect"):
            sock = await connect(address, port, settings.timeouts.connect_s)
            reader, writer = await open_streams(sock)
    except OSError as exc:  # TimeoutError too
        return rec.fail_exc(exc, Operation.CONNECT)
    sock = writer.get_extra_info("sockname")
    local = (str(sock[0]), int(sock[1])) if sock else None
    pack = wire.frame if p.framing == "rfc4571" else (lambda packet: packet)
    start = time.monotonic()
    try:
        writer.write(b"".join(pack(t.packet) for t in tally.transactions))
        await asyncio.wait_for(writer.drain(), settings.timeouts.udp_s)
    except (OSError, TimeoutError) as exc:
        await close_streams(writer)
        return rec.fail_exc(exc, Operation.WRITE)
    try:
        with rec.phase("stun"):
            await asyncio.wait_for(
                _read_tcp_answers(reader, tally, p.framing, start), settings.timeouts.udp_s
            )
    except (OSError, TimeoutError, asyncio.IncompleteReadError) as exc:
        binding = tally.evidence(local, None)
        if tally.answered:
            binding = replace(binding, stream_error=str(classify(exc, Operation.READ)))
            return rec.ok(replace(rec.evidence, binding=binding))
        if tally.bad:
            return rec.fail(
                Failure.BAD_RESPONSE, Operation.READ, replace(rec.evidence, binding=binding)
            )
        return rec.fail_exc(exc, Operation.READ, replace(rec.evidence, binding=binding))
    finally:
        await close_streams(writer)
    return _verdict(rec, tally, Failure.GENERIC_TIMEOUT, tally.evidence(local, None))


async def _read_tcp_answers(
    reader: asyncio.StreamReader, tally: _Tally, framing: str, start: float
) -> None:
    """Read whole messages until every transaction is resolved.  Each read is bounded
    by a 16-bit length, so a giant reply cannot eat memory.  After a malformed message
    the stream cannot be trusted to be in step, so reading stops there."""
    pending = len(tally.transactions)
    while pending:
        if framing == "rfc4571":
            size = int.from_bytes(await reader.readexactly(2), "big")
            data = await reader.readexactly(size)
        else:
            data = await reader.readexactly(wire.HEADER_LENGTH)
            if wire.is_stun(data):  # else the length field is noise: parse() rejects it
                data += await reader.readexactly(int.from_bytes(data[2:4], "big"))
        before = tally.malformed_stray
        pending -= len(tally.handle(time.monotonic(), data, lambda _i: start))
        if tally.malformed_stray != before or any(
            t.outcome in ("malformed", "reflected") for t in tally.transactions
        ):
            return


# ---------------------------------------------------------------- reflector hello


async def _reflector(
    rec: Recorder[StunEvidence], address: str, port: int, p: StunParams, budget: float
) -> ProbeResult:
    tag = bytes.fromhex(p.peer_tag) if p.peer_tag else secrets.token_bytes(16)
    hello = wire.reflector_hello(tag)
    replies: list[tuple[float, bytes]] = []

    def handle(arrived: float, data: bytes) -> list[int]:
        replies.append((arrived, data))
        return [0]

    try:
        channel = await UdpChannel.open(address, port)
    except OSError as exc:
        return rec.fail_exc(exc, Operation.CONNECT)
    sender = _Retransmitter([hello], budget)
    try:
        with rec.phase("reflector"):
            await sender.run(channel, handle)
    except OSError as exc:
        rec.evidence = _with_icmp(rec.evidence, channel)
        sent = StunReflector(hello_bytes=len(hello), datagrams_sent=channel.sent)
        return rec.fail_exc(exc, Operation.READ, replace(rec.evidence, reflector=sent))
    finally:
        channel.close()
    rec.evidence = _with_icmp(rec.evidence, channel)
    evidence = StunReflector(hello_bytes=len(hello), datagrams_sent=channel.sent)
    if not replies:
        silent = replace(rec.evidence, reflector=evidence)
        return rec.fail(Failure.UDP_NO_RESPONSE, Operation.READ, silent)
    arrived, data = replies[0]
    first = sender.first_sent[0]
    reply = StunReflectorReply(
        rtt_s=_round(arrived - first) if first is not None else None,
        reply_bytes=len(data),
        tag_match=wire.reflector_tag_matches(data, tag),
        echoed=data == hello,
    )
    return rec.ok(replace(rec.evidence, reflector=replace(evidence, reply=reply)))


# ---------------------------------------------------------------- call-like flow


@dataclass
class _Flow:
    """Packets of a call-like flow and what came back for each."""

    packets: list[bytes]
    tids: dict[bytes, int]
    ssrc: bytes
    sent_at: list[float] = field(default_factory=list)  # packet i left at sent_at[i]
    transit: dict[int, float] = field(default_factory=dict)  # index -> RTT, arrival order
    last_reply: float | None = None
    unmatched: int = 0
    duplicates: int = 0

    def match(self, data: bytes) -> int | None:
        if wire.is_stun(data) and data[8:20] in self.tids:
            return self.tids[data[8:20]]
        if len(data) >= _RTP_HEADER and data[0] == 0x80 and data[8:12] == self.ssrc:
            return int.from_bytes(data[2:4], "big")
        return None

    def handle(self, arrived: float, data: bytes) -> None:
        index = self.match(data)
        if index is None or index >= len(self.sent_at):
            self.unmatched += 1  # not ours, or a "reply" to a packet not yet sent
        elif index in self.transit:
            self.duplicates += 1
        else:
            self.transit[index] = arrived - self.sent_at[index]
            self.last_reply = arrived


def _flow_packets(p: StunParams, total: int) -> _Flow:
    """STUN Binding requests first (what a call opens with), then RTP-shaped media:
    V=2, PT 111, 16-bit sequence = packet index, 48 kHz timestamp, one SSRC."""
    ssrc = secrets.token_bytes(4)
    packets: list[bytes] = []
    tids: dict[bytes, int] = {}
    for i in range(total):
        if i < p.stun_packets:
            msg = wire.binding_request(username=p.username, software=p.software)
            tids[msg.transaction_id] = i
            packets.append(wire.encode(msg, fingerprint=p.fingerprint))
            continue
        header = bytes([0x80, _RTP_PAYLOAD_TYPE]) + i.to_bytes(2, "big")
        header += ((i * 960) & 0xFFFFFFFF).to_bytes(4, "big") + ssrc
        packets.append(header + secrets.token_bytes(p.payload_size - _RTP_HEADER))
    return _Flow(packets, tids, ssrc)


async def _flow(
    rec: Recorder[StunEvidence], address: str, port: int, p: StunParams, settings: ProbeSettings
) -> ProbeResult:
    total = max(1, math.floor(p.duration_s * p.rate_pps))
    flow = _flow_packets(p, total)
    grace = min(settings.timeouts.udp_s, 1.0)  # for the last packets' answers
    try:
        channel = await UdpChannel.open(address, port)
    except OSError as exc:
        return rec.fail_exc(exc, Operation.CONNECT)
    start = time.monotonic()
    try:
        with rec.phase("flow"):
            await _run_flow(channel, flow, start, p.rate_pps, grace)
    except OSError as exc:
        rec.evidence = _with_icmp(rec.evidence, channel)
        broken = replace(rec.evidence, flow=_flow_evidence(flow, start, p))
        return rec.fail_exc(exc, Operation.READ, broken)
    finally:
        channel.close()
    rec.evidence = _with_icmp(rec.evidence, channel)
    evidence = replace(rec.evidence, flow=_flow_evidence(flow, start, p))
    if evidence.flow is not None and evidence.flow.cutoff_s is not None:
        return rec.fail(Failure.UDP_NO_RESPONSE, Operation.READ, evidence)
    return rec.ok(evidence)


async def _run_flow(
    channel: UdpChannel, flow: _Flow, start: float, rate: float, grace: float
) -> None:
    """Send on an absolute schedule (start + i / rate: no drift) while reading replies;
    after the last send wait up to ``grace`` for the stragglers."""
    total = len(flow.packets)
    end = start + (total - 1) / rate + grace
    while time.monotonic() < end:
        now = time.monotonic()
        while len(flow.sent_at) < total and now >= start + len(flow.sent_at) / rate:
            flow.sent_at.append(channel.send(flow.packets[len(flow.sent_at)]))
        if len(flow.transit) == total:
            break
        nxt = len(flow.sent_at)
        item = await channel.recv(start + nxt / rate if nxt < total else end)
        if item is not None:
            flow.handle(*item)


def _flow_evidence(flow: _Flow, start: float, p: StunParams) -> StunFlow:
    sent, got = len(flow.sent_at), len(flow.transit)
    rtts = list(flow.transit.values())
    return StunFlow(
        rate_pps=p.rate_pps,  # as configured: an int stays an int in JSON
        duration_s=p.duration_s,
        sent=sent,
        received=got,
        loss=round(1 - got / sent, 4) if sent else None,
        stun_sent=min(sent, p.stun_packets),
        stun_received=sum(1 for i in flow.transit if i < p.stun_packets),
        jitter_s=_round(_jitter(rtts)),
        rtt_min_s=_round(min(rtts)) if rtts else None,
        rtt_median_s=_round(statistics.median(rtts)) if rtts else None,
        rtt_max_s=_round(max(rtts)) if rtts else None,
        unmatched=flow.unmatched,
        duplicates=flow.duplicates,
        last_reply_s=_round(flow.last_reply - start) if flow.last_reply is not None else None,
        cutoff_s=_cutoff(flow, start, p),
    )


def _jitter(transits: list[float]) -> float | None:
    """RFC 3550 6.4.1 interarrival jitter, over round trips taken in arrival order:
    J += (|D(i-1, i)| - J) / 16, D being the change in transit time."""
    if len(transits) < 2:
        return None
    jitter = 0.0
    for prev, cur in itertools.pairwise(transits):
        jitter += (abs(cur - prev) - jitter) / 16
    return jitter


def _cutoff(flow: _Flow, start: float, p: StunParams) -> float | None:
    """When replies stopped for good, as an offset from the flow's start; None if not.

    A flow is cut off when every packet sent during a trailing window went unanswered
    (a run that long is not random loss: at 50% loss, 13 packets in a row is 1e-4).
    The window is 3 packet intervals at least, a quarter of the flow, at most 1 s.
    A flow with no reply at all is cut off at 0.
    """
    if not flow.sent_at:
        return None
    if not flow.transit:
        return 0.0
    first_lost = max(flow.transit) + 1
    if first_lost >= len(flow.sent_at):
        return None
    window = max(3 / p.rate_pps, min(1.0, p.duration_s / 4))
    if flow.sent_at[-1] - flow.sent_at[first_lost] < window:
        return None
    return round(flow.sent_at[first_lost] - start, 3)


# ---------------------------------------------------------------- entry point


async def probe(target: Target, settings: ProbeSettings) -> ProbeResult:
    """Probe a STUN relay, a Telegram reflector, or an echoing peer (see module doc)."""
    rec = Recorder(target, StunEvidence())
    p = StunParams.of(target)
    if target.address is None or target.port is None:
        raise ValueError("stun: a target needs an address and a port")
    rec.evidence = StunEvidence(stun_transport=p.transport, mode=p.mode)
    budget = settings.timeouts.udp_s
    if p.mode == "flow":
        return await _flow(rec, target.address, target.port, p, settings)
    if p.mode == "reflector":
        return await _reflector(rec, target.address, target.port, p, budget)
    if p.transport == "tcp":
        rec.evidence = replace(rec.evidence, framing=p.framing)
        return await _tcp_binding(rec, target.address, target.port, p, settings)
    return await _udp_binding(rec, target.address, target.port, p, budget)
