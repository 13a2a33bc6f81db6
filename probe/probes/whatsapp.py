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
from dataclasses import dataclass
from typing import Any, ClassVar, Self

from ..config.settings import ProbeSettings
from ..model import ProbeParams, ProbeResult, Target
from ..wire import noise
from . import _exchange
from ._exchange import ReplyReader, exchange
from .base import Recorder
from .params import ParamError, check_keys, shown


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


@dataclass(frozen=True)
class WhatsappParams(ProbeParams):
    """``wa_version``: the two header version bytes, default ``[6, 3]``."""

    PROBE: ClassVar[str] = "whatsapp"
    wa_version: tuple[int, int] = noise.DEFAULT_VERSION

    @classmethod
    def parse(cls, params: Mapping[str, Any], base: Self | None = None) -> Self:
        """A bad value is a configuration bug, never a network finding (and must not be
        mistaken for the peer's ``bad_response``), so the loader rejects it up front."""
        b = base if base is not None else cls()
        check_keys("whatsapp", params, ("wa_version",))
        version = params.get("wa_version", b.wa_version)
        if (
            isinstance(version, list | tuple)
            and len(version) == 2
            and all(
                isinstance(v, int) and not isinstance(v, bool) and 0 <= v <= 255 for v in version
            )
        ):
            return cls((version[0], version[1]))
        raise ParamError(
            "whatsapp", "wa_version", f"must be two byte values like [6, 3], got {shown(version)}"
        )


def budget_s(_p: WhatsappParams, settings: ProbeSettings) -> float:
    """The longest correct run (`probes.ProbeType.budget`): one request-reply exchange."""
    return _exchange.budget_s(settings)


async def probe(target: Target, settings: ProbeSettings) -> ProbeResult:
    version = WhatsappParams.of(target).wa_version
    ephemeral = noise.public_bytes(noise.new_ephemeral())
    request = noise.client_hello_packet(ephemeral, version)
    return await exchange(target, settings, request, _read_reply, _judge)
