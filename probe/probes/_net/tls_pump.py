"""The asyncio adapter for `tls.TlsClient`: moves its bytes to and from a connected socket.

All TLS state lives in the client; this only reads TCP pieces, writes what the client
wants sent, and counts what the socket took and gave.  ``on_receive`` sees every piece
from the server before the client does (the ``tls`` probe keeps the head of the server's
flight and bounds it, ``transfer`` timestamps each piece); ``send_first`` may take over
the first flight (the ``tls`` probe's split ClientHello).
"""

from __future__ import annotations

import asyncio
import contextlib
import socket
import ssl
from collections.abc import Awaitable, Callable

from .tls import TlsClient

OnReceive = Callable[[bytes], None]
SendFirst = Callable[[bytes], Awaitable[None]]


class TlsPump:
    """A `TlsClient` over a connected non-blocking TCP socket.

    ``sent``: bytes the socket accepted; ``received``: bytes read from it (the server's
    TCP payload, TLS records included); ``eof``: the server's FIN arrived.
    """

    def __init__(
        self,
        sock: socket.socket,
        client: TlsClient,
        *,
        read_size: int,
        on_receive: OnReceive | None = None,
        send_first: SendFirst | None = None,
    ) -> None:
        self.sock = sock
        self.client = client
        self.sent = 0
        self.received = 0
        self.eof = False
        self._read_size = read_size
        self._on_receive = on_receive
        self._send_first = send_first
        self._loop = asyncio.get_running_loop()

    async def handshake(self) -> None:
        """Complete the handshake or raise (SSLError, OSError, EOFError, or whatever
        ``on_receive`` raises).  Unbounded in time: the caller sets the clock."""
        while True:  # each pass sends, or reads a TCP piece or EOF: the clock bounds it
            try:
                done = self.client.do_handshake()
            except ssl.SSLError:
                self.flush_nowait()  # our alert tells the server why; best effort
                raise
            await self.flush()  # TLS 1.3: on completion our Finished is still queued
            if done:
                return
            await self.receive()

    async def flush(self) -> None:
        """Put everything the client has queued on the wire."""
        data = self.client.data_to_send()
        if not data:
            return
        if self._send_first is not None and self.sent == 0:
            await self._send_first(data)
        else:
            await self._loop.sock_sendall(self.sock, data)
        self.sent += len(data)

    def flush_nowait(self) -> None:
        """Best effort, never blocks: an alert or close_notify on the way out."""
        with contextlib.suppress(OSError):
            data = self.client.data_to_send()
            if data:
                self.sock.send(data)

    async def receive(self) -> None:
        """Read one TCP piece (or the EOF) into the client."""
        if self.eof:  # OpenSSL wants more after EOF: never spin on a closed socket
            raise EOFError("peer closed the connection")
        data = await self._loop.sock_recv(self.sock, self._read_size)
        if not data:
            self.eof = True
            self.client.feed_eof()
            return
        self.received += len(data)
        if self._on_receive is not None:
            self._on_receive(data)
        self.client.feed(data)

    async def read(self, budget: Callable[[], float]) -> bytes:
        """The next decrypted piece, ``b""`` at the end (``client.close_kind`` says how).

        ``budget()`` is asked before each TCP read how long it may wait; TimeoutError when
        it passes.  Bounded: each pass either returns or consumes one TCP piece or EOF.
        """
        while True:
            data = self.client.read(self._read_size)
            if data is not None:
                return data
            async with asyncio.timeout(budget()):
                await self.receive()

    async def write(self, plaintext: bytes, within_s: float) -> None:
        """Encrypt and send ``plaintext``; TimeoutError if the socket will not take it."""
        self.client.write(plaintext)
        async with asyncio.timeout(within_s):
            await self.flush()

    def close_notify(self) -> None:
        """Send close_notify without waiting for the peer's: a clean, bounded goodbye."""
        self.client.close()
        self.flush_nowait()
