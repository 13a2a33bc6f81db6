"""DNS judgements: what a resolver's answer means.  Pure functions over addresses.

The codec (`probe.wire.dnsmsg`) reads addresses out of DNS messages; this module judges
them, for the DNS probe, the round runner, the offline gate and the verdicts:

- `is_bogon()`: an address no public service would be reached at.
- `suspect_bogon()`: a bogon the service does not itself declare (a lie or a local box).
- `in_prefixes()`: inside one of the service's declared prefixes.
- `compare_answer_sets()`: do two resolvers' answers for one name disagree in a way
  that matters (a lie), as opposed to a CDN handing out different addresses of the
  same service?

How a failed lookup is *named* (rcode, exception -> failure) belongs to `probe.classify`.
"""

from __future__ import annotations

import ipaddress
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

__all__ = [
    "AnswerComparison",
    "IPAddress",
    "IPNetwork",
    "compare_answer_sets",
    "in_prefixes",
    "is_bogon",
    "suspect_bogon",
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
    if sa & sb:
        return AnswerComparison(True, "overlap")
    return AnswerComparison(False, "disjoint")
