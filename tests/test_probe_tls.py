"""TLS handshake probe against real loopback TLS servers (IPv4 and IPv6).

Every certificate failure must keep the peer certificate as evidence, and every hostile
server (reset, silence, garbage, FIN, alert after the ClientHello) must be classified
within the TLS timeout.
"""

from __future__ import annotations

import asyncio
import base64
import hashlib
import re
import ssl
import time
from datetime import UTC, datetime

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import serialization

from probe.lab.certs import CertificateAuthority, LeafCert
from probe.lab.servers.tls import TLSMode, TLSServer
from probe.model import Operation, ProbeResult
from probe.probes import REGISTRY, tls
from probe.probes.params import ParamError
from tests.helpers import refusing_port, settings, target

HOSTS = pytest.mark.parametrize("host", ["127.0.0.1", "::1"])
NAME = "chat.lab.example"


def fingerprint(cert: LeafCert) -> str:
    return hashlib.sha256(ssl.PEM_cert_to_DER_cert(cert.cert_pem.decode())).hexdigest()


async def run(host: str, server: TLSServer, ca_file: str | None, **kw: object) -> ProbeResult:
    params = kw.pop("params", None)
    name = kw.pop("name", NAME)
    return await tls.probe(
        target("tls", host, server.port, host=str(name), params=params),  # type: ignore[arg-type]
        settings(ca_file=ca_file, **kw),  # type: ignore[arg-type]
    )


def assert_evidence(result: ProbeResult, cert: LeafCert, source: str) -> None:
    evidence = result.details["certificate"]
    assert evidence["sha256"] == fingerprint(cert)
    parsed = x509.load_pem_x509_certificate(cert.cert_pem)
    assert evidence["subject"] == parsed.subject.rfc4514_string()
    assert evidence["issuer"] == parsed.issuer.rfc4514_string()
    assert evidence["not_after"] == parsed.not_valid_after_utc.isoformat()
    assert result.details["certificate_source"] == source


def test_registered() -> None:
    assert REGISTRY["tls"].run is tls.probe


# --- certificates -------------------------------------------------------------------


@HOSTS
async def test_valid_certificate_records_version_alpn_cipher_and_cert(
    host: str, ca: CertificateAuthority, ca_file: str
) -> None:
    cert = ca.issue(NAME)
    async with TLSServer(host, cert=cert, alpn=["h2", "http/1.1"]) as server:
        result = await run(host, server, ca_file)
        assert list(server.sni_seen) == [NAME]
    assert result.ok, result.details
    assert result.details["tls_version"] == "TLSv1.3"
    assert result.details["alpn"] == "h2"
    assert result.details["cipher"]
    assert result.details["sni"] == NAME
    assert result.details["handshake"]["bytes_received"] > 0
    assert set(result.phases) == {"connect", "connect_rtt", "tls"}  # rtt: the kernel's
    assert_evidence(result, cert, "handshake")
    assert result.details["certificate"]["sans"] == [f"DNS:{NAME}"]


@HOSTS
async def test_wrong_hostname_keeps_the_certificate(
    host: str, ca: CertificateAuthority, ca_file: str
) -> None:
    cert = ca.issue("someone-else.example")
    async with TLSServer(host, cert=cert) as server:
        result = await run(host, server, ca_file)
        # the evidence comes from the verifying handshake: no second connection
        assert list(server.sni_seen) == [NAME]
    assert result.failure == "ssl_invalid_hostname"
    assert result.failed_operation is Operation.TLS_HANDSHAKE
    assert_evidence(result, cert, "handshake")
    assert result.details["certificate"]["sans"] == ["DNS:someone-else.example"]
    assert set(result.phases) == {"connect", "connect_rtt", "tls"}


@HOSTS
@pytest.mark.parametrize("ca_name", ["probe lab CA", "Totally Trusted National CA"])
async def test_unknown_authority_keeps_the_certificate(
    host: str, ca_name: str, ca_file: str
) -> None:
    # "probe lab CA" is also the trusted CA's name: a MITM CA copying a trusted root's
    # name fails on the signature, which is still an unknown authority (as in OONI/Go).
    rogue = CertificateAuthority(ca_name)
    cert = rogue.issue(NAME)
    async with TLSServer(host, cert=cert) as server:
        result = await run(host, server, ca_file)
    assert result.failure == "ssl_unknown_authority"
    assert result.failed_operation is Operation.TLS_HANDSHAKE
    assert_evidence(result, cert, "handshake")
    assert result.details["certificate"]["issuer"] == f"CN={ca_name}"


async def test_certificate_failure_keeps_the_whole_chain_from_the_same_handshake(
    ca_file: str,
) -> None:
    rogue = CertificateAuthority("Interceptor CA")
    cert = rogue.issue(NAME, chain=True)  # leaf + the rogue CA, as a MITM box sends it
    async with TLSServer("127.0.0.1", cert=cert) as server:
        result = await run("127.0.0.1", server, ca_file)
        assert server.client_hellos == 1  # no second, unverified connection was needed
    assert result.failure == "ssl_unknown_authority"
    chain = [base64.b64decode(c) for c in result.details["peer_certificates"]]
    assert chain == [
        # the leaf: the first PEM block (load_pem reads only that one)
        x509.load_pem_x509_certificate(cert.cert_pem).public_bytes(serialization.Encoding.DER),
        rogue.cert.public_bytes(serialization.Encoding.DER),
    ]
    assert hashlib.sha256(chain[0]).hexdigest() == result.details["certificate"]["sha256"]


async def test_valid_handshake_keeps_the_leaf_fingerprint_not_the_chain(
    ca: CertificateAuthority, ca_file: str
) -> None:
    async with TLSServer("127.0.0.1", cert=ca.issue(NAME, chain=True)) as server:
        result = await run("127.0.0.1", server, ca_file)
    assert result.ok
    assert "peer_certificates" not in result.details  # small results snapshot on success
    assert result.details["certificate"]["issuer"] == "CN=probe lab CA"


async def test_without_the_chain_api_a_second_handshake_reads_the_certificate(
    ca_file: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    # What an interpreter without get_unverified_chain does (the API is private before 3.13).
    monkeypatch.setattr(tls.Handshake, "peer_chain", lambda self: [])
    cert = CertificateAuthority("Interceptor CA").issue(NAME)
    async with TLSServer("127.0.0.1", cert=cert) as server:
        result = await run("127.0.0.1", server, ca_file)
        assert list(server.sni_seen) == [NAME, NAME]
    assert result.failure == "ssl_unknown_authority"
    assert_evidence(result, cert, "unverified_second_handshake")
    [der] = [base64.b64decode(c) for c in result.details["peer_certificates"]]
    assert der == ssl.PEM_cert_to_DER_cert(cert.cert_pem.decode())
    assert set(result.phases) == {"connect", "connect_rtt", "tls", "certificate_evidence"}


@HOSTS
async def test_split_client_hello_is_cut_inside_the_name_and_still_completes(
    host: str, ca: CertificateAuthority, ca_file: str
) -> None:
    async with TLSServer(host, cert=ca.issue(NAME)) as server:
        result = await run(host, server, ca_file, params={"split_hello": True})
        assert server.client_hellos == 1 and list(server.sni_seen) == [NAME]
    assert result.ok, result.failure
    # the same context builds a ClientHello of the same layout: the cut is mid-name
    incoming, outgoing = ssl.MemoryBIO(), ssl.MemoryBIO()
    probe_like = tls.client_context(ca_file, tls.DEFAULT_ALPN)
    obj = probe_like.wrap_bio(incoming, outgoing, server_hostname=NAME)
    with pytest.raises(ssl.SSLWantReadError):
        obj.do_handshake()
    at = outgoing.read().find(NAME.encode())
    assert result.details["client_hello_split_at"] == at + len(NAME) // 2


async def test_alt_shape_changes_the_cipher_suite_vector_and_still_completes(
    ca: CertificateAuthority, ca_file: str
) -> None:
    default = tls.client_context(ca_file, tls.DEFAULT_ALPN)
    alt = tls.client_context(ca_file, tls.DEFAULT_ALPN, shape="alt")
    assert [c["name"] for c in default.get_ciphers()] != [c["name"] for c in alt.get_ciphers()]
    async with TLSServer("127.0.0.1", cert=ca.issue(NAME), alpn=["h2", "http/1.1"]) as server:
        result = await run("127.0.0.1", server, ca_file, params={"shape": "alt"})
    assert result.ok and result.details["client_hello_shape"] == "alt"


@pytest.mark.parametrize(
    ("params", "message"),
    [
        ({"shape": "chrome"}, "must be one of default, alt, got 'chrome'"),
        ({"split_hello": "yes"}, "must be true or false, got 'yes'"),
    ],
)
def test_bad_client_hello_params_are_named(params: dict, message: str) -> None:
    with pytest.raises(ParamError, match=re.escape(message)):
        tls.TLSParams.parse(params)


@HOSTS
async def test_expired_certificate_keeps_the_certificate(
    host: str, ca: CertificateAuthority, ca_file: str
) -> None:
    cert = ca.issue(NAME, expired=True)
    async with TLSServer(host, cert=cert) as server:
        result = await run(host, server, ca_file)
    assert result.failure == "ssl_invalid_certificate"
    assert result.details["verify_message"] == "certificate has expired"
    assert_evidence(result, cert, "handshake")
    not_after = datetime.fromisoformat(result.details["certificate"]["not_after"])
    assert not_after < datetime.now(UTC)


@HOSTS
async def test_system_store_alone_does_not_trust_the_lab_ca(
    host: str, ca: CertificateAuthority
) -> None:
    cert = ca.issue(NAME)
    async with TLSServer(host, cert=cert) as server:
        result = await run(host, server, ca_file=None)
    assert result.failure == "ssl_unknown_authority"
    assert_evidence(result, cert, "handshake")


@HOSTS
async def test_ip_literal_sends_no_sni_and_verifies_the_ip(
    host: str, ca: CertificateAuthority, ca_file: str
) -> None:
    cert = ca.issue(host)
    async with TLSServer(host, cert=cert) as server:
        result = await run(host, server, ca_file, name=host)
        assert list(server.sni_seen) == [None]
    assert result.ok, result.details
    assert result.details["sni"] is None
    assert result.details["certificate"]["sans"] == [f"IP:{host}"]


@HOSTS
async def test_ip_literal_with_a_certificate_for_another_ip_scrubs_the_message(
    host: str, ca: CertificateAuthority, ca_file: str
) -> None:
    cert = ca.issue("192.0.2.10")  # a SAN only: no traffic goes there
    async with TLSServer(host, cert=cert) as server:
        result = await run(host, server, ca_file, name=host)
    assert result.failure == "ssl_invalid_hostname"
    assert host not in result.details["verify_message"]
    assert "[scrubbed]" in result.details["verify_message"]


@HOSTS
async def test_sni_param_overrides_the_endpoint_name(
    host: str, ca: CertificateAuthority, ca_file: str
) -> None:
    # swap test: same address, a neutral SNI instead of the (blocked) service name
    cert = ca.issue("neutral.example")
    async with TLSServer(host, cert=cert) as server:
        result = await run(host, server, ca_file, params={"sni": "neutral.example"})
        assert list(server.sni_seen) == ["neutral.example"]
    assert result.ok, result.details
    assert result.details["sni"] == "neutral.example"


@HOSTS
async def test_alpn_param_and_server_without_alpn(
    host: str, ca: CertificateAuthority, ca_file: str
) -> None:
    cert = ca.issue(NAME)
    async with TLSServer(host, cert=cert, alpn=["http/1.1"]) as with_alpn:
        chosen = await run(host, with_alpn, ca_file, params={"alpn": ["http/1.1"]})
    async with TLSServer(host, cert=cert) as without_alpn:
        none = await run(host, without_alpn, ca_file)
    assert chosen.ok
    assert chosen.details["alpn"] == "http/1.1"
    assert chosen.details["alpn_offered"] == ["http/1.1"]
    assert none.ok
    assert none.details["alpn"] is None


@HOSTS
async def test_probe_closes_the_connection_cleanly(
    host: str, ca: CertificateAuthority, ca_file: str
) -> None:
    async with TLSServer(host, cert=ca.issue(NAME)) as server:
        result = await run(host, server, ca_file)
        await server.wait_for(lambda s: s.accepted == 1 and s.open_connections == 0, 2)
        assert server.client_closed == 1  # close_notify and FIN, no RST
    assert result.ok


# --- hostile peers -------------------------------------------------------------------


async def hostile(host: str, mode: TLSMode, tls_s: float = 3.0) -> tuple[ProbeResult, float]:
    async with TLSServer(host, mode=mode) as server:
        start = time.monotonic()
        result = await run(host, server, ca_file=None, tls_s=tls_s)
        took = time.monotonic() - start
        assert server.client_hellos == 1
    assert not result.ok
    assert result.failed_operation is Operation.TLS_HANDSHAKE
    assert "certificate" not in result.details  # nothing to keep: no certificate came
    return result, took


@HOSTS
async def test_reset_after_client_hello(host: str) -> None:
    result, took = await hostile(host, TLSMode.RESET_AFTER_HELLO)
    assert result.failure == "connection_reset"
    assert result.details["handshake"]["stage"] == "awaiting_server_hello"
    assert result.details["handshake"]["bytes_sent"] > 0
    assert took < 1.5  # on the peer's action, not at the 3 s timeout


@HOSTS
async def test_silence_after_client_hello_times_out(host: str) -> None:
    result, took = await hostile(host, TLSMode.HANG_AFTER_HELLO, tls_s=0.3)
    assert result.failure == "generic_timeout_error"
    hs = result.details["handshake"]
    assert hs == {
        "stage": "awaiting_server_hello",
        "bytes_sent": hs["bytes_sent"],
        "bytes_received": 0,
        "server_messages": [],  # no server byte: the B3 signature, not a slow path
        "timeout_s": hs["timeout_s"],
    }
    # no progress: the configured timeout is not stretched (a blackhole costs no more)
    assert 0.3 <= hs["timeout_s"] < 1.0
    assert 0.3 <= result.phases["tls"] < 1.0
    assert took < 1.5


@HOSTS
async def test_garbage_instead_of_server_hello(host: str) -> None:
    result, took = await hostile(host, TLSMode.GARBAGE_AFTER_HELLO)
    assert result.failure == "ssl_failed_handshake"
    assert result.details["handshake"]["bytes_received"] > 0
    assert result.details["handshake"]["server_messages"] == ["not_tls"]
    assert took < 1.5  # on the peer's action, not at the 3 s timeout


@HOSTS
async def test_fin_after_client_hello_is_eof(host: str) -> None:
    result, took = await hostile(host, TLSMode.CLOSE_AFTER_HELLO)
    assert result.failure == "eof_error"
    assert result.details["handshake"]["stage"] == "awaiting_server_hello"
    assert took < 1.5  # on the peer's action, not at the 3 s timeout


@HOSTS
async def test_alert_after_client_hello(host: str) -> None:
    result, took = await hostile(host, TLSMode.ALERT_AFTER_HELLO)
    assert result.failure == "ssl_failed_handshake"
    assert result.details["handshake"]["server_messages"] == ["alert"]
    assert took < 1.5  # on the peer's action, not at the 3 s timeout


async def test_giant_server_hello_is_refused_without_reading_it(ca_file: str) -> None:
    # A record announcing a 16 MB ServerHello, then a flood: the handshake must fail on the
    # announced size, long before the flood is read (and well within the timeout).
    flood = bytes([0x16, 0x03, 0x03, 0x40, 0x00, 0x02, 0xFF, 0xFF, 0xFF]) + b"\x00" * 400_000
    async with TLSServer("127.0.0.1", mode=TLSMode.GARBAGE_AFTER_HELLO, garbage=flood) as server:
        result = await run("127.0.0.1", server, ca_file, tls_s=5.0)
    assert result.failure == "ssl_failed_handshake"
    assert result.details["handshake"]["bytes_received"] < 100_000
    assert result.duration_s < 2.5


@HOSTS
async def test_refused_is_a_connect_failure(host: str) -> None:
    with refusing_port(host) as port:
        result = await tls.probe(target("tls", host, port, host=NAME), settings())
    assert result.failure == "connection_refused"
    assert result.failed_operation is Operation.CONNECT
    assert "tls" not in result.phases


def test_serve_mode_needs_a_certificate() -> None:
    with pytest.raises(ValueError, match="certificate"):
        TLSServer("127.0.0.1")


# --- pure helpers ---------------------------------------------------------------------


@pytest.mark.parametrize(
    ("host", "address", "params", "expected"),
    [
        (NAME, "127.0.0.1", {}, (NAME, NAME)),
        (NAME, "127.0.0.1", {"sni": "neutral.example"}, ("neutral.example", "neutral.example")),
        (NAME, "127.0.0.1", {"sni": None}, (None, "127.0.0.1")),  # explicit: send no SNI
        (NAME, "::1", {"sni": "::1"}, (None, "::1")),  # an IP is never sent as SNI
        ("fe80::1%lo", "fe80::1%lo", {}, (None, "fe80::1")),  # scope id is not in a cert
    ],
)
def test_server_names(
    host: str, address: str, params: dict[str, object], expected: tuple[str | None, str]
) -> None:
    t = target("tls", address, 443, host=host, params=params)
    assert tls.server_names(t, tls.TLSParams.of(t)) == expected


def test_unparseable_certificate_keeps_its_fingerprint() -> None:
    evidence = tls.certificate_evidence(b"\x30\x03not a certificate")
    assert evidence["sha256"] == hashlib.sha256(b"\x30\x03not a certificate").hexdigest()
    assert evidence["parse_error"]
    assert "subject" not in evidence


# --- path-aware handshake timeout ------------------------------------------------------------


async def test_a_handshake_still_receiving_gets_more_time_a_silent_one_does_not() -> None:
    received = [0]

    async def dribble(pieces: int) -> str:
        for _ in range(pieces):  # bounded
            await asyncio.sleep(0.05)
            received[0] += 1
        return "done"

    # 1.5 s of steady progress outlasts its 0.5 s floor: the floor is not a cliff
    assert await tls.while_progressing(dribble(30), 0.5, 5.0, lambda: received[0]) == "done"
    with pytest.raises(TimeoutError):  # no byte at all: ends at the floor
        await tls.while_progressing(asyncio.sleep(30), 0.2, 5.0, lambda: 0)
    received[0] = 0
    with pytest.raises(TimeoutError):  # progress forever: bounded by the cap
        await tls.while_progressing(dribble(10_000), 0.2, 0.6, lambda: received[0])


def test_a_slow_connect_stretches_the_handshake_timeout_within_bounds() -> None:
    assert tls.handshake_timeout(3.0, 0.001) == (3.0, 3.0 * tls.STRETCH_MAX)
    first, cap = tls.handshake_timeout(3.0, 0.6)
    assert first == 0.6 * tls.HANDSHAKE_RTTS and cap == 9.0
    assert tls.handshake_timeout(3.0, 5.0) == (9.0, 9.0)  # never beyond the bound
