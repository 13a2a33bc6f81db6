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

from ..model import ProbeResult, Target
from ..settings import ProbeSettings
from ..wire import WireError, noise
from ._exchange import ReplyReader, exchange
from .base import Recorder


async def _read_reply(replies: ReplyReader) -> noise.ServerHello:
    length = noise.decode_frame_length(await replies.read(3))
    return noise.parse_server_hello(await replies.read(length))


def _judge(rec: Recorder, hello: noise.ServerHello, replies: ReplyReader) -> ProbeResult:
    return rec.ok(
        static_bytes=len(hello.static),
        payload_bytes=len(hello.payload),
        bytes_received=replies.received,
        rtt_ms=round(rec.phases["handshake"] * 1000, 3),
    )


async def probe(target: Target, settings: ProbeSettings) -> ProbeResult:
    version = target.params.get("wa_version", noise.DEFAULT_VERSION)
    ephemeral = noise.public_bytes(noise.new_ephemeral())
    try:
        request = noise.client_hello_packet(ephemeral, tuple(version))
    except (WireError, TypeError):
        # A configuration bug, not a network finding (and not the peer's bad_response).
        raise ValueError(f"whatsapp param wa_version must be two bytes, got {version!r}") from None
    return await exchange(target, settings, request, _read_reply, _judge)
