"""A TLS server with a real mode and the hostile modes a censor or broken peer shows.

`TLSServer` per `TLSMode`:

- ``serve``: a real TLS server with the given `LeafCert` (and ALPN if given); after the
  handshake it echoes application data until the client closes;
- ``reset_after_hello``: read the ClientHello, then RST (FIELD.md B3, RST variant);
- ``hang_after_hello``: read the ClientHello, then never answer (B3, silent drop);
- ``garbage_after_hello``: answer the ClientHello with bytes that are not TLS;
- ``close_after_hello``: read the ClientHello, then FIN;
- ``alert_after_hello``: answer the ClientHello with a fatal handshake_failure alert.

The hostile modes never parse beyond the record header: they read one TLS record (the
ClientHello) so their reaction comes *after* the probe's ClientHello, as on the wire.
``client_hellos`` counts the ClientHellos seen and ``sni_seen`` keeps the last server
names asked for in ``serve`` mode, so the lab can tell "the censor ate the ClientHello"
from "the server refused it".
"""

from __future__ import annotations

import asyncio
import collections
import ssl
import tempfile
from collections.abc import Sequence
from enum import StrEnum
from pathlib import Path

from ..certs import LeafCert
from .tcp import StreamServer, abort_with_rst, drain_until_eof, echo_until_eof

# A TLS record is at most 2^14 bytes of plaintext plus 2048 of expansion (RFC 8446 5.2);
# anything claiming more is not a ClientHello and is not read.
_MAX_RECORD = 2**14 + 2048
_HANDSHAKE = 0x16
# alert record: type 21, legacy version TLS 1.2, length 2, level fatal(2), handshake_failure(40)
FATAL_HANDSHAKE_FAILURE = bytes([0x15, 0x03, 0x03, 0x00, 0x02, 0x02, 0x28])
# Plain HTTP where a ServerHello should be: what a block page injector or a wrong service sends
DEFAULT_GARBAGE = b"HTTP/1.1 403 Forbidden\r\nContent-Length: 0\r\n\r\n"


class TLSMode(StrEnum):
    SERVE = "serve"
    RESET_AFTER_HELLO = "reset_after_hello"
    HANG_AFTER_HELLO = "hang_after_hello"
    GARBAGE_AFTER_HELLO = "garbage_after_hello"
    CLOSE_AFTER_HELLO = "close_after_hello"
    ALERT_AFTER_HELLO = "alert_after_hello"


async def read_client_hello(reader: asyncio.StreamReader) -> bytes:
    """Read the first TLS record (the ClientHello); a non-TLS first record is returned as is.

    Raises IncompleteReadError if the client leaves before a whole record arrived.
    """
    header = await reader.readexactly(5)
    length = int.from_bytes(header[3:5], "big")
    if header[0] != _HANDSHAKE or length > _MAX_RECORD:
        return header
    return header + await reader.readexactly(length)


def server_context(cert: LeafCert, alpn: Sequence[str] = ()) -> ssl.SSLContext:
    # ssl can only load a key pair from files: write them to a private temporary
    # directory that is gone again before the server accepts anything.
    with tempfile.TemporaryDirectory(prefix="probe-tls-") as tmp:
        ctx = cert.server_context(Path(tmp), "leaf")
    if alpn:
        ctx.set_alpn_protocols(list(alpn))
    return ctx


class TLSServer(StreamServer):
    """Real or hostile TLS endpoint bound to ``host``:``port`` (0 = ephemeral)."""

    def __init__(
        self,
        host: str,
        port: int = 0,
        *,
        cert: LeafCert | None = None,
        mode: TLSMode | str = TLSMode.SERVE,
        alpn: Sequence[str] = (),
        garbage: bytes = DEFAULT_GARBAGE,
        handshake_timeout_s: float = 10.0,
    ) -> None:
        if TLSMode(mode) is TLSMode.SERVE and cert is None:
            raise ValueError("serve mode needs a certificate")
        context = server_context(cert, alpn) if cert is not None else None
        # Only serve mode lets asyncio run the TLS handshake; hostile modes see raw bytes.
        super().__init__(
            host,
            port,
            ssl=context if TLSMode(mode) is TLSMode.SERVE else None,
            ssl_handshake_timeout_s=handshake_timeout_s,
        )
        self.mode = TLSMode(mode)
        self.context = context
        if context is not None:
            context.sni_callback = self._record_sni
        self.garbage = garbage
        self.client_hellos = 0
        self.sni_seen: collections.deque[str | None] = collections.deque(maxlen=64)

    def _record_sni(
        self, _obj: ssl.SSLObject | ssl.SSLSocket, name: str | None, _ctx: ssl.SSLContext
    ) -> None:
        self.client_hellos += 1
        self.sni_seen.append(name)

    async def handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        if self.mode is TLSMode.SERVE:
            # asyncio ran the handshake before calling us.  A client that breaks the TLS
            # stream raises ssl.SSLError, an OSError: the base ends that connection quietly.
            await echo_until_eof(reader, writer)
            return
        await read_client_hello(reader)
        self.client_hellos += 1
        if self.mode is TLSMode.RESET_AFTER_HELLO:
            abort_with_rst(writer)
        elif self.mode is TLSMode.HANG_AFTER_HELLO:
            await drain_until_eof(reader)
        elif self.mode is TLSMode.GARBAGE_AFTER_HELLO:
            writer.write(self.garbage)
            await writer.drain()
            await drain_until_eof(reader)  # keep the connection: the bytes are the failure
        elif self.mode is TLSMode.ALERT_AFTER_HELLO:
            writer.write(FATAL_HANDSHAKE_FAILURE)
            await writer.drain()
        # CLOSE_AFTER_HELLO: returning makes the base class close with a FIN
