"""A small TCP server base for the application-handshake stubs (MTProto DC, WhatsApp chat).

Subclasses implement `handle()` for one connection.  The base binds to the
caller's host/port (port 0 = ephemeral), tracks connections so `close()` ends
them all (a stub in ``hang`` mode must not outlive its test), and turns a
client's garbage or disconnect into a quiet close: a stub never crashes on what
the probe (or a censor in the lab) sends it.
"""

from __future__ import annotations

import asyncio
import contextlib
import socket
import struct
from types import TracebackType
from typing import Any, Self

from ...wire import WireError

# Handlers end by themselves once close() releases them; cancelling is the fallback
# (Python 3.11's start_server logs a spurious error for a cancelled handler task).
_CLOSE_GRACE_S = 1.0


class StreamServer:
    """Base for one-request stub servers; an async context manager."""

    def __init__(self, host: str = "127.0.0.1", port: int = 0) -> None:
        self.host = host
        self._requested_port = port
        self._server: asyncio.Server | None = None
        self._closing: asyncio.Event | None = None
        self._tasks: set[asyncio.Task[Any]] = set()
        self._writers: set[asyncio.StreamWriter] = set()
        self.connections = 0

    @property
    def port(self) -> int:
        if self._server is None:
            raise RuntimeError("server not started")
        return int(self._server.sockets[0].getsockname()[1])

    async def start(self) -> Self:
        self._closing = asyncio.Event()
        self._server = await asyncio.start_server(
            self._on_connect, self.host, self._requested_port, reuse_address=True
        )
        return self

    async def close(self) -> None:
        """Stop listening and end every connection, including hanging ones."""
        if self._closing is not None:
            self._closing.set()  # releases handlers parked in hang()
        if self._server is not None:
            self._server.close()
        for writer in list(self._writers):
            writer.transport.abort()  # a handler blocked on read or drain sees the loss
        tasks = list(self._tasks)
        if tasks:
            _, stuck = await asyncio.wait(tasks, timeout=_CLOSE_GRACE_S)
            for task in stuck:
                task.cancel()
            await asyncio.gather(*stuck, return_exceptions=True)
        if self._server is not None:
            await self._server.wait_closed()
            self._server = None

    async def __aenter__(self) -> Self:
        return await self.start()

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.close()

    async def handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        raise NotImplementedError

    async def hang(self) -> None:
        """Hold the connection open, sending nothing, until the server closes."""
        assert self._closing is not None
        await self._closing.wait()

    @staticmethod
    def reset(writer: asyncio.StreamWriter) -> None:
        """Abort with SO_LINGER 0 so the kernel sends RST instead of FIN."""
        sock = writer.get_extra_info("socket")
        if sock is not None:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        writer.transport.abort()

    async def _on_connect(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        assert task is not None
        self._tasks.add(task)
        self._writers.add(writer)
        self.connections += 1
        try:
            await self.handle(reader, writer)
        except (OSError, EOFError, WireError):
            pass  # a client that disconnects or sends garbage just loses its connection
        finally:
            self._tasks.discard(task)
            self._writers.discard(writer)
            writer.close()
            with contextlib.suppress(OSError, asyncio.CancelledError):
                await writer.wait_closed()
