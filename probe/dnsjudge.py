"""DNS judgements: what a resolver's answer means.  Pure functions, no I/O.

The codec (`probe.wire.dnsmsg`) reads addresses out of DNS messages and the DNS probe
(`probe.probes.dns`) asks the resolvers; this module judges what came back, for the
probe, the round runner, the offline gate and the verdicts:

- `is_bogon()`: an address no public service would be reached at.
- `suspect_bogon()`: a bogon the service does not itself declare (a lie or a local box).
- `in_prefixes()`: inside one of the service's declared prefixes.
- `compare_answer_sets()`: do two resolvers' answers for one name disagree in a way
  that matters (a lie), as opposed to a CDN handing out different addresses of the
  same service?  `disjoint()` is its last rule, which the verdicts use on their own.
- `dns_consistency()`: that comparison over one round's results, as flags.
- `telling_failure()`: which of a lookup's A and AAAA failures the result carries.
- `resolver_kind()`: system, udp, tcp or doh, from a target's resolver string.

How a failed lookup is *named* (rcode, exception -> failure) belongs to `probe.classify`.
"""

from __future__ import annotations

import ipaddress
from collections import defaultdict
from collections.abc import Hashable, Iterable, Sequence
from dataclasses import dataclass

from .evidence import DnsEvidence
from .model import Failure, ProbeResult, failure_kind

__all__ = [
    "AnswerComparison",
    "IPAddress",
    "IPNetwork",
    "compare_answer_sets",
    "disjoint",
    "dns_consistency",
    "in_prefixes",
    "is_bogon",
    "resolver_kind",
    "suspect_bogon",
    "telling_failure",
]

IPNetwork = ipaddress.IPv4Network | ipaddress.IPv6Network
IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address


# --- bogons ------------------------------------------------------------------------------
# Addresses no public service is reachable at: a resolver answering one of these for a
# public name is lying (censors answer 127.0.0.1, 10.x or a blackhole) or broken.

_V4_BOGONS: tuple[ipaddress.IPv4Network, ...] = tuple(
    ipaddress.IPv4Network(n)
    for n in (
        "0.0.0.0/8",  # "this network", unspecified
        "10.0.0.0/8",  # private (RFC 1918)
        "100.64.0.0/10",  # carrier-grade NAT (RFC 6598)
        "127.0.0.0/8",  # loopback
        "169.254.0.0/16",  # link-local
        "172.16.0.0/12",  # private
        "192.0.0.0/24",  # IETF protocol assignments
        "192.0.2.0/24",  # documentation TEST-NET-1
        "192.88.99.0/24",  # deprecated 6to4 relay anycast
        "192.168.0.0/16",  # private
        "198.18.0.0/15",  # benchmarking
        "198.51.100.0/24",  # documentation TEST-NET-2
        "203.0.113.0/24",  # documentation TEST-NET-3
        "224.0.0.0/4",  # multicast
        "240.0.0.0/4",  # reserved, and 255.255.255.255 broadcast
    )
)

# IPv6 is judged by allocation instead: only 2000::/3 is global unicast, so anything
# outside it is a bogon (loopback, unspecified, v4-mapped, ULA, link-local, multicast,
# site-local, discard ...) except the NAT64 prefixes a DNS64 resolver legitimately
# synthesises.  Inside 2000::/3 a few ranges are reserved.
_V6_GLOBAL = ipaddress.IPv6Network("2000::/3")
_V6_NAT64: tuple[ipaddress.IPv6Network, ...] = (
    ipaddress.IPv6Network("64:ff9b::/96"),  # RFC 6052 well-known prefix
    ipaddress.IPv6Network("64:ff9b:1::/48"),  # RFC 8215 local-use translation
)
_V6_BOGONS_IN_GLOBAL: tuple[ipaddress.IPv6Network, ...] = tuple(
    ipaddress.IPv6Network(n)
    for n in (
        "2001:2::/48",  # benchmarking
        "2001:10::/28",  # deprecated ORCHID
        "2001:db8::/32",  # documentation
        "3fff::/20",  # documentation (RFC 9637)
    )
)


def _address(ip: str | IPAddress) -> IPAddress:
    return ipaddress.ip_address(ip) if isinstance(ip, str) else ip


def is_bogon(ip: str | IPAddress) -> bool:
    """True for loopback, private, link-local, unspecified, multicast, reserved, CGNAT and
    documentation addresses, IPv4 and IPv6.  Raises ValueError for a string that is not an
    IP address."""
    addr = _address(ip)
    if isinstance(addr, ipaddress.IPv4Address):
        return any(addr in net for net in _V4_BOGONS)
    if any(addr in net for net in _V6_NAT64):
        return False
    if addr not in _V6_GLOBAL:
        return True
    return any(addr in net for net in _V6_BOGONS_IN_GLOBAL)


def in_prefixes(ip: str | IPAddress, prefixes: Iterable[IPNetwork]) -> bool:
    """Is the address inside one of the prefixes (of its own family)?"""
    addr = _address(ip)
    return any(addr.version == net.version and addr in net for net in prefixes)


def suspect_bogon(ip: str | IPAddress, prefixes: Iterable[IPNetwork] = ()) -> bool:
    """A bogon that the service does not itself declare (lab services declare 127/8):
    as a DNS answer, a lie or a local box, never a place the service is reached at."""
    return is_bogon(ip) and not in_prefixes(ip, prefixes)


# --- answer consistency ------------------------------------------------------------------


@dataclass(frozen=True)
class AnswerComparison:
    """Whether two answer sets for one name are consistent, and which rule decided."""

    consistent: bool
    reason: str  # identical | one_empty | bogon | within_prefixes | outside_prefixes
    #              | overlap | disjoint


def _suspect(addrs: frozenset[IPAddress], prefixes: Sequence[IPNetwork]) -> frozenset[IPAddress]:
    """Bogons that the service does not itself declare (lab services declare 127/8)."""
    return frozenset(a for a in addrs if suspect_bogon(a, prefixes))


def compare_answer_sets(
    a: Iterable[str | IPAddress],
    b: Iterable[str | IPAddress],
    prefixes: Sequence[IPNetwork] = (),
) -> AnswerComparison:
    """Compare two resolvers' address sets for the same name (A and AAAA together).

    CDNs legitimately answer different addresses to different resolvers, so a plain
    set difference would cry wolf.  The rule, first match wins:

    1. identical sets: consistent.
    2. one set empty, the other not (e.g. NXDOMAIN over UDP, addresses over TCP):
       inconsistent.
    3. one side holds a bogon the service does not declare and the other does not:
       inconsistent (the classic 127.0.0.1 / private-address lie).
    4. the service declares prefixes: both sets entirely inside them = consistent
       (CDN variation within the service); exactly one set with addresses outside
       them = inconsistent.
    5. otherwise (no prefixes, or both sides outside them): consistent if the sets
       share at least one address, inconsistent if disjoint.  Rule 5 can flag a CDN
       that geo-balances with no overlap: that is why prefixes are preferred.
    """
    sa = frozenset(_address(x) for x in a)
    sb = frozenset(_address(x) for x in b)
    if sa == sb:
        return AnswerComparison(True, "identical")
    if not sa or not sb:
        return AnswerComparison(False, "one_empty")
    if bool(_suspect(sa, prefixes)) != bool(_suspect(sb, prefixes)):
        return AnswerComparison(False, "bogon")
    if prefixes:
        out_a = any(not in_prefixes(x, prefixes) for x in sa)
        out_b = any(not in_prefixes(x, prefixes) for x in sb)
        if not out_a and not out_b:
            return AnswerComparison(True, "within_prefixes")
        if out_a != out_b:
            return AnswerComparison(False, "outside_prefixes")
    if disjoint(sa, sb):
        return AnswerComparison(False, "disjoint")
    return AnswerComparison(True, "overlap")


def disjoint(a: Iterable[Hashable], b: Iterable[Hashable]) -> bool:
    """No address in common, compared as given (parsed addresses, or the text of a
    record that may come from another agent and is never parsed: it cannot raise)."""
    return frozenset(a).isdisjoint(b)


# --- one lookup's failure ----------------------------------------------------------------

# When neither A nor AAAA produced an address, the result carries the most telling of
# the two failures: a DNS-level verdict beats a transport symptom, and "the name has no
# address" is only the verdict when both types said so.
_RANK: tuple[str, ...] = (
    Failure.DNS_NXDOMAIN,
    Failure.DNS_REFUSED,
    Failure.DNS_SERVFAIL,
    Failure.DNS_SERVER_MISBEHAVING,
    # anything else (connection_refused, ssl_*, eof_error, unknown_failure ...) ranks here
    Failure.GENERIC_TIMEOUT,
    Failure.DNS_NO_ANSWER,
)
_RANK_OTHER = _RANK.index(Failure.GENERIC_TIMEOUT) - 0.5


def _rank(failure: str) -> float:
    return _RANK.index(failure) if failure in _RANK else _RANK_OTHER


def telling_failure(failures: Iterable[str]) -> str:
    """The failure a lookup with no address reports, from its queries' failures (the
    first of the most telling, in the order given)."""
    return min(failures, key=_rank)


# --- consistency across resolvers --------------------------------------------------------

# Results whose resolver gave a verdict on the name; a timeout, SERVFAIL or refused
# connection says nothing about what the name resolves to and is left out.
_NEGATIVE = frozenset({Failure.DNS_NXDOMAIN, Failure.DNS_NO_ANSWER})
_CONSISTENCY_FLAGS: tuple[str, ...] = (
    "dns_udp_tcp_mismatch",
    "dns_doh_mismatch",
    "dns_system_mismatch",
    "dns_resolver_mismatch",
)


def resolver_kind(resolver: str | None) -> str:
    """``system``, ``udp``, ``tcp`` or ``doh``: the part of a resolver string before its
    first colon (no resolver is the system's).  The config only makes valid ones."""
    return (resolver or "system").split(":", 1)[0]


def _answer_set(result: ProbeResult) -> frozenset[str] | None:
    if result.skipped is not None:
        return None
    kind = failure_kind(result.failure)
    if kind in _NEGATIVE:
        return frozenset()
    if result.ok or kind == Failure.DNS_BOGON:
        evidence = result.evidence
        found = evidence.addresses() if isinstance(evidence, DnsEvidence) else ()
        return frozenset(found)
    return None


def _mismatch_flag(a: str, b: str) -> str:
    kinds = {a, b}
    if kinds == {"udp", "tcp"}:
        return "dns_udp_tcp_mismatch"
    if len(kinds) == 2 and "doh" in kinds:
        return "dns_doh_mismatch"
    if len(kinds) == 2 and "system" in kinds:
        return "dns_system_mismatch"
    return "dns_resolver_mismatch"  # two resolvers of the same kind


def dns_consistency(results: Sequence[ProbeResult]) -> tuple[str, ...]:
    """Flags for resolvers whose answers for the same name disagree.

    Results are grouped by service and host name; within a group every pair of
    results that carry a verdict (addresses, NXDOMAIN or NOERROR-no-data) is
    compared with `compare_answer_sets` using the endpoint's declared prefixes
    (see its docstring for the CDN rule).  The flag names the resolver kinds:
    ``dns_udp_tcp_mismatch`` (censor behaviour B1), ``dns_doh_mismatch`` (DoH is
    the control), ``dns_system_mismatch``, ``dns_resolver_mismatch`` (same kind).
    """
    groups: dict[tuple[str, str], list[ProbeResult]] = defaultdict(list)
    for result in results:
        if result.target.probe == "dns":
            host = result.target.endpoint.host.lower().rstrip(".")
            groups[(result.target.service, host)].append(result)
    flags: set[str] = set()
    for group in groups.values():
        flags.update(_group_flags(group))
    return tuple(f for f in _CONSISTENCY_FLAGS if f in flags)


def _group_flags(group: Iterable[ProbeResult]) -> set[str]:
    judged = [(r, s) for r in group if (s := _answer_set(r)) is not None]
    prefixes = tuple(p for r, _ in judged for p in r.target.endpoint.prefixes)
    flags: set[str] = set()
    for i, (ra, sa) in enumerate(judged):
        for rb, sb in judged[i + 1 :]:
            if not compare_answer_sets(sa, sb, prefixes).consistent:
                kinds = resolver_kind(ra.target.resolver), resolver_kind(rb.target.resolver)
                flags.add(_mismatch_flag(*kinds))
    return flags
