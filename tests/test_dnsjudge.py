"""probe.dnsjudge: bogons, declared prefixes, when two resolvers' answers disagree, and
which failure a lookup reports (dns_consistency over results: tests/test_probe_dns.py)."""

from __future__ import annotations

import ipaddress

import pytest
from hypothesis import given
from hypothesis import strategies as st

from probe.dnsjudge import (
    compare_answer_sets,
    disjoint,
    in_prefixes,
    is_bogon,
    resolver_kind,
    suspect_bogon,
    telling_failure,
)
from probe.model import Failure

# Data only: these are pure functions over address values and nothing in this file opens a
# socket.  The public addresses below (Telegram, Meta, Google, Cloudflare) are examples of
# what must NOT read as a bogon; they are never contacted.
NET = ipaddress.ip_network


# --- bogons ------------------------------------------------------------------------------------

BOGONS = [
    "0.0.0.0", "10.1.2.3", "100.64.0.1", "127.0.0.1", "169.254.1.1", "172.16.0.1",
    "192.0.0.8", "192.0.2.1", "192.168.1.1", "198.18.0.1", "198.51.100.7", "203.0.113.9",
    "224.0.0.1", "240.0.0.1", "255.255.255.255",
    "::", "::1", "::ffff:1.2.3.4", "fc00::1", "fd12::1", "fe80::1", "fec0::1", "ff02::1",
    "100::1", "2001:db8::1", "3fff::1", "2001:2::1", "2001:10::1",
]  # fmt: skip
PUBLIC = [
    "149.154.167.51", "157.240.1.1", "8.8.8.8", "1.1.1.1", "91.108.56.130",
    "2001:67c:4e8:f002::a", "2a03:2880::1", "2001:4860:4860::8888",
    "64:ff9b::8.8.8.8",  # NAT64 (DNS64 resolvers synthesise these legitimately)
]  # fmt: skip


@pytest.mark.parametrize("ip", BOGONS)
def test_bogons(ip: str) -> None:
    assert is_bogon(ip)
    assert is_bogon(ipaddress.ip_address(ip))


@pytest.mark.parametrize("ip", PUBLIC)
def test_public_addresses_are_not_bogons(ip: str) -> None:
    assert not is_bogon(ip)


@given(st.ip_addresses())
def test_every_special_address_is_a_bogon(
    ip: ipaddress.IPv4Address | ipaddress.IPv6Address,
) -> None:
    special = ip.is_loopback or ip.is_link_local or ip.is_multicast or ip.is_unspecified
    if isinstance(ip, ipaddress.IPv4Address):
        special = special or ip.is_private or ip.is_reserved
    else:
        special = special or ip.is_site_local or ip.ipv4_mapped is not None
    if special:
        assert is_bogon(ip)


def test_is_bogon_rejects_a_non_address() -> None:
    with pytest.raises(ValueError, match="does not appear"):
        is_bogon("g.whatsapp.net")


def test_in_prefixes_matches_only_the_same_family() -> None:
    prefixes = (NET("127.0.0.0/8"), NET("2001:67c:4e8::/48"))
    assert in_prefixes("127.0.0.2", prefixes)
    assert in_prefixes("2001:67c:4e8:f002::a", prefixes)
    assert not in_prefixes("::ffff:127.0.0.2", prefixes)
    assert not in_prefixes("10.0.0.1", prefixes)
    assert not in_prefixes("10.0.0.1", ())


# --- answer-set comparison -----------------------------------------------------------------

TG = (NET("149.154.160.0/20"), NET("91.108.56.0/22"))


@pytest.mark.parametrize(
    ("a", "b", "prefixes", "consistent", "reason"),
    [
        (["149.154.167.51"], ["149.154.167.51"], (), True, "identical"),
        ([], [], (), True, "identical"),
        ([], ["149.154.167.51"], (), False, "one_empty"),
        (["127.0.0.1"], ["149.154.167.51"], (), False, "bogon"),
        (["10.10.34.35"], ["149.154.167.51"], TG, False, "bogon"),
        (["149.154.167.51"], ["149.154.175.50"], TG, True, "within_prefixes"),
        (["149.154.167.51"], ["91.108.56.130", "149.154.175.50"], TG, True, "within_prefixes"),
        (["8.8.8.8"], ["149.154.167.51"], TG, False, "outside_prefixes"),
        (["8.8.8.8", "149.154.167.51"], ["149.154.167.51", "1.1.1.1"], TG, True, "overlap"),
        (["157.240.1.1", "157.240.1.2"], ["157.240.1.2"], (), True, "overlap"),
        (["157.240.1.1"], ["157.240.2.2"], (), False, "disjoint"),
        # lab services declare 127/8: loopback answers are theirs, not a lie
        (["127.0.0.2"], ["127.0.0.3"], (NET("127.0.0.0/8"),), True, "within_prefixes"),
    ],
)
def test_compare_answer_sets(
    a: list[str], b: list[str], prefixes: tuple, consistent: bool, reason: str
) -> None:
    result = compare_answer_sets(a, b, prefixes)
    assert (result.consistent, result.reason) == (consistent, reason)
    mirrored = compare_answer_sets(b, a, prefixes)
    assert (mirrored.consistent, mirrored.reason) == (consistent, reason)


@given(
    st.lists(st.ip_addresses(), max_size=5),
    st.lists(st.ip_addresses(), max_size=5),
)
def test_compare_answer_sets_is_symmetric_and_reflexive(a: list, b: list) -> None:
    assert compare_answer_sets(a, b, TG) == compare_answer_sets(b, a, TG)
    assert compare_answer_sets(a, a, TG).consistent


def test_suspect_bogon_spares_what_the_service_declares() -> None:
    lab = (NET("127.0.0.0/8"),)
    assert suspect_bogon("127.0.0.2")
    assert not suspect_bogon("127.0.0.2", lab)
    assert suspect_bogon("10.0.0.1", lab)  # a bogon outside the declared prefixes
    assert not suspect_bogon("149.154.167.51")  # public: never suspect


# declared prefixes that bogons do fall into (127/8 in the lab, 10/8, ULA) and some they don't
PREFIX_POOL = [
    NET(n)
    for n in ("127.0.0.0/8", "10.0.0.0/8", "0.0.0.0/0", "149.154.160.0/20", "fd00::/8", "::/0")
]


@given(st.ip_addresses(), st.lists(st.sampled_from(PREFIX_POOL), max_size=3))
def test_suspect_bogon_is_a_bogon_outside_the_prefixes(
    ip: ipaddress.IPv4Address | ipaddress.IPv6Address,
    prefixes: list[ipaddress.IPv4Network | ipaddress.IPv6Network],
) -> None:
    assert suspect_bogon(ip, prefixes) == (is_bogon(ip) and not in_prefixes(ip, prefixes))
    if suspect_bogon(ip, prefixes):
        assert not any(ip.version == n.version and ip in n for n in prefixes)


def test_disjoint_compares_text_as_given_and_never_raises() -> None:
    assert disjoint(["157.240.1.1"], ["157.240.9.9"])
    assert not disjoint(["157.240.1.1", "157.240.1.2"], ["157.240.1.2"])
    assert disjoint([], ["157.240.1.1"])
    assert disjoint(["not an address"], ["157.240.1.1"])  # another agent's record: no raise


# --- which failure a lookup reports ------------------------------------------------------------


@pytest.mark.parametrize(
    ("failures", "telling"),
    [
        # a DNS-level verdict beats a transport symptom, whichever query gave it
        ([Failure.GENERIC_TIMEOUT, Failure.DNS_NXDOMAIN], Failure.DNS_NXDOMAIN),
        ([Failure.DNS_SERVFAIL, Failure.DNS_REFUSED], Failure.DNS_REFUSED),
        (["connection_refused", Failure.GENERIC_TIMEOUT], "connection_refused"),
        # "no address" is the verdict only when both types said so
        ([Failure.DNS_NO_ANSWER, Failure.GENERIC_TIMEOUT], Failure.GENERIC_TIMEOUT),
        ([Failure.DNS_NO_ANSWER, Failure.DNS_NO_ANSWER], Failure.DNS_NO_ANSWER),
        # two unranked failures: the first, as given (A before AAAA)
        (["eof_error", "connection_reset"], "eof_error"),
    ],
)
def test_telling_failure(failures: list[str], telling: str) -> None:
    assert telling_failure(failures) == telling


@pytest.mark.parametrize(
    ("resolver", "kind"),
    [
        (None, "system"),
        ("system", "system"),
        ("udp:127.0.0.1:53", "udp"),
        ("tcp:[::1]:53", "tcp"),
        ("doh:https://127.0.0.1:8443/dns-query", "doh"),
    ],
)
def test_resolver_kind(resolver: str | None, kind: str) -> None:
    assert resolver_kind(resolver) == kind
