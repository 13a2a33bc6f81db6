"""probe.classify: (exception, operation) -> failure, with real exceptions wherever one can be made.

Real syscalls on loopback give refused, reset, ENETUNREACH and EADDRNOTAVAIL; real
OpenSSL handshakes run in memory (two SSLObjects over MemoryBIOs, no sockets) give
every certificate and handshake error.  EHOSTUNREACH, EHOSTDOWN, ENETDOWN and ETIMEDOUT
cannot be produced on loopback without routing changes or minutes of SYN retries, so
those use OSError(errno, strerror), which is exactly what the socket module raises.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import ipaddress
import os
import resource
import socket
import ssl
import struct
from collections.abc import Iterator
from pathlib import Path

import dns.exception
import dns.message
import dns.rcode
import dns.resolver
import pytest
import service_identity
from hypothesis import given
from hypothesis import strategies as st

from probe.classify import (
    AGENT_RESOURCES,
    Classified,
    HandshakeTooLarge,
    IcmpError,
    classify,
    classify_quic_close,
    classify_rcode,
    scrub,
)
from probe.lab.certs import CertificateAuthority, LeafCert
from probe.lab.servers.tls import DEFAULT_GARBAGE, FATAL_HANDSHAKE_FAILURE
from probe.model import Failure, Operation, failure_kind
from probe.wire import WireError

CONNECT, READ, TLS = Operation.CONNECT, Operation.READ, Operation.TLS_HANDSHAKE


def failure(exc: BaseException, op: Operation) -> str:
    """The failure string a result would carry."""
    return str(classify(exc, op))


def caught(fn: object, *args: object) -> BaseException:
    try:
        fn(*args)  # type: ignore[operator]
    except BaseException as exc:  # the exception is the test subject
        return exc
    raise AssertionError("expected an exception")


@pytest.fixture
def listener() -> Iterator[socket.socket]:
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.bind(("127.0.0.1", 0))
    sock.listen(1)
    sock.settimeout(2)
    yield sock
    sock.close()


# --- socket errors from real syscalls -------------------------------------------------


@pytest.mark.parametrize("host", ["127.0.0.1", "::1"])
def test_real_refused(host: str) -> None:
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with socket.socket(family) as probe_sock:
        probe_sock.bind((host, 0))
        port = probe_sock.getsockname()[1]
    with socket.socket(family) as sock:
        sock.settimeout(2)
        exc = caught(sock.connect, (host, port))
    assert isinstance(exc, ConnectionRefusedError)
    assert failure(exc, CONNECT) == "connection_refused"


def test_real_reset(listener: socket.socket) -> None:
    with socket.create_connection(listener.getsockname(), timeout=2) as client:
        accepted, _ = listener.accept()
        accepted.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        accepted.close()  # RST
        exc = caught(client.recv, 1)
    assert isinstance(exc, ConnectionResetError)
    assert failure(exc, READ) == "connection_reset"


def test_real_enetunreach_from_a_v6only_socket_to_a_mapped_address() -> None:
    # The kernel refuses an IPv4-mapped destination on an IPV6_V6ONLY socket with
    # ENETUNREACH before sending anything (and the address is 127.0.0.1 anyway).
    with socket.socket(socket.AF_INET6, socket.SOCK_STREAM) as sock:
        sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
        exc = caught(sock.connect, ("::ffff:127.0.0.1", 9))
    assert isinstance(exc, OSError)
    assert exc.errno == errno.ENETUNREACH
    assert failure(exc, CONNECT) == "network_unreachable"


def test_real_eaddrnotavail_from_binding_a_foreign_address() -> None:
    # bind() sends nothing; 2001:db8::/32 is documentation space, never configured here
    with socket.socket(socket.AF_INET6, socket.SOCK_STREAM) as sock:
        exc = caught(sock.bind, ("2001:db8::1", 0))
    assert isinstance(exc, OSError)
    assert exc.errno == errno.EADDRNOTAVAIL
    assert failure(exc, CONNECT) == "network_unreachable"


@pytest.mark.parametrize(
    ("code", "expected"),
    [
        (errno.EHOSTUNREACH, "host_unreachable"),
        (errno.EHOSTDOWN, "host_unreachable"),
        (errno.ENETUNREACH, "network_unreachable"),
        (errno.ENETDOWN, "network_unreachable"),
        (errno.ETIMEDOUT, "generic_timeout_error"),
        (errno.ECONNABORTED, "connection_aborted"),
        (errno.EPIPE, "connection_reset"),
    ],
)
def test_errno_mapping(code: int, expected: str) -> None:
    for op in Operation:  # errno means the same whatever the step
        assert failure(OSError(code, os.strerror(code)), op) == expected


@pytest.mark.parametrize(
    ("exc", "expected"),
    [
        (ConnectionRefusedError(), "connection_refused"),
        (ConnectionResetError(), "connection_reset"),
        (BrokenPipeError(), "connection_reset"),
        (ConnectionAbortedError(), "connection_aborted"),
        (EOFError(), "eof_error"),
        (WireError("short header"), "bad_response"),
    ],
)
def test_type_mapping_without_errno(exc: BaseException, expected: str) -> None:
    for op in Operation:
        assert failure(exc, op) == expected


async def test_real_asyncio_timeout() -> None:
    never = asyncio.Event()
    with pytest.raises(TimeoutError) as info:
        async with asyncio.timeout(0.01):
            await never.wait()
    assert failure(info.value, READ) == "generic_timeout_error"


async def test_real_incomplete_read_is_eof() -> None:
    reader = asyncio.StreamReader()
    reader.feed_data(b"ab")
    reader.feed_eof()
    with pytest.raises(asyncio.IncompleteReadError) as info:
        await reader.readexactly(4)
    assert failure(info.value, READ) == "eof_error"


# --- TLS errors from real in-memory OpenSSL handshakes ----------------------------------


def client_context(ca: CertificateAuthority) -> ssl.SSLContext:
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)  # verifies: CERT_REQUIRED + check_hostname
    ctx.load_verify_locations(cadata=ca.cert_pem.decode())
    return ctx


def handshake(server_cert: LeafCert, client: ssl.SSLContext, name: str, tmp: Path) -> None:
    """Run a client/server handshake in memory; raises the client's error."""
    server_ctx = server_cert.server_context(tmp, "leaf")
    c_in, c_out, s_in, s_out = (ssl.MemoryBIO() for _ in range(4))
    c = client.wrap_bio(c_in, c_out, server_hostname=name)
    s = server_ctx.wrap_bio(s_in, s_out, server_side=True)
    for _ in range(8):  # a TLS 1.3 handshake needs 2 round trips
        try:
            c.do_handshake()
            return
        except ssl.SSLWantReadError:
            pass
        s_in.write(c_out.read())
        with contextlib.suppress(ssl.SSLWantReadError):
            s.do_handshake()
        c_in.write(s_out.read())
    raise AssertionError("handshake did not finish")


def client_fed(ca: CertificateAuthority, data: bytes | None) -> BaseException:
    """Send a ClientHello into memory, then feed the client ``data`` (None = EOF)."""
    c_in, c_out = ssl.MemoryBIO(), ssl.MemoryBIO()
    c = client_context(ca).wrap_bio(c_in, c_out, server_hostname="a.example")
    with pytest.raises(ssl.SSLWantReadError):
        c.do_handshake()
    assert c_out.read()  # the ClientHello
    if data is None:
        c_in.write_eof()
    else:
        c_in.write(data)
    return caught(c.do_handshake)


def test_real_handshake_succeeds(ca: CertificateAuthority, tmp_path: Path) -> None:
    handshake(ca.issue("a.example"), client_context(ca), "a.example", tmp_path)


@pytest.mark.parametrize(
    ("names", "expired", "server_hostname", "code", "expected"),
    [
        (("b.example",), False, "a.example", 62, "ssl_invalid_hostname"),
        (("127.0.0.2",), False, "127.0.0.1", 64, "ssl_invalid_hostname"),
        (("a.example",), True, "a.example", 10, "ssl_invalid_certificate"),
    ],
)
def test_real_verification_errors(
    ca: CertificateAuthority,
    tmp_path: Path,
    names: tuple[str, ...],
    expired: bool,
    server_hostname: str,
    code: int,
    expected: str,
) -> None:
    cert = ca.issue(*names, expired=expired)
    exc = caught(handshake, cert, client_context(ca), server_hostname, tmp_path)
    assert isinstance(exc, ssl.SSLCertVerificationError)
    assert exc.verify_code == code
    assert failure(exc, TLS) == expected


@pytest.mark.parametrize(("ca_name", "code"), [("other CA", 20), ("probe lab CA", 7)])
def test_real_unknown_authority(
    ca: CertificateAuthority, tmp_path: Path, ca_name: str, code: int
) -> None:
    # code 7: the rogue CA copies the trusted CA's name, so OpenSSL finds the trusted CA
    # by name and the signature check fails; Go (OONI) calls both "unknown authority".
    rogue = CertificateAuthority(ca_name)
    exc = caught(handshake, rogue.issue("a.example"), client_context(ca), "a.example", tmp_path)
    assert isinstance(exc, ssl.SSLCertVerificationError)
    assert exc.verify_code == code
    assert failure(exc, TLS) == "ssl_unknown_authority"


def test_real_garbage_instead_of_server_hello(ca: CertificateAuthority) -> None:
    exc = client_fed(ca, DEFAULT_GARBAGE)
    assert type(exc) is ssl.SSLError
    assert failure(exc, TLS) == "ssl_failed_handshake"


def test_real_alert_instead_of_server_hello(ca: CertificateAuthority) -> None:
    exc = client_fed(ca, FATAL_HANDSHAKE_FAILURE)
    assert type(exc) is ssl.SSLError
    assert failure(exc, TLS) == "ssl_failed_handshake"


def test_real_eof_during_handshake(ca: CertificateAuthority) -> None:
    exc = client_fed(ca, None)
    assert isinstance(exc, ssl.SSLEOFError)
    assert failure(exc, TLS) == "eof_error"


# --- unknown failures ------------------------------------------------------------------


def test_unknown_failure_scrubs_ipv4_and_ipv6() -> None:
    exc = RuntimeError(
        "peer 192.0.2.7:443 then [2001:db8::7]:443 via fe80::1%eth0 and ::ffff:198.51.100.1"
    )
    classified = classify(exc, READ)
    text = str(classified)
    assert text.startswith("unknown_failure RuntimeError: peer ")
    for leaked in ("192.0.2.7", "2001:db8::7", "fe80::1", "198.51.100.1", "::ffff"):
        assert leaked not in text
    assert text.count("[scrubbed]") >= 4
    assert failure_kind(text) is classified.failure is Failure.UNKNOWN
    assert text == f"unknown_failure {classified.message}"


def test_unknown_oserror_errno_is_unknown_failure_with_ip_scrubbed() -> None:
    exc = OSError(errno.EPROTO, f"{os.strerror(errno.EPROTO)} talking to 203.0.113.9")
    assert (
        failure(exc, READ)
        == f"unknown_failure OSError: [Errno {errno.EPROTO}] Protocol error talking to [scrubbed]"
    )


def test_unknown_failure_is_bounded_and_single_line() -> None:
    text = failure(RuntimeError("line one\nline two " + "x" * 500), READ)
    assert "\n" not in text
    assert len(text) <= len("unknown_failure ") + 200


def test_scrub_keeps_text_without_addresses() -> None:
    assert scrub("certificate has expired") == "certificate has expired"


# --- the operation decides ---------------------------------------------------------------


def test_a_handshake_too_large_is_a_failed_handshake_only_during_the_handshake() -> None:
    exc = HandshakeTooLarge("more than 65536 bytes, no handshake")
    assert classify(exc, TLS) == Classified(Failure.SSL_FAILED_HANDSHAKE)
    # outside a handshake nothing raises it: no vocabulary word, the message is kept
    assert (
        failure(exc, READ)
        == "unknown_failure HandshakeTooLarge: more than 65536 bytes, no handshake"
    )


@pytest.mark.parametrize(
    ("exc", "expected"),
    [
        (dns.resolver.NXDOMAIN(), Failure.DNS_NXDOMAIN),
        (dns.resolver.NoAnswer(), Failure.DNS_NO_ANSWER),
        (dns.exception.Timeout(), Failure.GENERIC_TIMEOUT),
        (dns.message.ShortHeader(), Failure.DNS_SERVER_MISBEHAVING),
        (dns.exception.FormError(), Failure.DNS_SERVER_MISBEHAVING),
    ],
)
def test_dnspython_exceptions_when_resolving(exc: BaseException, expected: Failure) -> None:
    assert classify(exc, Operation.RESOLVE) == Classified(expected)
    assert classify(exc, CONNECT).failure is Failure.UNKNOWN  # not a connect error


def test_the_quic_handshake_classifies_certificate_checks_outside_ssl() -> None:
    exc = service_identity.VerificationError([])
    assert classify(exc, Operation.QUIC_HANDSHAKE).failure is Failure.SSL_INVALID_HOSTNAME
    assert classify(exc, TLS).failure is Failure.SSL_INVALID_HOSTNAME
    assert classify(exc, READ).failure is Failure.UNKNOWN


@pytest.mark.parametrize(
    ("code", "expected"),
    [
        (socket.EAI_NONAME, "dns_nxdomain_error"),
        (socket.EAI_AGAIN, "dns_temporary_failure"),
        (socket.EAI_FAIL, "dns_server_misbehaving"),
    ],
)
def test_getaddrinfo_errors(code: int, expected: str) -> None:
    exc = socket.gaierror(code, "lookup of g.whatsapp.net failed")
    for op in Operation:  # getaddrinfo also runs inside connects (aiohttp, the gate)
        assert failure(exc, op) == expected


def test_an_unmapped_getaddrinfo_error_keeps_its_message() -> None:
    exc = socket.gaierror(socket.EAI_SERVICE, "Servname not supported for 10.0.0.1")
    assert failure(exc, Operation.RESOLVE) == (
        f"unknown_failure getaddrinfo: [Errno {socket.EAI_SERVICE}] "
        "Servname not supported for [scrubbed]"
    )


@pytest.mark.parametrize("code", [errno.EMFILE, errno.ENFILE, errno.ENOBUFS, errno.ENOMEM])
def test_the_agent_running_out_of_resources_is_its_own_marker(code: int) -> None:
    for op in Operation:
        assert failure(OSError(code, os.strerror(code)), op) == AGENT_RESOURCES
    assert failure_kind(AGENT_RESOURCES) is Failure.UNKNOWN


def test_real_emfile_from_exhausting_descriptors() -> None:
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    opened: list[socket.socket] = []
    error: OSError | None = None
    resource.setrlimit(resource.RLIMIT_NOFILE, (64, hard))
    try:
        for _ in range(128):  # bounded: the limit is 64
            opened.append(socket.socket())
    except OSError as exc:
        error = exc
    finally:
        for sock in opened:
            sock.close()
        resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))
    assert error is not None and error.errno == errno.EMFILE
    assert failure(error, CONNECT) == AGENT_RESOURCES


# --- the DNS rcode table -----------------------------------------------------------------


@pytest.mark.parametrize(
    ("rcode", "answered", "expected"),
    [
        ("NOERROR", True, None),
        ("NOERROR", False, Failure.DNS_NO_ANSWER),
        ("NXDOMAIN", False, Failure.DNS_NXDOMAIN),
        ("NXDOMAIN", True, Failure.DNS_NXDOMAIN),  # addresses beside NXDOMAIN: still NXDOMAIN
        ("SERVFAIL", False, Failure.DNS_SERVFAIL),
        ("REFUSED", False, Failure.DNS_REFUSED),
        ("FORMERR", False, Failure.DNS_SERVER_MISBEHAVING),
        ("NOTIMP", False, Failure.DNS_SERVER_MISBEHAVING),
        ("3841", False, Failure.DNS_SERVER_MISBEHAVING),  # a number dnspython cannot name
        (None, False, Failure.DNS_SERVER_MISBEHAVING),
    ],
)
def test_classify_rcode(rcode: str | None, answered: bool, expected: Failure | None) -> None:
    assert classify_rcode(rcode, answered=answered) is expected


@given(st.integers(0, 4095), st.booleans())
def test_every_rcode_dnspython_names_is_classified(value: int, answered: bool) -> None:
    text = dns.rcode.to_text(dns.rcode.Rcode.make(value))
    kind = classify_rcode(text, answered=answered)
    assert kind is None or isinstance(kind, Failure)
    assert (kind is None) == (value == 0 and answered)


# --- properties ----------------------------------------------------------------------------

_ipv4 = st.ip_addresses(v=4).map(str)
_ipv6 = st.ip_addresses(v=6).map(lambda a: a.compressed)


@given(
    st.integers(-200, 200),
    st.lists(st.one_of(st.text(max_size=20), _ipv4, _ipv6), max_size=6),
    st.sampled_from(list(Operation)),
)
def test_any_oserror_lands_in_the_closed_vocabulary(
    code: int, parts: list[str], op: Operation
) -> None:
    message = " ".join(parts)
    classified = classify(OSError(code, message), op)
    text = str(classified)
    assert failure_kind(text) is classified.failure
    assert "\n" not in text and len(text) <= len("unknown_failure ") + 200
    # only unknown_failure carries a message, and no address survives in it
    assert bool(classified.message) <= (classified.failure is Failure.UNKNOWN)
    words = classified.message.split()
    assert not [p for p in parts if _is_address(p) and p in words]


def _is_address(text: str) -> bool:
    try:
        ipaddress.ip_address(text)
    except ValueError:
        return False
    return True


@given(st.lists(st.one_of(_ipv4, _ipv6), min_size=1, max_size=4), st.text(max_size=30))
def test_scrub_removes_every_address(addresses: list[str], filler: str) -> None:
    text = scrub(f"{filler} " + " then ".join(f"peer {a}:443" for a in addresses))
    for address in addresses:
        assert f"peer {address}:" not in text


@given(st.integers(0, 2**62 - 1), st.booleans(), st.booleans())
def test_any_quic_close_code_lands_in_the_closed_vocabulary(
    code: int, application: bool, by_peer: bool
) -> None:
    classified = classify_quic_close(code, application=application, by_peer=by_peer)
    assert failure_kind(str(classified)) is classified.failure
    assert bool(classified.message) <= (classified.failure is Failure.UNKNOWN)
    if application:  # the application's codes are never read as transport ones
        assert classified.failure is Failure.UNKNOWN


# --- ICMP errors from a connected UDP socket's error queue ---------------------------------


@pytest.mark.parametrize(
    ("family", "icmp_type", "code", "err", "expected"),
    [
        ("icmp", 3, 0, errno.ENETUNREACH, "network_unreachable"),
        ("icmp", 3, 1, errno.EHOSTUNREACH, "host_unreachable"),
        ("icmp", 3, 3, errno.ECONNREFUSED, "connection_refused"),
        ("icmp", 3, 13, errno.EHOSTUNREACH, "host_unreachable"),  # admin prohibited
        ("icmp", 11, 0, errno.EHOSTUNREACH, "host_unreachable"),  # time exceeded
        ("icmpv6", 1, 0, errno.ENETUNREACH, "network_unreachable"),  # no route
        ("icmpv6", 1, 1, errno.EACCES, "host_unreachable"),  # admin prohibited: not EACCES
        ("icmpv6", 1, 3, errno.EHOSTUNREACH, "host_unreachable"),  # address unreachable
        ("icmpv6", 1, 4, errno.ECONNREFUSED, "connection_refused"),
        ("icmpv6", 3, 0, errno.EHOSTUNREACH, "host_unreachable"),  # time exceeded
        # a type the table does not name: the kernel's errno decides
        ("icmp", 12, 0, errno.EPROTO, "unknown_failure"),
        ("icmp", 3, 4, errno.EMSGSIZE, "unknown_failure"),  # fragmentation needed
    ],
)
def test_icmp_errors_are_classified_by_type_and_code(
    family: str, icmp_type: int, code: int, err: int, expected: str
) -> None:
    exc = IcmpError.of(err, family=family, icmp_type=icmp_type, icmp_code=code, reporter="x")
    assert failure(exc, READ).split(" ")[0] == expected
    # still the builtin subclass its errno names, for code that catches those
    assert isinstance(exc, ConnectionRefusedError) == (err == errno.ECONNREFUSED)
    assert isinstance(exc, PermissionError) == (err == errno.EACCES)
