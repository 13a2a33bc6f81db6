"""TLS handshake probe: TCP connect, then a full, verifying TLS handshake with a chosen SNI.

Phases: ``connect`` (shared with the TCP probe) and ``tls``.  A success proves that a
ServerHello and a certificate chain valid for the name came back, i.e. the SNI was not
filtered on this path.  Failures, all with ``failed_operation: tls_handshake``:

- ``connection_reset``: RST during the handshake (FIELD.md B3, RST variant);
- ``generic_timeout_error``: the peer went silent; ``details.handshake.stage`` says
  whether that was right after our ClientHello (``awaiting_server_hello``, B3 silent
  drop) or later (``mid_handshake``, e.g. throttling);
- ``eof_error``: the peer closed the connection (FIN) during the handshake;
- ``ssl_failed_handshake``: an alert, a protocol mismatch, or bytes that are not TLS;
- ``ssl_invalid_hostname`` / ``ssl_unknown_authority`` / ``ssl_invalid_certificate``:
  the certificate failed verification (system store plus ``settings.tls.ca_file``).

Why sans-IO (`probe.probes._net.tls`: ``ssl.MemoryBIO`` + ``SSLObject``, moved over a raw
socket by `_net.tls_pump`) and not ``open_connection(ssl=...)`` or ``start_tls``:
asyncio's SSL transport hides when our ClientHello left and whether the server sent
anything at all.  Driving the handshake ourselves we write the ClientHello, count every
byte each way, and can tell "reset or silence right after the ClientHello" from "stalled
after the ServerHello", which is exactly the difference between an SNI filter and a slow
or broken server.

Certificate evidence is kept even when verification fails: a MITM certificate is the
finding.  ``getpeercert`` returns nothing after a failed verification, but OpenSSL still
holds the chain the peer sent (``SSLObject.get_unverified_chain``, public since 3.13 and
present on the underlying ``_ssl`` object since 3.10), so the leaf evidence and the whole
chain (``details.peer_certificates``, base64 DER, leaf first: the archive's OONI
``tls_handshakes[].peer_certificates``) come from the verifying handshake itself.  Only if
that chain is unavailable does the probe make a *second* connection with verification
disabled, used only to read the certificate; ``details.certificate_source`` says which
connection the evidence came from (``handshake`` or ``unverified_second_handshake``).
The verdict always comes from the first, verifying handshake.

Path-aware timeout: ``tls_s`` is a floor, not a cliff.  On a visibly slow path (the TCP
connect took long) the handshake gets up to ``HANDSHAKE_RTTS`` connect times, and a
handshake still receiving server bytes when its time runs out gets another ``tls_s``,
both bounded by ``STRETCH_MAX`` times ``tls_s``.  A handshake with no server byte at all
(the B3 blackhole) still ends at ``tls_s``.  ``details.handshake`` records the bytes each
way, the server's messages seen (``server_hello``, ``certificate``, ``encrypted``, ``alert``
...; `probe.wire.tlsrec`) and the time allowed (``timeout_s``).

Params: ``sni`` (override the server name; ``null`` = send none), ``alpn`` (list,
default ``["h2", "http/1.1"]``), ``shape`` (``default`` or ``alt``: another ClientHello,
with other TLS 1.2 cipher suites, no session-ticket extension and the ALPN list reversed)
and ``split_hello`` (send the ClientHello in two TCP segments, cut inside the SNI).  The
last two are the B4 swap tests (`probe.swaps`): does a filter key on the ClientHello's
shape rather than its SNI, and does it reassemble segments?
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import hashlib
import ipaddress
import os
import socket
import ssl
from collections.abc import Callable, Coroutine, Iterable, Mapping, Sequence
from dataclasses import dataclass, replace
from typing import Any, ClassVar, Self, TypeVar

from cryptography import x509

from ..classify import HandshakeTooLarge, classify, scrub
from ..config.settings import ProbeSettings
from ..evidence import CertificateEvidence, HandshakeProgress, TlsEvidence, TlsNegotiated, TlsOffer
from ..model import Failure, Operation, ProbeParams, ProbeResult, Target
from ..wire.tlsrec import server_messages
from ._net.tcp import connect
from ._net.tls import MAX_CHAIN, TlsClient
from ._net.tls_pump import TlsPump
from .base import Recorder
from .params import ParamError, SniParams, alpn_param, bool_param, check_keys, shown, sni_param
from .tcp import connect_recorded, require_address

T = TypeVar("T")
DEFAULT_ALPN = ("h2", "http/1.1")
_READ_CHUNK = 16 * 1024
# A real server's handshake flight (certificate chain included) is a few KB; past this the
# peer is feeding us something else and we stop reading rather than buffer it.
_MAX_HANDSHAKE_BYTES = 256 * 1024
_MAX_SANS = 100  # evidence, not an archive of a hostile certificate
_SPLIT_PAUSE_S = 0.05  # between the two halves of a split ClientHello
# The ``alt`` ClientHello shape: TLS 1.2 suites in another order and set (the cipher-suite
# vector is the fingerprint detail DPI keys on most), no session-ticket extension.
_ALT_CIPHERS = "ECDHE-ECDSA-CHACHA20-POLY1305:ECDHE-RSA-CHACHA20-POLY1305:ECDHE+AESGCM"
SHAPES = ("default", "alt")
_KEEP_BYTES = 16 * 1024  # the start of the server's flight, to name its messages
STRETCH_MAX = 3.0  # a handshake timeout may grow to this many times the configured one
HANDSHAKE_RTTS = 10.0  # a slow path's handshake gets this many connect times


def handshake_timeout(tls_s: float, connect_s: float | None) -> tuple[float, float]:
    """(first budget, hard cap) for a handshake after a connect that took ``connect_s``."""
    cap = STRETCH_MAX * tls_s
    first = tls_s if connect_s is None else max(tls_s, min(cap, HANDSHAKE_RTTS * connect_s))
    return first, cap


async def while_progressing(
    work: Coroutine[Any, Any, T], first_s: float, cap_s: float, received: Callable[[], int]
) -> T:
    """Await ``work`` for ``first_s``; each time that runs out while ``received()`` grew
    since the last check, grant ``first_s`` more, never beyond ``cap_s`` in all.
    Raises TimeoutError (and cancels ``work``) otherwise."""
    loop = asyncio.get_running_loop()
    task = asyncio.ensure_future(work)
    start = loop.time()
    deadline = start + first_s
    seen = received()
    try:
        while True:  # bounded: each pass moves the deadline forward or ends
            left = max(0.0, deadline - loop.time())
            done, _ = await asyncio.wait({task}, timeout=left)
            if done:
                return task.result()
            now = received()
            if now == seen or loop.time() >= start + cap_s:
                raise TimeoutError
            seen = now
            deadline = min(start + cap_s, loop.time() + first_s)
    finally:
        if not task.done():
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await task


@dataclass
class Progress:
    """Bytes each way during the handshake: where it broke is the evidence."""

    sent: int = 0
    received: int = 0
    eof: bool = False
    head: bytes = b""  # the first bytes the server sent (bounded)
    timeout_s: float | None = None  # the time the handshake was allowed

    @property
    def stage(self) -> str:
        if self.sent == 0:
            return "before_client_hello"
        if self.received == 0:
            return "awaiting_server_hello"
        return "mid_handshake"

    def as_evidence(self) -> HandshakeProgress:
        return HandshakeProgress(
            stage=self.stage,
            bytes_sent=self.sent,
            bytes_received=self.received,
            server_messages=tuple(server_messages(self.head)),
            eof=self.eof,
            timeout_s=round(self.timeout_s, 3) if self.timeout_s is not None else None,
        )


class Handshake:
    """A client TLS handshake over a connected non-blocking socket: the sans-IO
    `TlsClient` moved by a `TlsPump`, plus what this probe watches (the server's first
    bytes, the size bound, the split ClientHello)."""

    def __init__(
        self,
        sock: socket.socket,
        ctx: ssl.SSLContext,
        server_hostname: str | None,
        *,
        split_hello: bool = False,
    ) -> None:
        self.client = TlsClient(ctx, server_hostname)
        self.progress = Progress()
        self.split_at: int | None = None  # where the ClientHello was cut (split_hello)
        self._name = (server_hostname or "").encode()
        self._sock = sock
        self._pump = TlsPump(
            sock,
            self.client,
            read_size=_READ_CHUNK,
            on_receive=self._received,
            send_first=self._send_split if split_hello else None,
        )

    async def run(self) -> None:
        """Complete the handshake or raise (SSLError, OSError, EOFError, HandshakeTooLarge)."""
        try:
            await self._pump.handshake()
        finally:  # also on the caller's timeout: the counts are the evidence
            self.progress.sent, self.progress.eof = self._pump.sent, self._pump.eof

    async def _send_split(self, hello: bytes) -> None:
        """The ClientHello in two TCP segments, cut in the middle of the server name (or
        of the record): a censor matching per packet sees neither half of the name."""
        loop = asyncio.get_running_loop()
        at = hello.find(self._name) if self._name else -1
        cut = at + len(self._name) // 2 if at > 0 else len(hello) // 2
        self._sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        await loop.sock_sendall(self._sock, hello[:cut])
        await asyncio.sleep(_SPLIT_PAUSE_S)  # the first half leaves alone
        await loop.sock_sendall(self._sock, hello[cut:])
        self.split_at = cut

    def _received(self, data: bytes) -> None:
        self.progress.received += len(data)
        if len(self.progress.head) < _KEEP_BYTES:
            self.progress.head += data[: _KEEP_BYTES - len(self.progress.head)]
        if self.progress.received > _MAX_HANDSHAKE_BYTES:
            raise HandshakeTooLarge(f"more than {_MAX_HANDSHAKE_BYTES} bytes, no handshake")

    def negotiated(self) -> TlsNegotiated:
        agreed = self.client.negotiated()
        return TlsNegotiated(tls_version=agreed.tls_version, alpn=agreed.alpn, cipher=agreed.cipher)

    def peer_chain(self) -> list[bytes]:
        """The DER chain the peer sent (leaf first), also after a failed verification."""
        return self.client.peer_chain()

    def close_notify(self) -> None:
        """Send close_notify without waiting for the peer's: a clean, bounded goodbye."""
        self._pump.close_notify()


def chain_evidence(chain: Sequence[bytes]) -> tuple[bytes, ...]:
    """``peer_certificates``: DER, leaf first, bounded (base64 in JSON: OONI's form)."""
    return tuple(chain[:MAX_CHAIN])


def _ca_mtime(ca_file: str | None) -> int | None:
    if ca_file is None:
        return None
    try:
        return os.stat(ca_file).st_mtime_ns
    except OSError:
        return None


@functools.lru_cache(maxsize=16)
def _context(
    ca_file: str | None, _mtime: int | None, alpn: tuple[str, ...], verify: bool, shape: str
) -> ssl.SSLContext:
    # Cached: loading the system store takes ~0.1 s; the CA file's mtime is part of the key
    # so a regenerated lab CA is picked up.
    if verify:
        ctx = ssl.create_default_context()
        if ca_file is not None:
            ctx.load_verify_locations(cafile=ca_file)
    else:  # evidence only: no trust store needed, nothing is verified
        ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
        ctx.check_hostname = False
        ctx.verify_mode = ssl.CERT_NONE
    if shape == "alt":
        ctx.set_ciphers(_ALT_CIPHERS)
        ctx.options |= ssl.OP_NO_TICKET
        alpn = tuple(reversed(alpn))
    if alpn:
        ctx.set_alpn_protocols(list(alpn))
    return ctx


def client_context(
    ca_file: str | None, alpn: Sequence[str], *, verify: bool = True, shape: str = "default"
) -> ssl.SSLContext:
    """Client context: system trust store plus ``ca_file``; ``verify=False`` only for evidence.
    ``shape="alt"``: another ClientHello (the B4 swap test)."""
    return _context(ca_file, _ca_mtime(ca_file), tuple(alpn), verify, shape)


def warm_contexts(ca_file: str | None, alpns: Iterable[Sequence[str]]) -> None:
    """Build the client contexts a config will use, ahead of its first probe.

    Loading the trust store takes ~20-100 ms of CPU: built lazily on the event loop it
    delayed every probe started alongside the first TLS one, and those probes timed the
    delay as network latency.  The scheduler calls this in a thread before any round.
    """
    for alpn in {tuple(a) for a in alpns}:
        for shape in SHAPES:  # a swap test may try the other ClientHello shape
            client_context(ca_file, alpn, shape=shape)
    client_context(ca_file, DEFAULT_ALPN, verify=False)  # the evidence-only second handshake


def server_names(target: Target, params: SniParams) -> tuple[str | None, str]:
    """(SNI to send, name to verify the certificate against).

    ``params.sni`` overrides the endpoint's name (swap tests: same IP, neutral SNI).
    Without any name we verify against the IP literal itself: CPython then sends no SNI
    and checks the certificate's IP SANs.
    """
    # an explicit null means: send no SNI
    sni = (params.sni if params.sni_given else target.server_name) or None
    address, _ = require_address(target)
    if sni is not None and _is_ip(sni):
        return None, sni  # an IP is never sent as SNI (RFC 6066 3)
    # a scope id ("%eth0") is not part of the address a certificate can name
    return sni, sni or address.split("%", 1)[0]


def _is_ip(name: str) -> bool:
    try:
        ipaddress.ip_address(name)
    except ValueError:
        return False
    return True


@dataclass(frozen=True)
class TLSParams(ProbeParams):
    """The ``tls`` probe's params.  ``sni`` matters only when given (null = send none)."""

    PROBE: ClassVar[str] = "tls"
    alpn: tuple[str, ...] = DEFAULT_ALPN
    sni: str | None = None
    sni_given: bool = False
    shape: str = "default"
    split_hello: bool = False

    @classmethod
    def parse(cls, params: Mapping[str, Any], base: Self | None = None) -> Self:
        """``sni``, ``alpn``, ``shape``, ``split_hello`` (unknown keys are errors)."""
        b = base if base is not None else cls()
        check_keys("tls", params, ("sni", "alpn", "shape", "split_hello"))
        shape = params.get("shape", b.shape)
        if not isinstance(shape, str) or shape not in SHAPES:
            raise ParamError(
                "tls", "shape", f"must be one of {', '.join(SHAPES)}, got {shown(shape)}"
            )
        sni, given = sni_param("tls", params, b)
        return cls(
            alpn=alpn_param("tls", params, b.alpn),
            sni=sni,
            sni_given=given,
            shape=shape,
            split_hello=bool_param("tls", params, "split_hello", b.split_hello),
        )


def budget_s(_p: TLSParams, settings: ProbeSettings) -> float:
    """The longest correct run (`probes.ProbeType.budget`): the connect and a handshake
    stretched to its cap (a split ClientHello pauses between its halves), then on a
    certificate error the evidence-only second connect and handshake."""
    t = settings.timeouts
    return t.connect_s + STRETCH_MAX * t.tls_s + _SPLIT_PAUSE_S + t.connect_s + t.tls_s


@functools.lru_cache(maxsize=1024)
def certificate_evidence(der: bytes) -> CertificateEvidence:
    """Fingerprint and identity of a leaf certificate; parse errors are evidence too.

    Memoised on the DER bytes (a pure function of them, and the result is frozen): an
    endpoint serves the same certificate round after round, and parsing it in full on
    every success cost more CPU than the handshake's own Python work.
    """
    sha256 = hashlib.sha256(der).hexdigest()
    try:
        cert = x509.load_der_x509_certificate(der)
        return CertificateEvidence(
            sha256=sha256,
            der_bytes=len(der),
            subject=cert.subject.rfc4514_string(),
            issuer=cert.issuer.rfc4514_string(),
            serial=format(cert.serial_number, "x"),
            not_before=cert.not_valid_before_utc.isoformat(),
            not_after=cert.not_valid_after_utc.isoformat(),
            sans=tuple(_sans(cert)),
        )
    except Exception as exc:  # a hostile peer's DER can break the parser in many ways
        error = f"{type(exc).__name__}: {scrub(str(exc))}"[:200]
        return CertificateEvidence(sha256=sha256, der_bytes=len(der), parse_error=error)


def _sans(cert: x509.Certificate) -> list[str]:
    try:
        ext = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName)
    except x509.ExtensionNotFound:
        return []
    names = [f"DNS:{n}" for n in ext.value.get_values_for_type(x509.DNSName)]
    names += [f"IP:{ip}" for ip in ext.value.get_values_for_type(x509.IPAddress)]
    return names[:_MAX_SANS]


async def _handshake(
    address: str, port: int, ctx: ssl.SSLContext, verify_name: str | None, settings: ProbeSettings
) -> Handshake:
    """Connect and handshake once; for the evidence-only second connection."""
    sock = await connect(address, port, settings.timeouts.connect_s)
    with contextlib.closing(sock):
        hs = Handshake(sock, ctx, verify_name)
        async with asyncio.timeout(settings.timeouts.tls_s):
            await hs.run()
        hs.close_notify()
        return hs


async def unverified_certificate(
    target: Target,
    settings: ProbeSettings,
    sni: str | None,
    alpn: Sequence[str],
    evidence: TlsEvidence,
) -> TlsEvidence:
    """``evidence`` plus the leaf certificate and chain from a fresh handshake with
    verification off (evidence only), or the reason there is none."""
    address, port = require_address(target)
    ctx = client_context(settings.tls.ca_file, alpn, verify=False)
    try:
        hs = await _handshake(address, port, ctx, sni, settings)
    except (OSError, EOFError, HandshakeTooLarge) as exc:
        return replace(evidence, certificate_error=str(classify(exc, Operation.TLS_HANDSHAKE)))
    der = hs.client.peer_certificate()
    if der is None:
        return replace(evidence, certificate_error=str(Failure.SSL_FAILED_HANDSHAKE))
    return replace(
        evidence,
        certificate=certificate_evidence(der),
        certificate_source="unverified_second_handshake",
        peer_certificates=chain_evidence(hs.peer_chain() or [der]),
    )


async def probe(target: Target, settings: ProbeSettings) -> ProbeResult:
    """TCP connect to the target, then a verifying TLS handshake with the chosen SNI."""
    rec = Recorder(target, TlsEvidence())
    params = TLSParams.of(target)
    alpn = params.alpn
    address, port = require_address(target)
    sni, verify_name = server_names(target, params)
    shape = params.shape if params.shape != "default" else None
    offer = TlsOffer(sni=sni, alpn_offered=tuple(alpn), client_hello_shape=shape)
    rec.evidence = TlsEvidence(offer=offer)
    try:
        conn = await connect_recorded(rec, address, port, settings.timeouts.connect_s)
    except OSError as exc:
        return rec.fail_exc(exc, Operation.CONNECT)
    sock = conn.sock
    rec.evidence = replace(
        rec.evidence,
        connect_rtt_s=conn.connect_rtt_s,
        socket=conn.socket,
        connect_time_s=rec.phases["connect"],
    )
    # With no SNI we still verify against the IP literal; CPython sends no SNI for it.
    ctx = client_context(settings.tls.ca_file, alpn, shape=params.shape)
    hs = Handshake(sock, ctx, verify_name, split_hello=params.split_hello)
    first_s, cap_s = handshake_timeout(settings.timeouts.tls_s, rec.phases["connect"])
    failure: BaseException | None = None
    t0 = asyncio.get_running_loop().time()
    with contextlib.closing(sock):
        try:
            with rec.phase("tls"):
                await while_progressing(hs.run(), first_s, cap_s, lambda: hs.progress.received)
        except (OSError, EOFError, HandshakeTooLarge) as exc:  # SSLError, TimeoutError too
            failure = exc
        else:
            hs.close_notify()
    if failure is not None and isinstance(failure, TimeoutError):
        hs.progress.timeout_s = asyncio.get_running_loop().time() - t0
    rec.evidence = replace(
        rec.evidence, handshake=hs.progress.as_evidence(), client_hello_split_at=hs.split_at
    )
    if failure is None:
        der = hs.client.peer_certificate()
        rec.evidence = replace(rec.evidence, negotiated=hs.negotiated())
        if der is not None:
            rec.evidence = replace(
                rec.evidence, certificate=certificate_evidence(der), certificate_source="handshake"
            )
        return rec.ok()
    if isinstance(failure, ssl.SSLCertVerificationError):
        rec.evidence = replace(
            rec.evidence,
            verify_code=failure.verify_code,
            verify_message=scrub(str(failure.verify_message)),
        )
        # The chain is the finding (a MITM's forged issuer): keep all of it.  On success
        # the leaf's fingerprint is enough and the results snapshot stays small.
        chain = hs.peer_chain()
        if chain:
            rec.evidence = replace(
                rec.evidence,
                certificate=certificate_evidence(chain[0]),
                certificate_source="handshake",
                peer_certificates=chain_evidence(chain),
            )
        else:
            with rec.phase("certificate_evidence"):
                rec.evidence = await unverified_certificate(
                    target, settings, sni or verify_name, alpn, rec.evidence
                )
    return rec.fail_exc(failure, Operation.TLS_HANDSHAKE)
