"""One connected-UDP channel: datagrams stamped on arrival, send times, ICMP errors.

Connected (``connect()``-ed), because only then does the kernel (a) drop datagrams from
any other source address and (b) report ICMP errors for our flow.  Without more, Linux
reports only the "hard" ones (port unreachable as ECONNREFUSED, administratively
prohibited) and drops host and network unreachable, so a censor answering with ICMP host
unreachable would read as silence.  ``IP_RECVERR`` / ``IPV6_RECVERR`` make it report
every ICMP error and queue it, with the ICMP type and code and the address of the node
that sent it, on the socket's error queue (ip(7), "IP_RECVERR").

How an error reaches a probe: the kernel sets the socket's pending error, asyncio's next
``recvfrom`` (or ``sendto``) raises it and hands it to ``error_received``, and `IcmpWatch`
then drains the error queue (``MSG_ERRQUEUE``).  Draining is not optional: a non-empty
error queue keeps the socket in EPOLLERR, and asyncio would spin on a socket it can
never read.  Each queued error quotes the start of the datagram it answers, and is kept
only if that matches a datagram *this* socket sent: a late error for an earlier flow on
the same port, or a forged one, is counted as stray and never becomes the failure.  A
flood is bounded three ways: the kernel caps the queue at the socket's receive buffer,
one drain reads at most `DRAIN_LIMIT` entries, and at most `ICMP_KEEP` are recorded.

Arrival times are taken in the protocol callback, when the event loop hands over the
datagram, so a round trip does not include the time the probe's coroutine took to be
scheduled.  ICMP errors are queued in order with the datagrams: a reply that came before
the error is read before it.
"""

from __future__ import annotations

import asyncio
import errno as errnos
import socket
import time
from collections.abc import Callable, Iterable, Sequence
from typing import Any, TypeVar

from ...classify import IcmpError
from ...evidence import IcmpReport
from ...wire.errqueue import IP_RECVERR, IPV6_RECVERR, parse_error_queue

QUEUE_LIMIT = 4096  # datagrams waiting to be read; a flooding peer cannot eat memory
DRAIN_LIMIT = 256  # error-queue entries read per error the kernel reports
ICMP_KEEP = 8  # ICMP errors recorded per socket (the rest are only counted)

_ANC_SIZE = 512  # the extended error and the offender's sockaddr fit with room to spare
_QUOTE_KEY = 32  # leading bytes of a sent datagram an ICMP quote is matched against
_SENT_KEEP = 4096  # sent datagrams remembered for that match (a long flow forgets the oldest)

P = TypeVar("P", bound=asyncio.DatagramProtocol)


class IcmpWatch:
    """The error queue of one connected UDP socket, and which of its errors are ours.

    ``sent(data)`` for every datagram sent; ``take(exc)`` when asyncio reports an error:
    the errors to hand to the probe (the first ICMP error that answers one of our
    datagrams, or ``exc`` itself when nothing was queued: a local send error).
    ``errors``: the ICMP errors attributed to us (at most `ICMP_KEEP`); ``unrecorded``:
    ours beyond that; ``stray``: queued errors that answer no datagram of ours.
    """

    def __init__(self, sock: socket.socket) -> None:
        self._sock = sock
        self._sent: dict[bytes, None] = {}  # insertion-ordered set of datagram prefixes
        self.errors: list[IcmpError] = []
        self.unrecorded = 0
        self.stray = 0

    def sent(self, data: bytes) -> None:
        self._sent[data[:_QUOTE_KEY]] = None
        if len(self._sent) > _SENT_KEEP:
            del self._sent[next(iter(self._sent))]

    def take(self, exc: Exception) -> list[Exception]:
        queued = self._drain()
        if not queued:
            return [exc]  # not an ICMP error: e.g. sendto's own ENETUNREACH or EPERM
        ours: list[IcmpError] = []
        stray_errnos: set[int] = set()
        for err, quote in queued:
            if self._answers_us(quote):
                ours.append(err)
            else:
                self.stray += 1
                stray_errnos.add(err.errno or 0)
        for err in ours:
            if len(self.errors) < ICMP_KEEP:
                self.errors.append(err)
            else:
                self.unrecorded += 1
        if ours:
            return [ours[0]]
        if isinstance(exc, OSError) and exc.errno in stray_errnos:
            return []  # the pending error was the stray one's
        return [exc]

    def _answers_us(self, quote: bytes) -> bool:
        """Does the quoted start of a datagram match one this socket sent?

        A router may quote no payload at all (RFC 792 asks only for 8 bytes past the IP
        header: the UDP header); then only the kernel's match on addresses and ports
        vouches for it."""
        if not quote:
            return True
        key = quote[:_QUOTE_KEY]
        if len(key) == _QUOTE_KEY:
            return key in self._sent
        return any(sent.startswith(key) for sent in self._sent)

    def _drain(self) -> list[tuple[IcmpError, bytes]]:
        out: list[tuple[IcmpError, bytes]] = []
        for _ in range(DRAIN_LIMIT):
            try:
                quote, ancdata, _flags, _addr = self._sock.recvmsg(
                    _QUOTE_KEY, _ANC_SIZE, socket.MSG_ERRQUEUE
                )
            except OSError:  # BlockingIOError: the queue is empty (or the socket closed)
                break
            err = _icmp_error(ancdata)
            if err is not None:
                out.append((err, quote))
        return out


def _icmp_error(ancdata: Sequence[tuple[int, int, bytes]]) -> IcmpError | None:
    """The ICMP error in one error-queue message's control data (None: not ICMP)."""
    queued = parse_error_queue(ancdata)
    if queued is None:
        return None
    return IcmpError.of(
        queued.errno or errnos.EHOSTUNREACH,
        family=queued.family,
        icmp_type=queued.icmp_type,
        icmp_code=queued.icmp_code,
        reporter=queued.offender,
    )


def icmp_evidence(
    watches: Iterable[IcmpWatch],
) -> tuple[tuple[IcmpReport, ...] | None, int | None]:
    """The evidence form of what some sockets' watches kept: (the ICMP errors that
    answered our datagrams, at most `ICMP_KEEP`; the count of stray ones), None for none."""
    watches = list(watches)
    errors = [e for w in watches for e in w.errors][:ICMP_KEEP]
    stray = sum(w.stray for w in watches)
    reports = tuple(
        IcmpReport(
            icmp=e.family,
            type=e.icmp_type,
            code=e.icmp_code,
            errno=errnos.errorcode.get(e.errno or 0, str(e.errno)),
            reporter=e.reporter,
        )
        for e in errors
    )
    return reports or None, stray or None


def _watch_errors(sock: socket.socket, family: int) -> None:
    if family == socket.AF_INET6:
        sock.setsockopt(socket.IPPROTO_IPV6, IPV6_RECVERR, 1)
    else:
        sock.setsockopt(socket.SOL_IP, IP_RECVERR, 1)


async def open_connected(
    host: str, port: int, factory: Callable[[IcmpWatch], P]
) -> tuple[asyncio.DatagramTransport, P]:
    """A datagram endpoint on a socket connected to ``host``:``port`` (no packet is sent),
    with ICMP error reporting on; ``factory`` gets the socket's `IcmpWatch`.

    For the protocols that bring their own (aioquic's); everyone else uses `UdpChannel`.
    Raises OSError (no route, no such family ...), the caller's ``connect`` failure.
    """
    loop = asyncio.get_running_loop()
    infos = await loop.getaddrinfo(host, port, type=socket.SOCK_DGRAM, proto=socket.IPPROTO_UDP)
    sock = _connected_socket(host, infos)
    protocol = factory(IcmpWatch(sock))
    try:
        return await loop.create_datagram_endpoint(lambda: protocol, sock=sock)
    except BaseException:
        sock.close()
        raise


def _connected_socket(host: str, infos: Sequence[tuple[Any, ...]]) -> socket.socket:
    """A non-blocking UDP socket with ICMP error reporting, connected to the first
    address that takes it (as ``create_datagram_endpoint`` tries them)."""
    failure: OSError = OSError(errnos.EADDRNOTAVAIL, f"no address for {host!r}")
    for family, kind, proto, _name, address in infos:
        sock = socket.socket(family, kind, proto)
        try:
            sock.setblocking(False)
            _watch_errors(sock, family)
            sock.connect(address)
        except OSError as exc:
            sock.close()
            failure = exc
            continue
        return sock
    raise failure


class _Arrivals(asyncio.DatagramProtocol):
    """Queues (arrival time, bytes) and ICMP errors, at most ``limit`` of them."""

    def __init__(self, watch: IcmpWatch, limit: int) -> None:
        self.queue: asyncio.Queue[tuple[float, bytes] | Exception] = asyncio.Queue()
        self.dropped = 0
        self.watch = watch
        self._limit = limit

    def datagram_received(self, data: bytes, addr: Any) -> None:
        if self.queue.qsize() >= self._limit:
            self.dropped += 1
            return
        self.queue.put_nowait((time.monotonic(), data))

    def error_received(self, exc: Exception) -> None:
        for err in self.watch.take(exc):
            if self.queue.qsize() < self._limit:
                self.queue.put_nowait(err)


class UdpChannel:
    """A connected UDP socket with send timestamps and a deadline-bounded receive.

    ``sent`` / ``received``: datagrams sent and read; ``dropped``: datagrams that found
    the queue full (a flood), never read; ``icmp``: the socket's `IcmpWatch` (every ICMP
    error that answered our datagrams, and the stray ones counted).
    """

    def __init__(self, transport: asyncio.DatagramTransport, protocol: _Arrivals) -> None:
        self._transport = transport
        self._protocol = protocol
        self.sent = 0
        self.received = 0

    @classmethod
    async def open(cls, host: str, port: int, *, queue_limit: int = QUEUE_LIMIT) -> UdpChannel:
        """Raises OSError when the local socket cannot be set up (the ``connect`` step)."""
        transport, protocol = await open_connected(
            host, port, lambda watch: _Arrivals(watch, queue_limit)
        )
        return cls(transport, protocol)

    @property
    def local(self) -> tuple[str, int]:
        sockname = self._transport.get_extra_info("sockname")
        return str(sockname[0]), int(sockname[1])

    @property
    def dropped(self) -> int:
        return self._protocol.dropped

    @property
    def icmp(self) -> IcmpWatch:
        return self._protocol.watch

    def send(self, data: bytes) -> float:
        """Send one datagram; the monotonic time it left (a send error arrives via `recv`)."""
        self._protocol.watch.sent(data)  # before the send: its error may come at once
        self._transport.sendto(data)
        self.sent += 1
        return time.monotonic()

    async def recv(self, until: float) -> tuple[float, bytes] | None:
        """The next (arrival time, datagram), or None once ``until`` (monotonic) passes.

        Raises the ICMP error (an `IcmpError`, or another OSError such as a local
        send error) in its turn.
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
