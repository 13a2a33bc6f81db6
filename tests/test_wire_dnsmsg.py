"""probe.wire.dnsmsg: parsing raises only WireError, queries, answer extraction."""

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
