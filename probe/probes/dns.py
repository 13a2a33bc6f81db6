"""DNS probe: resolve an endpoint's name (A and AAAA) through one resolver and judge the answer.

The resolver is the target's ``resolver`` string:

- ``system``: the OS stub (``getaddrinfo``), what apps on this vantage get;
- ``udp:HOST:PORT`` / ``tcp:HOST:PORT``: a plain DNS resolver (HOST may be ``[v6]``);
- ``doh:URL``: DNS over HTTPS (RFC 8484), the control a censor cannot tamper with.

Over UDP every datagram from the resolver is kept until ``reply_window_s`` after
the first one: an on-path injector's forged answer arrives first and the real
one after it, and the pair is the evidence (dnspython's ``receive_udp`` returns
only the first).  The first well-formed matching reply is the answer, as a stub
resolver would take it.

This module asks; `probe.dnsjudge` judges what came back (bogons, prefixes, which
failure a lookup reports, and the consistency of several resolvers for one name).
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import ipaddress
import os
import socket
import ssl
import time
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field, replace
from typing import ClassVar, Literal

import aiohttp
import dns.message

from ..classify import classify, classify_rcode
from ..config.settings import ProbeSettings
from ..dnsjudge import IPNetwork, in_prefixes, suspect_bogon, telling_failure
from ..evidence import DnsEvidence, DnsReply
from ..model import Failure, Operation, ProbeResult, Target
from ..wire import WireError
from ..wire.dnsmsg import (
    MAX_MESSAGE,
    addresses,
    build_query,
    matches_query,
    parse_message,
    rcode_text,
)
from ._net.tcp import close_streams, connect, open_streams
from ._net.udp import IcmpWatch, UdpChannel, icmp_evidence
from .base import Recorder
from .params import NoParams

__all__ = [
    "QTYPES",
    "DnsParams",
    "ResolverSpec",
    "budget_s",
    "parse_resolver",
    "probe",
]

QTYPES: tuple[str, ...] = ("A", "AAAA")
DOH_CONTENT_TYPE = "application/dns-message"
_MAX_UDP_REPLIES = 32  # evidence kept per query; a flood beyond this is dropped
_GARBAGE_EVIDENCE = 32  # bytes of an unparsable reply kept as hex


@dataclass(frozen=True)
class DnsParams(NoParams):
    """The ``dns`` probe takes no params: the resolvers come from the config."""

    PROBE: ClassVar[str] = "dns"


def budget_s(_p: DnsParams, settings: ProbeSettings) -> float:
    """The longest correct run (`probes.ProbeType.budget`): A and AAAA at once, each
    within ``dns_s``, then over UDP the window for a second, differing reply."""
    return settings.timeouts.dns_s + settings.resolvers.reply_window_s


# --- resolver strings ---------------------------------------------------------------------


@dataclass(frozen=True)
class ResolverSpec:
    kind: Literal["system", "udp", "tcp", "doh"]
    host: str = ""
    port: int = 0
    url: str = ""


def parse_resolver(spec: str) -> ResolverSpec:
    """Parse ``system``, ``udp:HOST:PORT``, ``tcp:HOST:PORT`` (``[v6]`` ok) or ``doh:URL``.

    Raises ValueError on anything else: a config error the config validator should
    catch by calling this at load time, not a network failure.
    """
    if spec == "system":
        return ResolverSpec("system")
    kind, sep, rest = spec.partition(":")
    if not sep:
        raise ValueError(f"resolver {spec!r}: want system, udp:, tcp: or doh:")
    if kind == "doh":
        if not rest.startswith("https://"):
            raise ValueError(f"resolver {spec!r}: a DoH URL starts with https://")
        return ResolverSpec("doh", url=rest)
    if kind not in ("udp", "tcp"):
        raise ValueError(f"resolver {spec!r}: unknown kind {kind!r}")
    if rest.startswith("["):
        host, bracket, port_text = rest[1:].partition("]:")
        if not bracket:
            raise ValueError(f"resolver {spec!r}: want [IPv6]:PORT")
    else:
        host, _, port_text = rest.rpartition(":")
        if ":" in host:
            raise ValueError(f"resolver {spec!r}: write an IPv6 resolver as [ADDR]:PORT")
    if not host or not port_text.isdigit() or not 0 < int(port_text) < 65536:
        raise ValueError(f"resolver {spec!r}: want HOST:PORT with a port in 1-65535")
    return ResolverSpec(kind, host=host, port=int(port_text))  # type: ignore[arg-type]


# --- per-query outcome --------------------------------------------------------------------


@dataclass
class _Outcome:
    """What one query (A or AAAA) came to: a reply's rcode and addresses, or an error."""

    rcode: str | None = None
    addresses: tuple[str, ...] = ()
    error: str | None = None  # classified failure when no usable reply arrived
    replies: list[DnsReply] = field(default_factory=list)  # evidence
    disagree: bool = False  # several matching replies that differ: injection
    icmp: IcmpWatch | None = None  # UDP: the ICMP errors the query's socket received

    @property
    def failure(self) -> str | None:
        if self.error is not None:
            return self.error
        return classify_rcode(self.rcode, answered=bool(self.addresses))


def _judge(
    query: dns.message.Message, qname: str, qtype: str, raw: Sequence[tuple[float, bytes]]
) -> _Outcome:
    """Turn the replies received for one query into its outcome plus evidence."""
    out = _Outcome()
    matching: list[tuple[str, tuple[str, ...]]] = []
    for delay, data in raw:
        entry = DnsReply(qtype=qtype, delay_s=round(delay, 6))
        try:
            message = parse_message(data)
        except WireError:
            out.replies.append(replace(entry, garbage_hex=data[:_GARBAGE_EVIDENCE].hex()))
            continue
        rcode, addrs = rcode_text(message), addresses(message, qname, qtype)
        ours = matches_query(query, message)
        # not ours: wrong transaction ID or question (mismatch)
        out.replies.append(replace(entry, rcode=rcode, answers=tuple(addrs), mismatch=not ours))
        if ours:
            matching.append((rcode, addrs))
    if matching:
        out.rcode, out.addresses = matching[0]
        out.disagree = len({(r, frozenset(a)) for r, a in matching}) > 1
    elif raw:
        out.error = Failure.DNS_SERVER_MISBEHAVING  # the resolver spoke, but never an answer
    return out


def _failed(exc: BaseException) -> _Outcome:
    return _Outcome(error=str(classify(exc, Operation.RESOLVE)))


# --- UDP ----------------------------------------------------------------------------------


def _answers(query: dns.message.Message, data: bytes) -> bool:
    """Is ``data`` a well-formed reply to ``query`` (what ends a stub resolver's wait)?"""
    try:
        return matches_query(query, parse_message(data))
    except WireError:
        return False


async def _collect(
    channel: UdpChannel, query: dns.message.Message, wait_s: float, window_s: float
) -> tuple[list[tuple[float, bytes]], BaseException | None]:
    """Send ``query``; keep every datagram (up to a bound) with its delay since the send.

    The wait ends at the first reply that answers the query (then ``window_s`` more, to
    catch a second, differing answer: the point of this probe), at an ICMP error, or
    after ``wait_s`` (then the error is a TimeoutError).  Garbage or a reply to another
    query does not end it: a stub resolver ignores those and keeps listening, so a stray
    or forged datagram arriving first must not hide the real answer that comes after it.
    """
    sent_at = channel.send(query.to_wire())
    replies: list[tuple[float, bytes]] = []
    answered = False
    until = sent_at + wait_s
    while True:  # bounded: each pass reads a datagram or ends at ``until``
        try:
            item = await channel.recv(until)
        except OSError as exc:  # on our connected socket: ICMP port unreachable and kin
            if answered:
                continue  # an error after the answer changes nothing
            return replies, exc
        if item is None:
            return replies, None if answered else TimeoutError()
        arrived, data = item
        answers = _answers(query, data)
        # A flood beyond the bound is dropped, but never the first real answer.
        if len(replies) < _MAX_UDP_REPLIES or (answers and not answered):
            replies.append((arrived - sent_at, data))
        if answers and not answered:
            answered = True
            until = time.monotonic() + window_s


async def _udp_query(r: ResolverSpec, qname: str, qtype: str, settings: ProbeSettings) -> _Outcome:
    query = build_query(qname, qtype)
    try:
        # A connected socket: the kernel drops datagrams from other addresses (an
        # injector spoofs the resolver's, so it still gets through) and reports ICMP.
        channel = await UdpChannel.open(r.host, r.port)
    except OSError as exc:
        return _failed(exc)
    with contextlib.closing(channel):
        replies, error = await _collect(
            channel, query, settings.timeouts.dns_s, settings.resolvers.reply_window_s
        )
    if not replies and error is not None:
        return replace(_failed(error), icmp=channel.icmp)
    # only unusable replies after a timeout: judged too (the resolver spoke, never an answer)
    return replace(_judge(query, qname, qtype, replies), icmp=channel.icmp)


# --- TCP ----------------------------------------------------------------------------------


async def _tcp_exchange(host: str, port: int, wire: bytes, timeout_s: float) -> bytes:
    """One RFC 1035 length-prefixed exchange; the prefix bounds the read to 64 KiB.
    ``host`` is an IP literal (the config allows no other resolver host): the shared
    connect never looks a name up."""
    reader, writer = await open_streams(await connect(host, port, timeout_s))
    try:
        writer.write(len(wire).to_bytes(2, "big") + wire)
        await writer.drain()
        size = int.from_bytes(await reader.readexactly(2), "big")
        return await reader.readexactly(size)
    finally:
        # the peer's reset on close changes nothing about what we read
        await close_streams(writer)


async def _tcp_query(r: ResolverSpec, qname: str, qtype: str, settings: ProbeSettings) -> _Outcome:
    query = build_query(qname, qtype)
    start = time.monotonic()
    timeout_s = settings.timeouts.dns_s
    try:
        async with asyncio.timeout(timeout_s):  # the whole exchange, connect included
            data = await _tcp_exchange(r.host, r.port, query.to_wire(), timeout_s)
    except (OSError, TimeoutError, EOFError) as exc:
        return _failed(exc)
    return _judge(query, qname, qtype, [(time.monotonic() - start, data)])


# --- DoH ----------------------------------------------------------------------------------


def _ssl_context(ca_file: str | None) -> ssl.SSLContext:
    """System trust store, plus the configured CA file (the lab's) as an extra anchor."""
    stamp = os.stat(ca_file).st_mtime_ns if ca_file else 0
    return _cached_ssl_context(ca_file, stamp)


@functools.lru_cache(maxsize=8)
def _cached_ssl_context(ca_file: str | None, _stamp: int) -> ssl.SSLContext:
    # Loading the system store costs ~0.2 s of CPU: once per CA file version, not per probe.
    ctx = ssl.create_default_context()
    if ca_file:
        ctx.load_verify_locations(ca_file)
    return ctx


async def _read_bounded(stream: aiohttp.StreamReader, limit: int) -> bytes | None:
    """The body, or None once it exceeds ``limit`` (a giant reply must not eat memory)."""
    body = bytearray()
    while True:  # each turn adds at least one byte or ends: at most limit + 1 turns
        chunk = await stream.read(limit + 1 - len(body))
        if not chunk:
            return bytes(body)
        body += chunk
        if len(body) > limit:
            return None


async def _doh_query(session: aiohttp.ClientSession, url: str, qname: str, qtype: str) -> _Outcome:
    # RFC 8484 suggests ID 0 for cacheability; POST is not cached, so a random ID
    # keeps the reply-matching check meaningful.
    query = build_query(qname, qtype)
    headers = {"Content-Type": DOH_CONTENT_TYPE, "Accept": DOH_CONTENT_TYPE}
    start = time.monotonic()
    try:
        async with session.post(url, data=query.to_wire(), headers=headers) as resp:
            status, content_type = resp.status, resp.content_type
            body = await _read_bounded(resp.content, MAX_MESSAGE)
    except aiohttp.ClientResponseError as exc:
        # aiohttp could not read an HTTP response (bad status line, headers ...): the
        # server spoke, never an answer.  Its message quotes the peer's bytes: not kept.
        unreadable = DnsReply(qtype=qtype, http_error=type(exc).__name__)
        return _Outcome(error=Failure.DNS_SERVER_MISBEHAVING, replies=[unreadable])
    except (aiohttp.ClientError, OSError, TimeoutError) as exc:
        return _failed(exc)
    delay = time.monotonic() - start
    if status != 200 or content_type != DOH_CONTENT_TYPE or body is None:
        evidence = DnsReply(
            qtype=qtype,
            delay_s=round(delay, 6),
            http_status=status,
            content_type=content_type,
            oversized=body is None,
        )
        return _Outcome(error=Failure.DNS_SERVER_MISBEHAVING, replies=[evidence])
    out = _judge(query, qname, qtype, [(delay, body)])
    out.replies = [replace(entry, http_status=status) for entry in out.replies]
    return out


# --- the resolvers ------------------------------------------------------------------------

_Resolve = Callable[[ResolverSpec, str, ProbeSettings], Awaitable[dict[str, _Outcome]]]


async def _each_qtype(
    query: Callable[[str], Awaitable[_Outcome]],
) -> dict[str, _Outcome]:
    outcomes = await asyncio.gather(*(query(qt) for qt in QTYPES))
    return dict(zip(QTYPES, outcomes, strict=True))


async def _resolve_udp(r: ResolverSpec, qname: str, settings: ProbeSettings) -> dict[str, _Outcome]:
    return await _each_qtype(lambda qt: _udp_query(r, qname, qt, settings))


async def _resolve_tcp(r: ResolverSpec, qname: str, settings: ProbeSettings) -> dict[str, _Outcome]:
    return await _each_qtype(lambda qt: _tcp_query(r, qname, qt, settings))


async def _resolve_doh(r: ResolverSpec, qname: str, settings: ProbeSettings) -> dict[str, _Outcome]:
    connector = aiohttp.TCPConnector(ssl=_ssl_context(settings.tls.ca_file))
    timeout = aiohttp.ClientTimeout(total=settings.timeouts.dns_s)
    # trust_env=False: a proxy from the environment would measure the proxy's path.
    async with aiohttp.ClientSession(
        connector=connector, timeout=timeout, trust_env=False
    ) as session:
        return await _each_qtype(lambda qt: _doh_query(session, r.url, qname, qt))


async def _resolve_system(
    r: ResolverSpec, qname: str, settings: ProbeSettings
) -> dict[str, _Outcome]:
    loop = asyncio.get_running_loop()
    # An IP literal needs no lookup: AI_NUMERICHOST guarantees no DNS query leaves, and
    # the other family simply has no address (as NOERROR without data would say).
    version = _ip_version(qname)
    flags = socket.AI_NUMERICHOST if version else 0

    async def lookup(family: socket.AddressFamily) -> _Outcome:
        if version and version != (4 if family == socket.AF_INET else 6):
            return _Outcome(rcode="NOERROR")
        try:
            infos = await loop.getaddrinfo(
                qname, None, family=family, type=socket.SOCK_STREAM, flags=flags
            )
        except OSError as exc:  # socket.gaierror: classified by its EAI_* code
            return _failed(exc)
        found = tuple(dict.fromkeys(str(info[4][0]) for info in infos))
        return _Outcome(rcode="NOERROR", addresses=found)

    try:
        # getaddrinfo runs in a thread that cannot be cancelled; the timeout only
        # stops us waiting for it.
        async with asyncio.timeout(settings.timeouts.dns_s):
            v4, v6 = await asyncio.gather(lookup(socket.AF_INET), lookup(socket.AF_INET6))
    except TimeoutError as exc:
        return {qt: _failed(exc) for qt in QTYPES}
    return {"A": v4, "AAAA": v6}


def _ip_version(host: str) -> int:
    """4 or 6 for an IP literal, 0 for a name."""
    try:
        return ipaddress.ip_address(host).version
    except ValueError:
        return 0


_RESOLVERS: dict[str, _Resolve] = {
    "system": _resolve_system,
    "udp": _resolve_udp,
    "tcp": _resolve_tcp,
    "doh": _resolve_doh,
}


# --- the probe ----------------------------------------------------------------------------


async def probe(target: Target, settings: ProbeSettings) -> ProbeResult:
    """Resolve ``target.endpoint.host`` (A and AAAA) via ``target.resolver``."""
    resolver = target.resolver or "system"
    rec = Recorder(target, DnsEvidence(resolver=resolver))
    spec = parse_resolver(resolver)
    qname = target.endpoint.host
    with rec.phase("resolve"):
        outcomes = await _RESOLVERS[spec.kind](spec, qname, settings)
    return _finish(rec, target.endpoint.prefixes, outcomes, with_replies=spec.kind != "system")


def _finish(
    rec: Recorder[DnsEvidence],
    prefixes: Sequence[IPNetwork],
    outcomes: dict[str, _Outcome],
    *,
    with_replies: bool,
) -> ProbeResult:
    answers = {qt: tuple(o.addresses) for qt, o in outcomes.items()}
    # Rcodes tell the DNS-level story; errors are the queries that got no usable reply.
    errors = {qt: str(o.error) for qt, o in outcomes.items() if o.error}
    replies = tuple(entry for o in outcomes.values() for entry in o.replies)
    icmp_errors, icmp_stray = icmp_evidence(o.icmp for o in outcomes.values() if o.icmp)
    rec.evidence = replace(
        rec.evidence,
        answers=answers,
        rcodes={qt: o.rcode for qt, o in outcomes.items() if o.rcode},
        errors=errors or None,
        replies=replies if with_replies else None,
        icmp_errors=icmp_errors,
        icmp_stray=icmp_stray,
    )
    if any(o.disagree for o in outcomes.values()):
        rec.flag("dns_injection_suspected")
    found = [a for qt in QTYPES for a in answers[qt]]
    if not found:
        failure = telling_failure(o.failure or Failure.DNS_NO_ANSWER for o in outcomes.values())
        return rec.fail(failure, Operation.RESOLVE)
    if prefixes and any(not in_prefixes(a, prefixes) for a in found):
        rec.flag("dns_answer_outside_prefixes")
    # A bogon inside the service's own prefixes is legitimate (lab services live on 127/8).
    bogons = tuple(a for a in found if suspect_bogon(a, prefixes))
    if bogons:
        return rec.fail(Failure.DNS_BOGON, Operation.RESOLVE, replace(rec.evidence, bogons=bogons))
    return rec.ok()
