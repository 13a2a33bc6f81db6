"""QUIC servers for tests and the lab: a real aioquic server and a Version-Negotiation-only one.

- `QUICServer`: aioquic's server with the given `LeafCert` and ALPN (``h3``
  by default).  A completed handshake is all the ``quic`` probe needs; with ALPN
  h3 it also answers any HTTP/3 request with ``200`` and a short body, so a
  browser-like client works too.  ``refuse_with=CODE`` instead closes every
  connection mid-handshake with that transport error code (e.g. ``0x130``,
  CRYPTO_ERROR + unknown_ca): what a peer, or a censor holding the Initial keys
  anyone can derive, may send.  Like any aioquic server it answers datagrams
  carrying a version it does not support with Version Negotiation, so it also
  serves the ``quic_vn`` probe.
- `VersionNegotiationServer`: answers every long-header datagram (of at least
  ``min_datagram`` bytes, 1200 as RFC 9000 §14.1 lets servers require) with a VN
  offering ``versions``, and never completes a handshake.  With the default
  offer (v1 and v2, what a real server lists) a v1 client must ignore the VN
  (RFC 9000 §6.2) and times out; offering only versions the client lacks makes
  it fail with an incompatible version.  Hostile modes (`VNMode`): ``wrong_cids``
  answers a VN that does not echo the client's connection IDs (what a blind
  injector could send), ``garbage`` answers bytes that are not QUIC at all.

Both count the datagrams they received (``datagrams``), so the lab can tell "the
censor ate the Initial" from "the server got it and refused".  Both bind to the
caller's host/port (port 0 = ephemeral), expose ``port``, and are async context
managers.
"""

from __future__ import annotations

import asyncio
import os
import tempfile
from collections.abc import Callable, Sequence
from enum import StrEnum
from pathlib import Path
from typing import Any, Self, cast

from aioquic.asyncio.protocol import QuicConnectionProtocol
from aioquic.asyncio.server import QuicServer
from aioquic.h3.connection import H3_ALPN, H3Connection
from aioquic.h3.events import HeadersReceived
from aioquic.quic import events
from aioquic.quic.configuration import QuicConfiguration
from aioquic.quic.connection import NetworkAddress, QuicConnection

from ...wire import WireError
from ...wire.quic import (
    MIN_INITIAL_SIZE,
    QUIC_V1,
    QUIC_V2,
    VERSION_NEGOTIATION,
    build_version_negotiation,
    parse_long_header,
)
from ..certs import LeafCert
from . import AsyncServer

__all__ = ["GARBAGE", "H3_BODY", "QUICServer", "VNMode", "VersionNegotiationServer"]

H3_BODY = b"probe lab\n"
# Short-header form (top bit clear) so it can never parse as Version Negotiation.
GARBAGE = b"\x17" + b"not quic at all " * 4


class VNMode(StrEnum):
    ANSWER = "answer"
    WRONG_CIDS = "wrong_cids"
    GARBAGE = "garbage"


class _UDPServer(AsyncServer):
    """Binding, port and lifetime shared by both servers."""

    def __init__(self, host: str, port: int) -> None:
        self.host = host
        self._requested_port = port
        self._transport: asyncio.DatagramTransport | None = None

    @property
    def port(self) -> int:
        if self._transport is None:
            raise RuntimeError("server not started")
        return int(self._transport.get_extra_info("sockname")[1])

    async def _bind(self, factory: Callable[[], asyncio.DatagramProtocol]) -> None:
        loop = asyncio.get_running_loop()
        transport, _ = await loop.create_datagram_endpoint(
            factory, local_addr=(self.host, self._requested_port)
        )
        self._transport = transport

    async def close(self) -> None:
        if self._transport is not None:
            self._transport.close()
            self._transport = None


class _LabConnection(QuicConnectionProtocol):
    """One server-side connection: counts handshakes, answers HTTP/3 requests."""

    def __init__(self, quic: QuicConnection, owner: QUICServer, **kw: Any) -> None:
        super().__init__(quic, **kw)
        self._owner = owner
        self._h3: H3Connection | None = None

    def quic_event_received(self, event: events.QuicEvent) -> None:
        refuse_with = self._owner.refuse_with
        if refuse_with is not None and isinstance(event, events.ProtocolNegotiated):
            # a transport close (frame 0x1c) naming the CRYPTO frame that carried the
            # ClientHello; sent by the transmit() that follows this batch of events
            self._quic.close(error_code=refuse_with, frame_type=0x06, reason_phrase="refused")
            return
        if isinstance(event, events.HandshakeCompleted):
            self._owner.handshakes += 1
            self._owner.handshake_seen.set()
            if event.alpn_protocol in H3_ALPN:
                self._h3 = H3Connection(self._quic)
        if self._h3 is None:
            return
        for h3_event in self._h3.handle_event(event):
            if isinstance(h3_event, HeadersReceived):
                self._h3.send_headers(
                    h3_event.stream_id,
                    [(b":status", b"200"), (b"content-type", b"text/plain")],
                )
                self._h3.send_data(h3_event.stream_id, H3_BODY, end_stream=True)
        # sends happen in transmit(), which aioquic calls after every batch of events


class _CountingQuicServer(QuicServer):
    def __init__(self, owner: QUICServer, **kw: Any) -> None:
        super().__init__(**kw)
        self._owner = owner

    def datagram_received(self, data: bytes | str, addr: NetworkAddress) -> None:
        self._owner.datagrams += 1
        super().datagram_received(data, addr)


class QUICServer(_UDPServer):
    """A real QUIC server (aioquic) bound to ``host``:``port`` (0 = ephemeral)."""

    def __init__(
        self,
        host: str = "127.0.0.1",
        port: int = 0,
        *,
        cert: LeafCert,
        alpn: Sequence[str] = ("h3",),
        versions: Sequence[int] = (QUIC_V1, QUIC_V2),
        refuse_with: int | None = None,
    ) -> None:
        super().__init__(host, port)
        self.refuse_with = refuse_with
        self.configuration = QuicConfiguration(
            is_client=False, alpn_protocols=list(alpn), supported_versions=list(versions)
        )
        # aioquic loads a key pair only from files: write them to a private temporary
        # directory that is gone again before the server accepts anything.
        with tempfile.TemporaryDirectory(prefix="probe-quic-") as tmp:
            certfile, keyfile = cert.write(Path(tmp), "leaf")
            self.configuration.load_cert_chain(certfile, keyfile)
        self._server: _CountingQuicServer | None = None
        self.datagrams = 0
        self.handshakes = 0
        self.handshake_seen = asyncio.Event()  # set once a handshake completed here

    async def start(self) -> Self:
        def connection(quic: QuicConnection, **kw: Any) -> QuicConnectionProtocol:
            return _LabConnection(quic, self, **kw)

        def server() -> asyncio.DatagramProtocol:
            self._server = _CountingQuicServer(
                self, configuration=self.configuration, create_protocol=connection
            )
            return self._server

        # What aioquic's serve() does, keeping the transport so the bound port is known.
        await self._bind(server)
        return self

    async def close(self) -> None:
        if self._server is not None:
            self._server.close()  # closes every connection and the transport
            self._server = None
            self._transport = None
        await super().close()


class _VNResponder(asyncio.DatagramProtocol):
    def __init__(self, owner: VersionNegotiationServer) -> None:
        self._owner = owner
        self._transport: asyncio.DatagramTransport | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self._transport = cast(asyncio.DatagramTransport, transport)

    def datagram_received(self, data: bytes, addr: Any) -> None:
        owner = self._owner
        owner.datagrams += 1
        if len(data) < owner.min_datagram or self._transport is None:
            return
        try:
            header = parse_long_header(data)
        except WireError:
            return  # short header or garbage: nothing to negotiate
        if header.version == VERSION_NEGOTIATION:
            return  # never answer a VN with a VN (reflection loop between two servers)
        self._transport.sendto(self._reply(header.dcid, header.scid), addr)
        owner.answered += 1

    def _reply(self, dcid: bytes, scid: bytes) -> bytes:
        owner = self._owner
        if owner.mode is VNMode.GARBAGE:
            return GARBAGE
        if owner.mode is VNMode.WRONG_CIDS:
            dcid, scid = os.urandom(len(dcid)), os.urandom(len(scid))
        # A VN's DCID/SCID are the client's SCID/DCID (RFC 8999 §6).
        return build_version_negotiation(scid, dcid, tuple(owner.versions))


class VersionNegotiationServer(_UDPServer):
    """Answers any long-header datagram with Version Negotiation; never handshakes."""

    def __init__(
        self,
        host: str = "127.0.0.1",
        port: int = 0,
        *,
        versions: Sequence[int] = (QUIC_V1, QUIC_V2),
        min_datagram: int = MIN_INITIAL_SIZE,
        mode: VNMode | str = VNMode.ANSWER,
    ) -> None:
        super().__init__(host, port)
        self.mode = VNMode(mode)
        self.versions = tuple(versions)
        self.min_datagram = min_datagram
        self.datagrams = 0
        self.answered = 0

    async def start(self) -> Self:
        await self._bind(lambda: _VNResponder(self))
        return self
