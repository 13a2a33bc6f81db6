"""Core value types shared by every layer: targets, results, the failure vocabulary.

Everything here is immutable.  Probes build a `ProbeResult`; the round runner,
classifier, exporter, archive and dashboards only read them.

Failure vocabulary
------------------
``Failure`` holds OONI's df-007 strings verbatim plus a few of our own where
OONI has no word (marked *ours*).  A failure string on a result is always one
of these values, except ``unknown_failure <message>`` whose message (IP
addresses scrubbed) follows the base word; `failure_kind()` maps any failure
string back to its bounded `Failure` member for use as a metric label.
"""

from __future__ import annotations

import functools
import ipaddress
from collections.abc import Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime
from enum import StrEnum
from types import MappingProxyType
from typing import Any, ClassVar, Literal, Self

from .evidence import Evidence, empty_evidence

__all__ = [
    "Endpoint",
    "Failure",
    "Operation",
    "ParamError",
    "ProbeParams",
    "ProbeResult",
    "ProbeSpec",
    "Service",
    "SkipReason",
    "Target",
    "Vantage",
    "VantageState",
    "failure_kind",
    "freeze",
]


class Failure(StrEnum):
    """Closed failure vocabulary (OONI df-007 plus documented additions)."""

    CONNECTION_REFUSED = "connection_refused"
    CONNECTION_RESET = "connection_reset"
    CONNECTION_ABORTED = "connection_aborted"
    GENERIC_TIMEOUT = "generic_timeout_error"
    EOF = "eof_error"
    HOST_UNREACHABLE = "host_unreachable"
    NETWORK_UNREACHABLE = "network_unreachable"
    DNS_NXDOMAIN = "dns_nxdomain_error"
    DNS_NO_ANSWER = "dns_no_answer"
    DNS_REFUSED = "dns_refused_error"
    DNS_SERVFAIL = "dns_servfail_error"
    DNS_BOGON = "dns_bogon_error"
    DNS_SERVER_MISBEHAVING = "dns_server_misbehaving"
    DNS_TEMPORARY_FAILURE = "dns_temporary_failure"
    SSL_FAILED_HANDSHAKE = "ssl_failed_handshake"
    SSL_INVALID_HOSTNAME = "ssl_invalid_hostname"
    SSL_UNKNOWN_AUTHORITY = "ssl_unknown_authority"
    SSL_INVALID_CERTIFICATE = "ssl_invalid_certificate"
    QUIC_INCOMPATIBLE_VERSION = "quic_incompatible_version"
    UNKNOWN = "unknown_failure"
    # ours: OONI has no word for these
    UDP_NO_RESPONSE = "udp_no_response"  # datagrams sent, nothing came back in time
    BAD_RESPONSE = "bad_response"  # the peer answered bytes that are not the protocol
    STALL_AFTER_BYTES = "stall_after_bytes"  # data flowed, then stopped without FIN/RST
    THROTTLED = "throttled"  # transfer completed but below the throttling threshold


class Operation(StrEnum):
    """The step that failed (OONI's `failed_operation`)."""

    RESOLVE = "resolve"
    CONNECT = "connect"
    TLS_HANDSHAKE = "tls_handshake"
    QUIC_HANDSHAKE = "quic_handshake"
    READ = "read"
    WRITE = "write"


class SkipReason(StrEnum):
    """Why a target was not probed; a skipped result never counts as blocked."""

    VANTAGE_OFFLINE = "vantage_offline"
    IPV6_UNAVAILABLE = "ipv6_unavailable"
    # The agent itself ran out of file descriptors or buffers (EMFILE, ENFILE, ENOBUFS):
    # nothing was learnt about the target, which must not read as its failure.
    AGENT_RESOURCES = "agent_resources"


Role = Literal["signalling", "web", "media", "registration", "call-relay", "control"]
ROLES: tuple[str, ...] = ("signalling", "web", "media", "registration", "call-relay", "control")


def failure_kind(failure: str | None) -> Failure | None:
    """Map a result's failure string to its bounded vocabulary member."""
    if failure is None:
        return None
    base = failure.split(" ", 1)[0]
    try:
        return Failure(base)
    except ValueError:
        return Failure.UNKNOWN


def freeze(mapping: Mapping[str, Any] | None = None) -> Mapping[str, Any]:
    """A read-only view of a fresh copy, for mapping fields of frozen dataclasses."""
    return MappingProxyType(dict(mapping or {}))


def _empty() -> Mapping[str, Any]:
    return freeze()


# Stands for "the probe's own empty evidence", filled in from the target's probe name.
_NO_EVIDENCE = Evidence()


@dataclass(frozen=True)
class Vantage:
    """Where measurements are taken from."""

    name: str = "unnamed"
    country: str = "ZZ"
    asn: str = "AS0"
    role: Literal["test", "control"] = "test"


class ParamError(ValueError):
    """An invalid probe parameter.

    ``key`` names the parameter (None: the params as a whole); ``message`` says what is
    wrong without repeating the key, so the loader can print it after the key's field
    path (``endpoints[3].probes[1].transfer.max_bytes: must be ...``).
    """

    def __init__(self, probe: str, key: str | None, message: str) -> None:
        super().__init__(f"{probe}: {key}: {message}" if key is not None else f"{probe}: {message}")
        self.probe = probe
        self.key = key
        self.message = message


class ProbeParams:
    """Base of every probe's typed params: one frozen dataclass per probe (``TcpParams``,
    ``TLSParams``, ``StunParams``...), each listed in the probe registry (`probe.probes`).

    The config loader parses a probe's params once, at load time, into its class; a
    follow-up's overrides are parsed once, when it is planned (`probe.swaps`).  A probe
    then reads attributes (``TcpParams.of(target).hold_s``), never a mapping.
    """

    __slots__ = ()
    PROBE: ClassVar[str] = ""  # the probe's name, as its errors and the registry say it

    @classmethod
    def parse(cls, params: Mapping[str, Any], base: Self | None = None) -> Self:
        """Params as written in YAML (plain data) over ``base`` (default: the defaults).

        Raises `ParamError` naming the offending key, and nothing else
        whatever ``params`` holds.
        """
        raise NotImplementedError(f"{cls.__name__}.parse")

    @classmethod
    def of(cls, owner: Target | ProbeSpec) -> Self:
        """The params a target runs with (or a spec carries); None there means defaults."""
        params = owner.params
        if params is None:
            return cls()
        if not isinstance(params, cls):  # a spec of another probe: a bug, not bad input
            raise TypeError(f"expected {cls.__name__}, got {type(params).__name__}")
        return params


@dataclass(frozen=True)
class ProbeSpec:
    """One probe applied to an endpoint: which ports (None = all) and its typed params
    (None: the probe's defaults; the config loader always sets them)."""

    name: str
    ports: tuple[int, ...] | None = None
    params: ProbeParams | None = None


@functools.lru_cache(maxsize=65536)
def _ip_version(text: str) -> int | None:
    """4 or 6 for an IP literal, else None.  Memoised (a pure function of the text): the
    scheduler, store and exporter asked for every result, and parsing showed in profiles."""
    try:
        return ipaddress.ip_address(text).version
    except ValueError:
        return None


@dataclass(frozen=True)
class Endpoint:
    """A host of a service, as listed in seeds or user config."""

    service: str
    name: str
    host: str  # hostname or IP literal
    ports: tuple[int, ...]
    transport: Literal["tcp", "udp"]
    role: str
    probes: tuple[ProbeSpec, ...]
    addresses: tuple[str, ...] = ()  # known-good addresses (seeds), probed besides DNS answers
    prefixes: tuple[ipaddress.IPv4Network | ipaddress.IPv6Network, ...] = ()  # the service's
    sni: str | None = None
    source: str = ""
    confidence: str = ""
    # a control inside the country (seed key ``domestic``): it keeps answering under an
    # allowlist regime (FIELD.md B10), which tells that regime from a dead uplink
    domestic: bool = False

    @property
    def is_ip_literal(self) -> bool:
        return _ip_version(self.host) is not None

    def spec(self, probe: str) -> ProbeSpec | None:
        return next((s for s in self.probes if s.name == probe), None)

    def ports_for(self, probe: str) -> tuple[int, ...]:
        spec = self.spec(probe)
        if spec is None:
            return ()
        return spec.ports if spec.ports is not None else self.ports


@dataclass(frozen=True)
class Service:
    """A service (whatsapp, telegram, a control set, a lab service) and its endpoints."""

    name: str
    display_name: str
    endpoints: tuple[Endpoint, ...]
    prefixes: tuple[ipaddress.IPv4Network | ipaddress.IPv6Network, ...] = ()
    origin: str = ""  # file the service came from
    source: str = ""  # where the list as a whole comes from (seed `source:`)


@dataclass(frozen=True)
class Target:
    """One probe against one address and port of an endpoint.

    ``address`` is None for DNS probes, which carry ``resolver`` instead
    (``system``, ``udp:HOST:PORT``, ``tcp:HOST:PORT`` or ``doh:URL``).
    ``address_source`` says where the address came from (``literal``, ``seed``,
    ``system``, ``doh`` ...): an address only the control resolver knew is how a
    DNS lie is told apart from an IP block.
    """

    endpoint: Endpoint
    probe: str
    address: str | None = None
    port: int | None = None
    resolver: str | None = None
    address_source: str = ""
    # A follow-up run of the same probe (swap test or repeat), e.g. "neutral_sni",
    # "repeat2"; ``overrides`` are its parameter changes as written (kept for the
    # record), ``variant_params`` the spec's params with them applied, parsed once
    # when the follow-up is planned (`probe.swaps`).
    variant: str = ""
    overrides: Mapping[str, Any] = field(default_factory=_empty)
    variant_params: ProbeParams | None = None

    @property
    def service(self) -> str:
        return self.endpoint.service

    @property
    def params(self) -> ProbeParams | None:
        """The typed params this target runs with (None: the probe's defaults)."""
        if self.variant_params is not None:
            return self.variant_params
        if self.overrides:  # built by hand, not planned: running it would drop them
            raise ValueError(f"{self.label}: overrides without parsed variant_params")
        spec = self.endpoint.spec(self.probe)
        return spec.params if spec is not None else None

    @property
    def label(self) -> str:
        """The probe name as shown and exported: ``tls`` or ``tls/neutral_sni``."""
        return f"{self.probe}/{self.variant}" if self.variant else self.probe

    @property
    def family(self) -> Literal["ipv4", "ipv6"] | None:
        if self.address is None:
            return None
        version = _ip_version(self.address)
        if version is None:
            raise ValueError(f"{self.address!r} does not appear to be an IPv4 or IPv6 address")
        return "ipv6" if version == 6 else "ipv4"

    @property
    def server_name(self) -> str | None:
        """The SNI to present: override, else the hostname (None for IP literals)."""
        if self.endpoint.sni:
            return self.endpoint.sni
        return None if self.endpoint.is_ip_literal else self.endpoint.host

    def key(self) -> tuple[str, str, str, str, str]:
        """Stable identity used by the scheduler, exporter and archive."""
        where = self.address or self.resolver or ""
        return (self.service, self.endpoint.name, self.label, where, str(self.port or ""))


@dataclass(frozen=True)
class ProbeResult:
    """What one probe observed.  Never raised: failures are data."""

    target: Target
    ok: bool
    t: datetime  # wall-clock start, UTC
    duration_s: float  # monotonic
    failure: str | None = None
    failed_operation: Operation | None = None
    phases: Mapping[str, float] = field(default_factory=_empty)  # phase -> seconds
    # The probe's own evidence class (`probe.evidence`); its JSON form is the "details"
    # of every record.  Left out: the probe's empty evidence.
    evidence: Evidence = _NO_EVIDENCE
    flags: tuple[str, ...] = ()  # anomalies that are not failures (e.g. dns_injection)
    skipped: SkipReason | None = None

    def __post_init__(self) -> None:
        if self.evidence is _NO_EVIDENCE:
            object.__setattr__(self, "evidence", empty_evidence(self.target.probe))
        if self.ok and self.failure is not None:
            raise ValueError("a successful result carries no failure")
        if not self.ok and self.failure is None and self.skipped is None:
            raise ValueError("a failed result needs a failure string")

    @property
    def failure_kind(self) -> Failure | None:
        return failure_kind(self.failure)

    @property
    def status(self) -> Literal["ok", "failed", "skipped"]:
        if self.skipped is not None:
            return "skipped"
        return "ok" if self.ok else "failed"


def utcnow() -> datetime:
    return datetime.now(UTC)


@dataclass(frozen=True)
class VantageState:
    """The offline gate's finding for one round: nothing counts as blocked when offline."""

    online: bool
    ipv6: bool
    t: datetime
    evidence: Mapping[str, Any] = field(default_factory=_empty)
    # Online, but only domestic controls answer while every foreign one fails: an
    # allowlist regime (FIELD.md B10), a state of the vantage, not a per-service block.
    allowlist: bool = False

    @property
    def state(self) -> Literal["online", "offline", "allowlist"]:
        if not self.online:
            return "offline"
        return "allowlist" if self.allowlist else "online"
