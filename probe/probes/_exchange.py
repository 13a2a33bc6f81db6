"""One request, one bounded reply over TCP: the shape shared by the application-handshake
probes (MTProto ``req_pq_multi``, WhatsApp Noise ClientHello).

Phases recorded: ``connect``; ``first_byte`` (request written -> first reply byte);
``handshake`` (request written -> reply read and parsed).  Failure mapping, by
the step that failed:

* connect: whatever `classify` says (refused, timeout, unreachable ...), operation
  ``connect``; connecting is the TCP probe's `connect_recorded()`, so every TCP-based probe
  connects the same way and records the same socket evidence
* write: ``connection_reset`` etc., operation ``write``
* read: silence past ``timeouts.app_s`` -> ``generic_timeout_error``; FIN -> ``eof_error``;
  RST -> ``connection_reset``; bytes that are not the protocol -> ``bad_response``,
  all with operation ``read``, the bytes received so far and the first of them (hex)
  as evidence.

The request and reply codecs are the probe's; every read is an exact, bounded
byte count decided by the codec, so a giant or endless reply cannot eat memory.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from dataclasses import replace
from typing import Any, TypeVar

from ..config.settings import ProbeSettings
from ..evidence import ExchangeEvidence
from ..model import Failure, Operation, ProbeResult, Target
from ..wire import WireError
from ._net.tcp import close_streams, open_streams
from .base import Recorder
from .tcp import connect_recorded, require_address
from .tls import STRETCH_MAX, handshake_timeout

T = TypeVar("T")
E = TypeVar("E", bound=ExchangeEvidence)

_EVIDENCE_BYTES = 16  # how much of an unexpected reply to keep (hex), as the tcp probe does
_CLOSE_WAIT_S = 1.0  # the bounded close after the exchange


class ReplyReader:
    """Exact-count reads from the peer that time the first byte and keep evidence."""

    def __init__(self, reader: asyncio.StreamReader, rec: Recorder[Any]) -> None:
        self._reader = reader
        self._rec = rec
        self.received = 0
        self._head = bytearray()

    async def read(self, n: int) -> bytes:
        """Exactly ``n`` bytes; EOF first raises `asyncio.IncompleteReadError` (-> eof_error).

        Reads in chunks into our own buffer (not ``readexactly``) so that bytes
        already received are counted as evidence even when the deadline cancels
        the read halfway.
        """
        data = bytearray()
        while len(data) < n:  # each pass gets >= 1 byte or ends: bounded by n
            if self.received == 0:
                with self._rec.phase("first_byte"):
                    chunk = await self._reader.read(n - len(data))
            else:
                chunk = await self._reader.read(n - len(data))
            if not chunk:
                raise asyncio.IncompleteReadError(bytes(data), n)
            self._keep(chunk)
            data += chunk
        return bytes(data)

    def _keep(self, data: bytes) -> None:
        self.received += len(data)
        room = _EVIDENCE_BYTES - len(self._head)
        if room > 0:
            self._head += data[:room]

    def evidence(self, evidence: E) -> E:
        """``evidence`` plus the bytes received so far and the first of them (hex)."""
        return replace(evidence, bytes_received=self.received, first_bytes_hex=self._head.hex())


ReadReply = Callable[[ReplyReader], Awaitable[T]]
Judge = Callable[[Recorder[E], T, ReplyReader], ProbeResult]


def budget_s(settings: ProbeSettings) -> float:
    """The longest correct `exchange`: the connect, the application exchange stretched
    to its cap after a slow connect (`tls.handshake_timeout`), the bounded close."""
    t = settings.timeouts
    return t.connect_s + STRETCH_MAX * t.app_s + _CLOSE_WAIT_S


async def exchange(
    target: Target,
    settings: ProbeSettings,
    request: bytes,
    read_reply: ReadReply[T],
    judge: Judge[E, T],
    evidence: E,
) -> ProbeResult:
    """Connect, send ``request``, parse one reply with ``read_reply``, let ``judge`` decide.
    ``evidence`` is the probe's empty evidence, filled in here up to the reply."""
    rec = Recorder(target, evidence)
    address, port = require_address(target)  # a missing address is a config bug: raises
    try:
        conn = await connect_recorded(rec, address, port, settings.timeouts.connect_s)
    except OSError as exc:  # TimeoutError and ConnectionError are OSErrors
        return rec.fail_exc(exc, Operation.CONNECT)
    rec.evidence = replace(rec.evidence, connect_rtt_s=conn.connect_rtt_s, socket=conn.socket)
    reader, writer = await open_streams(conn.sock)
    try:
        return await _request_reply(rec, settings, reader, writer, request, read_reply, judge)
    finally:
        await close_streams(writer, _CLOSE_WAIT_S)


async def _request_reply(
    rec: Recorder[E],
    settings: ProbeSettings,
    reader: asyncio.StreamReader,
    writer: asyncio.StreamWriter,
    request: bytes,
    read_reply: ReadReply[T],
    judge: Judge[E, T],
) -> ProbeResult:
    replies = ReplyReader(reader, rec)
    step = Operation.WRITE
    try:
        # One budget for the whole application exchange: a censor that lets the request
        # through but stalls the answer is caught by the same clock as one that drops it.
        # app_s is a floor: after a slow connect (a SYN retransmitted, so the kernel's
        # retransmission timeout for our request is 3 s) it grows, within bounds.
        budget, _ = handshake_timeout(settings.timeouts.app_s, rec.phases.get("connect"))
        rec.evidence = replace(rec.evidence, app_timeout_s=round(budget, 3))
        async with asyncio.timeout(budget):
            writer.write(request)
            await writer.drain()
            step = Operation.READ
            with rec.phase("handshake"):
                reply = await read_reply(replies)
    except WireError as exc:
        malformed = replace(rec.evidence, reason="malformed", error=str(exc))
        return rec.fail(Failure.BAD_RESPONSE, Operation.READ, replies.evidence(malformed))
    except (OSError, EOFError, TimeoutError) as exc:
        return rec.fail_exc(exc, step, replies.evidence(rec.evidence))
    return judge(rec, reply, replies)
