"""A WhatsApp chat-server stub: parses the WA header + ClientHello and answers a ServerHello.

The ServerHello is structurally what a real server sends -- its own fresh
X25519 ephemeral key, a 48-byte "encrypted" static key and an "encrypted"
certificate payload -- but the encrypted parts are random bytes: the probe
stops before it could tell, and the stub has no business holding WhatsApp keys.

Modes:

``ok``         a well-formed ServerHello
``garbage``    an HTTP block page instead of a Noise frame
``malformed``  a frame whose ServerHello has a 16-byte ephemeral key (fails validation)
``close``      reads the hello, then closes (FIN) without answering
``reset``      reads the hello, then resets (RST)
``hang``       reads the hello and never answers

Every hello parsed is appended to `hellos` as ``(version, client_ephemeral)``.
"""

from __future__ import annotations

import asyncio
import os
from enum import StrEnum

from ...wire import noise
from .tcp import BLOCK_PAGE, StreamServer

__all__ = ["NoiseMode", "NoiseServer"]

# Size of the encrypted certificate payload: real ones are a few hundred bytes.
_CERT_PAYLOAD_LEN = 300


class NoiseMode(StrEnum):
    OK = "ok"
    GARBAGE = "garbage"
    MALFORMED = "malformed"
    CLOSE = "close"
    RESET = "reset"
    HANG = "hang"


class NoiseServer(StreamServer):
    """Listens on host/port (0 = ephemeral) and answers one ClientHello per connection."""

    def __init__(
        self,
        host: str = "127.0.0.1",
        port: int = 0,
        mode: NoiseMode | str = NoiseMode.OK,
    ) -> None:
        super().__init__(host, port)
        self.mode = NoiseMode(mode)
        self.hellos: list[tuple[tuple[int, int], bytes]] = []

    async def handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        version = noise.parse_header(await reader.readexactly(4))
        length = noise.decode_frame_length(await reader.readexactly(3))
        ephemeral = noise.parse_client_hello(await reader.readexactly(length))
        self.hellos.append((version, ephemeral))
        if await self.leave_unanswered(self.mode, writer):
            return
        writer.write(self._reply())
        await writer.drain()

    def _reply(self) -> bytes:
        if self.mode is NoiseMode.GARBAGE:
            return BLOCK_PAGE
        ephemeral = noise.public_bytes(noise.new_ephemeral())
        if self.mode is NoiseMode.MALFORMED:
            ephemeral = ephemeral[:16]
        hello = noise.ServerHello(
            ephemeral=ephemeral,
            static=os.urandom(noise.STATIC_ENCRYPTED_LEN),
            payload=os.urandom(_CERT_PAYLOAD_LEN),
        )
        return noise.frame(noise.encode_server_hello(hello))
