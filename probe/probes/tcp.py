"""TCP connect probe: does a SYN to this address and port come back as an established connection?

What a success proves: the three-way handshake completed with *something* at that
address (the service, or a middlebox answering for it).  What a failure says:

- ``connection_refused``: an RST answered the SYN (nothing listening, or an IP block
  with ``reject with tcp reset``, FIELD.md B2);
- ``generic_timeout_error``: the SYN (or its SYN-ACK) vanished (B2 blackhole);
- ``host_unreachable`` / ``network_unreachable``: an ICMP error or no local route;
- ``connection_reset`` / ``eof_error``: only with the ``hold_s`` parameter (below).

``hold_s`` (params, default 0 = a plain OONI-style connect): keep the connection open
that long and watch it.  Some middleboxes let the handshake through and then kill the
connection; an RST then gives ``connection_reset`` and a FIN ``eof_error``, both with
``failed_operation: read``.  Bytes the peer volunteers are counted, not judged.

`connect()` and `socket_evidence()` are shared with the TLS probe and the application
probes, so every TCP-based probe connects the same way and records the same evidence.
"""

from __future__ import annotations

import asyncio
import contextlib
import ipaddress
import os
import socket
import struct
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, ClassVar, Self

from ..config.settings import ProbeSettings
from ..model import Operation, ProbeParams, ProbeResult, Target
from .base import Recorder
from .params import check_keys, number_param

_HOLD_READ = 4096  # bytes per read while holding: enough to notice data, RST or FIN
# Stop reading once the peer has clearly answered (a flood must not burn CPU for the whole
# hold); the connection is still held, and a reset still seen, until hold_s is over.
_HOLD_MAX_BYTES = 64 * 1024
_FIRST_BYTES = 16  # a short prefix of whatever the peer sends, as hex evidence
# Watching longer than a few minutes shows nothing more and ties up a probe slot.
MAX_HOLD_S = 300.0


@dataclass(frozen=True)
class TcpParams(ProbeParams):
    """``hold_s`` (default 0): the only param."""

    PROBE: ClassVar[str] = "tcp"
    hold_s: float = 0.0

    @classmethod
    def parse(cls, params: Mapping[str, Any], base: Self | None = None) -> Self:
        b = base if base is not None else cls()
        check_keys("tcp", params, ("hold_s",))
        return cls(float(number_param("tcp", params, "hold_s", b.hold_s, 0.0, MAX_HOLD_S)))


def budget_s(p: TcpParams, settings: ProbeSettings) -> float:
    """The longest correct run (`probes.ProbeType.budget`): the connect, then the hold."""
    return settings.timeouts.connect_s + p.hold_s


def require_address(target: Target) -> tuple[str, int]:
    """The target's IP literal and port; anything else is a config bug, not a network failure."""
    if target.address is None or target.port is None:
        raise ValueError(f"{target.probe} target needs an address and a port: {target.key()}")
    return target.address, target.port


def _sockaddr(address: str) -> tuple[socket.AddressFamily, str]:
    # ipaddress validates the literal up front: we never want getaddrinfo to fall back to
    # DNS for a hostname that slipped into `address` (the resolver is a probe of its own).
    ip = ipaddress.ip_address(address)
    return (socket.AF_INET6 if ip.version == 6 else socket.AF_INET), address


async def connect(address: str, port: int, timeout_s: float) -> socket.socket:
    """Open a non-blocking TCP socket to an IP literal within ``timeout_s`` seconds.

    Raises OSError (refused, unreachable, ...) or TimeoutError; the caller classifies.
    A raw socket (not ``open_connection``) so the caller can keep reading the kernel's
    view of the connection and hand the socket to a sans-IO TLS layer.
    """
    family, host = _sockaddr(address)
    if family == socket.AF_INET6:
        # AI_NUMERICHOST: turns "fe80::1%eth0" into a sockaddr with its scope id, no DNS
        info = socket.getaddrinfo(host, port, family, socket.SOCK_STREAM, 0, socket.AI_NUMERICHOST)
        sockaddr: tuple[Any, ...] = info[0][4]
    else:
        sockaddr = (host, port)
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setblocking(False)
    try:
        async with asyncio.timeout(timeout_s):
            await asyncio.get_running_loop().sock_connect(sock, sockaddr)
    except BaseException:  # also on cancellation: never leak the half-open socket
        sock.close()
        raise
    return sock


# struct tcp_info (linux/tcp.h): tcpi_rtt is the u32 at byte 68, in microseconds.  Right
# after the handshake it holds exactly one sample, the SYN -> SYN-ACK round trip as the
# kernel timed it on arrival: queueing on our event loop cannot bend it.
_TCPI_RTT_OFFSET = 68
_TCP_INFO_LEN = 104


def kernel_connect_rtt(sock: socket.socket) -> float | None:
    """The kernel's SYN/SYN-ACK round-trip time in seconds, read right after connect.

    None where TCP_INFO is missing (not Linux) or holds no sample: Karn's rule takes none
    when the SYN was retransmitted, and an answer to a retransmitted SYN is ambiguous.
    """
    option = getattr(socket, "TCP_INFO", None)
    if option is None:
        return None
    try:
        info = sock.getsockopt(socket.IPPROTO_TCP, option, _TCP_INFO_LEN)
    except OSError:
        return None
    if len(info) < _TCPI_RTT_OFFSET + 4:
        return None
    (rtt_us,) = struct.unpack_from("=I", info, _TCPI_RTT_OFFSET)
    return rtt_us / 1e6 if rtt_us else None


def record_connect_rtt(rec: Recorder, sock: socket.socket) -> None:
    """Report the kernel's connect time as phase ``connect_rtt``, beside the loop-timed
    ``connect`` (which also counts how long the loop took to notice the connection)."""
    rtt = kernel_connect_rtt(sock)
    if rtt is not None:
        rec.phases["connect_rtt"] = rtt
        rec.details["connect_rtt_s"] = rtt


def _family(ip: str) -> str:
    parsed = ipaddress.ip_address(ip.split("%", 1)[0])
    if isinstance(parsed, ipaddress.IPv6Address) and parsed.ipv4_mapped is not None:
        return "ipv4"  # what goes on the wire for ::ffff:a.b.c.d
    return f"ipv{parsed.version}"


def socket_evidence(sock: socket.socket) -> dict[str, Any]:
    """Address families of both ends.  Never the local address: it identifies the vantage."""
    evidence: dict[str, Any] = {}
    for key, getter in (("local_family", sock.getsockname), ("peer_family", sock.getpeername)):
        try:
            evidence[key] = _family(str(getter()[0]))
        except OSError:  # ENOTCONN: the peer already reset the connection
            evidence[key] = None
    return evidence


_TCP_INFO_LAST_ACK_RECV = 56  # offset of tcpi_last_ack_recv (ms) in Linux's struct tcp_info


def watch_path(sock: socket.socket) -> None:
    """Ask the kernel for a keepalive probe after each second without a packet from the
    peer: the peer's kernel answers it with an ACK, so `since_last_ack` can tell a silent
    *server* on a working path from a path that lets nothing back (a freeze).  Best
    effort: where the options do not exist, `since_last_ack` says nothing."""
    with contextlib.suppress(OSError, AttributeError):
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_KEEPALIVE, 1)
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_KEEPIDLE, 1)
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_KEEPINTVL, 1)
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_KEEPCNT, 120)  # never the killer


def since_last_ack(sock: socket.socket) -> float | None:
    """Seconds since the last ACK (or any packet) came from the peer, from TCP_INFO; None
    where the kernel does not say."""
    try:
        info = sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_INFO, 104)
    except (OSError, AttributeError):
        return None
    if len(info) < _TCP_INFO_LAST_ACK_RECV + 4:
        return None
    ms = int.from_bytes(info[_TCP_INFO_LAST_ACK_RECV : _TCP_INFO_LAST_ACK_RECV + 4], "little")
    return ms / 1000


async def _hold(sock: socket.socket, hold_s: float, rec: Recorder) -> BaseException | None:
    """Watch an established connection; the exception that ended it early, else None."""
    loop = asyncio.get_running_loop()
    received = 0
    first = b""
    try:
        async with asyncio.timeout(hold_s):
            while received < _HOLD_MAX_BYTES:
                data = await loop.sock_recv(sock, _HOLD_READ)
                if not data:
                    return EOFError("peer closed the connection while held")
                if not first:
                    first = data[:_FIRST_BYTES]
                received += len(data)
            await asyncio.sleep(hold_s)  # read enough: hold on without reading, to the end
    except TimeoutError:
        pass  # held for the whole window: that is the success case
    except OSError as exc:
        return exc
    finally:
        rec.details["bytes_received"] = received
        if first:
            rec.details["first_bytes_hex"] = first.hex()
    # Unread bytes hide a FIN, but an RST still sets the socket's pending error.
    error = sock.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR)
    return OSError(error, os.strerror(error)) if error else None


async def probe(target: Target, settings: ProbeSettings) -> ProbeResult:
    """Connect to ``target.address``:``target.port``; optionally hold the connection."""
    rec = Recorder(target)
    address, port = require_address(target)
    hold_s = TcpParams.of(target).hold_s
    try:
        with rec.phase("connect"):
            sock = await connect(address, port, settings.timeouts.connect_s)
    except OSError as exc:  # TimeoutError and ConnectionError are OSErrors
        return rec.fail_exc(exc, Operation.CONNECT, connect_time_s=rec.phases["connect"])
    record_connect_rtt(rec, sock)
    # closing() sends our FIN: a clean close, not an RST, so the peer sees a normal client
    with contextlib.closing(sock):
        rec.details.update(socket_evidence(sock), connect_time_s=rec.phases["connect"])
        if hold_s > 0:
            rec.details["hold_s"] = hold_s
            with rec.phase("hold"):
                ended = await _hold(sock, hold_s, rec)
            if ended is not None:
                return rec.fail_exc(ended, Operation.READ)
    return rec.ok()
