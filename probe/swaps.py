"""Swap tests and repeats: the follow-up runs that turn a failure into evidence.

A failed result alone says "something broke"; a follow-up on the same path says
what (FIELD.md §3):

========================================  ==========================================
first run failed with                     follow-up (``Target.label``)
========================================  ==========================================
tls/transfer reset, timeout, EOF or       ``tls/neutral_sni``: same address and port,
alert in ``tls_handshake``                SNI = a neutral name.  A completed handshake
                                          (or one failing only on the certificate
                                          name) proves the path carries TLS: the SNI
                                          was the trigger (B3)
same                                      ``tls/other_shape`` (param ``shape: alt``) and
                                          ``tls/split_hello`` (``split_hello: true``):
                                          the same SNI in another ClientHello, and the
                                          same ClientHello in two TCP segments (B4:
                                          fingerprint filter? does the censor reassemble?)
quic: anything but a certificate error    ``quic_vn/swap``: a version-negotiation probe
                                          to the same address and port (B8 vs UDP
                                          blocking), unless a ``quic_vn`` already ran
dns via system/udp: failure or a          ``dns/swap`` through every configured TCP and
tampering flag                            DoH resolver not already asked (B1)
stun binding over UDP: silence            ``stun/random_udp``: ``control: true``, random
                                          datagrams of the same sizes first (B9:
                                          content filter vs address block)
tcp, tls, quic, mtproto, whatsapp:  ``<probe>/repeat`` on a fresh connection
                                          (censors are inconsistent)
========================================  ==========================================

Bounded: follow-ups are planned only from first runs (``variant == ""``), never from a
follow-up, and at most one of each kind per target (deduplicated by `Target.key`).
``transfer`` is not repeated: it already runs several connections itself.

`followups` is pure; the round runner (`probe.round.measure_endpoint`) runs what it
returns through the same `Runner`, so the same concurrency bounds apply.  A follow-up's
parameter overrides are parsed here, once, over the endpoint's params for that probe
(`Target.variant_params`); the overrides themselves stay on the target for the record.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from typing import Any

from .dnsjudge import resolver_kind
from .model import Failure, Operation, ProbeResult, Target, freeze
from .probes import REGISTRY
from .probes.stun import StunParams
from .probes.tls import TLSParams
from .probes.transfer import TransferParams

__all__ = [
    "DEFAULT_NEUTRAL_SNI",
    "NEUTRAL_SNI",
    "OTHER_SHAPE",
    "RANDOM_UDP",
    "REPEAT",
    "SPLIT_HELLO",
    "SWAP",
    "followups",
]

# A name no censor we know of filters and whose TLS servers answer anywhere.  It is only
# ever sent as SNI to the address under test, never resolved.  Under an allowlist regime
# (FIELD.md B10) nothing is neutral; the offline gate's domestic controls catch that.
DEFAULT_NEUTRAL_SNI = "example.com"

NEUTRAL_SNI = "neutral_sni"
OTHER_SHAPE = "other_shape"
SPLIT_HELLO = "split_hello"
SWAP = "swap"
RANDOM_UDP = "random_udp"
REPEAT = "repeat"

_TLS_TRIGGERS = frozenset(
    {Failure.CONNECTION_RESET, Failure.GENERIC_TIMEOUT, Failure.EOF, Failure.SSL_FAILED_HANDSHAKE}
)
_CERT = frozenset(
    {Failure.SSL_INVALID_HOSTNAME, Failure.SSL_UNKNOWN_AUTHORITY, Failure.SSL_INVALID_CERTIFICATE}
)
_REPEATED = frozenset({"tcp", "tls", "quic", "mtproto", "whatsapp"})
_DNS_FLAGS = frozenset(
    {
        "dns_injection_suspected",
        "dns_answer_outside_prefixes",
        "dns_udp_tcp_mismatch",
        "dns_doh_mismatch",
        "dns_system_mismatch",
    }
)


def _variant(t: Target, probe: str, variant: str, overrides: Mapping[str, Any]) -> Target:
    """A follow-up of ``t``: ``probe`` on the same path, its overrides parsed once, over
    the endpoint's params for ``probe`` (its defaults if it has no such spec)."""
    spec = t.endpoint.spec(probe)
    params = REGISTRY[probe].parse(overrides, spec.params if spec else None)
    return Target(
        t.endpoint,
        probe,
        t.address,
        t.port,
        address_source=t.address_source,
        variant=variant,
        overrides=freeze(overrides),
        variant_params=params,
    )


def _sni(t: Target) -> str | None:
    """The SNI param a tls or transfer run had (None: none given, or none to send)."""
    params = TLSParams.of(t) if t.probe == "tls" else TransferParams.of(t)
    return params.sni if params.sni_given else None


def _neutral_sni(r: ProbeResult, neutral: str) -> list[Target]:
    t = r.target
    if t.probe not in ("tls", "transfer") or r.failed_operation != Operation.TLS_HANDSHAKE:
        return []
    if r.failure_kind not in _TLS_TRIGGERS or _sni(t) == neutral:
        return []
    return [_variant(t, "tls", NEUTRAL_SNI, {"sni": neutral})]


def _client_hello(r: ProbeResult) -> list[Target]:
    """B4: the same SNI in another ClientHello shape, and the same ClientHello split in
    two TCP segments.  With the neutral-SNI swap they tell an SNI filter from a
    fingerprint filter, and a censor that reassembles from one that matches per packet."""
    t = r.target
    if t.probe not in ("tls", "transfer") or r.failed_operation != Operation.TLS_HANDSHAKE:
        return []
    if r.failure_kind not in _TLS_TRIGGERS:
        return []
    return [
        _variant(t, "tls", variant, override)  # over the endpoint's tls params (its SNI)
        for variant, override in (
            (OTHER_SHAPE, {"shape": "alt"}),
            (SPLIT_HELLO, {"split_hello": True}),
        )
    ]


_Ran = set[tuple[str, str, str, str, int | None]]  # service, endpoint, probe, address, port


def _version_negotiation(r: ProbeResult, ran: _Ran) -> list[Target]:
    t = r.target
    if t.probe != "quic" or r.failure_kind in _CERT:
        return []
    if (t.service, t.endpoint.name, "quic_vn", t.address or "", t.port) in ran:
        return []  # the endpoint's own quic_vn spec already covered this address and port
    return [
        Target(
            t.endpoint, "quic_vn", t.address, t.port, address_source=t.address_source, variant=SWAP
        )
    ]


def _dns(
    r: ProbeResult, resolvers: Sequence[str], asked: set[tuple[str, str, str]]
) -> list[Target]:
    t = r.target
    if t.probe != "dns" or resolver_kind(t.resolver) not in ("system", "udp"):
        return []
    if r.ok and not _DNS_FLAGS & set(r.flags):
        return []
    return [
        Target(t.endpoint, "dns", resolver=rid, variant=SWAP)
        for rid in resolvers
        if resolver_kind(rid) in ("tcp", "doh") and (t.service, t.endpoint.name, rid) not in asked
    ]


def _random_udp(r: ProbeResult) -> list[Target]:
    t = r.target
    if t.probe != "stun" or r.failure_kind != Failure.UDP_NO_RESPONSE:
        return []
    params = StunParams.of(t)
    if params.mode != "binding" or params.transport != "udp":
        return []
    if params.control:
        return []  # the random-UDP control already ran inside this result
    return [_variant(t, "stun", RANDOM_UDP, {"control": True})]


def _repeat(r: ProbeResult) -> list[Target]:
    t = r.target
    if t.probe not in _REPEATED:
        return []
    return [
        Target(
            t.endpoint, t.probe, t.address, t.port, address_source=t.address_source, variant=REPEAT
        )
    ]


def followups(
    results: Iterable[ProbeResult],
    *,
    neutral_sni: str = DEFAULT_NEUTRAL_SNI,
    resolvers: Sequence[str] = (),
) -> list[Target]:
    """The follow-up targets for a pass of results (pure; see the module docstring).

    ``resolvers``: the configured resolver ids (`probe.round.resolver_ids`); only their
    ``tcp:`` and ``doh:`` entries are used for DNS swaps.
    """
    batch = list(results)
    targets = [r.target for r in batch]
    done = {t.key() for t in targets}
    ran: _Ran = {(t.service, t.endpoint.name, t.probe, t.address or "", t.port) for t in targets}
    asked = {(t.service, t.endpoint.name, t.resolver or "") for t in targets if t.probe == "dns"}
    planned: dict[tuple[str, str, str, str, str], Target] = {}
    for r in batch:
        if r.target.variant or r.skipped is not None:
            continue  # never a follow-up of a follow-up; nothing to follow when not measured
        if r.ok and r.target.probe != "dns":
            continue  # a success needs no follow-up (a DNS success may carry tamper flags)
        for t in (
            *_neutral_sni(r, neutral_sni),
            *_client_hello(r),
            *_version_negotiation(r, ran),
            *_dns(r, resolvers, asked),
            *_random_udp(r),
            *([] if r.ok else _repeat(r)),
        ):
            if t.key() not in done:
                planned.setdefault(t.key(), t)
    return list(planned.values())
