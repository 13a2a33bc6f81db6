"""A client TLS connection as a state machine over memory BIOs: no IO inside.

Bytes from the network go in with `TlsClient.feed` (the peer's EOF with ``feed_eof``), bytes for
the network come out of `TlsClient.data_to_send`; the caller moves them (aioquic's
``QuicConnection`` split; `tls_pump` is the asyncio adapter the probes use).  This module
imports neither socket nor asyncio, so a test drives it against an in-memory server.

Owning the bytes is the point: asyncio's SSL transport hides when our ClientHello left,
whether the server sent anything at all, and how many wire bytes (handshake included)
came back before a flow stopped, which is the evidence the ``tls`` and ``transfer``
probes exist to collect.
"""

from __future__ import annotations

import contextlib
import ssl
from dataclasses import dataclass
from typing import Any, Literal

MAX_CHAIN = 8  # real chains have 2-4 certificates; a hostile peer may send dozens

CloseKind = Literal["close_notify", "ragged"]


@dataclass(frozen=True)
class Negotiated:
    """What a completed handshake settled on."""

    tls_version: str | None
    alpn: str | None
    cipher: str | None


class TlsClient:
    """One client TLS connection; counts the wire bytes each way.

    ``bytes_received``: bytes fed in (server -> client TLS records).  ``bytes_sent``:
    bytes taken out with `data_to_send` (what the caller is to put on the wire).
    """

    def __init__(self, ctx: ssl.SSLContext, server_hostname: str | None) -> None:
        self._incoming = ssl.MemoryBIO()
        self._outgoing = ssl.MemoryBIO()
        self.ssl = ctx.wrap_bio(self._incoming, self._outgoing, server_hostname=server_hostname)
        self.bytes_received = 0
        self.bytes_sent = 0
        self.eof_received = False
        self.close_kind: CloseKind | None = None  # how the peer ended the plaintext stream
        self.handshake_complete = False

    # -- bytes in and out ----------------------------------------------------------------

    def feed(self, data: bytes) -> None:
        """Bytes from the peer (``b""`` changes nothing: the EOF is `feed_eof`)."""
        self.bytes_received += len(data)
        self._incoming.write(data)

    def feed_eof(self) -> None:
        """The peer closed its side: OpenSSL then reports close_notify, a ragged EOF or
        an alert, whichever the bytes before it amount to."""
        self.eof_received = True
        self._incoming.write_eof()

    def data_to_send(self) -> bytes:
        """Everything the state machine wants on the wire now (may be ``b""``)."""
        data = self._outgoing.read()
        self.bytes_sent += len(data)
        return data

    # -- handshake -----------------------------------------------------------------------

    def do_handshake(self) -> bool:
        """Advance the handshake: True once complete, False while it needs more bytes
        from the peer (send `data_to_send` first).  Raises `ssl.SSLError` (an alert, a
        failed verification, bytes that are not TLS); its alert is in `data_to_send`."""
        try:
            self.ssl.do_handshake()
        except ssl.SSLWantReadError:
            return False
        self.handshake_complete = True
        return True

    def negotiated(self) -> Negotiated:
        """Version, ALPN and cipher suite the handshake settled on (None before it did)."""
        cipher = self.ssl.cipher()
        return Negotiated(
            tls_version=self.ssl.version(),
            alpn=self.ssl.selected_alpn_protocol(),
            cipher=cipher[0] if cipher else None,
        )

    def peer_certificate(self) -> bytes | None:
        """The verified leaf certificate (DER); None before the handshake completed (a
        failed verification never completes it: `peer_chain` still has the chain)."""
        if not self.handshake_complete:
            return None  # getpeercert would raise ValueError
        return self.ssl.getpeercert(binary_form=True)

    def peer_chain(self) -> list[bytes]:
        """The DER chain the peer sent (leaf first, at most `MAX_CHAIN`), also after a
        failed verification: a MITM's certificate is the finding.

        Python 3.13 made ``get_unverified_chain`` public; 3.10-3.12 have it on the
        underlying ``_ssl`` object only.  Evidence only: no API -> an empty list.
        """
        getter = getattr(self.ssl, "get_unverified_chain", None)
        if getter is None:
            getter = getattr(getattr(self.ssl, "_sslobj", None), "get_unverified_chain", None)
        try:
            chain = getter() if getter is not None else None
        except (ssl.SSLError, ValueError):
            return []
        return [_der(c) for c in list(chain or [])[:MAX_CHAIN]]

    # -- application data ----------------------------------------------------------------

    def write(self, plaintext: bytes) -> None:
        """Encrypt ``plaintext``; the records wait in `data_to_send`."""
        self.ssl.write(plaintext)

    def read(self, max_bytes: int) -> bytes | None:
        """Decrypted bytes (at most ``max_bytes``), None while a whole record is still
        missing (feed more), ``b""`` at the end of the stream (`close_kind` says how).
        Raises `ssl.SSLError` on an alert or a bad record."""
        try:
            data = self.ssl.read(max_bytes)
        except ssl.SSLWantReadError:
            return None
        except ssl.SSLZeroReturnError:
            self.close_kind = "close_notify"
            return b""
        except ssl.SSLEOFError:
            self.close_kind = "ragged"  # FIN without close_notify
            return b""
        if not data:
            self.close_kind = self.close_kind or "close_notify"
        return data

    def close(self) -> None:
        """Queue our close_notify (in `data_to_send`) without waiting for the peer's."""
        # WantRead: the peer's close_notify is not awaited
        with contextlib.suppress(ssl.SSLError, OSError):
            self.ssl.unwrap()


def _der(cert: Any) -> bytes:
    if isinstance(cert, bytes):  # 3.13's public API returns DER already
        return cert
    return bytes(cert.public_bytes(ssl._ssl.ENCODING_DER))  # type: ignore[attr-defined]
