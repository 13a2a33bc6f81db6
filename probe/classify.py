"""The one place that maps exceptions to failure strings (cf. OONI netxlite/classify.go).

Order matters: errno first, then exception type; anything unrecognised becomes
``unknown_failure <message>`` with IP addresses scrubbed so that a failure
string never leaks a vantage's or a target's address into labels or logs.
"""

from __future__ import annotations

import asyncio
import errno
import re
import socket
import ssl

import aiohttp
import dns.exception
import dns.resolver
import service_identity
from OpenSSL import crypto as openssl_crypto

from .model import Failure
from .wire import WireError

# OpenSSL X509_V_ERR_* codes seen on SSLCertVerificationError.verify_code
_X509_HOSTNAME_MISMATCH = 62
_X509_IP_ADDRESS_MISMATCH = 64  # an IP-literal target whose certificate lacks that IP SAN
_X509_UNKNOWN_AUTHORITY = frozenset(
    {
        2,  # unable to get issuer certificate
        # A leaf whose issuer *name* matches a trusted CA but whose signature does not: a
        # MITM CA copying a trusted root's name.  Go (and so OONI) calls this "signed by
        # unknown authority" too.
        7,  # certificate signature failure
        18,  # self-signed certificate
        19,  # self-signed certificate in chain
        20,  # unable to get local issuer certificate
        21,  # unable to verify the first certificate
    }
)

_ERRNO: dict[int, Failure] = {
    errno.ECONNREFUSED: Failure.CONNECTION_REFUSED,
    errno.ECONNRESET: Failure.CONNECTION_RESET,
    errno.ECONNABORTED: Failure.CONNECTION_ABORTED,
    errno.ETIMEDOUT: Failure.GENERIC_TIMEOUT,
    errno.EHOSTUNREACH: Failure.HOST_UNREACHABLE,
    errno.EHOSTDOWN: Failure.HOST_UNREACHABLE,
    errno.ENETUNREACH: Failure.NETWORK_UNREACHABLE,
    errno.ENETDOWN: Failure.NETWORK_UNREACHABLE,
    errno.EADDRNOTAVAIL: Failure.NETWORK_UNREACHABLE,  # e.g. IPv6 with no v6 address
    errno.EPIPE: Failure.CONNECTION_RESET,
}

# Errors that say the agent is out of resources, not that the network failed.  Classified
# as this marker, which the runner turns into a skip (`SkipReason.AGENT_RESOURCES`) and
# the offline gate into "no finding"; it never stays a target's failure.
_AGENT_SIDE_ERRNOS = frozenset({errno.EMFILE, errno.ENFILE, errno.ENOBUFS, errno.ENOMEM})
AGENT_RESOURCES = f"{Failure.UNKNOWN} agent_resources_exhausted"


def is_agent_side(exc: BaseException) -> bool:
    """Whether ``exc`` is the agent running out of descriptors or buffers."""
    return isinstance(exc, OSError) and exc.errno in _AGENT_SIDE_ERRNOS


_GAI: dict[int, Failure] = {
    socket.EAI_NONAME: Failure.DNS_NXDOMAIN,
    socket.EAI_AGAIN: Failure.DNS_TEMPORARY_FAILURE,
    socket.EAI_FAIL: Failure.DNS_SERVER_MISBEHAVING,
}
if hasattr(socket, "EAI_NODATA"):
    _GAI[socket.EAI_NODATA] = Failure.DNS_NO_ANSWER

_IPV4 = re.compile(r"\b(?:\d{1,3}\.){3}\d{1,3}\b")
_IPV6 = re.compile(r"(?<![\w:])(?:[0-9A-Fa-f]{0,4}:){2,7}[0-9A-Fa-f]{0,4}(?![\w:])")


def scrub(message: str) -> str:
    """Replace IPv4 and IPv6 addresses with a placeholder."""
    return _IPV6.sub("[scrubbed]", _IPV4.sub("[scrubbed]", message))


def unknown(message: str) -> str:
    text = " ".join(scrub(message).split())[:200]
    return f"{Failure.UNKNOWN} {text}" if text else str(Failure.UNKNOWN)


def classify_ssl_error(exc: ssl.SSLError) -> str:
    if isinstance(exc, ssl.SSLCertVerificationError):
        return classify_x509_verify_code(exc.verify_code)
    if isinstance(exc, ssl.SSLEOFError | ssl.SSLZeroReturnError):
        return Failure.EOF
    return Failure.SSL_FAILED_HANDSHAKE


# QUIC transport error codes (RFC 9000 §20.1).  CRYPTO_ERROR 0x0100-0x01ff carries the
# TLS alert that ended the handshake in its low byte.
_QUIC_CONNECTION_REFUSED = 0x02
_QUIC_VERSION_NEGOTIATION_ERROR = 0x11  # RFC 9368
_QUIC_CRYPTO_ERROR = 0x100
_QUIC_CRYPTO_ERROR_END = 0x1FF
# TLS alerts (RFC 8446 §6) that blame the certificate.  aioquic raises bad_certificate (42)
# for a hostname mismatch AND an untrusted chain alike; the QUIC probe re-checks the peer
# certificate (service_identity / pyOpenSSL exceptions below) to tell those two apart.
_TLS_ALERT: dict[int, Failure] = {
    42: Failure.SSL_INVALID_CERTIFICATE,  # bad_certificate
    43: Failure.SSL_INVALID_CERTIFICATE,  # unsupported_certificate
    44: Failure.SSL_INVALID_CERTIFICATE,  # certificate_revoked
    45: Failure.SSL_INVALID_CERTIFICATE,  # certificate_expired (also "not yet valid")
    46: Failure.SSL_INVALID_CERTIFICATE,  # certificate_unknown
    48: Failure.SSL_UNKNOWN_AUTHORITY,  # unknown_ca
}


def classify_quic_close(
    error_code: int, *, application: bool = False, by_peer: bool = False
) -> str:
    """The failure for a QUIC connection closed during the handshake, by its error code.

    ``application``: the code came in an application CONNECTION_CLOSE (frame 0x1d),
    whose codes belong to the application (HTTP/3's overlap CRYPTO_ERROR's range).
    ``by_peer``: the peer sent the close.  A certificate alert then judges *our*
    certificate (a client sends none) or is forged by whoever derived the Initial keys;
    either way the server's certificate is not at fault: ``ssl_failed_handshake``, as
    the same alert received over TLS/TCP is.
    """
    if application:
        return unknown(f"quic_application_error 0x{error_code:x}")
    if _QUIC_CRYPTO_ERROR <= error_code <= _QUIC_CRYPTO_ERROR_END:
        if by_peer:
            return Failure.SSL_FAILED_HANDSHAKE
        alert = error_code - _QUIC_CRYPTO_ERROR
        return _TLS_ALERT.get(alert, Failure.SSL_FAILED_HANDSHAKE)
    if error_code == _QUIC_VERSION_NEGOTIATION_ERROR:
        return Failure.QUIC_INCOMPATIBLE_VERSION
    if error_code == _QUIC_CONNECTION_REFUSED:
        return Failure.CONNECTION_REFUSED
    return unknown(f"quic_error 0x{error_code:x}")


def classify_x509_verify_code(code: int | None) -> str:
    """The failure for an OpenSSL X509_V_ERR_* code (chain verification outside ssl)."""
    if code in (_X509_HOSTNAME_MISMATCH, _X509_IP_ADDRESS_MISMATCH):
        return Failure.SSL_INVALID_HOSTNAME
    if code in _X509_UNKNOWN_AUTHORITY:
        return Failure.SSL_UNKNOWN_AUTHORITY
    return Failure.SSL_INVALID_CERTIFICATE


def classify_dns_error(exc: dns.exception.DNSException) -> str:
    if isinstance(exc, dns.resolver.NXDOMAIN):
        return Failure.DNS_NXDOMAIN
    if isinstance(exc, dns.resolver.NoAnswer):
        return Failure.DNS_NO_ANSWER
    if isinstance(exc, dns.exception.Timeout):
        return Failure.GENERIC_TIMEOUT
    # ShortHeader, FormError, Truncated, UnknownTSIGKey ...: the server spoke, not an answer
    return Failure.DNS_SERVER_MISBEHAVING


def _unwrap_aiohttp(exc: BaseException) -> BaseException:
    """The socket or TLS error an aiohttp connector error wraps (the DoH client's).

    aiohttp's wrappers subclass OSError and even ssl.SSLCertVerificationError without
    carrying their data (no ``verify_code``), so classify the original instead.
    """
    if isinstance(exc, aiohttp.ClientConnectorCertificateError):
        return exc.certificate_error
    if isinstance(exc, aiohttp.ClientConnectorError):
        return exc.os_error
    return exc


def classify_exception(exc: BaseException) -> str:
    """Return the failure string for an exception raised by a network operation."""
    exc = _unwrap_aiohttp(exc)
    if isinstance(exc, asyncio.TimeoutError | TimeoutError | socket.timeout):
        return Failure.GENERIC_TIMEOUT
    if isinstance(exc, asyncio.IncompleteReadError | EOFError):
        return Failure.EOF
    # aiohttp: the server closed before (all of) the response arrived
    if isinstance(exc, aiohttp.ServerDisconnectedError | aiohttp.ClientPayloadError):
        return Failure.EOF
    if isinstance(exc, WireError):
        return Failure.BAD_RESPONSE
    if isinstance(exc, socket.gaierror):
        return _GAI.get(exc.errno or 0) or unknown(f"getaddrinfo: {exc}")
    if isinstance(exc, ssl.SSLError):
        return classify_ssl_error(exc)
    if isinstance(exc, dns.exception.DNSException):
        return classify_dns_error(exc)
    # certificate checks made outside the ssl module (the QUIC probe, like aioquic)
    if isinstance(exc, service_identity.VerificationError):
        return Failure.SSL_INVALID_HOSTNAME
    if isinstance(exc, service_identity.CertificateError):
        return Failure.SSL_INVALID_CERTIFICATE  # no usable identity (no SAN) at all
    if isinstance(exc, openssl_crypto.X509StoreContextError):
        return classify_x509_verify_code(exc.errors[0] if exc.errors else None)
    if isinstance(exc, OSError):
        if exc.errno in _AGENT_SIDE_ERRNOS:
            return AGENT_RESOURCES
        if exc.errno in _ERRNO:
            return _ERRNO[exc.errno]
        if isinstance(exc, ConnectionRefusedError):
            return Failure.CONNECTION_REFUSED
        if isinstance(exc, ConnectionResetError | BrokenPipeError):
            return Failure.CONNECTION_RESET
        if isinstance(exc, ConnectionAbortedError):
            return Failure.CONNECTION_ABORTED
    return unknown(f"{type(exc).__name__}: {exc}")
