"""The ``quic`` and ``quic_vn`` probes against real aioquic / VN-only servers on loopback."""

from __future__ import annotations

import asyncio
import base64
import contextlib
import hashlib
import socket
import ssl
from collections.abc import Iterator
from typing import Any

import pytest
import service_identity
from aioquic.asyncio.client import connect
from aioquic.asyncio.protocol import QuicConnectionProtocol
from aioquic.h3.connection import H3_ALPN, H3Connection
from aioquic.h3.events import DataReceived, HeadersReceived
from aioquic.quic import events
from aioquic.quic.configuration import QuicConfiguration
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from OpenSSL import crypto as openssl_crypto

from probe.classify import classify, classify_quic_close
from probe.config.settings import ProbeSettings
from probe.lab.certs import CertificateAuthority
from probe.lab.servers.quic import H3_BODY, QUICServer, VersionNegotiationServer, VNMode
from probe.model import Failure, Operation, ProbeResult
from probe.probes import REGISTRY, quic, quic_vn
from probe.probes.quic import _trust
from probe.wire.quic import QUIC_V1, QUIC_V2, is_reserved_version
from tests.helpers import settings, target, unbound_udp_port

NAME = "quic.example"
HOSTS = ["127.0.0.1", "::1"]
QUIC_S = 1.0  # real handshakes on loopback take milliseconds
SILENT_S = 0.4  # for the cases that must wait the whole timeout


@pytest.fixture(params=HOSTS)
def host(request: pytest.FixtureRequest) -> str:
    return str(request.param)


@pytest.fixture
def st(ca_file: str) -> ProbeSettings:
    return settings(ca_file=ca_file, quic_s=QUIC_S)


def fingerprint(pem: bytes) -> str:
    return x509.load_pem_x509_certificate(pem).fingerprint(hashes.SHA256()).hex()


@contextlib.contextmanager
def silent_peer(host: str) -> Iterator[int]:
    """A bound UDP port that never answers: no ICMP error, no reply (a silent drop)."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with socket.socket(family, socket.SOCK_DGRAM) as sock:
        sock.bind((host, 0))
        yield int(sock.getsockname()[1])


async def run_quic(host: str, port: int, st: ProbeSettings, **params: Any) -> ProbeResult:
    return await quic.probe(target("quic", host, port, host=NAME, params=params), st)


def assert_failed(result: ProbeResult, failure: Failure) -> None:
    assert not result.ok
    assert result.failure == failure
    assert result.failed_operation is Operation.QUIC_HANDSHAKE


def test_both_probes_are_registered() -> None:
    assert REGISTRY["quic"].run is quic.probe
    assert REGISTRY["quic_vn"].run is quic_vn.probe


# --- quic: success -------------------------------------------------------------------------


async def test_v1_handshake_succeeds_with_alpn_and_certificate_evidence(
    host: str, ca: CertificateAuthority, st: ProbeSettings
) -> None:
    leaf = ca.issue(NAME)
    async with QUICServer(host, cert=leaf) as server:
        result = await run_quic(host, server.port, st)
        await asyncio.wait_for(server.handshake_seen.wait(), QUIC_S)
    assert result.ok, result.failure
    assert result.details["alpn"] == "h3"
    assert result.details["quic_version"] == "0x00000001"
    assert {"initial", "handshake"} <= set(result.details["server_packet_types"])
    assert result.details["sni"] == NAME
    assert result.details["certificate_source"] == "handshake"
    certificate = result.details["certificate"]
    assert certificate["sha256"] == fingerprint(leaf.cert_pem)
    assert certificate["subject"] == f"CN={NAME}"
    assert certificate["issuer"] == "CN=probe lab CA"
    assert certificate["sans"] == [f"DNS:{NAME}"]
    # a real v1 client's Initial is padded to >= 1200 bytes: the size TSPU keys on (B8)
    assert result.details["initial_datagram_bytes"] >= 1200
    assert 0 < result.phases["quic_handshake"] < QUIC_S


async def test_sni_param_overrides_the_endpoint_name(
    ca: CertificateAuthority, st: ProbeSettings
) -> None:
    async with QUICServer(cert=ca.issue(NAME)) as server:
        t = target("quic", "127.0.0.1", server.port, host="blocked.example", params={"sni": NAME})
        result = await quic.probe(t, st)
    assert result.ok, result.failure
    assert result.details["sni"] == NAME


async def test_ip_literal_target_is_verified_against_the_ip_san(
    ca: CertificateAuthority, st: ProbeSettings
) -> None:
    async with QUICServer(cert=ca.issue("127.0.0.1")) as server:
        result = await quic.probe(target("quic", "127.0.0.1", server.port), st)
    assert result.ok, result.failure
    assert result.details["sni"] is None


async def test_explicit_null_sni_sends_none_and_verifies_the_ip(
    ca: CertificateAuthority, st: ProbeSettings
) -> None:
    async with QUICServer(cert=ca.issue(NAME)) as server:
        result = await run_quic("127.0.0.1", server.port, st, sni=None)
    assert_failed(result, Failure.SSL_INVALID_HOSTNAME)  # the certificate has no IP SAN
    assert result.details["sni"] is None


async def test_ip_literal_target_still_checks_the_name(
    ca: CertificateAuthority, st: ProbeSettings
) -> None:
    # No SNI must not mean no hostname check: a name-only certificate fails for an IP.
    async with QUICServer(cert=ca.issue(NAME)) as server:
        result = await quic.probe(target("quic", "127.0.0.1", server.port), st)
    assert_failed(result, Failure.SSL_INVALID_HOSTNAME)


async def test_quic_v2_handshake_succeeds(ca: CertificateAuthority, st: ProbeSettings) -> None:
    async with QUICServer(cert=ca.issue(NAME)) as server:
        result = await run_quic("127.0.0.1", server.port, st, version="v2")
    assert result.ok, result.failure
    assert result.details["quic_version"] == f"0x{QUIC_V2:08x}"


async def test_alpn_param_is_offered(ca: CertificateAuthority, st: ProbeSettings) -> None:
    async with QUICServer(cert=ca.issue(NAME), alpn=("h3", "doq")) as server:
        result = await run_quic("127.0.0.1", server.port, st, alpn="doq")
    assert result.ok, result.failure
    assert result.details["alpn"] == "doq"


# --- quic: certificate failures --------------------------------------------------------------


async def test_wrong_hostname_is_invalid_hostname_and_keeps_the_certificate(
    host: str, ca: CertificateAuthority, st: ProbeSettings
) -> None:
    leaf = ca.issue("other.example")
    async with QUICServer(host, cert=leaf) as server:
        result = await run_quic(host, server.port, st)
    assert_failed(result, Failure.SSL_INVALID_HOSTNAME)
    assert result.details["quic_close_by"] == "local"
    assert result.details["quic_error_code"] == "0x12a"  # CRYPTO_ERROR + bad_certificate
    # OONI keeps the certificate of a failed verification: a MITM certificate is the finding
    assert result.details["certificate"]["sha256"] == fingerprint(leaf.cert_pem)
    assert result.details["certificate"]["subject"] == "CN=other.example"


@pytest.mark.parametrize("ca_name", ["probe lab CA", "another CA"])
async def test_unknown_ca_is_unknown_authority(host: str, ca_name: str, st: ProbeSettings) -> None:
    # Same name as the trusted CA (a MITM copying a root's name) or a different one.
    rogue = CertificateAuthority(ca_name)
    leaf = rogue.issue(NAME, chain=True)  # leaf + the rogue CA, as a MITM box sends it
    async with QUICServer(host, cert=leaf) as server:
        result = await run_quic(host, server.port, st)
    assert_failed(result, Failure.SSL_UNKNOWN_AUTHORITY)
    assert result.details["quic_error_code"] == "0x12a"
    # the chain as sent, for the archive's quic_handshakes[].peer_certificates
    chain = [base64.b64decode(c) for c in result.details["peer_certificates"]]
    assert hashlib.sha256(chain[0]).hexdigest() == fingerprint(leaf.cert_pem)
    assert chain[1:] == [rogue.cert.public_bytes(serialization.Encoding.DER)]


async def test_expired_certificate_is_invalid_certificate(
    host: str, ca: CertificateAuthority, st: ProbeSettings
) -> None:
    async with QUICServer(host, cert=ca.issue(NAME, expired=True)) as server:
        result = await run_quic(host, server.port, st)
    assert_failed(result, Failure.SSL_INVALID_CERTIFICATE)
    assert result.details["quic_error_code"] == "0x12d"  # CRYPTO_ERROR + certificate_expired


def test_trust_is_the_system_store_plus_the_ca_file(ca_file: str) -> None:
    paths = ssl.get_default_verify_paths()
    assert _trust(settings()) == (paths.cafile, paths.capath)
    assert _trust(settings(ca_file=ca_file)) == (ca_file, paths.capath)


async def test_without_ca_file_the_lab_ca_is_untrusted(ca: CertificateAuthority) -> None:
    plain = settings(quic_s=QUIC_S)
    async with QUICServer(cert=ca.issue(NAME)) as server:
        result = await run_quic("127.0.0.1", server.port, plain)
    assert_failed(result, Failure.SSL_UNKNOWN_AUTHORITY)  # the lab CA is in no system store


async def test_server_closing_the_handshake_is_classified_at_once(
    ca: CertificateAuthority, st: ProbeSettings
) -> None:
    # The server refuses our ALPN with CRYPTO_ERROR + no_application_protocol (0x178).
    # Read from the CONNECTION_CLOSE itself, not after aioquic's draining period.
    async with QUICServer(cert=ca.issue(NAME)) as server:
        result = await run_quic("127.0.0.1", server.port, st, alpn="nope")
    assert_failed(result, Failure.SSL_FAILED_HANDSHAKE)
    assert result.details["quic_close_by"] == "peer"
    assert result.details["quic_error_code"] == "0x178"
    assert result.duration_s < QUIC_S / 2


@pytest.mark.parametrize(
    "code", [0x12A, 0x130, 0x12D], ids=["bad_certificate", "unknown_ca", "certificate_expired"]
)
async def test_a_certificate_alert_from_the_peer_is_not_a_certificate_finding(
    ca: CertificateAuthority, st: ProbeSettings, code: int
) -> None:
    # The server's alert is about *our* certificate (a client sends none), or is forged by a
    # censor that derived the Initial keys: the server's certificate was never at fault, so
    # no ssl_invalid_certificate / ssl_unknown_authority (which the verdicts read as MITM).
    async with QUICServer(cert=ca.issue(NAME), refuse_with=code) as server:
        result = await run_quic("127.0.0.1", server.port, st)
    assert_failed(result, Failure.SSL_FAILED_HANDSHAKE)
    assert result.details["quic_close_by"] == "peer"
    assert result.details["quic_error_code"] == f"0x{code:x}"


# --- quic: no server, silence, version negotiation -------------------------------------------


async def test_no_server_is_refused(host: str, st: ProbeSettings) -> None:
    # Loopback answers an unbound UDP port with ICMP port unreachable at once, and only a
    # connected socket hears it: refused, not a timeout.
    result = await run_quic(host, unbound_udp_port(host), st)
    assert_failed(result, Failure.CONNECTION_REFUSED)
    assert result.duration_s < QUIC_S / 2
    assert result.details["datagrams_received"] == 0


async def test_silent_peer_times_out_after_retransmitting(ca_file: str) -> None:
    fast = settings(ca_file=ca_file, quic_s=SILENT_S)
    with silent_peer("127.0.0.1") as port:
        result = await run_quic("127.0.0.1", port, fast)
    assert_failed(result, Failure.GENERIC_TIMEOUT)
    assert result.details["datagrams_sent"] >= 2  # aioquic's PTO resent the Initial
    assert result.details["datagrams_received"] == 0
    assert SILENT_S <= result.duration_s < SILENT_S + 0.5


async def test_vn_only_server_listing_v1_makes_quic_time_out_while_quic_vn_succeeds(
    host: str, ca_file: str
) -> None:
    # A VN that lists the version the client used must be discarded (RFC 9000 §6.2,
    # downgrade protection), so the v1 handshake keeps retransmitting into a timeout:
    # from the client's side this is B8's signature, answered VN but no v1 handshake.
    fast = settings(ca_file=ca_file, quic_s=SILENT_S)
    async with VersionNegotiationServer(host) as server:
        handshake = await run_quic(host, server.port, fast)
        vn = await quic_vn.probe(target("quic_vn", host, server.port), fast)
    assert_failed(handshake, Failure.GENERIC_TIMEOUT)
    assert "quic_vn_lists_our_version" in handshake.flags
    assert handshake.details["offered_versions"] == ["0x00000001", f"0x{QUIC_V2:08x}"]
    assert handshake.details["datagrams_received"] >= 1
    # a VN packet, not handshake progress (what the verdict engine reads)
    assert set(handshake.details["server_packet_types"]) <= {"version_negotiation"}
    assert vn.ok, vn.failure
    assert vn.details["offers_quic_v1"] is True


async def test_vn_only_server_without_our_version_is_incompatible(
    host: str, st: ProbeSettings
) -> None:
    async with VersionNegotiationServer(host, versions=(QUIC_V2,)) as server:
        result = await run_quic(host, server.port, st)
    assert_failed(result, Failure.QUIC_INCOMPATIBLE_VERSION)
    assert result.details["offered_versions"] == [f"0x{QUIC_V2:08x}"]
    assert result.duration_s < QUIC_S / 2


async def test_v2_client_against_a_v1_only_server_is_incompatible(
    ca: CertificateAuthority, st: ProbeSettings
) -> None:
    async with QUICServer(cert=ca.issue(NAME), versions=(QUIC_V1,)) as server:
        result = await run_quic("127.0.0.1", server.port, st, version="v2")
    assert_failed(result, Failure.QUIC_INCOMPATIBLE_VERSION)
    assert result.details["offered_versions"] == ["0x00000001"]


async def test_spoofed_vn_not_echoing_our_ids_is_ignored(ca_file: str) -> None:
    # A VN that does not echo our connection IDs is not an answer (a blind injector's):
    # it neither fails the handshake as incompatible nor counts as evidence.
    fast = settings(ca_file=ca_file, quic_s=SILENT_S)
    async with VersionNegotiationServer(versions=(QUIC_V2,), mode=VNMode.WRONG_CIDS) as server:
        result = await run_quic("127.0.0.1", server.port, fast)
    assert_failed(result, Failure.GENERIC_TIMEOUT)
    assert "offered_versions" not in result.details


async def test_garbage_replies_end_in_a_timeout(ca_file: str) -> None:
    fast = settings(ca_file=ca_file, quic_s=SILENT_S)
    async with VersionNegotiationServer(mode=VNMode.GARBAGE) as server:
        result = await run_quic("127.0.0.1", server.port, fast)
    assert_failed(result, Failure.GENERIC_TIMEOUT)
    assert result.details["datagrams_received"] >= 1


def test_unknown_version_param_is_a_config_error() -> None:
    with pytest.raises(ValueError, match="version"):
        quic._Params.of(target("quic", "127.0.0.1", 443, params={"version": "v3"}))


# --- quic_vn ------------------------------------------------------------------------------


async def test_vn_probe_is_answered_by_a_real_quic_server(
    host: str, ca: CertificateAuthority, st: ProbeSettings
) -> None:
    async with QUICServer(host, cert=ca.issue(NAME)) as server:
        result = await quic_vn.probe(target("quic_vn", host, server.port), st)
        assert server.handshakes == 0
    assert result.ok, result.failure
    assert result.details["offered_versions"] == ["0x00000001", f"0x{QUIC_V2:08x}"]
    assert result.details["offers_quic_v1"] is True
    assert result.details["datagram_bytes"] == 1200
    assert result.details["datagrams_sent"] == 1
    assert is_reserved_version(int(result.details["probe_version"], 16))
    assert 0 < result.phases["quic_vn"] < QUIC_S


async def test_vn_probe_version_can_be_pinned(st: ProbeSettings) -> None:
    # The VN-only server ignores datagrams under 1200 bytes, so an answer also proves size.
    async with VersionNegotiationServer(min_datagram=1200) as server:
        t = target("quic_vn", "127.0.0.1", server.port, params={"version": "0xbabababa"})
        result = await quic_vn.probe(t, st)
    assert result.ok, result.failure
    assert result.details["probe_version"] == "0xbabababa"
    assert server.answered == 1


async def test_vn_probe_silence_is_udp_no_response_after_three_sends() -> None:
    fast = settings(quic_s=SILENT_S)
    with silent_peer("127.0.0.1") as port:
        result = await quic_vn.probe(target("quic_vn", "127.0.0.1", port), fast)
    assert_failed(result, Failure.UDP_NO_RESPONSE)
    assert result.details["datagrams_sent"] == 3
    assert SILENT_S <= result.duration_s < SILENT_S + 0.5


async def test_vn_probe_no_server_is_refused(host: str, st: ProbeSettings) -> None:
    result = await quic_vn.probe(target("quic_vn", host, unbound_udp_port(host)), st)
    assert_failed(result, Failure.CONNECTION_REFUSED)
    assert result.duration_s < QUIC_S / 2


@pytest.mark.parametrize(
    ("mode", "reason"),
    [
        (VNMode.WRONG_CIDS, "version negotiation does not echo our connection IDs"),
        (VNMode.GARBAGE, "not a long-header packet"),
    ],
)
async def test_vn_probe_replies_that_are_not_our_vn_are_bad_response(
    mode: VNMode, reason: str
) -> None:
    fast = settings(quic_s=SILENT_S)
    async with VersionNegotiationServer(mode=mode) as server:
        result = await quic_vn.probe(target("quic_vn", "127.0.0.1", server.port), fast)
    assert_failed(result, Failure.BAD_RESPONSE)
    assert result.details["invalid_reply"] == reason


@pytest.mark.parametrize("version", [1, "0x6b3343cf", 0])
def test_vn_probe_refuses_versions_that_would_not_be_negotiated(version: object) -> None:
    with pytest.raises(ValueError, match="negotiated"):
        quic_vn._version(target("quic_vn", "127.0.0.1", 443, params={"version": version}))


# --- the lab server speaks HTTP/3 -----------------------------------------------------------


class _H3Client(QuicConnectionProtocol):
    def __init__(self, *args: Any, **kw: Any) -> None:
        super().__init__(*args, **kw)
        self.h3 = H3Connection(self._quic)
        self.status: bytes | None = None
        self.body = b""
        self.finished = asyncio.get_running_loop().create_future()

    def quic_event_received(self, event: events.QuicEvent) -> None:
        for h3_event in self.h3.handle_event(event):
            if isinstance(h3_event, HeadersReceived):
                self.status = dict(h3_event.headers).get(b":status")
            elif isinstance(h3_event, DataReceived):
                self.body += h3_event.data
                if h3_event.stream_ended and not self.finished.done():
                    self.finished.set_result(None)

    def get(self) -> None:
        stream_id = self._quic.get_next_available_stream_id()
        headers = [(b":method", b"GET"), (b":scheme", b"https"), (b":authority", NAME.encode())]
        self.h3.send_headers(stream_id, [*headers, (b":path", b"/")], end_stream=True)
        self.transmit()


async def test_lab_server_answers_an_http3_request(ca: CertificateAuthority, ca_file: str) -> None:
    config = QuicConfiguration(is_client=True, alpn_protocols=H3_ALPN, server_name=NAME)
    config.load_verify_locations(cafile=ca_file)
    # The second item is evaluated once the server is up; "127.0.0.1" is an IP literal,
    # so aioquic's getaddrinfo() does no name lookup.
    async with (
        QUICServer(cert=ca.issue(NAME)) as server,
        connect(
            "127.0.0.1", server.port, configuration=config, create_protocol=_H3Client
        ) as client,
    ):
        assert isinstance(client, _H3Client)
        client.get()
        await asyncio.wait_for(client.finished, QUIC_S)
    assert client.status == b"200"
    assert client.body == H3_BODY


# --- classification of QUIC close codes and out-of-ssl certificate checks -------------------


@pytest.mark.parametrize(
    ("code", "application", "failure"),
    [
        (0x12A, False, "ssl_invalid_certificate"),  # bad_certificate, before diagnosis
        (0x12D, False, "ssl_invalid_certificate"),  # certificate_expired
        (0x130, False, "ssl_unknown_authority"),  # unknown_ca
        (0x128, False, "ssl_failed_handshake"),  # handshake_failure
        (0x178, False, "ssl_failed_handshake"),  # no_application_protocol
        (0x11, False, "quic_incompatible_version"),
        (0x02, False, "connection_refused"),
        (0x0A, False, "unknown_failure quic_error 0xa"),  # PROTOCOL_VIOLATION
        (0x100, True, "unknown_failure quic_application_error 0x100"),  # H3_NO_ERROR
    ],
)
def test_classify_quic_close(code: int, application: bool, failure: str) -> None:
    assert str(classify_quic_close(code, application=application)) == failure


@pytest.mark.parametrize("code", [0x12A, 0x12D, 0x130, 0x128, 0x178])
def test_a_peer_s_crypto_error_is_a_failed_handshake(code: int) -> None:
    assert classify_quic_close(code, by_peer=True).failure is Failure.SSL_FAILED_HANDSHAKE
    assert classify_quic_close(0x11, by_peer=True).failure is Failure.QUIC_INCOMPATIBLE_VERSION


def test_classify_out_of_ssl_certificate_errors() -> None:
    op = Operation.QUIC_HANDSHAKE

    def kind(exc: BaseException) -> Failure:
        return classify(exc, op).failure

    assert kind(service_identity.VerificationError([])) is Failure.SSL_INVALID_HOSTNAME
    assert kind(service_identity.CertificateError()) is Failure.SSL_INVALID_CERTIFICATE
    x509_error = openssl_crypto.X509StoreContextError
    cert = openssl_crypto.X509()
    assert kind(x509_error("m", [20, 0, "m"], cert)) is Failure.SSL_UNKNOWN_AUTHORITY
    assert kind(x509_error("m", [10, 0, "m"], cert)) is Failure.SSL_INVALID_CERTIFICATE
