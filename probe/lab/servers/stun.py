"""A STUN responder for tests and the lab, over UDP or TCP, with hostile variants.

Behaviours (``behavior=``):

``binding``            answers Binding requests with XOR-MAPPED-ADDRESS (+ SOFTWARE,
                       FINGERPRINT); ignores anything that is not a STUN request
``error401``           answers every Binding request with 401 (reason ``error_reason``)
``truncated``          a success response missing its last 6 bytes (length field kept)
``bad_cookie``         a success response with the wrong magic cookie
``bad_length``         a success response whose length field overstates the body
``garbage``            7 random bytes (no transaction id to match)
``giant``              60000 random bytes (a reader must bound what it takes in)
``reset``              TCP only: an RST (SO_LINGER 0) as soon as a message arrives
``silent``             reads everything, answers nothing
``echo``               sends every packet back unchanged (what a relay of our own or
                       the lab peer does; needed by the probe's control and flow modes)
``drop_stun_echo_rest`` echoes everything except STUN: a content filter in one box

``answer_first=N`` / ``answer_for_s=T`` make any behaviour go silent after N packets
received or T seconds after the first packet: the cut-off a call-blocking censor
applies to a flow it let start.  Over TCP, messages are framed per RFC 4571
(``framing="rfc4571"``) or bare (``framing="none"``).
"""

from __future__ import annotations

import asyncio
import secrets
import time
from collections import deque
from typing import Any, Literal, Self, get_args

from ...wire import WireError
from ...wire import stun as wire
from . import AsyncServer
from .tcp import CallbackStreamServer, abort_with_rst

__all__ = ["Behavior", "StunServer"]

Behavior = Literal[
    "binding",
    "error401",
    "truncated",
    "bad_cookie",
    "bad_length",
    "garbage",
    "giant",
    "reset",
    "silent",
    "echo",
    "drop_stun_echo_rest",
]
BEHAVIORS: tuple[str, ...] = get_args(Behavior)
_MAX_PACKETS_KEPT = 256
_GIANT = 60000  # fits one UDP datagram on loopback and one RFC 4571 frame


class StunServer(AsyncServer):
    """Bind to ``host``:``port`` (0 = ephemeral) over ``transport``; see module doc."""

    def __init__(
        self,
        host: str = "127.0.0.1",
        port: int = 0,
        *,
        transport: Literal["udp", "tcp"] = "udp",
        behavior: Behavior = "binding",
        framing: Literal["rfc4571", "none"] = "rfc4571",
        answer_first: int | None = None,
        answer_for_s: float | None = None,
        software: str | None = "probe-lab stun",
        error_reason: str = "Unauthorized",
    ) -> None:
        if behavior not in BEHAVIORS:
            raise ValueError(f"unknown STUN server behaviour {behavior!r}")
        if behavior == "reset" and transport != "tcp":
            raise ValueError("behaviour 'reset' needs transport 'tcp'")
        self.host = host
        self._port = port
        self.transport = transport
        self.behavior = behavior
        self.framing = framing
        self.answer_first = answer_first
        self.answer_for_s = answer_for_s
        self.software = software
        self.error_reason = error_reason
        self.received = 0  # packets (datagrams or framed messages) read
        self.answered = 0  # packets sent back
        self.packets: deque[bytes] = deque(maxlen=_MAX_PACKETS_KEPT)  # the latest ones
        self.arrivals: deque[float] = deque(maxlen=_MAX_PACKETS_KEPT)  # their monotonic times
        self._first_at: float | None = None
        self._udp: asyncio.DatagramTransport | None = None
        self._tcp: CallbackStreamServer | None = None

    @property
    def port(self) -> int:
        if self._udp is not None:
            return int(self._udp.get_extra_info("sockname")[1])
        if self._tcp is not None:
            return self._tcp.port
        return self._port

    async def start(self) -> Self:
        loop = asyncio.get_running_loop()
        if self.transport == "udp":
            self._udp, _ = await loop.create_datagram_endpoint(
                lambda: _UdpResponder(self), local_addr=(self.host, self._port)
            )
        else:
            self._tcp = await CallbackStreamServer(self.host, self._port, self._serve_tcp).start()
        return self

    async def close(self) -> None:
        if self._udp is not None:
            self._udp.close()
        if self._tcp is not None:
            await self._tcp.close()

    # ------------------------------------------------------------ the one decision

    def respond(self, data: bytes, peer: tuple[str, int]) -> bytes | None:
        """What to send back for one packet from ``peer`` (None = nothing)."""
        now = time.monotonic()
        self.received += 1
        self.packets.append(data)
        self.arrivals.append(now)
        if self._first_at is None:
            self._first_at = now
        if self._cut_off(now):
            return None
        reply = self._reply(data, peer)
        if reply is not None:
            self.answered += 1
        return reply

    def _cut_off(self, now: float) -> bool:
        if self.answer_first is not None and self.received > self.answer_first:
            return True
        return (
            self.answer_for_s is not None
            and self._first_at is not None
            and now - self._first_at > self.answer_for_s
        )

    def _reply(self, data: bytes, peer: tuple[str, int]) -> bytes | None:
        if self.behavior == "silent":
            return None
        if self.behavior == "echo":
            return data
        if self.behavior == "drop_stun_echo_rest":
            return None if wire.is_stun(data) else data
        if self.behavior == "garbage":
            return secrets.token_bytes(7)
        if self.behavior == "giant":
            return secrets.token_bytes(_GIANT)
        request = _binding_request(data)
        if request is None:
            return None
        if self.behavior == "error401":
            error = wire.binding_error(request, 401, self.error_reason)
            return wire.encode(error, fingerprint=True)
        mapped = wire.Address(peer[0], peer[1])
        good = wire.encode(
            wire.binding_success(request, mapped, software=self.software), fingerprint=True
        )
        return _spoil(good, self.behavior)

    # ------------------------------------------------------------ TCP

    async def _serve_tcp(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        # Runs until the client leaves: `StreamServer` takes its EOF or reset quietly.
        peer = writer.get_extra_info("peername")
        while True:
            data = await self._read_message(reader)
            if self.behavior == "reset":
                self.respond(data, (str(peer[0]), int(peer[1])))
                abort_with_rst(writer)
                break
            reply = self.respond(data, (str(peer[0]), int(peer[1])))
            if reply is None:
                continue
            writer.write(wire.frame(reply) if self.framing == "rfc4571" else reply)
            await writer.drain()
            if self.behavior == "truncated" and self.framing == "none":
                break  # the stream cannot go on after half a message: end it

    async def _read_message(self, reader: asyncio.StreamReader) -> bytes:
        # Both framings carry a 16-bit length, so one read is at most 64 KiB.
        if self.framing == "rfc4571":
            size = int.from_bytes(await reader.readexactly(2), "big")
            return await reader.readexactly(size)
        header = await reader.readexactly(wire.HEADER_LENGTH)
        return header + await reader.readexactly(int.from_bytes(header[2:4], "big"))


class _UdpResponder(asyncio.DatagramProtocol):
    def __init__(self, server: StunServer) -> None:
        self.server = server
        self.transport: asyncio.DatagramTransport | None = None

    def connection_made(self, transport: Any) -> None:
        self.transport = transport

    def datagram_received(self, data: bytes, addr: Any) -> None:
        reply = self.server.respond(data, (str(addr[0]), int(addr[1])))
        if reply is not None and self.transport is not None:
            self.transport.sendto(reply, addr)


def _binding_request(data: bytes) -> wire.Message | None:
    try:
        message = wire.parse(data)
    except WireError:
        return None
    if message.msg_class != wire.Class.REQUEST or message.method != wire.Method.BINDING:
        return None
    return message


def _spoil(response: bytes, behavior: str) -> bytes:
    """The malformed variants of a good response; each keeps the transaction id, so a
    client can tell which request the broken answer belongs to."""
    if behavior == "truncated":
        return response[:-6]
    if behavior == "bad_cookie":
        return response[:4] + b"\x21\x12\xa4\x43" + response[8:]
    if behavior == "bad_length":
        length = int.from_bytes(response[2:4], "big") + 4
        return response[:2] + length.to_bytes(2, "big") + response[4:]
    return response
