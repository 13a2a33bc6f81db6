"""HTTPS bulk server: a body of a configurable size, optionally frozen, reset or paced.

Emulates, from the server's side, what the transfer probe must tell apart (FIELD.md §2):

- ``normal``: the whole body, then close (close_notify + FIN).
- ``freeze``: ``cut_after`` body bytes, then silence with the connection held open (no
  FIN, no RST) until the client leaves or ``hold_s`` passes: the B7 "16-20 KB freeze".
- ``reset``: ``cut_after`` body bytes, then an RST (SO_LINGER 0 + abort).
- ``pause``: ``cut_after`` body bytes, ``pause_s`` of silence, then the rest: a
  retransmission back-off on a shaped path, which a freeze must not be confused with.
- ``silent``: read the request, answer nothing, hold the connection (B5, post-handshake
  stall).  Under TLS 1.3 the session tickets still go out unless the context's
  ``num_tickets`` is 0.
- ``rate_kbps``: a token bucket in the write loop paces the body (B6 throttling);
  ``upload_rate_kbps`` paces the reads of the POST sink the same way.
- ``cut_every``: a freeze, reset or silence hits only every n-th request (TSPU does not freeze
  every connection), counting the requests for the body path from 1.
- POST to any path is an upload sink: it reads ``Content-Length`` bytes and answers
  ``200`` with ``received N``.

Written on asyncio streams so the byte at which the body stops, and the time each chunk
leaves, are exact.  It assumes nothing about its client: the censorship lab runs it
inside a namespace behind kernel throttling and byte-counting freezes as well.
"""

from __future__ import annotations

import asyncio
import ssl
from contextlib import suppress
from dataclasses import dataclass
from typing import Literal

from ..certs import LeafCert
from .tcp import READ_CHUNK, StreamServer, abort_with_rst
from .tls import server_context

__all__ = ["BulkBehaviour", "HTTPSBulkServer", "TokenBucket"]

_CHUNK = 16 * 1024  # one full TLS record of plaintext
_BLOCK = bytes(range(256)) * (_CHUNK // 256)  # body content; TLS makes it look random anyway


@dataclass(frozen=True)
class BulkBehaviour:
    body_bytes: int = 1024 * 1024
    path: str = "/"
    mode: Literal["normal", "freeze", "reset", "silent", "pause"] = "normal"
    cut_after: int = 16 * 1024  # body bytes sent before a freeze or reset
    cut_every: int = 1  # cut the n-th, 2n-th, ... request for `path` (1 = every one)
    rate_kbps: float | None = None  # server -> client pacing; None = as fast as possible
    upload_rate_kbps: float | None = None  # pacing of the POST sink's reads
    burst_bytes: int = 4096  # token bucket depth; also the paced write size
    framing: Literal["length", "chunked", "close"] = "length"
    pause_s: float = 0.0  # mode pause: silence between cut_after and the rest of the body
    hold_s: float = 300.0  # a frozen connection is held open at most this long
    request_timeout_s: float = 10.0  # TLS handshake, request head, each upload read
    max_upload_bytes: int = 64 * 1024 * 1024
    raw_response: bytes | None = None  # send these bytes instead of any HTTP response

    def __post_init__(self) -> None:
        if self.body_bytes < 0 or self.cut_after < 0:
            raise ValueError("body_bytes and cut_after must be >= 0")
        if self.cut_every < 1:
            raise ValueError("cut_every must be >= 1")
        if self.burst_bytes < 1:
            raise ValueError("burst_bytes must be >= 1")
        for rate in (self.rate_kbps, self.upload_rate_kbps):
            if rate is not None and rate <= 0:
                raise ValueError("rates must be > 0 kbit/s")


class TokenBucket:
    """Paces bytes at ``rate_kbps`` with a bucket of ``burst_bytes`` (takes <= burst)."""

    def __init__(self, rate_kbps: float, burst_bytes: int) -> None:
        self.rate = rate_kbps * 1000 / 8  # bytes per second
        self.capacity = float(burst_bytes)
        self.tokens = float(burst_bytes)
        self._loop = asyncio.get_running_loop()
        self._t = self._loop.time()

    async def take(self, n: int) -> None:
        n = min(n, int(self.capacity))
        while True:  # at most two rounds: the sleep covers the whole deficit
            now = self._loop.time()
            self.tokens = min(self.capacity, self.tokens + (now - self._t) * self.rate)
            self._t = now
            if self.tokens >= n:
                self.tokens -= n
                return
            await asyncio.sleep((n - self.tokens) / self.rate)


def _bucket(rate_kbps: float | None, burst: int) -> TokenBucket | None:
    return TokenBucket(rate_kbps, burst) if rate_kbps is not None else None


@dataclass(frozen=True)
class _Request:
    method: str
    path: str
    content_length: int | None


def _parse_request(head: bytes) -> _Request | None:
    lines = head.split(b"\r\n")
    parts = lines[0].split(b" ")
    if len(parts) != 3 or not parts[2].startswith(b"HTTP/1."):
        return None
    length: int | None = None
    for line in lines[1:]:
        name, _, value = line.partition(b":")
        if name.strip().lower() == b"content-length":
            if not value.strip().isdigit() or len(value.strip()) > 15:
                return None  # also keeps int() away from absurdly long digit strings
            length = int(value.strip())
    path = parts[1].decode("latin-1").split("?", 1)[0]
    return _Request(parts[0].decode("latin-1"), path, length)


def _response_head(status: str, headers: dict[str, str]) -> bytes:
    fields = "".join(f"{k}: {v}\r\n" for k, v in headers.items())
    return f"HTTP/1.1 {status}\r\n{fields}Connection: close\r\n\r\n".encode("latin-1")


class HTTPSBulkServer(StreamServer):
    """``async with HTTPSBulkServer("127.0.0.1", 0, cert=leaf, behaviour=...) as srv: srv.port``

    Counters besides `StreamServer`'s: ``requests`` (GET/HEAD for the body path),
    ``cut`` (request numbers frozen or reset, silenced included) and ``uploads`` (bytes
    read per POST); `wait_for` wakes on each change.
    """

    def __init__(
        self,
        host: str,
        port: int = 0,
        *,
        cert: LeafCert | None = None,
        ssl_context: ssl.SSLContext | None = None,
        behaviour: BulkBehaviour | None = None,
    ) -> None:
        if cert is not None and ssl_context is not None:
            raise ValueError("give cert or ssl_context, not both")
        if ssl_context is None:
            if cert is None:
                raise ValueError("an HTTPS server needs a cert or an ssl_context")
            ssl_context = server_context(cert)
        self.behaviour = behaviour or BulkBehaviour()
        super().__init__(
            host, port, ssl=ssl_context, ssl_handshake_timeout_s=self.behaviour.request_timeout_s
        )
        self.requests = 0
        self.cut: list[int] = []
        self.uploads: list[int] = []

    async def handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            await self._handle(reader, writer)
        except (OSError, asyncio.IncompleteReadError, asyncio.LimitOverrunError):
            return  # a client leaving mid-response (or sending junk) is an everyday event

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        b = self.behaviour
        head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), b.request_timeout_s)
        if b.raw_response is not None:
            writer.write(b.raw_response)
            await writer.drain()
            return
        request = _parse_request(head)
        if request is None:
            await _reply(writer, "400 Bad Request", b"bad request\n")
        elif request.method == "POST":
            await self._sink(reader, writer, request)
        elif request.method in ("GET", "HEAD") and request.path == b.path:
            await self._send_body(reader, writer, request.method == "HEAD")
        else:
            await _reply(writer, "404 Not Found", b"not found\n")

    async def _send_body(
        self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter, head_only: bool
    ) -> None:
        b = self.behaviour
        self.requests += 1
        number = self.requests
        cut = b.mode != "normal" and number % b.cut_every == 0
        self.changed()
        if cut and b.mode == "silent":
            self._cut(number)
            await self._hold(reader)
            return
        headers = {"Content-Type": "application/octet-stream"}
        if b.framing == "length":
            headers["Content-Length"] = str(b.body_bytes)
        elif b.framing == "chunked":
            headers["Transfer-Encoding"] = "chunked"
        writer.write(_response_head("200 OK", headers))
        await writer.drain()
        if head_only:
            return
        to_send = min(b.cut_after, b.body_bytes) if cut else b.body_bytes
        bucket = _bucket(b.rate_kbps, b.burst_bytes)
        await self._write_body(writer, to_send, bucket)
        if cut and b.mode == "pause":
            self._cut(number)
            await asyncio.sleep(b.pause_s)
            await self._write_body(writer, b.body_bytes - to_send, bucket)
            cut = False
        if not cut:
            if b.framing == "chunked":
                writer.write(b"0\r\n\r\n")
                await writer.drain()
            return
        self._cut(number)
        if b.mode == "reset":
            abort_with_rst(writer)
        else:
            await self._hold(reader)

    def _cut(self, number: int) -> None:
        self.cut.append(number)
        self.changed()

    async def _write_body(
        self, writer: asyncio.StreamWriter, size: int, bucket: TokenBucket | None
    ) -> None:
        step = min(_CHUNK, self.behaviour.burst_bytes) if bucket else _CHUNK
        chunked = self.behaviour.framing == "chunked"
        sent = 0
        while sent < size:  # bounded: each pass sends >= 1 byte
            n = min(step, size - sent)
            if bucket is not None:
                await bucket.take(n)
            data = _BLOCK[:n]
            writer.write(b"%x\r\n%b\r\n" % (n, data) if chunked else data)
            await writer.drain()  # so a paced chunk leaves now, not in a later burst
            sent += n

    async def _hold(self, reader: asyncio.StreamReader) -> None:
        """Keep the connection open and silent until the client leaves or hold_s passes."""
        with suppress(TimeoutError):
            async with asyncio.timeout(self.behaviour.hold_s):
                while await reader.read(READ_CHUNK):  # ends at the client's FIN or RST
                    pass

    async def _sink(
        self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter, request: _Request
    ) -> None:
        b = self.behaviour
        if request.content_length is None:
            await _reply(writer, "411 Length Required", b"length required\n")
            return
        if request.content_length > b.max_upload_bytes:
            await _reply(writer, "413 Content Too Large", b"too large\n")
            return
        bucket = _bucket(b.upload_rate_kbps, b.burst_bytes)
        step = min(_CHUNK, b.burst_bytes) if bucket else _CHUNK
        received = 0
        while received < request.content_length:  # bounded: >= 1 byte per pass or break
            want = min(step, request.content_length - received)
            if bucket is not None:
                await bucket.take(want)
            data = await asyncio.wait_for(reader.read(want), b.request_timeout_s)
            if not data:
                break
            received += len(data)
        self.uploads.append(received)
        self.changed()
        if received == request.content_length:
            await _reply(writer, "200 OK", b"received %d\n" % received)


async def _reply(writer: asyncio.StreamWriter, status: str, body: bytes) -> None:
    headers = {"Content-Type": "text/plain", "Content-Length": str(len(body))}
    writer.write(_response_head(status, headers) + body)
    await writer.drain()
