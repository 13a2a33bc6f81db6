"""WhatsApp chat-protocol probe: does a chat server answer our Noise ClientHello?

Over TCP to a chat endpoint (``g.whatsapp.net`` / ``e*.whatsapp.net``, ports
5222 or 443), send the ``WA`` header and a framed ``HandshakeMessage{clientHello}``
carrying a fresh X25519 ephemeral key, read one bounded frame back within
``timeouts.app_s``.  Success is a structurally valid ServerHello (32-byte
ephemeral key, 48-byte encrypted static key, non-empty encrypted certificate).
We stop there: no ClientFinish, no login, no account, and the server's
encrypted parts are never decrypted.

Params: ``wa_version`` -- the two header version bytes, default ``[6, 3]``.

Failures: see `probe.probes._exchange`; anything but a valid ServerHello is
``bad_response`` with ``details.reason`` = ``malformed`` and ``details.error``
naming what was wrong.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import replace
from typing import Any

from ..config.settings import ProbeSettings
from ..evidence import WhatsappEvidence
from ..model import ProbeResult, Target
from ..wire import noise
from ._exchange import ReplyReader, exchange
from .base import Recorder
from .params import ParamError, check_keys, shown


async def _read_reply(replies: ReplyReader) -> noise.ServerHello:
    length = noise.decode_frame_length(await replies.read(3))
    return noise.parse_server_hello(await replies.read(length))


def _judge(
    rec: Recorder[WhatsappEvidence], hello: noise.ServerHello, replies: ReplyReader
) -> ProbeResult:
    return rec.ok(
        replace(
            rec.evidence,
            static_bytes=len(hello.static),
            payload_bytes=len(hello.payload),
            bytes_received=replies.received,
            rtt_ms=round(rec.phases["handshake"] * 1000, 3),
        )
    )


def parse_params(params: Mapping[str, Any]) -> tuple[int, int]:
    """``wa_version``: two byte values, default ``[6, 3]``.  Raises `ParamError`.

    A bad value is a configuration bug, never a network finding (and must not be
    mistaken for the peer's ``bad_response``), so the loader rejects it up front.
    """
    check_keys("whatsapp", params, ("wa_version",))
    version = params.get("wa_version", noise.DEFAULT_VERSION)
    if (
        isinstance(version, list | tuple)
        and len(version) == 2
        and all(isinstance(v, int) and not isinstance(v, bool) and 0 <= v <= 255 for v in version)
    ):
        return (version[0], version[1])
    raise ParamError(
        "whatsapp", "wa_version", f"must be two byte values like [6, 3], got {shown(version)}"
    )


async def probe(target: Target, settings: ProbeSettings) -> ProbeResult:
    version = parse_params(target.params)  # raises before connecting
    ephemeral = noise.public_bytes(noise.new_ephemeral())
    request = noise.client_hello_packet(ephemeral, version)
    return await exchange(target, settings, request, _read_reply, _judge, WhatsappEvidence())
