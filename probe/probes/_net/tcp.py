"""One TCP connect to an IP literal, and the kernel's view of the connection.

Every TCP-based probe (tcp, tls, transfer, the application exchanges, STUN and DNS over TCP)
connects through `connect`, so they all connect the same way; the ones that record the
kernel's connect round trip and the address families read them with `kernel_connect_rtt`
and `address_families` right after it.
"""

from __future__ import annotations

import asyncio
import contextlib
import ipaddress
import socket
import struct
from typing import Any

# struct tcp_info (linux/tcp.h): u32 fields at fixed offsets.  tcpi_rtt (microseconds):
# right after the handshake it holds exactly one sample, the SYN -> SYN-ACK round trip as
# the kernel timed it on arrival, so queueing on our event loop cannot bend it.
# tcpi_last_ack_recv (milliseconds): time since the peer last sent us anything.
_TCPI_RTT_OFFSET = 68
_TCPI_LAST_ACK_RECV_OFFSET = 56
_TCP_INFO_LEN = 104


def _sockaddr(address: str, port: int) -> tuple[socket.AddressFamily, tuple[Any, ...]]:
    # ipaddress validates the literal up front: we never want getaddrinfo to fall back to
    # DNS for a hostname that slipped into `address` (the resolver is a probe of its own).
    ip = ipaddress.ip_address(address)
    if ip.version == 6:
        # AI_NUMERICHOST: turns "fe80::1%eth0" into a sockaddr with its scope id, no DNS
        info = socket.getaddrinfo(
            address, port, socket.AF_INET6, socket.SOCK_STREAM, 0, socket.AI_NUMERICHOST
        )
        return socket.AF_INET6, info[0][4]
    return socket.AF_INET, (address, port)


async def connect(address: str, port: int, timeout_s: float) -> socket.socket:
    """Open a non-blocking TCP socket to an IP literal within ``timeout_s`` seconds.

    Raises OSError (refused, unreachable, ...) or TimeoutError; the caller classifies.
    A raw socket (not ``open_connection``) so the caller can keep reading the kernel's
    view of the connection and hand the socket to a sans-IO TLS layer.
    """
    family, sockaddr = _sockaddr(address, port)
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setblocking(False)
    try:
        async with asyncio.timeout(timeout_s):
            await asyncio.get_running_loop().sock_connect(sock, sockaddr)
    except BaseException:  # also on cancellation: never leak the half-open socket
        sock.close()
        raise
    return sock


async def open_streams(sock: socket.socket) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
    """asyncio streams over a socket from `connect`, for probes that read with a
    StreamReader; the socket is closed if that fails (also on cancellation)."""
    try:
        return await asyncio.open_connection(sock=sock)
    except BaseException:
        sock.close()
        raise


async def close_streams(writer: asyncio.StreamWriter, wait_s: float = 1.0) -> None:
    """Close (FIN) and wait up to ``wait_s`` for it to finish: a peer that never
    acknowledges, or resets, must not hold the probe."""
    writer.close()
    with contextlib.suppress(OSError, TimeoutError):
        async with asyncio.timeout(wait_s):
            await writer.wait_closed()


def _tcp_info_u32(sock: socket.socket, offset: int) -> int | None:
    """One u32 field of ``struct tcp_info``; None where the kernel does not say (not Linux)."""
    option = getattr(socket, "TCP_INFO", None)
    if option is None:
        return None
    try:
        info = sock.getsockopt(socket.IPPROTO_TCP, option, _TCP_INFO_LEN)
    except OSError:
        return None
    if len(info) < offset + 4:
        return None
    (value,) = struct.unpack_from("=I", info, offset)
    return int(value)


def kernel_connect_rtt(sock: socket.socket) -> float | None:
    """The kernel's SYN/SYN-ACK round-trip time in seconds, read right after connect.

    None where TCP_INFO is missing (not Linux) or holds no sample: Karn's rule takes none
    when the SYN was retransmitted, and an answer to a retransmitted SYN is ambiguous.
    """
    rtt_us = _tcp_info_u32(sock, _TCPI_RTT_OFFSET)
    return rtt_us / 1e6 if rtt_us else None


def _family(ip: str) -> str:
    parsed = ipaddress.ip_address(ip.split("%", 1)[0])
    if isinstance(parsed, ipaddress.IPv6Address) and parsed.ipv4_mapped is not None:
        return "ipv4"  # what goes on the wire for ::ffff:a.b.c.d
    return f"ipv{parsed.version}"


def address_families(sock: socket.socket) -> tuple[str | None, str | None]:
    """(local, peer) address family, ``ipv4`` or ``ipv6``; never the addresses (the local
    one identifies the vantage).  None where the kernel no longer knows (ENOTCONN: the
    peer already reset the connection)."""
    families: list[str | None] = []
    for getter in (sock.getsockname, sock.getpeername):
        try:
            families.append(_family(str(getter()[0])))
        except OSError:
            families.append(None)
    return families[0], families[1]


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
    ms = _tcp_info_u32(sock, _TCPI_LAST_ACK_RECV_OFFSET)
    return None if ms is None else ms / 1000
