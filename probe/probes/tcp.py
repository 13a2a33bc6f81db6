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

Connecting is `connect_recorded` (over `_net.tcp.connect`), shared with the TLS and
application probes: they all connect the same way and record the same connect evidence
(the kernel's connect RTT, the address families) as this one.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import socket
from collections.abc import Mapping
from dataclasses import dataclass, replace
from typing import Any, ClassVar, Self

from ..config.settings import ProbeSettings
from ..evidence import SocketEvidence, TcpEvidence
from ..model import Operation, ProbeParams, ProbeResult, Target
from ._net.tcp import address_families, connect, kernel_connect_rtt
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


def socket_evidence(sock: socket.socket) -> SocketEvidence:
    """Address families of both ends.  Never the local address: it identifies the vantage."""
    local, peer = address_families(sock)
    return SocketEvidence(local_family=local, peer_family=peer)


@dataclass(frozen=True)
class Connected:
    """A fresh TCP connection and the kernel's view of it, for the probe's evidence."""

    sock: socket.socket
    connect_rtt_s: float | None  # the kernel's SYN/SYN-ACK round trip (TCP_INFO)
    socket: SocketEvidence


async def connect_recorded(
    rec: Recorder[Any], address: str, port: int, timeout_s: float
) -> Connected:
    """Every TCP probe's first step: `connect`, timed as phase ``connect`` (also when it
    fails), then the kernel's view of the new connection read right away: its SYN/SYN-ACK
    round trip (also phase ``connect_rtt``, beside the loop-timed ``connect``, which also
    counts how long the loop took to notice the connection) and the address families.
    Raises OSError (TimeoutError too); the caller classifies."""
    with rec.phase("connect"):
        sock = await connect(address, port, timeout_s)
    rtt = kernel_connect_rtt(sock)
    if rtt is not None:
        rec.phases["connect_rtt"] = rtt
    return Connected(sock, rtt, socket_evidence(sock))


async def _hold(
    sock: socket.socket, hold_s: float, rec: Recorder[TcpEvidence]
) -> BaseException | None:
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
        rec.evidence = replace(
            rec.evidence, bytes_received=received, first_bytes_hex=first.hex() if first else None
        )
    # Unread bytes hide a FIN, but an RST still sets the socket's pending error.
    error = sock.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR)
    return OSError(error, os.strerror(error)) if error else None


async def probe(target: Target, settings: ProbeSettings) -> ProbeResult:
    """Connect to ``target.address``:``target.port``; optionally hold the connection."""
    rec = Recorder(target, TcpEvidence())
    address, port = require_address(target)
    hold_s = TcpParams.of(target).hold_s
    try:
        conn = await connect_recorded(rec, address, port, settings.timeouts.connect_s)
    except OSError as exc:  # TimeoutError and ConnectionError are OSErrors
        return rec.fail_exc(
            exc, Operation.CONNECT, TcpEvidence(connect_time_s=rec.phases["connect"])
        )
    sock = conn.sock
    # closing() sends our FIN: a clean close, not an RST, so the peer sees a normal client
    with contextlib.closing(sock):
        rec.evidence = TcpEvidence(
            connect_rtt_s=conn.connect_rtt_s,
            socket=conn.socket,
            connect_time_s=rec.phases["connect"],
            hold_s=hold_s if hold_s > 0 else None,
        )
        if hold_s > 0:
            with rec.phase("hold"):
                ended = await _hold(sock, hold_s, rec)
            if ended is not None:
                return rec.fail_exc(ended, Operation.READ)
    return rec.ok()
