"""A Telegram DC stub: parses a real req_pq_multi and answers resPQ (or misbehaves on purpose).

Modes (what a censor, a middlebox or a broken path can look like to the probe):

``ok``               resPQ echoing the client's nonce, fresh server_nonce, pq and 3 fingerprints
``wrong_nonce``      a well-formed resPQ whose nonce is not the client's (a replayed/forged answer)
``garbage``          an HTTP block page instead of MTProto
``transport_error``  the framed 4-byte negative code (``error_code``, default -404)
``giant``            announces a 1 GiB packet, then holds the connection
``stall``            sends the first 10 bytes of a good resPQ, then nothing (post-handshake stall)
``close``            reads the request, then closes (FIN) without answering
``reset``            reads the request, then resets (RST)
``hang``             reads the request and never answers

Every request parsed is appended to `requests` as ``(message_id, nonce)``.
"""

from __future__ import annotations

import asyncio
import os
import struct
import time
from enum import StrEnum

from ...wire import mtproto
from .tcp import BLOCK_PAGE, StreamServer

__all__ = ["MTProtoMode", "MTProtoServer"]

# pq from the MTProto docs' sample exchange (a product of two primes, as a DC sends)
SAMPLE_PQ = bytes.fromhex("17ed48941a08f981")


class MTProtoMode(StrEnum):
    OK = "ok"
    WRONG_NONCE = "wrong_nonce"
    GARBAGE = "garbage"
    TRANSPORT_ERROR = "transport_error"
    GIANT = "giant"
    STALL = "stall"
    CLOSE = "close"
    RESET = "reset"
    HANG = "hang"


class MTProtoServer(StreamServer):
    """Listens on host/port (0 = ephemeral) and answers one req_pq_multi per connection."""

    def __init__(
        self,
        host: str = "127.0.0.1",
        port: int = 0,
        mode: MTProtoMode | str = MTProtoMode.OK,
        *,
        error_code: int = -404,
    ) -> None:
        super().__init__(host, port)
        self.mode = MTProtoMode(mode)
        self.error_code = error_code
        self.requests: list[tuple[int, bytes]] = []

    async def handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        if await reader.readexactly(4) != mtproto.INTERMEDIATE_TAG:
            return  # a real DC also drops a transport it does not recognise
        length = mtproto.decode_header(await reader.readexactly(4))
        if isinstance(length, mtproto.TransportError):
            return
        msg_id, nonce = mtproto.parse_req_pq_multi(await reader.readexactly(length))
        self.requests.append((msg_id, nonce))
        await self._answer(writer, nonce)

    async def _answer(self, writer: asyncio.StreamWriter, nonce: bytes) -> None:
        mode = self.mode
        if await self.leave_unanswered(mode, writer):
            return
        reply = self._reply(nonce)
        writer.write(reply[:10] if mode is MTProtoMode.STALL else reply)
        await writer.drain()
        if mode in (MTProtoMode.GIANT, MTProtoMode.STALL):
            await self.hang()

    def _reply(self, nonce: bytes) -> bytes:
        mode = self.mode
        if mode is MTProtoMode.GARBAGE:
            return BLOCK_PAGE
        if mode is MTProtoMode.TRANSPORT_ERROR:
            return mtproto.encode_transport_error(self.error_code)
        if mode is MTProtoMode.GIANT:
            return struct.pack("<i", 1 << 30) + os.urandom(1024)
        if mode is MTProtoMode.WRONG_NONCE:
            nonce = bytes(b ^ 0xFF for b in nonce)  # never equal to the original
        res = mtproto.ResPQ(
            nonce=nonce,
            server_nonce=os.urandom(16),
            pq=SAMPLE_PQ,
            fingerprints=tuple(struct.unpack("<q", os.urandom(8))[0] for _ in range(3)),
        )
        # server message ids answering a client message are 1 mod 4 (MTProto description)
        server_msg_id = mtproto.message_id(time.time()) | 1
        body = mtproto.encode_res_pq(res)
        return mtproto.frame(mtproto.unencrypted_message(server_msg_id, body))
