"""Builders for targets and settings pointing at local test servers (loopback only), and
for probe results as data (no socket)."""

from __future__ import annotations

import contextlib
import socket
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any, TypeVar

from probe.config.settings import ProbeSettings, Resolvers, Timeouts, TLSOptions
from probe.evidence import Evidence
from probe.model import Endpoint, Operation, ProbeResult, ProbeSpec, SkipReason, Target, freeze
from probe.probes import REGISTRY


@dataclass(frozen=True, kw_only=True)
class RawEvidence(Evidence):
    """Hand-made evidence whose JSON form is any shape (hostile values: NaN, bytes, deep
    nesting; the archive rotation tests' own tags), for the writers that must cope with
    whatever a buggy probe or a foreign record holds.  Probes never produce it."""

    raw: Mapping[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        pass  # any shape: nothing to freeze or check

    def to_json(self) -> dict[str, Any]:
        return dict(self.raw)


EvidenceT = TypeVar("EvidenceT", bound=Evidence)


def evidence_of(result: ProbeResult, cls: type[EvidenceT]) -> EvidenceT:
    """The result's evidence as the probe's own class (a test fails on any other)."""
    assert isinstance(result.evidence, cls), result.evidence
    return result.evidence


def json_details(result: ProbeResult) -> dict[str, Any]:
    """A result's evidence as every record carries it under ``"details"`` (its JSON form)."""
    return result.evidence.to_json()


def endpoint(
    host: str = "127.0.0.1",
    *,
    probes: tuple[str, ...] | dict[str, dict[str, Any]] = ("tcp",),
    ports: tuple[int, ...] = (),
    service: str = "lab",
    name: str | None = None,
    sni: str | None = None,
    transport: str = "tcp",
    role: str = "signalling",
    prefixes: tuple[Any, ...] = (),
    addresses: tuple[str, ...] = (),
) -> Endpoint:
    if isinstance(probes, dict):
        # parsed as the config loader does: a bad param raises ParamError here
        specs = tuple(ProbeSpec(n, None, REGISTRY[n].parse(p)) for n, p in probes.items())
    else:
        specs = tuple(ProbeSpec(n) for n in probes)
    return Endpoint(
        service=service,
        name=name or host,
        host=host,
        ports=ports,
        transport=transport,  # type: ignore[arg-type]
        role=role,
        probes=specs,
        addresses=addresses,
        prefixes=prefixes,
        sni=sni,
        source="test",
        confidence="C",
    )


def target(
    probe: str,
    address: str | None = "127.0.0.1",
    port: int | None = None,
    *,
    host: str | None = None,
    resolver: str | None = None,
    params: dict[str, Any] | None = None,
    **endpoint_kw: Any,
) -> Target:
    ep = endpoint(
        host or address or "localhost",
        probes={probe: params or {}},
        ports=(port,) if port else (),
        **endpoint_kw,
    )
    return Target(ep, probe, address, port, resolver, "literal" if address else "")


def settings(
    *,
    ca_file: str | None = None,
    resolvers: Resolvers | None = None,
    **timeouts: float,
) -> ProbeSettings:
    fast = {
        "dns_s": 2.0,
        "connect_s": 2.0,
        "tls_s": 2.0,
        "quic_s": 2.0,
        "udp_s": 2.0,
        "app_s": 2.0,
        "transfer_s": 10.0,
        "stall_s": 1.0,
    }
    fast.update(timeouts)
    return ProbeSettings(
        timeouts=Timeouts(**fast),
        resolvers=resolvers or Resolvers(system=True, reply_window_s=0.3),
        tls=TLSOptions(ca_file=ca_file),
    )


T0 = datetime(2025, 3, 1, 12, 0, 0, tzinfo=UTC)  # when the built results were measured


def ok(t: Target, at: datetime = T0, **phases: float) -> ProbeResult:
    """A success with these phase durations (seconds)."""
    return ProbeResult(t, True, at, sum(phases.values()) or 0.01, phases=freeze(phases))


def failed(
    t: Target,
    failure: str = "connection_reset",
    op: Operation = Operation.CONNECT,
    at: datetime = T0,
    **phases: float,
) -> ProbeResult:
    """A failure that took 2.5 s in all, with these phase durations."""
    return ProbeResult(
        t, False, at, 2.5, failure=failure, failed_operation=op, phases=freeze(phases)
    )


def skipped(
    t: Target, reason: SkipReason = SkipReason.VANTAGE_OFFLINE, at: datetime = T0
) -> ProbeResult:
    return ProbeResult(t, False, at, 0.0, skipped=reason)


@contextlib.contextmanager
def refusing_port(host: str = "127.0.0.1") -> Iterator[int]:
    """A TCP port bound but not listening while the block runs: the kernel answers a
    connect with an RST (connection refused), and nothing else can take the port meanwhile."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with socket.socket(family, socket.SOCK_STREAM) as sock:
        sock.bind((host, 0))
        yield int(sock.getsockname()[1])


def unbound_udp_port(host: str = "127.0.0.1") -> int:
    """A UDP port nothing is bound to (bound to learn a free one, then released): loopback
    answers a datagram to it with ICMP port unreachable, which a connected socket hears as
    connection refused.  Unlike TCP, a bound UDP socket would swallow the datagram."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with socket.socket(family, socket.SOCK_DGRAM) as sock:
        sock.bind((host, 0))
        return int(sock.getsockname()[1])
