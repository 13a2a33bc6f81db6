"""The verdict vocabulary, the confidence scale, and what judging produces.

A `Finding` is what a rule concludes about one probe's attempts or one path; an
`EndpointVerdict` and a `ServiceVerdict` are what the engine hands out.  Confidence is an
ordering, not a probability: a verdict isolated by a swap test or a control vantage ranks
above a bare signature, which ranks above "consistent with censorship but equally with an
outage".
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from enum import StrEnum


class Verdict(StrEnum):
    """Closed verdict vocabulary (one exported series per value)."""

    OK = "ok"
    DNS_TAMPERING = "dns_tampering"  # nxdomain / bogon / inconsistent / injected
    IP_BLOCKING = "ip_blocking"  # blackhole or reset on connect
    TLS_SNI_FILTERING = "tls_sni_filtering"
    TLS_MITM = "tls_mitm"
    # ours beyond the brief's list: TCP connects, the application's first bytes kill
    # the flow (MTProto, WhatsApp Noise, TLS with any SNI) while the control completes
    PROTOCOL_FILTERING = "protocol_filtering"
    QUIC_FILTERING = "quic_filtering"
    UDP_BLOCKING = "udp_blocking"
    THROTTLING = "throttling"
    STALL_AFTER_BYTES = "stall_after_bytes"
    PARTIAL = "partial"  # some paths/endpoints blocked, others not (blocked_fraction)
    ENDPOINT_DOWN = "endpoint_down"  # the control vantage fails the same way
    VANTAGE_OFFLINE = "vantage_offline"
    # only domestic destinations answer (FIELD.md B10): a state of the network, not a block
    ALLOWLIST_REGIME = "allowlist_regime"
    INCONCLUSIVE = "inconclusive"


# Which blocking verdict names an endpoint when several hold, most telling first: a DNS
# lie stops an ordinary client before any packet reaches the service; a MITM is worse
# than a block; IP blocks are coarser than the filters below them.
PRIORITY: tuple[Verdict, ...] = (
    Verdict.DNS_TAMPERING,
    Verdict.TLS_MITM,
    Verdict.IP_BLOCKING,
    Verdict.TLS_SNI_FILTERING,
    Verdict.PROTOCOL_FILTERING,
    Verdict.QUIC_FILTERING,
    Verdict.UDP_BLOCKING,
    Verdict.STALL_AFTER_BYTES,
    Verdict.THROTTLING,
)
BLOCKING: frozenset[Verdict] = frozenset(PRIORITY)

# Confidence levels (see the module docstring: an ordering a dashboard can threshold).
CERTAIN = 0.95  # a swap test or the control isolates the cause
STRONG = 0.85  # a direct signature with one corroboration
GOOD = 0.7  # a signature with one corroboration missing
FAIR = 0.6  # consistent with censorship; an outage explains it less well
WEAK = 0.45  # consistent with censorship; an outage explains it as well
NONE = 0.3  # inconclusive
_AGREE_BONUS = 0.05  # a repeat on a fresh connection failed the same way
_MAX_CONFIDENCE = 0.99


@dataclass(frozen=True)
class EndpointVerdict:
    """`probe.records.VerdictFields` for one endpoint."""

    service: str
    endpoint: str
    verdict: Verdict
    confidence: float
    evidence: tuple[str, ...] = ()
    blocked_fraction: float | None = None  # only for ``partial``


@dataclass(frozen=True)
class ServiceVerdict:
    """`probe.records.VerdictFields` for a whole service (``endpoint`` is always None)."""

    service: str
    verdict: Verdict
    confidence: float
    evidence: tuple[str, ...] = ()
    blocked_fraction: float | None = None  # only for ``partial``
    endpoint: None = None


@dataclass(frozen=True)
class Finding:
    """What one rule, one probe's attempts or one path concluded (not yet an endpoint's)."""

    verdict: Verdict
    confidence: float
    evidence: tuple[str, ...] = ()

    @property
    def blocking(self) -> bool:
        return self.verdict in BLOCKING

    def stronger(self, note: str) -> Finding:
        confidence = min(_MAX_CONFIDENCE, self.confidence + _AGREE_BONUS)
        return Finding(self.verdict, confidence, (*self.evidence, note))


def distinct_lines(lines: Iterable[str]) -> tuple[str, ...]:
    """Evidence lines without repeats, in order.  Never truncated here: JSON output and the
    API are for machines; the table shortens what it shows (``output.shown_evidence``)."""
    return tuple(dict.fromkeys(lines))


def _rank(f: Finding) -> tuple[int, float]:
    order = PRIORITY.index(f.verdict) if f.blocking else len(PRIORITY)
    return (order, -f.confidence)


def strongest(findings: Sequence[Finding]) -> Finding:
    """Blocking beats down beats ok beats inconclusive; among blocking, `PRIORITY`."""
    blocking = [f for f in findings if f.blocking]
    if blocking:
        best = min(blocking, key=_rank)
        return Finding(best.verdict, best.confidence, merge_evidence(best, findings))
    for verdict in (Verdict.ENDPOINT_DOWN, Verdict.OK, Verdict.INCONCLUSIVE):
        same = [f for f in findings if f.verdict == verdict]
        if same:
            best = max(same, key=lambda f: f.confidence)
            confidence = best.confidence
            if verdict == Verdict.OK and any(f.verdict == Verdict.INCONCLUSIVE for f in findings):
                confidence *= 0.8  # a probe on the same path could not say
            return Finding(verdict, confidence, merge_evidence(best, findings))
    return findings[0]


def merge_evidence(first: Finding, findings: Sequence[Finding]) -> tuple[str, ...]:
    return distinct_lines([*first.evidence, *(e for f in findings for e in f.evidence)])
