"""The one place that names failures (cf. OONI netxlite/classify.go).

`classify(exc, operation)` takes the step that failed, as OONI's classifiers do: the
operation's own classifier runs first and falls back to the generic one::

    classify(exc, op)
      RESOLVE          dnspython's exceptions                       -> _generic
      TLS_HANDSHAKE    HandshakeTooLarge, non-ssl certificate checks -> _generic
      QUIC_HANDSHAKE   certificate checks made outside ssl          -> _generic
      CONNECT, READ, WRITE                                             _generic
    _generic: errno first, then exception type (timeouts, EOF, aiohttp's wrappers,
              WireError, getaddrinfo, ssl); anything else is unknown_failure

Observations that are not exceptions are classified here too: a DNS reply's rcode
(`classify_rcode`), a QUIC CONNECTION_CLOSE's error code (`classify_quic_close`) and an
ICMP error's type and code (`classify_icmp`: an `IcmpError` from a connected UDP
socket's error queue is classified by what the router said, not by the errno the
kernel chose for it).

Every classifier returns a `Classified`: the bounded `Failure` member plus, for
``unknown_failure`` only, a message with IP addresses scrubbed so that a failure string
never leaks a vantage's or a target's address into labels or logs.  ``str()`` of it is
the failure string a result carries (``unknown_failure <message>``).
"""

from __future__ import annotations

import asyncio
import errno
import os
import re
import socket
import ssl
from collections.abc import Callable, Mapping
from dataclasses import dataclass

import aiohttp
import dns.exception
import dns.resolver
import service_identity
from OpenSSL import crypto as openssl_crypto

from .model import Failure, Operation
from .wire import WireError

__all__ = [
    "AGENT_RESOURCES",
    "Classified",
    "HandshakeTooLarge",
    "IcmpError",
    "classify",
    "classify_icmp",
    "classify_quic_close",
    "classify_rcode",
    "classify_x509_verify_code",
    "is_agent_side",
    "scrub",
]


@dataclass(frozen=True, slots=True)
class Classified:
    """A classified failure: its vocabulary member, and for ``unknown_failure`` the
    scrubbed, single-line message that follows it in the result's failure string."""

    failure: Failure
    message: str = ""

    def __str__(self) -> str:
        return f"{self.failure} {self.message}" if self.message else str(self.failure)


class HandshakeTooLarge(Exception):
    """The TLS peer sent more than any real handshake needs without finishing it."""


class IcmpError(OSError):
    """An ICMP error about a datagram our connected UDP socket sent (`probe.probes._net.udp`
    reads it from the socket's error queue, ``IP_RECVERR``).

    ``errno`` is the kernel's translation; ``family`` (``icmp`` or ``icmpv6``),
    ``icmp_type`` and ``icmp_code`` are what the reporting node said, and ``reporter`` is
    that node's address (a router on the path, the censor's or the target's own; None when
    the kernel did not know it).
    """

    def __init__(
        self,
        err: int,
        *,
        family: str,
        icmp_type: int,
        icmp_code: int,
        reporter: str | None = None,
    ) -> None:
        super().__init__(err, os.strerror(err))
        self.family = family
        self.icmp_type = icmp_type
        self.icmp_code = icmp_code
        self.reporter = reporter

    @staticmethod
    def of(
        err: int,
        *,
        family: str,
        icmp_type: int,
        icmp_code: int,
        reporter: str | None = None,
    ) -> IcmpError:
        """An IcmpError that is also the builtin OSError subclass ``err`` names (port
        unreachable is a ConnectionRefusedError, as it was before IP_RECVERR)."""
        kind = _ICMP_ERROR_KINDS.get(err, IcmpError)
        return kind(err, family=family, icmp_type=icmp_type, icmp_code=icmp_code, reporter=reporter)


class _IcmpRefused(IcmpError, ConnectionRefusedError):
    pass


class _IcmpPermission(IcmpError, PermissionError):
    pass


_ICMP_ERROR_KINDS: dict[int, type[IcmpError]] = {
    errno.ECONNREFUSED: _IcmpRefused,
    errno.EACCES: _IcmpPermission,
}


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
_AGENT_RESOURCES = Classified(Failure.UNKNOWN, "agent_resources_exhausted")
AGENT_RESOURCES = str(_AGENT_RESOURCES)


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
# up to 8 colons: a full address (7) with an unbracketed ":port" after it
_IPV6 = re.compile(r"(?<![\w:])(?:[0-9A-Fa-f]{0,4}:){2,8}[0-9A-Fa-f]{0,4}(?![\w:])")


def scrub(message: str) -> str:
    """Replace IPv4 and IPv6 addresses with a placeholder."""
    return _IPV6.sub("[scrubbed]", _IPV4.sub("[scrubbed]", message))


def _unknown(message: str) -> Classified:
    """``unknown_failure`` with ``message`` scrubbed, on one line, at most 200 characters."""
    return Classified(Failure.UNKNOWN, " ".join(scrub(message).split())[:200])


def _ssl_error(exc: ssl.SSLError) -> Failure:
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
) -> Classified:
    """The failure for a QUIC connection closed during the handshake, by its error code.

    ``application``: the code came in an application CONNECTION_CLOSE (frame 0x1d),
    whose codes belong to the application (HTTP/3's overlap CRYPTO_ERROR's range).
    ``by_peer``: the peer sent the close.  A certificate alert then judges *our*
    certificate (a client sends none) or is forged by whoever derived the Initial keys;
    either way the server's certificate is not at fault: ``ssl_failed_handshake``, as
    the same alert received over TLS/TCP is.
    """
    if application:
        return _unknown(f"quic_application_error 0x{error_code:x}")
    if _QUIC_CRYPTO_ERROR <= error_code <= _QUIC_CRYPTO_ERROR_END:
        if by_peer:
            return Classified(Failure.SSL_FAILED_HANDSHAKE)
        alert = error_code - _QUIC_CRYPTO_ERROR
        return Classified(_TLS_ALERT.get(alert, Failure.SSL_FAILED_HANDSHAKE))
    if error_code == _QUIC_VERSION_NEGOTIATION_ERROR:
        return Classified(Failure.QUIC_INCOMPATIBLE_VERSION)
    if error_code == _QUIC_CONNECTION_REFUSED:
        return Classified(Failure.CONNECTION_REFUSED)
    return _unknown(f"quic_error 0x{error_code:x}")


def classify_x509_verify_code(code: int | None) -> Failure:
    """The failure for an OpenSSL X509_V_ERR_* code (chain verification outside ssl)."""
    if code in (_X509_HOSTNAME_MISMATCH, _X509_IP_ADDRESS_MISMATCH):
        return Failure.SSL_INVALID_HOSTNAME
    if code in _X509_UNKNOWN_AUTHORITY:
        return Failure.SSL_UNKNOWN_AUTHORITY
    return Failure.SSL_INVALID_CERTIFICATE


# --- ICMP -----------------------------------------------------------------------------------

# ICMP destination unreachable (RFC 792, RFC 1812 §5.2.7.1) and ICMPv6 destination
# unreachable (RFC 4443 §3.1) by code, and time exceeded.  Linux names most of these
# EHOSTUNREACH, but ICMPv6 "administratively prohibited" EACCES, which would make the
# same censor rule read as host_unreachable over IPv4 and as an unknown failure over
# IPv6: the ICMP code decides here, in OONI's words (no new vocabulary).
_ICMP_UNREACH: Mapping[int, Failure] = {
    0: Failure.NETWORK_UNREACHABLE,  # net unreachable
    1: Failure.HOST_UNREACHABLE,  # host unreachable
    2: Failure.CONNECTION_REFUSED,  # protocol unreachable (the host itself said no)
    3: Failure.CONNECTION_REFUSED,  # port unreachable
    5: Failure.HOST_UNREACHABLE,  # source route failed
    6: Failure.NETWORK_UNREACHABLE,  # destination network unknown
    7: Failure.HOST_UNREACHABLE,  # destination host unknown
    8: Failure.HOST_UNREACHABLE,  # source host isolated
    9: Failure.NETWORK_UNREACHABLE,  # network administratively prohibited
    10: Failure.HOST_UNREACHABLE,  # host administratively prohibited
    11: Failure.NETWORK_UNREACHABLE,  # network unreachable for TOS
    12: Failure.HOST_UNREACHABLE,  # host unreachable for TOS
    13: Failure.HOST_UNREACHABLE,  # communication administratively prohibited
    14: Failure.HOST_UNREACHABLE,  # host precedence violation
    15: Failure.HOST_UNREACHABLE,  # precedence cutoff in effect
}
_ICMP6_UNREACH: Mapping[int, Failure] = {
    0: Failure.NETWORK_UNREACHABLE,  # no route to destination
    1: Failure.HOST_UNREACHABLE,  # administratively prohibited (as ICMP code 13)
    2: Failure.HOST_UNREACHABLE,  # beyond scope of source address
    3: Failure.HOST_UNREACHABLE,  # address unreachable
    4: Failure.CONNECTION_REFUSED,  # port unreachable
    5: Failure.HOST_UNREACHABLE,  # source address failed ingress/egress policy
    6: Failure.NETWORK_UNREACHABLE,  # reject route to destination
}
_ICMP_DEST_UNREACH = 3
_ICMP_TIME_EXCEEDED = 11
_ICMP6_DEST_UNREACH = 1
_ICMP6_TIME_EXCEEDED = 3


def classify_icmp(family: str, icmp_type: int, icmp_code: int) -> Failure | None:
    """The failure an ICMP (``family`` ``icmp``) or ICMPv6 (``icmpv6``) error stands for;
    None for a type this table does not name (the errno decides then).

    Time exceeded is host_unreachable, as Linux has it (a routing loop, or a censor
    answering with it): the datagram died on the way."""
    if family == "icmp":
        if icmp_type == _ICMP_DEST_UNREACH:
            return _ICMP_UNREACH.get(icmp_code)
        return Failure.HOST_UNREACHABLE if icmp_type == _ICMP_TIME_EXCEEDED else None
    if family == "icmpv6":
        if icmp_type == _ICMP6_DEST_UNREACH:
            return _ICMP6_UNREACH.get(icmp_code)
        return Failure.HOST_UNREACHABLE if icmp_type == _ICMP6_TIME_EXCEEDED else None
    return None


# --- DNS ------------------------------------------------------------------------------------

# A reply's response code (RFC 1035 §4.1.1, RFC 6895) as a failure.  NOERROR is judged by
# its answers; any other code (FORMERR, NOTIMP, YXDOMAIN ...) is a server misbehaving.
_RCODE: Mapping[str, Failure] = {
    "NXDOMAIN": Failure.DNS_NXDOMAIN,
    "SERVFAIL": Failure.DNS_SERVFAIL,
    "REFUSED": Failure.DNS_REFUSED,
}


def classify_rcode(rcode: str | None, *, answered: bool) -> Failure | None:
    """The failure a DNS reply with response code ``rcode`` (its text: NOERROR,
    NXDOMAIN ...) stands for; None for NOERROR with addresses (``answered``)."""
    if rcode == "NOERROR":
        return None if answered else Failure.DNS_NO_ANSWER
    return _RCODE.get(rcode or "", Failure.DNS_SERVER_MISBEHAVING)


def _resolver(exc: BaseException) -> Failure | None:
    """dnspython's exceptions (OONI's classifyResolverError)."""
    if not isinstance(exc, dns.exception.DNSException):
        return None
    if isinstance(exc, dns.resolver.NXDOMAIN):
        return Failure.DNS_NXDOMAIN
    if isinstance(exc, dns.resolver.NoAnswer):
        return Failure.DNS_NO_ANSWER
    if isinstance(exc, dns.exception.Timeout):
        return Failure.GENERIC_TIMEOUT
    # ShortHeader, FormError, Truncated, UnknownTSIGKey ...: the server spoke, not an answer
    return Failure.DNS_SERVER_MISBEHAVING


# --- handshakes -------------------------------------------------------------------------------


def _certificate(exc: BaseException) -> Failure | None:
    """Certificate checks made outside the ssl module (the QUIC probe, like aioquic)."""
    if isinstance(exc, service_identity.VerificationError):
        return Failure.SSL_INVALID_HOSTNAME
    if isinstance(exc, service_identity.CertificateError):
        return Failure.SSL_INVALID_CERTIFICATE  # no usable identity (no SAN) at all
    if isinstance(exc, openssl_crypto.X509StoreContextError):
        return classify_x509_verify_code(exc.errors[0] if exc.errors else None)
    return None


def _tls_handshake(exc: BaseException) -> Failure | None:
    """OONI's classifyTLSHandshakeError; ssl's own errors are generic (they also end
    reads over TLS, and the DoH client's connections)."""
    if isinstance(exc, HandshakeTooLarge):
        # bytes kept coming and none finished a handshake: not TLS as a client knows it
        return Failure.SSL_FAILED_HANDSHAKE
    return _certificate(exc)


_BY_OPERATION: Mapping[Operation, Callable[[BaseException], Failure | None]] = {
    Operation.RESOLVE: _resolver,
    Operation.TLS_HANDSHAKE: _tls_handshake,
    Operation.QUIC_HANDSHAKE: _certificate,
}


# --- exceptions ----------------------------------------------------------------------------


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


def classify(exc: BaseException, operation: Operation) -> Classified:
    """The failure an exception raised by ``operation`` stands for."""
    exc = _unwrap_aiohttp(exc)
    specific = _BY_OPERATION.get(operation)
    failure = specific(exc) if specific is not None else None
    if failure is not None:
        return Classified(failure)
    return _generic(exc)


def _generic(exc: BaseException) -> Classified:
    """Errors any operation can raise (OONI's classifyGenericError): errno first, then type."""
    if isinstance(exc, socket.gaierror):
        failure = _GAI.get(exc.errno or 0)
        return Classified(failure) if failure else _unknown(f"getaddrinfo: {exc}")
    # the agent's own exhaustion, before the errno table (timeouts and TLS errors are
    # OSErrors too, but their errno is not the kernel's)
    if is_agent_side(exc) and not isinstance(exc, TimeoutError | ssl.SSLError):
        return _AGENT_RESOURCES
    failure = _generic_failure(exc)
    if isinstance(exc, IcmpError):
        failure = classify_icmp(exc.family, exc.icmp_type, exc.icmp_code) or failure
    if failure is None:
        return _unknown(f"{type(exc).__name__}: {exc}")
    return Classified(failure)


def _generic_failure(exc: BaseException) -> Failure | None:
    if isinstance(exc, asyncio.TimeoutError | TimeoutError | socket.timeout):
        return Failure.GENERIC_TIMEOUT
    if isinstance(exc, asyncio.IncompleteReadError | EOFError):
        return Failure.EOF
    # aiohttp: the server closed before (all of) the response arrived
    if isinstance(exc, aiohttp.ServerDisconnectedError | aiohttp.ClientPayloadError):
        return Failure.EOF
    if isinstance(exc, WireError):
        return Failure.BAD_RESPONSE
    if isinstance(exc, ssl.SSLError):
        return _ssl_error(exc)
    if isinstance(exc, OSError):
        if exc.errno in _ERRNO:
            return _ERRNO[exc.errno]
        if isinstance(exc, ConnectionRefusedError):
            return Failure.CONNECTION_REFUSED
        if isinstance(exc, ConnectionResetError | BrokenPipeError):
            return Failure.CONNECTION_RESET
        if isinstance(exc, ConnectionAbortedError):
            return Failure.CONNECTION_ABORTED
    return None
