"""One connected-UDP channel: datagrams stamped on arrival, send times, ICMP errors.

Connected (``connect()``-ed), because only then does the kernel (a) drop datagrams from
any other source address and (b) report ICMP errors for our flow: Linux hands a port
unreachable to the socket as ECONNREFUSED, which asyncio passes to ``error_received``.
An unconnected socket never sees it, and "refused" would read as silence.

Arrival times are taken in the protocol callback, when the event loop hands over the
datagram, so a round trip does not include the time the probe's coroutine took to be
scheduled.  ICMP errors are queued in order with the datagrams: a reply that came before
the error is read before it.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from typing import Any, TypeVar

QUEUE_LIMIT = 4096  # datagrams waiting to be read; a flooding peer cannot eat memory

P = TypeVar("P", bound=asyncio.DatagramProtocol)


async def open_connected(
    host: str, port: int, factory: Callable[[], P]
) -> tuple[asyncio.DatagramTransport, P]:
    """A datagram endpoint on a socket connected to ``host``:``port`` (no packet is sent).

    For the protocols that bring their own (aioquic's); everyone else uses `UdpChannel`.
    Raises OSError (no route, no such family ...), the caller's ``connect`` failure.
    """
    loop = asyncio.get_running_loop()
    return await loop.create_datagram_endpoint(factory, remote_addr=(host, port))


class _Arrivals(asyncio.DatagramProtocol):
    """Queues (arrival time, bytes) and ICMP errors, at most ``limit`` of them."""

    def __init__(self, limit: int) -> None:
        self.queue: asyncio.Queue[tuple[float, bytes] | Exception] = asyncio.Queue()
        self.dropped = 0
        self._limit = limit

    def datagram_received(self, data: bytes, addr: Any) -> None:
        if self.queue.qsize() >= self._limit:
            self.dropped += 1
            return
        self.queue.put_nowait((time.monotonic(), data))

    def error_received(self, exc: Exception) -> None:
        self.queue.put_nowait(exc)


class UdpChannel:
    """A connected UDP socket with send timestamps and a deadline-bounded receive.

    ``sent`` / ``received``: datagrams sent and read; ``dropped``: datagrams that found
    the queue full (a flood), never read.
    """

    def __init__(self, transport: asyncio.DatagramTransport, protocol: _Arrivals) -> None:
        self._transport = transport
        self._protocol = protocol
        self.sent = 0
        self.received = 0

    @classmethod
    async def open(cls, host: str, port: int, *, queue_limit: int = QUEUE_LIMIT) -> UdpChannel:
        """Raises OSError when the local socket cannot be set up (the ``connect`` step)."""
        transport, protocol = await open_connected(host, port, lambda: _Arrivals(queue_limit))
        return cls(transport, protocol)

    @property
    def local(self) -> tuple[str, int]:
        sockname = self._transport.get_extra_info("sockname")
        return str(sockname[0]), int(sockname[1])

    @property
    def dropped(self) -> int:
        return self._protocol.dropped

    def send(self, data: bytes) -> float:
        """Send one datagram; the monotonic time it left (a send error arrives via `recv`)."""
        self._transport.sendto(data)
        self.sent += 1
        return time.monotonic()

    async def recv(self, until: float) -> tuple[float, bytes] | None:
        """The next (arrival time, datagram), or None once ``until`` (monotonic) passes.

        Raises the ICMP error (an OSError such as ConnectionRefusedError) in its turn.
        """
        queue = self._protocol.queue
        if queue.empty():
            remaining = until - time.monotonic()
            if remaining <= 0:
                return None
            try:
                item = await asyncio.wait_for(queue.get(), remaining)
            except TimeoutError:
                return None
        else:
            item = queue.get_nowait()
        if isinstance(item, Exception):
            raise item
        self.received += 1
        return item

    def close(self) -> None:
        self._transport.close()

    async def __aenter__(self) -> UdpChannel:
        return self

    async def __aexit__(self, *_exc: object) -> None:
        self.close()
