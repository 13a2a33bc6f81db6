"""Censor localisation (`probe trace`): at which hop does the block appear?

A CenTrace-style measurement.  The *triggering* packet of a failing path (the TCP SYN of
an IP block, the TLS ClientHello of an SNI filter, a STUN Binding request, a DNS query)
is sent again and again with an increasing IP TTL / IPv6 hop limit.  While the TTL is
too small, a router on the way answers ICMP time-exceeded; at the first TTL where the
packet passes the censor, the block's signature appears (a reset, silence, a forged
answer) -- so the censor sits at the last hop that still answered, or on the link behind
it.  A TTL that reaches the server instead gives its answer: no block on this path.

Privileges: none.  Linux tells an ordinary socket about ICMP errors when ``IP_RECVERR``
/ ``IPV6_RECVERR`` is set:

- UDP: the error queue (``recvmsg(MSG_ERRQUEUE)``) holds a ``sock_extended_err`` with
  the ICMP type and the *sender's* address, i.e. the router at that hop.
- TCP: a segment that expires yields only ``EHOSTUNREACH`` on the socket, without the
  sender (checked on Linux 6.x: no error-queue entry).  Reading the router's address for
  the TCP segment itself would take a raw ICMP socket (``CAP_NET_RAW``), which this tool
  never uses.  Instead the hop addresses come from a UDP walk to the same destination
  (same routers unless load balancing splits the flows; the report says so), and the TCP
  stepping says at which TTL the block appears.

Bounded and rate-limited: at most ``max_hops`` TTLs (default 12, at most 32), one probe
per TTL, ``interval_s`` apart (default 0.1 s), each waiting at most ``timeout_s``.  Never
part of ``probe run``: only the ``probe trace`` command sends these packets.

Whether the censor's hop is in the vantage's own AS needs IP-to-AS data, which is not
shipped: ``probe trace --asn-map FILE`` reads a prefix-to-AS table (`AsnMap`).  What it
cannot tell: a censor that does not decrement the TTL and sits behind a router that drops
expired packets silently.
"""

from __future__ import annotations

import contextlib
import errno
import ipaddress
import select
import socket
import ssl
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field, replace
from typing import Any, Literal

from .wire import stun as stun_wire
from .wire.dnsmsg import build_query
from .wire.errqueue import IP_RECVERR, IPV6_RECVERR, parse_error_queue

__all__ = [
    "AsnMap",
    "Hop",
    "Trace",
    "TraceError",
    "client_hello",
    "dns_trigger",
    "quic_trigger",
    "stun_trigger",
    "trace_tcp",
    "trace_udp",
    "udp_path",
    "with_asn",
]

SocketFactory = Callable[[socket.AddressFamily, socket.SocketKind], socket.socket]
Outcome = Literal["time_exceeded", "unreachable", "reply", "reset", "refused", "silence", "error"]

MAX_HOPS = 32
_TRACE_PORT = 33434  # the traditional traceroute port: closed on a real server
_UDP_MARKER = b"probe trace: TTL walk (censorship measurement)"


class TraceError(Exception):
    """A trace that could not start (bad target, no route); the message says why."""


@dataclass(frozen=True)
class Hop:
    """What one TTL gave: ``responder`` is the ICMP sender (a router) or the peer."""

    ttl: int
    outcome: Outcome
    responder: str | None = None
    rtt_s: float | None = None
    detail: str | None = None


@dataclass(frozen=True)
class Trace:
    """A finished trace.  ``blocked_at_ttl``: the first TTL showing the block;
    ``censor_hop``: the last hop that answered before it (the censor is that router or
    on the link behind it); ``reached_ttl``: hops to the destination, when not blocked."""

    address: str
    port: int
    protocol: Literal["tcp", "udp"]
    trigger: str
    hops: tuple[Hop, ...]
    path: tuple[Hop, ...] = ()  # TCP: the UDP walk that names the routers
    blocked_at_ttl: int | None = None
    censor_hop: Hop | None = None
    reached_ttl: int | None = None
    conclusion: str = ""
    notes: tuple[str, ...] = field(default_factory=tuple)
    censor_asn: str | None = None  # from an --asn-map, when given
    in_vantage_as: bool | None = None  # the censor's hop is in the vantage's own AS

    def to_json(self) -> dict[str, Any]:
        return asdict(self)


# --------------------------------------------------------------------------- AS data


Network = ipaddress.IPv4Network | ipaddress.IPv6Network


@dataclass(frozen=True)
class AsnMap:
    """Longest-prefix match over a prefix-to-AS table.  ``load`` reads either
    ``PREFIX/LEN ASN`` lines or RouteViews' pfx2as dump (``ADDRESS<tab>LEN<tab>ASN``);
    ``#`` comments and blank lines are skipped; a bad line is an error naming it."""

    entries: tuple[tuple[Network, str], ...]

    @classmethod
    def load(cls, path: str) -> AsnMap:
        entries: list[tuple[Network, str]] = []
        try:
            with open(path, encoding="utf-8") as f:
                for number, line in enumerate(f, 1):
                    text = line.split("#", 1)[0].split()
                    if text:
                        entries.append(_asn_entry(path, number, text))
        except OSError as exc:
            raise TraceError(f"{path}: {exc.strerror or exc}") from exc
        entries.sort(key=lambda e: e[0].prefixlen, reverse=True)
        return cls(tuple(entries))

    def lookup(self, address: str) -> str | None:
        ip = ipaddress.ip_address(address)
        return next((asn for net, asn in self.entries if ip in net), None)


def _asn_entry(path: str, number: int, fields: list[str]) -> tuple[Network, str]:
    try:
        if len(fields) == 3:  # pfx2as: address, length, AS (or an AS set "1_2")
            net = ipaddress.ip_network(f"{fields[0]}/{fields[1]}", strict=False)
        elif len(fields) == 2:
            net = ipaddress.ip_network(fields[0], strict=False)
        else:
            raise ValueError("expected 'PREFIX ASN' or 'ADDRESS LEN ASN'")
        # an AS set or a multi-origin prefix ("64502_64503", "1,2"): its first member
        asn = fields[-1].split("_")[0].split(",")[0].upper().removeprefix("AS")
        if not asn.isdigit():
            raise ValueError(f"{fields[-1]!r} is not an AS number")
    except ValueError as exc:
        raise TraceError(f"{path}:{number}: {exc}") from exc
    return net, f"AS{int(asn)}"


def with_asn(trace: Trace, asn_map: AsnMap, vantage_asn: str | None) -> Trace:
    """The trace with the censor hop's AS and whether it is the vantage's own."""
    hop = trace.censor_hop
    if hop is None or hop.responder is None:
        return trace
    asn = asn_map.lookup(hop.responder)
    own = None if asn is None or not vantage_asn else asn == vantage_asn.upper()
    where = "unknown AS" if asn is None else asn
    if own is not None:
        where += " (the vantage's own AS)" if own else f" (not the vantage's {vantage_asn})"
    conclusion = f"{trace.conclusion}; that hop is in {where}"
    return replace(trace, censor_asn=asn, in_vantage_as=own, conclusion=conclusion)


# --------------------------------------------------------------------------- triggers


def client_hello(sni: str | None, alpn: Sequence[str] = ("h2", "http/1.1")) -> bytes:
    """The ClientHello the ``tls`` probe sends for ``sni`` (same ssl defaults)."""
    ctx = ssl.create_default_context()
    ctx.check_hostname = False
    ctx.verify_mode = ssl.CERT_NONE
    if alpn:
        ctx.set_alpn_protocols(list(alpn))
    incoming, outgoing = ssl.MemoryBIO(), ssl.MemoryBIO()
    tls = ctx.wrap_bio(incoming, outgoing, server_hostname=sni)
    with contextlib.suppress(ssl.SSLWantReadError):
        tls.do_handshake()
    return outgoing.read()


def quic_trigger(sni: str | None, address: str, port: int) -> bytes:
    """The first datagram of a QUIC v1 handshake (an Initial padded to 1200 bytes: the
    size and version B8 filters key on), from aioquic as the ``quic`` probe sends it."""
    from aioquic.quic.configuration import QuicConfiguration
    from aioquic.quic.connection import QuicConnection

    config = QuicConfiguration(is_client=True, alpn_protocols=["h3"], server_name=sni)
    connection = QuicConnection(configuration=config)
    connection.connect((address, port), now=time.monotonic())
    datagrams = connection.datagrams_to_send(now=time.monotonic())
    if not datagrams:
        raise TraceError("aioquic produced no Initial")
    return bytes(datagrams[0][0])


def stun_trigger() -> bytes:
    return stun_wire.encode(stun_wire.binding_request(), fingerprint=True)


def dns_trigger(name: str, rdtype: str = "A") -> bytes:
    return bytes(build_query(name, rdtype).to_wire())


# --------------------------------------------------------------------------- sockets


def _family(address: str) -> socket.AddressFamily:
    try:
        version = ipaddress.ip_address(address).version
    except ValueError as exc:
        raise TraceError(f"{address!r} is not an IP address") from exc
    return socket.AF_INET6 if version == 6 else socket.AF_INET


def _set_ttl(sock: socket.socket, ttl: int) -> None:
    if sock.family == socket.AF_INET6:
        sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_UNICAST_HOPS, ttl)
    else:
        sock.setsockopt(socket.IPPROTO_IP, socket.IP_TTL, ttl)


def _recverr(sock: socket.socket) -> None:
    if sock.family == socket.AF_INET6:
        sock.setsockopt(socket.IPPROTO_IPV6, IPV6_RECVERR, 1)
    else:
        sock.setsockopt(socket.IPPROTO_IP, IP_RECVERR, 1)


def _queued_hop(ttl: int, rtt: float, ancdata: list[tuple[int, int, bytes]]) -> Hop:
    """The hop an error-queue message reports: time-exceeded from a router on the way,
    else unreachable (from the router or host that said so, when the kernel named it)."""
    err = parse_error_queue(ancdata)
    if err is None:  # not an ICMP error (a local one): no sender to name
        return Hop(ttl, "unreachable", None, rtt)
    return Hop(ttl, "time_exceeded" if err.time_exceeded else "unreachable", err.offender, rtt)


def _wait(sock: socket.socket, timeout_s: float) -> bool:
    poller = select.poll()
    poller.register(sock, select.POLLIN | select.POLLERR)
    return bool(poller.poll(max(0, int(timeout_s * 1000))))


# --------------------------------------------------------------------------- UDP


def _udp_hop(
    sock: socket.socket, ttl: int, payload: bytes, timeout_s: float, describe: Describe
) -> Hop:
    _set_ttl(sock, ttl)
    sent = time.monotonic()
    try:
        sock.send(payload)
    except OSError as exc:
        return Hop(ttl, "error", detail=errno.errorcode.get(exc.errno or 0, str(exc)))
    deadline = sent + timeout_s
    while (left := deadline - time.monotonic()) > 0 and _wait(sock, left):
        rtt = round(time.monotonic() - sent, 6)
        try:
            _data, ancdata, _flags, _addr = sock.recvmsg(512, 1024, socket.MSG_ERRQUEUE)
        except BlockingIOError:
            pass  # no ICMP error queued: a datagram came back
        else:
            return _queued_hop(ttl, rtt, ancdata)
        try:
            data = sock.recv(4096)
        except BlockingIOError:
            continue
        except OSError as exc:  # the error itself, reported once more on recv
            return Hop(ttl, "unreachable", None, rtt, errno.errorcode.get(exc.errno or 0))
        peer = sock.getpeername()[0]
        return Hop(ttl, "reply", peer, rtt, describe(data))
    return Hop(ttl, "silence")


Describe = Callable[[bytes], str | None]


def _no_detail(_data: bytes) -> str | None:
    return None


def _udp_walk(
    address: str,
    port: int,
    payload: bytes,
    *,
    max_hops: int,
    timeout_s: float,
    interval_s: float,
    factory: SocketFactory,
    describe: Describe = _no_detail,
    stop_after_silence: int = 3,
) -> list[Hop]:
    sock = factory(_family(address), socket.SOCK_DGRAM)
    hops: list[Hop] = []
    try:
        sock.setblocking(False)
        _recverr(sock)
        sock.connect((address, port))
        silent = 0
        for ttl in range(1, _bounded_hops(max_hops) + 1):
            if hops:
                time.sleep(interval_s)
            hop = _udp_hop(sock, ttl, payload, timeout_s, describe)
            hops.append(hop)
            if hop.outcome in ("reply", "unreachable", "error"):
                break
            silent = silent + 1 if hop.outcome == "silence" else 0
            if silent >= stop_after_silence:
                break
    finally:
        sock.close()
    return hops


def _bounded_hops(max_hops: int) -> int:
    if not 1 <= max_hops <= MAX_HOPS:
        raise TraceError(f"max_hops must be in 1..{MAX_HOPS}, got {max_hops}")
    return max_hops


def udp_path(
    address: str,
    *,
    max_hops: int = 12,
    timeout_s: float = 1.0,
    interval_s: float = 0.1,
    factory: SocketFactory = socket.socket,
) -> list[Hop]:
    """The routers towards ``address`` (a classic UDP traceroute to a closed port)."""
    return _udp_walk(
        address,
        _TRACE_PORT,
        _UDP_MARKER,
        max_hops=max_hops,
        timeout_s=timeout_s,
        interval_s=interval_s,
        factory=factory,
    )


def trace_udp(
    address: str,
    port: int,
    payload: bytes,
    trigger: str,
    *,
    max_hops: int = 12,
    timeout_s: float = 1.0,
    interval_s: float = 0.1,
    factory: SocketFactory = socket.socket,
    describe: Describe = _no_detail,
) -> Trace:
    """Step the TTL of a UDP trigger (STUN, DNS): time-exceeded until the censor, then
    silence (a drop) or an answer (the server, or a forger in front of it)."""
    path = udp_path(
        address, max_hops=max_hops, timeout_s=timeout_s, interval_s=interval_s, factory=factory
    )
    hops = _udp_walk(
        address,
        port,
        payload,
        max_hops=max_hops,
        timeout_s=timeout_s,
        interval_s=interval_s,
        factory=factory,
        describe=describe,
    )
    return _conclude(address, port, "udp", trigger, hops, path)


# --------------------------------------------------------------------------- TCP


def _tcp_hop(
    address: str,
    port: int,
    payload: bytes | None,
    ttl: int,
    timeout_s: float,
    factory: SocketFactory,
) -> Hop:
    """One TTL: ``payload`` None steps the SYN, else the first data segment."""
    sock = factory(_family(address), socket.SOCK_STREAM)
    try:
        _recverr(sock)  # an expired segment becomes EHOSTUNREACH at once
        sock.settimeout(timeout_s)
        if payload is None:
            _set_ttl(sock, ttl)
        sent = time.monotonic()
        try:
            sock.connect((address, port))
            if payload is None:
                return Hop(ttl, "reply", address, round(time.monotonic() - sent, 6), "SYN-ACK")
            _set_ttl(sock, ttl)
            sent = time.monotonic()
            sock.sendall(payload)
            data = sock.recv(4096)
        except TimeoutError:
            return Hop(ttl, "silence")
        except OSError as exc:
            return _tcp_error(ttl, exc, round(time.monotonic() - sent, 6))
        rtt = round(time.monotonic() - sent, 6)
        if not data:
            return Hop(ttl, "reply", address, rtt, "FIN")
        return Hop(ttl, "reply", address, rtt, f"{len(data)} bytes")
    finally:
        sock.close()


def _tcp_error(ttl: int, exc: OSError, rtt: float) -> Hop:
    code = exc.errno
    if code in (errno.EHOSTUNREACH, errno.ENETUNREACH):
        # with IP_RECVERR an expired segment's ICMP surfaces as this errno (no sender)
        return Hop(ttl, "time_exceeded", None, rtt, errno.errorcode.get(code))
    if code == errno.ECONNRESET:
        return Hop(ttl, "reset", None, rtt)
    if code == errno.ECONNREFUSED:
        return Hop(ttl, "refused", None, rtt)
    return Hop(ttl, "error", None, rtt, errno.errorcode.get(code or 0, str(exc)))


def trace_tcp(
    address: str,
    port: int,
    payload: bytes | None,
    trigger: str,
    *,
    max_hops: int = 12,
    timeout_s: float = 1.0,
    interval_s: float = 0.1,
    factory: SocketFactory = socket.socket,
) -> Trace:
    """Step the TTL of the SYN (``payload`` None: an IP block) or of the first data
    segment (a ClientHello: an SNI or fingerprint filter); routers named by a UDP walk."""
    path = udp_path(
        address, max_hops=max_hops, timeout_s=timeout_s, interval_s=interval_s, factory=factory
    )
    hops: list[Hop] = []
    silent = 0
    for ttl in range(1, _bounded_hops(max_hops) + 1):
        time.sleep(interval_s)
        hop = _tcp_hop(address, port, payload, ttl, timeout_s, factory)
        by_udp = next((h for h in path if h.ttl == ttl and h.responder), None)
        if hop.outcome == "time_exceeded" and by_udp is not None:
            hop = Hop(ttl, hop.outcome, by_udp.responder, hop.rtt_s, f"{hop.detail}; via UDP walk")
        hops.append(hop)
        if hop.outcome in ("reply", "reset", "refused", "error"):
            break
        silent = silent + 1 if hop.outcome == "silence" else 0
        if silent >= 3:
            break
    return _conclude(address, port, "tcp", trigger, hops, path)


# --------------------------------------------------------------------------- conclusion


def _conclude(
    address: str,
    port: int,
    protocol: Literal["tcp", "udp"],
    trigger: str,
    hops: Sequence[Hop],
    path: Sequence[Hop],
) -> Trace:
    notes: list[str] = []
    if protocol == "tcp":
        notes.append(
            "router addresses come from a UDP walk to the same address: load balancing "
            "may route TCP differently"
        )

    def done(conclusion: str, **found: Any) -> Trace:
        return Trace(address, port, protocol, trigger, tuple(hops), tuple(path),
                     conclusion=conclusion, notes=tuple(notes), **found)  # fmt: skip

    reached = next((h for h in hops if h.outcome == "reply" and h.responder == address), None)
    # The closed-port walk says how far the server is: an answer "from the server" that
    # arrives with a smaller TTL came from something in front of it (an injector).
    server_ttl = next((h.ttl for h in path if h.responder == address), None)
    if reached is not None and server_ttl is not None and reached.ttl < server_ttl:
        last = _hop_at(reached.ttl - 1, hops, path)
        conclusion = (
            f"an answer in the server's name at TTL {reached.ttl}, but the server is "
            f"{server_ttl} hops away: injected; the injector is {_where(last)}"
        )
        return done(conclusion, blocked_at_ttl=reached.ttl, censor_hop=last)
    if reached is not None:
        conclusion = f"reached the server at TTL {reached.ttl}: no block on the way"
        if reached.detail:
            conclusion += f" ({reached.detail})"
        return done(conclusion, reached_ttl=reached.ttl)
    first = _first_block(hops, path)
    if first is None:
        return done(f"only time-exceeded up to TTL {len(hops)}: the path is longer than that")
    what = {
        "reset": "a reset",
        "refused": "a reset to the SYN",
        "silence": "silence (dropped)",
        "reply": f"an answer from {first.responder}",
        "unreachable": f"ICMP unreachable from {first.responder or '?'}",
        "error": f"an error ({first.detail})",
    }.get(first.outcome, first.outcome)
    last = _hop_at(first.ttl - 1, hops, path)
    conclusion = f"{what} first at TTL {first.ttl}: the censor is {_where(last)}"
    return done(conclusion, blocked_at_ttl=first.ttl, censor_hop=last)


def _first_block(hops: Sequence[Hop], path: Sequence[Hop]) -> Hop | None:
    """The first TTL showing the block.  A reset, refusal, ICMP unreachable or foreign
    answer is one at once.  Silence is one only where it never ends (a router that
    rate-limits or never sends time-exceeded is silent too, and answers follow it); and a
    TTL at which the UDP walk met a router is not the start of the drop: the packet got
    that far (routers rate-limit ICMP, so the trigger's own time-exceeded may be missing).
    """
    loud = next((h for h in hops if h.outcome not in ("time_exceeded", "silence")), None)
    if loud is not None:
        return loud
    trailing = 0
    for h in reversed(hops):
        if h.outcome != "silence":
            break
        trailing += 1
    if not trailing:
        return None
    start = len(hops) - trailing
    expired = {h.ttl for h in path if h.outcome == "time_exceeded"}
    while start < len(hops) - 1 and hops[start].ttl in expired:
        start += 1
    return hops[start]


def _hop_at(ttl: int, hops: Sequence[Hop], path: Sequence[Hop]) -> Hop | None:
    """The router at ``ttl``, named by the trigger's own time-exceeded or the UDP walk."""
    if ttl < 1:
        return None
    for h in (*hops, *path):
        if h.ttl == ttl and h.outcome == "time_exceeded" and h.responder:
            return Hop(ttl, "time_exceeded", h.responder, h.rtt_s)
    return Hop(ttl, "silence")


def _where(last: Hop | None) -> str:
    if last is None:
        return "before the first router (on the vantage's own link or its first hop)"
    name = last.responder or "an unnamed router"
    return f"at hop {last.ttl} ({name}) or on the link right behind it"
