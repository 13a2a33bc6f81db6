"""Plain TCP servers with well-behaved and hostile modes, for tests and the censorship lab.

`TCPServer` accepts connections and then, per `TCPMode`:

- ``hold``: keep the connection open, read and discard, never answer (a silent service);
- ``reset``: abort right after accept with SO_LINGER 0, so the kernel sends an RST;
- ``garbage``: send fixed bytes that are no protocol, then hold;
- ``close``: close right after accept (FIN);
- ``echo``: send back whatever arrives.

`FullBacklogListener` is a listener whose SYNs go unanswered: Linux drops a SYN while
the listen queue is full (whatever tcp_syncookies says), so a connect to it times out
exactly as under a blackholing censor (FIELD.md B2), without any firewall rule.

`StreamServer` is the shared machinery (bind, port, connection tracking, counters, quiet
handling of hostile clients, clean shutdown) that every TCP server here builds on: TLS,
HTTPS bulk and the MTProto and WhatsApp (Noise) stubs.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import socket
import ssl
import struct
from collections.abc import Awaitable, Callable
from enum import StrEnum
from typing import Self

from ...wire import WireError
from . import AsyncServer

READ_CHUNK = 64 * 1024  # bound on every read: a hostile client cannot make us buffer more
DEFAULT_GARBAGE = b"\x00\xffnot-a-protocol\r\n" * 4
# What a block-page injector answers instead of the expected protocol.
BLOCK_PAGE = b"HTTP/1.1 403 Forbidden\r\nContent-Length: 0\r\nConnection: close\r\n\r\n"
_log = logging.getLogger(__name__)
_CLOSE_WAIT_S = 1.0  # handlers get this long to finish after their connections are aborted


class TCPMode(StrEnum):
    HOLD = "hold"
    RESET = "reset"
    GARBAGE = "garbage"
    CLOSE = "close"
    ECHO = "echo"


def abort_with_rst(writer: asyncio.StreamWriter | asyncio.BaseTransport) -> None:
    """Close the connection with an RST instead of a FIN (SO_LINGER on, timeout 0).

    Takes a stream writer or a bare transport (aiohttp hands the DoH server the latter).
    """
    transport = writer.transport if isinstance(writer, asyncio.StreamWriter) else writer
    assert isinstance(transport, asyncio.WriteTransport | asyncio.DatagramTransport)
    sock = transport.get_extra_info("socket")
    if sock is not None:
        with contextlib.suppress(OSError):
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    transport.abort()


async def drain_until_eof(reader: asyncio.StreamReader) -> None:
    """Read and discard until the client closes (or resets): 'accept and never answer'."""
    with contextlib.suppress(ConnectionError):
        while await reader.read(READ_CHUNK):
            pass


class StreamServer(AsyncServer):
    """An asyncio TCP server bound to ``host``:``port`` (0 = ephemeral) that tracks its
    connections so that ``close()`` ends them too (asyncio's Server.close() in 3.11 only
    stops accepting).  Subclasses implement `handle`; a handler may park in `hang`.

    A client that disconnects, stalls or sends bytes a codec rejects (OSError, EOFError,
    `WireError` out of `handle`) just loses its connection: a lab server never crashes on
    what a probe or a censor sends it.  Any other exception is a bug and is logged.

    Counters (``accepted``: connections handed to `handle`, after the TLS handshake when
    ``ssl`` is set; ``client_closed``: connections the client ended with a clean FIN) and
    `wait_for` let tests and the lab assert what the server saw without sleeping.
    """

    def __init__(
        self,
        host: str,
        port: int = 0,
        *,
        ssl: ssl.SSLContext | None = None,
        ssl_handshake_timeout_s: float = 10.0,
    ) -> None:
        self.host = host
        self.port = port
        # With a context asyncio runs the TLS handshake before `handle` is called.
        self.ssl = ssl
        self.ssl_handshake_timeout_s = ssl_handshake_timeout_s
        self.accepted = 0
        self.client_closed = 0
        self._server: asyncio.Server | None = None
        self._conns: dict[asyncio.Task[None], asyncio.StreamWriter] = {}
        self._closing = asyncio.Event()  # set by close(); releases handlers parked in hang()
        self._changed = asyncio.Event()

    @property
    def open_connections(self) -> int:
        return len(self._conns)

    @property
    def connections(self) -> int:
        """``accepted`` under the name the MTProto and Noise stubs had before they shared
        this base (`probe.lab.serve` still reports it)."""
        return self.accepted

    async def handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        raise NotImplementedError

    async def hang(self) -> None:
        """Hold the connection open, sending and reading nothing, until the server closes.

        Unlike `drain_until_eof` it does not end when the client leaves; `close` releases it.
        """
        await self._closing.wait()

    async def leave_unanswered(self, how: str, writer: asyncio.StreamWriter) -> bool:
        """Act out a way of not answering a request already read: ``close`` (return; the
        base then sends a FIN), ``reset`` (an RST) or ``hang`` (silence until the server
        closes).  False for any other ``how``: the caller answers."""
        if how == "hang":
            await self.hang()
        elif how == "reset":
            abort_with_rst(writer)
        elif how != "close":
            return False
        return True

    def changed(self) -> None:
        """Wake `wait_for` callers: call after changing any state a caller may wait on."""
        self._changed.set()
        self._changed = asyncio.Event()

    async def wait_for(self, predicate: Callable[[Self], bool], timeout_s: float = 5.0) -> None:
        """Wait until ``predicate(self)`` holds (re-checked on every change), or TimeoutError."""
        async with asyncio.timeout(timeout_s):
            while not predicate(self):
                await self._changed.wait()

    def _accept(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        # A plain function, not a coroutine: asyncio then calls it synchronously from
        # connection_made, so the task exists and is tracked before anything else runs
        # (and close() can never miss a connection that was just accepted).
        if self._closing.is_set():
            writer.transport.abort()
            return
        self.accepted += 1
        task = asyncio.get_running_loop().create_task(self._run(reader, writer))
        self._conns[task] = writer
        task.add_done_callback(self._finished)
        self.changed()

    async def _run(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            await self.handle(reader, writer)
        except (OSError, EOFError, WireError):
            # The client went away, stalled (TimeoutError is an OSError) or sent garbage
            # (IncompleteReadError is an EOFError): nothing to serve.
            return
        if reader.at_eof() and reader.exception() is None:
            self.client_closed += 1

    def _finished(self, task: asyncio.Task[None]) -> None:
        writer = self._conns.pop(task, None)
        if writer is not None:
            writer.close()  # a FIN, unless the handler already aborted the transport
        if not task.cancelled() and (exc := task.exception()) is not None:
            _log.error("%s handler failed", type(self).__name__, exc_info=exc)
        self.changed()

    async def start(self) -> Self:
        self._closing.clear()  # a server closed before may be started again
        self._server = await asyncio.start_server(
            self._accept,
            self.host,
            self.port,
            limit=READ_CHUNK,
            ssl=self.ssl,
            ssl_handshake_timeout=self.ssl_handshake_timeout_s if self.ssl else None,
        )
        self.port = int(self._server.sockets[0].getsockname()[1])
        return self

    async def close(self) -> None:
        """Stop accepting, then end every open connection and wait for its handler."""
        self._closing.set()
        if self._server is not None:
            self._server.close()
        # Aborting the transports wakes every handler blocked on a read or a drain with
        # EOF or a ConnectionError, so they finish normally; one still running after that
        # is cancelled.  This comes before Server.wait_closed(), which from Python 3.12 on
        # waits for the connections to end.
        for writer in self._conns.values():
            writer.transport.abort()
        tasks = set(self._conns)
        if tasks:
            _, pending = await asyncio.wait(tasks, timeout=_CLOSE_WAIT_S)
            for task in pending:
                task.cancel()
            await asyncio.gather(*pending, return_exceptions=True)
        if self._server is not None:
            await self._server.wait_closed()
            self._server = None


class CallbackStreamServer(StreamServer):
    """A `StreamServer` running ``handler`` per connection: the TCP side of a server that
    is more than a TCP server (DNS and STUN also answer over UDP on the same port)."""

    def __init__(
        self,
        host: str,
        port: int,
        handler: Callable[[asyncio.StreamReader, asyncio.StreamWriter], Awaitable[None]],
    ) -> None:
        super().__init__(host, port)
        self._handler = handler

    async def handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await self._handler(reader, writer)


class TCPServer(StreamServer):
    """A TCP server that behaves per `TCPMode` right after accepting a connection."""

    def __init__(
        self,
        host: str,
        port: int = 0,
        mode: TCPMode | str = TCPMode.HOLD,
        *,
        garbage: bytes = DEFAULT_GARBAGE,
    ) -> None:
        super().__init__(host, port)
        self.mode = TCPMode(mode)
        self.garbage = garbage

    async def handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        if self.mode is TCPMode.RESET:
            abort_with_rst(writer)
        elif self.mode is TCPMode.CLOSE:
            return  # _finished closes the writer: a FIN right after accept
        elif self.mode is TCPMode.GARBAGE:
            writer.write(self.garbage)
            await writer.drain()
            await drain_until_eof(reader)
        elif self.mode is TCPMode.ECHO:
            await echo_until_eof(reader, writer)
        else:
            await drain_until_eof(reader)


async def echo_until_eof(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    """Send back whatever arrives until the client closes."""
    while data := await reader.read(READ_CHUNK):
        writer.write(data)
        await writer.drain()  # back-pressure: a client that never reads stalls only itself


class FullBacklogListener(AsyncServer):
    """A listening socket whose accept queue is kept full, so new SYNs are dropped.

    Filling: listen(0) and connect to ourselves until a connect no longer completes
    (bounded).  Connections are never accepted.  Works the same on 127.0.0.1 and ::1 and
    inside a lab namespace.
    """

    _MAX_FILLERS = 8
    _FILL_WAIT_S = 0.2

    def __init__(self, host: str, port: int = 0) -> None:
        self.host = host
        self.port = port
        self._listener: socket.socket | None = None
        self._fillers: list[socket.socket] = []

    def _family(self) -> socket.AddressFamily:
        return socket.AF_INET6 if ":" in self.host else socket.AF_INET

    async def start(self) -> Self:
        listener = socket.socket(self._family(), socket.SOCK_STREAM)
        listener.bind((self.host, self.port))
        listener.listen(0)
        self._listener = listener
        self.port = int(listener.getsockname()[1])
        loop = asyncio.get_running_loop()
        for _ in range(self._MAX_FILLERS):
            filler = socket.socket(self._family(), socket.SOCK_STREAM)
            filler.setblocking(False)
            self._fillers.append(filler)
            try:
                async with asyncio.timeout(self._FILL_WAIT_S):
                    await loop.sock_connect(filler, (self.host, self.port))
            except TimeoutError:
                return self  # this SYN was dropped: the queue is full
        await self.close()
        raise RuntimeError("could not fill the listen queue; SYNs would still be answered")

    async def close(self) -> None:
        for sock in self._fillers:
            sock.close()
        self._fillers.clear()
        if self._listener is not None:
            self._listener.close()
            self._listener = None
