"""QUIC handshake probe: one full QUIC v1 (or v2) + TLS 1.3 handshake with aioquic.

Why not ``aioquic.asyncio.connect``: it binds an *unconnected* dual-stack socket
(so an ICMP port-unreachable never reaches us and "refused" looks like silence),
resolves the host with getaddrinfo, and turns every termination into a bare
``ConnectionError`` that has lost the QUIC error code.  Instead we drive aioquic's
sans-IO `QuicConnection` through a subclass of its thin asyncio adapter
(`QuicConnectionProtocol`, which keeps aioquic's own timer and retransmission
logic) over a socket we ``connect()``.  The subclass sees every raw datagram
(to recognise Version Negotiation ourselves), and a qlog hook shows each
CONNECTION_CLOSE frame the moment it is sent or received (aioquic itself reports
a close only after the draining period, and without saying who closed).

Outcomes (failed_operation ``quic_handshake`` unless the local socket fails):

- HandshakeCompleted -> ok, with the negotiated ALPN and the peer certificate;
- a Version Negotiation echoing our connection IDs and not offering our version
  -> ``quic_incompatible_version``;
- a CONNECTION_CLOSE (ours or the peer's) -> `classify.classify_quic_close` by
  its error code (a certificate alert only counts against the server's certificate
  when we sent it); aioquic's ``bad_certificate`` alert is ambiguous, so the peer
  certificate is re-checked (hostname, then chain, the order aioquic uses) and
  the typed exception classified;
- an ICMP error on the connected socket (``IP_RECVERR``: every kind, with its type,
  code and reporter in ``icmp_errors``) -> `classify.classify`
  (``connection_refused`` for port unreachable, ``host_unreachable`` ...);
- nothing by ``timeouts.quic_s`` -> ``generic_timeout_error``.

Trust: aioquic ignores SSL_CERT_FILE and defaults to certifi's bundle.  We give
it the system store as the ssl module sees it (`ssl.get_default_verify_paths`,
which honours SSL_CERT_FILE/SSL_CERT_DIR) plus ``tls.ca_file``, so the QUIC and
TLS probes trust the same roots; only when no system store exists (and no CA
file is set) does aioquic's certifi default apply.

Params, shared with the ``tls`` probe where they overlap: ``sni`` (override the
server name; ``null`` = send none and verify the IP literal), ``alpn`` (default
``["h3"]``), ``version`` (``"v1"``, default, or ``"v2"``, RFC 9369).
"""

from __future__ import annotations

import asyncio
import collections
import ipaddress
import ssl
from collections.abc import Mapping
from dataclasses import dataclass, replace
from typing import Any, ClassVar, Self, cast

import service_identity.cryptography
from aioquic.asyncio.protocol import QuicConnectionProtocol
from aioquic.quic import events
from aioquic.quic.configuration import QuicConfiguration
from aioquic.quic.connection import NetworkAddress, QuicConnection
from aioquic.quic.logger import QuicLogger, QuicLoggerTrace
from cryptography import x509
from cryptography.hazmat.primitives import serialization
from OpenSSL import crypto as openssl_crypto

from ..classify import classify, classify_quic_close, scrub
from ..config.settings import ProbeSettings
from ..evidence import QuicClose, QuicDatagrams, QuicEvidence, QuicNegotiated, QuicOffer
from ..model import Failure, Operation, ProbeParams, ProbeResult, Target
from ..wire import WireError
from ..wire.quic import (
    QUIC_V1,
    QUIC_V2,
    LongHeader,
    VersionNegotiation,
    is_long_header,
    parse_long_header,
    parse_version_negotiation,
)
from ._net.udp import IcmpWatch, icmp_evidence, open_connected
from .base import Recorder
from .params import ParamError, alpn_param, check_keys, shown, sni_param
from .tcp import require_address
from .tls import certificate_evidence, chain_evidence, server_names

__all__ = ["QuicParams", "budget_s", "probe"]

DEFAULT_ALPN = ("h3",)
VERSIONS: Mapping[str, int] = {"v1": QUIC_V1, "v2": QUIC_V2}
_BAD_CERTIFICATE = 0x100 + 42  # CRYPTO_ERROR + TLS bad_certificate
_MAX_REASON = 120


@dataclass(frozen=True)
class _Params:
    address: str
    port: int
    sni: str | None  # what goes into the ClientHello; None for no SNI
    verify_name: str  # what the certificate must match: the SNI, else the IP literal
    alpn: tuple[str, ...]
    version: int

    @classmethod
    def of(cls, target: Target) -> _Params:
        """Same address, SNI and ALPN rules as the ``tls`` probe, so swap tests line up."""
        parsed = QuicParams.of(target)
        address, port = require_address(target)
        sni, verify_name = server_names(target, parsed)
        return cls(address, port, sni, verify_name, parsed.alpn, parsed.version)


@dataclass(frozen=True)
class QuicParams(ProbeParams):
    """The ``quic`` probe's params: SNI (as for ``tls``), ALPN offered and the one QUIC
    version offered."""

    PROBE: ClassVar[str] = "quic"
    alpn: tuple[str, ...] = DEFAULT_ALPN
    version: int = QUIC_V1
    sni: str | None = None
    sni_given: bool = False

    @classmethod
    def parse(cls, params: Mapping[str, Any], base: Self | None = None) -> Self:
        """``sni``, ``alpn`` and ``version`` (unknown keys are errors)."""
        b = base if base is not None else cls()
        check_keys("quic", params, ("sni", "alpn", "version"))
        sni, given = sni_param("quic", params, b)
        version = b.version
        if "version" in params:
            name = params["version"]
            if not isinstance(name, str) or name not in VERSIONS:
                raise ParamError("quic", "version", f"must be one of v1, v2, got {shown(name)}")
            version = VERSIONS[name]
        return cls(alpn_param("quic", params, b.alpn), version, sni, given)


def budget_s(_p: QuicParams, settings: ProbeSettings) -> float:
    """The longest correct run (`probes.ProbeType.budget`): the handshake's ``quic_s``."""
    return settings.timeouts.quic_s


@dataclass(frozen=True)
class _Close:
    """A CONNECTION_CLOSE frame seen on the wire, and who sent it."""

    by: str  # "peer" or "local"
    error_code: int
    application: bool  # frame 0x1d: the code is the application's, not QUIC's
    trigger_frame_type: int | None
    reason: str

    def evidence(self) -> QuicClose:
        return QuicClose(
            quic_close_by=self.by,
            quic_error_code=f"0x{self.error_code:x}",
            quic_error_space="application" if self.application else "transport",
            quic_frame_type=self.trigger_frame_type,
            quic_reason=scrub(self.reason)[:_MAX_REASON],
        )


class _CloseTrace(QuicLoggerTrace):
    """aioquic's qlog hook, used only to see CONNECTION_CLOSE frames when they happen.

    aioquic reports a close (``ConnectionTerminated``) only after the closing or
    draining period (three PTOs, easily longer than a short probe timeout), and
    then without saying which side closed.  Its qlog events carry each packet's
    frames at once, ours and the peer's, so the probe reads those instead.
    Nothing is stored beyond the packets since the probe last looked.
    """

    def __init__(self, *, is_client: bool, odcid: bytes) -> None:
        super().__init__(is_client=is_client, odcid=odcid)
        # (event, frames); a received packet's frame list is filled after this call.
        self.packets: collections.deque[tuple[str, list[dict[str, Any]]]] = collections.deque(
            maxlen=256
        )
        # Packet types the server sent (initial, handshake, 1RTT, ...), first seen first:
        # handshake progress, the evidence that tells a slow path from a v1 filter.
        self.received_types: list[str] = []

    def log_event(self, *, category: str, event: str, data: dict[str, Any]) -> None:
        frames = data.get("frames")
        header = data.get("header")
        if event == "packet_received" and isinstance(header, dict):
            kind = str(header.get("packet_type", ""))[:20]
            if kind and kind not in self.received_types and len(self.received_types) < 8:
                self.received_types.append(kind)
        # Keep the list object itself: aioquic fills a received packet's list later.
        if event in ("packet_received", "packet_sent") and isinstance(frames, list):
            self.packets.append((event, frames))

    def take_close(self) -> _Close | None:
        found = None
        while self.packets:
            event, frames = self.packets.popleft()
            for frame in frames:
                if frame.get("frame_type") == "connection_close" and found is None:
                    found = _Close(
                        by="peer" if event == "packet_received" else "local",
                        error_code=int(frame.get("error_code", 0)),
                        application=frame.get("error_space") == "application",
                        trigger_frame_type=frame.get("trigger_frame_type"),
                        reason=str(frame.get("reason", "")),
                    )
        return found


class _CloseLogger(QuicLogger):
    """Hands aioquic one `_CloseTrace` and keeps nothing when the connection ends."""

    def __init__(self) -> None:
        super().__init__()
        self.trace: _CloseTrace | None = None

    def start_trace(self, is_client: bool, odcid: bytes) -> QuicLoggerTrace:
        self.trace = _CloseTrace(is_client=is_client, odcid=odcid)
        return self.trace

    def end_trace(self, trace: QuicLoggerTrace) -> None:
        pass


class _SendTap:
    """Stands in for the datagram transport so the probe sees what aioquic sends.

    The first datagram gives our connection IDs (to check a VN's echo) and the
    Initial's size (TSPU keys on it); sends after the probe gave up are dropped.
    """

    def __init__(self, inner: asyncio.DatagramTransport, watch: IcmpWatch) -> None:
        self.inner = inner
        self.watch = watch
        self.sent = 0
        self.first: bytes | None = None

    def sendto(self, data: bytes, addr: Any = None) -> None:
        if self.inner.is_closing():
            return
        if self.first is None:
            self.first = data
        self.sent += 1
        self.watch.sent(data)  # an ICMP error must quote one of these to count
        self.inner.sendto(data)  # connected socket: no address


class _HandshakeProtocol(QuicConnectionProtocol):
    """aioquic's adapter plus what a measurement needs: VN, ICMP errors, the close code."""

    def __init__(self, quic: QuicConnection, qlog: _CloseLogger, watch: IcmpWatch) -> None:
        super().__init__(quic)
        self.watch = watch
        self.done: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self.qlog = qlog
        self.close_frame: _Close | None = None
        self.tap: _SendTap | None = None
        self.received = 0
        self.completed: events.HandshakeCompleted | None = None
        self.terminated: events.ConnectionTerminated | None = None
        self.socket_error: Exception | None = None
        self.vn: VersionNegotiation | None = None
        self.vn_ignored: VersionNegotiation | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.tap = _SendTap(cast(asyncio.DatagramTransport, transport), self.watch)
        super().connection_made(cast(asyncio.BaseTransport, self.tap))

    def datagram_received(self, data: bytes | str, addr: NetworkAddress) -> None:
        self.received += 1
        self._inspect_vn(cast(bytes, data))
        super().datagram_received(data, addr)  # processes it and sends what it causes
        trace = self.qlog.trace
        close = trace.take_close() if trace is not None else None
        if close is not None and self.close_frame is None and self.completed is None:
            self.close_frame = close
            self._finish()

    def error_received(self, exc: Exception) -> None:
        # Only a connected UDP socket gets these (ICMP port/host unreachable); the watch
        # keeps those that answer our datagrams (a stray one does not end the handshake).
        for err in self.watch.take(exc):
            if self.socket_error is None:
                self.socket_error = err
            self._finish()

    def quic_event_received(self, event: events.QuicEvent) -> None:
        super().quic_event_received(event)
        if isinstance(event, events.HandshakeCompleted):
            self.completed = event
            self._finish()
        elif isinstance(event, events.ConnectionTerminated):
            self.terminated = event
            self._finish()

    def sent_header(self) -> LongHeader | None:
        if self.tap is None or self.tap.first is None:
            return None
        try:
            return parse_long_header(self.tap.first)
        except WireError:
            return None

    def _inspect_vn(self, data: bytes) -> None:
        """Recognise a Version Negotiation answering *our* Initial, before aioquic does."""
        if not is_long_header(data) or data[1:5] != b"\x00\x00\x00\x00":
            return
        sent = self.sent_header()
        try:
            vn = parse_version_negotiation(data)
        except WireError:
            return  # malformed: aioquic drops it too; silence decides
        if sent is None or not vn.echoes(sent.dcid, sent.scid):
            return  # not an answer to our packet (RFC 9000 §6.2: ignore)
        if sent.version in vn.versions:
            # RFC 9000 §6.2: a VN listing the version we used is discarded (downgrade
            # protection); aioquic keeps retransmitting, so this ends in a timeout.
            self.vn_ignored = vn
        elif self.vn is None:
            self.vn = vn

    def _finish(self) -> None:
        if not self.done.done():
            self.done.set_result(None)


def _trust(settings: ProbeSettings) -> tuple[str | None, str | None]:
    """(cafile, capath) for aioquic: the system store plus ``tls.ca_file``, as the tls probe.

    OpenSSL takes one file and one hashed directory; with a CA file configured the
    system roots come from the directory alone (Debian's /etc/ssl/certs has them all).
    """
    paths = ssl.get_default_verify_paths()
    return settings.tls.ca_file or paths.cafile, paths.capath


def _configuration(params: _Params, settings: ProbeSettings) -> QuicConfiguration:
    config = QuicConfiguration(
        is_client=True,
        alpn_protocols=list(params.alpn),
        # aioquic uses one name for SNI and verification; given an IP literal it
        # checks the IP SANs and sends no SNI (RFC 6066).  Never None: that would
        # skip the name check entirely.
        server_name=params.verify_name,
        supported_versions=[params.version],
        # Our deadline, not aioquic's idle timer, must end a silent handshake.
        idle_timeout=2 * settings.timeouts.quic_s + 1,
        verify_mode=ssl.CERT_REQUIRED,
        quic_logger=_CloseLogger(),
    )
    cafile, capath = _trust(settings)
    if cafile or capath:
        config.load_verify_locations(cafile=cafile, capath=capath)
    return config


def _peer_certificate(
    quic: QuicConnection,
) -> tuple[x509.Certificate | None, list[x509.Certificate]]:
    # aioquic has no public accessor; its TLS context keeps what the server sent.
    # Evidence only, so a future aioquic without these attributes degrades to None.
    tls = getattr(quic, "tls", None)
    return getattr(tls, "_peer_certificate", None), list(
        getattr(tls, "_peer_certificate_chain", [])
    )


def _diagnose_bad_certificate(
    cert: x509.Certificate,
    chain: list[x509.Certificate],
    server_name: str,
    trust: tuple[str | None, str | None],
) -> Exception | None:
    """Re-run aioquic's hostname and chain checks to learn which one failed.

    Same libraries and order as `aioquic.tls.verify_certificate` (dates were
    already ruled out: they have their own alert), but their typed exceptions
    reach `classify` instead of one ambiguous alert.
    """
    try:
        ipaddress.ip_address(server_name)
    except ValueError:
        is_ip = False
    else:
        is_ip = True
    try:
        if is_ip:
            service_identity.cryptography.verify_certificate_ip_address(cert, server_name)
        else:
            service_identity.cryptography.verify_certificate_hostname(cert, server_name)
    except (service_identity.VerificationError, service_identity.CertificateError) as exc:
        return exc
    cafile, capath = trust
    if not (cafile or capath):
        return None
    try:
        store = openssl_crypto.X509Store()
        store.load_locations(cafile, capath)
        context = openssl_crypto.X509StoreContext(
            store,
            openssl_crypto.X509.from_cryptography(cert),
            [openssl_crypto.X509.from_cryptography(c) for c in chain],
        )
        context.verify_certificate()
    except openssl_crypto.X509StoreContextError as exc:
        return exc
    except openssl_crypto.Error:
        return None  # an unreadable trust store: keep aioquic's own (coarser) verdict
    return None


def _vn_details(vn: VersionNegotiation) -> tuple[str, ...]:
    return tuple(f"0x{v:08x}" for v in vn.versions)


async def probe(target: Target, settings: ProbeSettings) -> ProbeResult:
    rec = Recorder(target, QuicEvidence())
    params = _Params.of(target)
    offer = QuicOffer(
        sni=params.sni, alpn_offered=tuple(params.alpn), quic_version=f"0x{params.version:08x}"
    )
    rec.evidence = QuicEvidence(offer=offer)
    config = _configuration(params, settings)
    connection = QuicConnection(configuration=config)
    qlog = cast(_CloseLogger, config.quic_logger)
    try:
        # connected, so the kernel reports ICMP errors to us and drops other sources
        transport, proto = await open_connected(
            params.address, params.port, lambda watch: _HandshakeProtocol(connection, qlog, watch)
        )
    except OSError as exc:
        return rec.fail_exc(exc, Operation.CONNECT)
    try:
        with rec.phase("quic_handshake"):
            proto.connect(transport.get_extra_info("peername"))
            try:
                async with asyncio.timeout(settings.timeouts.quic_s):
                    await proto.done
            except TimeoutError:
                pass
        return _outcome(rec, proto, connection, params, settings)
    finally:
        # Send CONNECTION_CLOSE (also what a client giving up does), then stop the
        # socket; aioquic's remaining timers run out against the closed tap.
        proto.close()
        transport.close()


def _outcome(
    rec: Recorder[QuicEvidence],
    proto: _HandshakeProtocol,
    connection: QuicConnection,
    params: _Params,
    settings: ProbeSettings,
) -> ProbeResult:
    tap = proto.tap
    datagrams = QuicDatagrams(
        datagrams_sent=tap.sent if tap else 0,
        datagrams_received=proto.received,
        server_packet_types=tuple(proto.qlog.trace.received_types) if proto.qlog.trace else (),
        initial_datagram_bytes=len(tap.first) if tap and tap.first else None,
    )
    icmp_errors, icmp_stray = icmp_evidence([proto.watch])
    rec.evidence = replace(
        rec.evidence, datagrams=datagrams, icmp_errors=icmp_errors, icmp_stray=icmp_stray
    )
    cert, chain = _peer_certificate(connection)
    if cert is not None:
        # Kept on failure too: a MITM certificate is the finding.  aioquic holds it
        # after a failed verification, so unlike the tls probe no second handshake.
        der = cert.public_bytes(serialization.Encoding.DER)
        rec.evidence = replace(
            rec.evidence, certificate=certificate_evidence(der), certificate_source="handshake"
        )
    if cert is not None and proto.completed is None:
        # As in the tls probe: on a failed handshake the chain is the evidence (a MITM's
        # forged issuer), archived as OONI's quic_handshakes[].peer_certificates.
        rec.evidence = replace(
            rec.evidence,
            peer_certificates=chain_evidence(
                [c.public_bytes(serialization.Encoding.DER) for c in [cert, *chain]]
            ),
        )
    op = Operation.QUIC_HANDSHAKE

    if proto.completed is not None:
        negotiated = QuicNegotiated(alpn=proto.completed.alpn_protocol)
        return rec.ok(replace(rec.evidence, negotiated=negotiated))
    if proto.vn is not None:
        offered = _vn_details(proto.vn)
        return rec.fail(
            Failure.QUIC_INCOMPATIBLE_VERSION, op, replace(rec.evidence, offered_versions=offered)
        )
    if proto.vn_ignored is not None:
        rec.flag("quic_vn_lists_our_version")
        rec.evidence = replace(rec.evidence, offered_versions=_vn_details(proto.vn_ignored))
    if proto.socket_error is not None:
        return rec.fail_exc(proto.socket_error, op)
    close = proto.close_frame or _terminated_close(proto.terminated)
    if close is None:
        return rec.fail(Failure.GENERIC_TIMEOUT, op)
    rec.evidence = replace(rec.evidence, close=close.evidence())
    failure = classify_quic_close(
        close.error_code, application=close.application, by_peer=close.by == "peer"
    )
    # Only our own bad_certificate verdict is about the server's certificate.
    ours = close.by == "local" and not close.application
    if close.error_code == _BAD_CERTIFICATE and ours and cert is not None:
        cause = _diagnose_bad_certificate(cert, chain, params.verify_name, _trust(settings))
        if cause is not None:
            failure = classify(cause, op)
    return rec.fail(failure, op)


def _terminated_close(event: events.ConnectionTerminated | None) -> _Close | None:
    """A termination without a CONNECTION_CLOSE on the wire (aioquic's own decision)."""
    if event is None:
        return None
    return _Close(
        by="local",
        error_code=event.error_code,
        application=event.frame_type is None,
        trigger_frame_type=event.frame_type,
        reason=event.reason_phrase,
    )
