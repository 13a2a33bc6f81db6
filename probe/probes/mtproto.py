"""Telegram MTProto probe: does a DC answer ``req_pq_multi`` with a resPQ echoing our nonce?

Over TCP to a DC address:port, send the intermediate-transport tag and an
unencrypted ``req_pq_multi`` with a fresh random 128-bit nonce, read one bounded
packet back within ``timeouts.app_s``.  Success is a resPQ carrying our nonce:
only a party that read this connection's request can produce it, so it proves a
live MTProto endpoint answered (no account, no key exchange: we stop there).

Failures: see `probe.probes._exchange` for connect/write/read; in addition a
reply that parses but is not the answer is ``bad_response`` with
``details.reason`` = ``nonce_mismatch`` (a resPQ for someone else's nonce) or
``transport_error`` (``details.transport_error`` = the DC's code, e.g. -404);
unparseable bytes are ``reason`` = ``malformed``.
"""

from __future__ import annotations

import secrets
import time
from dataclasses import dataclass
from typing import ClassVar

from ..config.settings import ProbeSettings
from ..model import Failure, Operation, ProbeResult, Target
from ..wire import mtproto
from . import _exchange
from ._exchange import ReplyReader, exchange
from .base import Recorder
from .params import NoParams

_NONCE_LEN = 16


@dataclass(frozen=True)
class MtprotoParams(NoParams):
    """The ``mtproto`` probe takes no params (every request carries a fresh nonce)."""

    PROBE: ClassVar[str] = "mtproto"


def budget_s(_p: MtprotoParams, settings: ProbeSettings) -> float:
    """The longest correct run (`probes.ProbeType.budget`): one request-reply exchange."""
    return _exchange.budget_s(settings)


async def _read_reply(replies: ReplyReader) -> mtproto.ResPQ | mtproto.TransportError:
    length = mtproto.decode_header(await replies.read(4))
    if isinstance(length, mtproto.TransportError):
        return length
    return mtproto.parse_reply(await replies.read(length))


def _judge(
    nonce: bytes,
    rec: Recorder,
    reply: mtproto.ResPQ | mtproto.TransportError,
    replies: ReplyReader,
) -> ProbeResult:
    if isinstance(reply, mtproto.TransportError):
        return rec.fail(
            Failure.BAD_RESPONSE,
            Operation.READ,
            reason="transport_error",
            transport_error=reply.code,
            transport_error_framed=reply.framed,
            **replies.evidence(),
        )
    if reply.nonce != nonce:
        return rec.fail(
            Failure.BAD_RESPONSE, Operation.READ, reason="nonce_mismatch", **replies.evidence()
        )
    return rec.ok(
        server_nonce_present=any(reply.server_nonce),
        fingerprints=len(reply.fingerprints),
        pq_bytes=len(reply.pq),
        bytes_received=replies.received,
        rtt_ms=round(rec.phases["handshake"] * 1000, 3),
    )


async def probe(target: Target, settings: ProbeSettings) -> ProbeResult:
    nonce = secrets.token_bytes(_NONCE_LEN)
    request = mtproto.req_pq_multi_packet(nonce, time.time())

    def judge(
        rec: Recorder, reply: mtproto.ResPQ | mtproto.TransportError, replies: ReplyReader
    ) -> ProbeResult:
        return _judge(nonce, rec, reply, replies)

    return await exchange(target, settings, request, _read_reply, judge)
