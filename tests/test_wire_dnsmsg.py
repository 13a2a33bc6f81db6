"""probe.wire.dnsmsg: parsing raises only WireError, answer extraction, bogons, set comparison."""

from __future__ import annotations

import ipaddress

import dns.message
import dns.rcode
import dns.rrset
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from probe.wire import WireError
from probe.wire.dnsmsg import (
    MAX_MESSAGE,
    addresses,
    build_query,
    compare_answer_sets,
    in_prefixes,
    is_bogon,
    matches_query,
    parse_message,
    rcode_text,
)

NET = ipaddress.ip_network


def _reply(qname: str, rdtype: str, *records: tuple[str, str, str]) -> dns.message.Message:
    """A response to a fresh query with (owner, type, value) records in the answer section."""
    query = build_query(qname, rdtype)
    reply = dns.message.make_response(query)
    for owner, rtype, value in records:
        reply.answer.append(dns.rrset.from_text(owner, 60, "IN", rtype, value))
    return reply


def _valid_reply_bytes() -> bytes:
    return _reply(
        "g.whatsapp.net",
        "A",
        ("g.whatsapp.net.", "CNAME", "edge.example."),
        ("edge.example.", "A", "157.240.1.1"),
    ).to_wire()


# --- parsing ----------------------------------------------------------------------------


@given(st.binary(max_size=600))
@settings(max_examples=400)
def test_arbitrary_bytes_raise_only_wire_error(data: bytes) -> None:
    try:
        message = parse_message(data)
    except WireError:
        return
    # Whatever parses must be safe to inspect further.
    rcode_text(message)
    addresses(message, "g.whatsapp.net", "A")
    addresses(message, "g.whatsapp.net", "AAAA")


@given(st.data())
@settings(max_examples=400)
def test_mutated_replies_raise_only_wire_error(data: st.DataObject) -> None:
    """Flipped, cut and extended real replies exercise the rdata parsers, not just the header."""
    wire = bytearray(_valid_reply_bytes())
    for _ in range(data.draw(st.integers(1, 8))):
        index = data.draw(st.integers(0, len(wire) - 1))
        wire[index] = data.draw(st.integers(0, 255))
    cut = data.draw(st.integers(0, len(wire)))
    tail = data.draw(st.binary(max_size=40))
    mutated = bytes(wire[:cut]) + tail
    query = build_query("g.whatsapp.net", "A")
    try:
        message = parse_message(mutated)
    except WireError:
        return
    matches_query(query, message)
    addresses(message, "g.whatsapp.net", "A")


def test_empty_and_short_input_is_wire_error() -> None:
    for data in (b"", b"\x00", b"\x12\x34\x81\x80"):
        with pytest.raises(WireError):
            parse_message(data)


def test_oversized_input_is_rejected_before_parsing() -> None:
    with pytest.raises(WireError, match="exceeds"):
        parse_message(b"\x00" * (MAX_MESSAGE + 1))


def test_a_valid_reply_round_trips() -> None:
    message = parse_message(_valid_reply_bytes())
    assert rcode_text(message) == "NOERROR"


# --- queries and matching ------------------------------------------------------------------


def test_build_query_sets_rd_edns_and_the_given_id() -> None:
    query = build_query("e1.whatsapp.net", "AAAA", qid=0x1234)
    assert query.id == 0x1234
    assert query.flags & dns.flags.RD
    assert query.edns == 0
    assert query.question[0].rdtype == dns.rdatatype.AAAA


def test_build_query_rejects_an_unencodable_name() -> None:
    with pytest.raises(ValueError, match="cannot build"):
        build_query("a" * 64 + ".example", "A")


def test_matches_query_checks_id_and_question() -> None:
    query = build_query("g.whatsapp.net", "A")
    good = dns.message.make_response(query)
    assert matches_query(query, good)
    wrong_id = dns.message.make_response(query)
    wrong_id.id = (query.id + 1) & 0xFFFF
    assert not matches_query(query, wrong_id)
    other_name = dns.message.make_response(build_query("e1.whatsapp.net", "A", qid=query.id))
    assert not matches_query(query, other_name)
    assert not matches_query(query, query)  # a query (QR clear) is no reply


def test_rcode_text_names_the_code() -> None:
    reply = _reply("x.example", "A")
    reply.set_rcode(dns.rcode.NXDOMAIN)
    assert rcode_text(parse_message(reply.to_wire())) == "NXDOMAIN"


# --- answer extraction -----------------------------------------------------------------------


def test_addresses_follow_the_cname_chain() -> None:
    reply = parse_message(_valid_reply_bytes())
    assert addresses(reply, "g.whatsapp.net", "A") == ("157.240.1.1",)
    assert addresses(reply, "g.whatsapp.net.", "A") == ("157.240.1.1",)
    assert addresses(reply, "G.WhatsApp.Net", "A") == ("157.240.1.1",)


def test_addresses_ignore_records_for_other_names_and_types() -> None:
    reply = _reply(
        "g.whatsapp.net",
        "A",
        ("unrelated.example.", "A", "10.0.0.1"),
        ("g.whatsapp.net.", "AAAA", "2a03:2880::1"),
        ("g.whatsapp.net.", "A", "157.240.1.1"),
    )
    assert addresses(reply, "g.whatsapp.net", "A") == ("157.240.1.1",)
    assert addresses(reply, "g.whatsapp.net", "AAAA") == ("2a03:2880::1",)


def test_a_cname_loop_ends() -> None:
    reply = _reply(
        "a.example",
        "A",
        ("a.example.", "CNAME", "b.example."),
        ("b.example.", "CNAME", "a.example."),
    )
    assert addresses(reply, "a.example", "A") == ()


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
