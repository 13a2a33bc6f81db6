"""Frozen configuration value types.  Loading and validation live in `probe.config`."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, Literal

from ..model import Service, Vantage, freeze


def _empty() -> Mapping[str, Any]:
    return freeze()


@dataclass(frozen=True)
class HostPort:
    host: str
    port: int

    def __str__(self) -> str:
        return f"[{self.host}]:{self.port}" if ":" in self.host else f"{self.host}:{self.port}"


@dataclass(frozen=True)
class Timeouts:
    """Per-step timeouts in seconds."""

    dns_s: float = 5.0
    connect_s: float = 10.0
    tls_s: float = 10.0
    quic_s: float = 10.0
    udp_s: float = 5.0  # total wait for a UDP (STUN) answer, retransmissions included
    app_s: float = 10.0  # application hello -> reply (MTProto, WhatsApp Noise)
    transfer_s: float = 30.0  # whole bulk transfer
    stall_s: float = 5.0  # no new byte for this long during a transfer = stall


@dataclass(frozen=True)
class Resolvers:
    system: bool = True
    udp: tuple[HostPort, ...] = ()
    tcp: tuple[HostPort, ...] = ()
    doh: str | None = None  # control resolver (DNS over HTTPS, RFC 8484)
    reply_window_s: float = 1.0  # keep listening after the first UDP reply (injection race)


@dataclass(frozen=True)
class TLSOptions:
    ca_file: str | None = None  # extra trust anchors (lab CA); system store otherwise
    sni_overrides: Mapping[str, str] = field(default_factory=_empty)  # endpoint name -> SNI


@dataclass(frozen=True)
class SwapSettings:
    """Swap tests (`probe.swaps`): the neutral SNI, globally and per service."""

    neutral_sni: str = "example.com"  # only ever sent as SNI, never resolved
    per_service: Mapping[str, str] = field(default_factory=_empty)  # service -> neutral SNI

    def neutral_for(self, service: str) -> str:
        return self.per_service.get(service, self.neutral_sni)


@dataclass(frozen=True)
class Schedule:
    interval_s: float = 300.0
    jitter_s: float = 30.0
    min_spacing_s: float = 60.0  # never re-test the same target sooner (residual blocking)
    concurrency: int = 32
    per_destination: int = 4
    # Rounds due within the same step of this grid start together, on one wake-up of
    # the process: a paced agent woken for every round pays each round's Python work
    # on cold caches (several times its cost back to back).  Only ever delays a round,
    # by less than one step (capped at a tenth of interval_s); 0 starts each round at
    # its own time.
    batch_s: float = 0.25


@dataclass(frozen=True)
class ArchiveSettings:
    """Where the measurement archive (JSON Lines, `probe.archive`) is written and kept."""

    path: str | None = "archive"  # directory; None disables the archive
    max_bytes: int = 64 * 1024 * 1024  # rotate the current file before it grows past this
    keep: int = 10  # rotated files kept besides the current one; older ones are deleted
    compress: bool = True  # gzip rotated files (in a background thread)


@dataclass(frozen=True)
class WebSettings:
    """The agent's own HTTP server: optional TLS and basic auth (bcrypt hashes only)."""

    tls_cert_file: str | None = None
    tls_key_file: str | None = None
    basic_auth_users: Mapping[str, str] = field(default_factory=_empty)  # user -> bcrypt hash
    # Host header values (names or IPs, no port) served besides the loopback names and the
    # listen address: a DNS-rebinding page can choose both Host and Origin, never these.
    allowed_hosts: tuple[str, ...] = ()
    # HTTP connections one client address (IPv4, IPv6 /64; loopback exempt) may hold at
    # once, below the global cap (probe.weblimits); 0: no per-client limit.
    max_connections_per_client: int = 16


@dataclass(frozen=True)
class MetricsSettings:
    """Opt-in metric families that cost series per endpoint (docs/metrics.md, budget)."""

    # Also export a 0 series for every verdict value an endpoint/service does not have.
    verdict_one_hot: bool = False
    # probe_phase_latency_seconds per series (endpoint, address, port...) instead of
    # aggregated per (service, probe, phase): 16 series per phase and endpoint.
    per_target_histograms: bool = False


@dataclass(frozen=True)
class ControlSettings:
    """A test vantage's control vantages (`probe.control`): their agents' ``/api/results``.

    URLs come only from the config, never from a request.  ``basic_auth`` is read from
    ``basic_auth_file`` at load (never written inline in the config, kept out of repr).
    """

    urls: tuple[str, ...] = ()
    ca_file: str | None = None  # trust anchors for https URLs (a control's own CA)
    basic_auth_file: str | None = None  # one line USER:PASSWORD
    basic_auth: tuple[str, str] | None = field(default=None, repr=False)
    poll_interval_s: float = 60.0
    max_age_s: float = 900.0  # older control measurements are never judged with
    timeout_s: float = 10.0  # one fetch, redirects and body included
    max_bytes: int = 32 * 1024 * 1024  # response body limit (a big agent's results fit)


@dataclass(frozen=True)
class ProbeSettings:
    """What a probe may read: timeouts, resolvers and TLS trust. Nothing else."""

    timeouts: Timeouts = field(default_factory=Timeouts)
    resolvers: Resolvers = field(default_factory=Resolvers)
    tls: TLSOptions = field(default_factory=TLSOptions)


@dataclass(frozen=True)
class AgentConfig:
    vantage: Vantage = field(default_factory=Vantage)
    schedule: Schedule = field(default_factory=Schedule)
    timeouts: Timeouts = field(default_factory=Timeouts)
    resolvers: Resolvers = field(default_factory=Resolvers)
    tls: TLSOptions = field(default_factory=TLSOptions)
    swaps: SwapSettings = field(default_factory=SwapSettings)
    seeds: tuple[str, ...] = ()  # shipped list names or file paths, as configured
    services: tuple[Service, ...] = ()  # seeds and user services, loaded and merged
    listen: HostPort = field(default_factory=lambda: HostPort("127.0.0.1", 9464))
    archive: ArchiveSettings = field(default_factory=ArchiveSettings)
    web: WebSettings = field(default_factory=WebSettings)
    metrics: MetricsSettings = field(default_factory=MetricsSettings)
    control: ControlSettings | None = None  # no control vantage: judged alone
    log_format: Literal["json", "logfmt"] = "json"
    source: str = "<defaults>"  # where this config was read from

    @property
    def settings(self) -> ProbeSettings:
        return ProbeSettings(timeouts=self.timeouts, resolvers=self.resolvers, tls=self.tls)
