"""probe.classify: exception -> failure string, with real exceptions wherever one can be made.

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
import os
import socket
import ssl
import struct
from collections.abc import Iterator
from pathlib import Path

import pytest

from probe.classify import classify_exception, scrub
from probe.lab.certs import CertificateAuthority, LeafCert
from probe.lab.servers.tls import DEFAULT_GARBAGE, FATAL_HANDSHAKE_FAILURE
from probe.model import Failure, failure_kind
from probe.wire import WireError


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
    assert classify_exception(exc) == "connection_refused"


def test_real_reset(listener: socket.socket) -> None:
    with socket.create_connection(listener.getsockname(), timeout=2) as client:
        accepted, _ = listener.accept()
        accepted.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        accepted.close()  # RST
        exc = caught(client.recv, 1)
    assert isinstance(exc, ConnectionResetError)
    assert classify_exception(exc) == "connection_reset"


def test_real_enetunreach_from_a_v6only_socket_to_a_mapped_address() -> None:
    # The kernel refuses an IPv4-mapped destination on an IPV6_V6ONLY socket with
    # ENETUNREACH before sending anything (and the address is 127.0.0.1 anyway).
    with socket.socket(socket.AF_INET6, socket.SOCK_STREAM) as sock:
        sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
        exc = caught(sock.connect, ("::ffff:127.0.0.1", 9))
    assert isinstance(exc, OSError)
    assert exc.errno == errno.ENETUNREACH
    assert classify_exception(exc) == "network_unreachable"


def test_real_eaddrnotavail_from_binding_a_foreign_address() -> None:
    # bind() sends nothing; 2001:db8::/32 is documentation space, never configured here
    with socket.socket(socket.AF_INET6, socket.SOCK_STREAM) as sock:
        exc = caught(sock.bind, ("2001:db8::1", 0))
    assert isinstance(exc, OSError)
    assert exc.errno == errno.EADDRNOTAVAIL
    assert classify_exception(exc) == "network_unreachable"


@pytest.mark.parametrize(
    ("code", "failure"),
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
def test_errno_mapping(code: int, failure: str) -> None:
    assert classify_exception(OSError(code, os.strerror(code))) == failure


@pytest.mark.parametrize(
    ("exc", "failure"),
    [
        (ConnectionRefusedError(), "connection_refused"),
        (ConnectionResetError(), "connection_reset"),
        (BrokenPipeError(), "connection_reset"),
        (ConnectionAbortedError(), "connection_aborted"),
        (EOFError(), "eof_error"),
        (WireError("short header"), "bad_response"),
    ],
)
def test_type_mapping_without_errno(exc: BaseException, failure: str) -> None:
    assert classify_exception(exc) == failure


async def test_real_asyncio_timeout() -> None:
    never = asyncio.Event()
    with pytest.raises(TimeoutError) as info:
        async with asyncio.timeout(0.01):
            await never.wait()
    assert classify_exception(info.value) == "generic_timeout_error"


async def test_real_incomplete_read_is_eof() -> None:
    reader = asyncio.StreamReader()
    reader.feed_data(b"ab")
    reader.feed_eof()
    with pytest.raises(asyncio.IncompleteReadError) as info:
        await reader.readexactly(4)
    assert classify_exception(info.value) == "eof_error"


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
    ("names", "expired", "server_hostname", "code", "failure"),
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
    failure: str,
) -> None:
    cert = ca.issue(*names, expired=expired)
    exc = caught(handshake, cert, client_context(ca), server_hostname, tmp_path)
    assert isinstance(exc, ssl.SSLCertVerificationError)
    assert exc.verify_code == code
    assert classify_exception(exc) == failure


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
    assert classify_exception(exc) == "ssl_unknown_authority"


def test_real_garbage_instead_of_server_hello(ca: CertificateAuthority) -> None:
    exc = client_fed(ca, DEFAULT_GARBAGE)
    assert type(exc) is ssl.SSLError
    assert classify_exception(exc) == "ssl_failed_handshake"


def test_real_alert_instead_of_server_hello(ca: CertificateAuthority) -> None:
    exc = client_fed(ca, FATAL_HANDSHAKE_FAILURE)
    assert type(exc) is ssl.SSLError
    assert classify_exception(exc) == "ssl_failed_handshake"


def test_real_eof_during_handshake(ca: CertificateAuthority) -> None:
    exc = client_fed(ca, None)
    assert isinstance(exc, ssl.SSLEOFError)
    assert classify_exception(exc) == "eof_error"


# --- unknown failures ------------------------------------------------------------------


def test_unknown_failure_scrubs_ipv4_and_ipv6() -> None:
    exc = RuntimeError(
        "peer 192.0.2.7:443 then [2001:db8::7]:443 via fe80::1%eth0 and ::ffff:198.51.100.1"
    )
    failure = classify_exception(exc)
    assert failure.startswith("unknown_failure RuntimeError: peer ")
    for leaked in ("192.0.2.7", "2001:db8::7", "fe80::1", "198.51.100.1", "::ffff"):
        assert leaked not in failure
    assert failure.count("[scrubbed]") >= 4
    assert failure_kind(failure) is Failure.UNKNOWN


def test_unknown_oserror_errno_is_unknown_failure_with_ip_scrubbed() -> None:
    exc = OSError(errno.EPROTO, f"{os.strerror(errno.EPROTO)} talking to 203.0.113.9")
    failure = classify_exception(exc)
    assert (
        failure
        == f"unknown_failure OSError: [Errno {errno.EPROTO}] Protocol error talking to [scrubbed]"
    )


def test_unknown_failure_is_bounded_and_single_line() -> None:
    failure = classify_exception(RuntimeError("line one\nline two " + "x" * 500))
    assert "\n" not in failure
    assert len(failure) <= len("unknown_failure ") + 200


def test_scrub_keeps_text_without_addresses() -> None:
    assert scrub("certificate has expired") == "certificate has expired"
