"""QUIC long header / Version Negotiation over aioquic: the probe's layout, round trips, fuzz."""

from __future__ import annotations

import contextlib
import struct

import pytest
from aioquic.buffer import Buffer  # type: ignore[attr-defined]  # re-exported by aioquic
from aioquic.quic.packet import QuicPacketType, encode_quic_version_negotiation, pull_quic_header
from hypothesis import given
from hypothesis import strategies as st

from probe.wire import WireError
from probe.wire.quic import (
    MAX_CID_V1,
    MAX_VERSIONS,
    MIN_INITIAL_SIZE,
    QUIC_V1,
    QUIC_V2,
    VersionNegotiation,
    build_version_negotiation,
    build_vn_probe,
    is_reserved_version,
    parse_long_header,
    parse_version_negotiation,
    reserved_version,
)

DCID = bytes(range(1, 9))
SCID = bytes(range(0x11, 0x19))
RESERVED = 0xBABABABA
versions_st = st.lists(st.integers(1, 0xFFFFFFFF), min_size=1, max_size=MAX_VERSIONS)


def test_vn_probe_is_an_initial_sized_long_header_with_a_reserved_version() -> None:
    packet = build_vn_probe(RESERVED, DCID, SCID, noise=b"\xff" * 2000)
    assert len(packet) == MIN_INITIAL_SIZE
    assert packet[0] == 0xC0  # long header + fixed bit + type Initial
    assert struct.unpack_from("!I", packet, 1)[0] == RESERVED
    header = parse_long_header(packet)
    assert (header.version, header.dcid, header.scid) == (RESERVED, DCID, SCID)
    # the noise fills the payload: it must not look like an all-zero (fingerprintable) pad
    assert packet[-1] == 0xFF


def test_vn_probe_parses_as_a_v1_style_initial_in_aioquic() -> None:
    # aioquic (like other servers) parses the v1 Initial layout before checking the version;
    # a packet it cannot parse is dropped without a Version Negotiation.
    packet = build_vn_probe(RESERVED, DCID, SCID, size=1300)
    header = pull_quic_header(Buffer(data=packet), host_cid_length=8)
    assert header.version == RESERVED
    assert header.packet_type == QuicPacketType.INITIAL
    assert (header.destination_cid, header.source_cid) == (DCID, SCID)
    assert header.packet_length == 1300  # the Length field covers exactly the rest


def test_vn_probe_without_noise_is_zero_padded() -> None:
    packet = build_vn_probe(RESERVED, DCID, b"")
    assert len(packet) == MIN_INITIAL_SIZE
    assert packet.endswith(b"\x00" * 100)


@pytest.mark.parametrize("version", [0, QUIC_V1, QUIC_V2])
def test_vn_probe_refuses_versions_a_server_would_process(version: int) -> None:
    with pytest.raises(WireError):
        build_vn_probe(version, DCID, SCID)


@pytest.mark.parametrize(
    ("dcid", "scid", "size"),
    [
        (b"1234567", SCID, MIN_INITIAL_SIZE),  # client DCID < 8 bytes
        (b"x" * 21, SCID, MIN_INITIAL_SIZE),  # > 20 bytes in v1
        (DCID, b"x" * 21, MIN_INITIAL_SIZE),
        (DCID, SCID, MIN_INITIAL_SIZE - 1),  # servers drop < 1200
        (DCID, SCID, 1500),  # beyond one Ethernet-MTU datagram
    ],
)
def test_vn_probe_rejects_bad_shapes(dcid: bytes, scid: bytes, size: int) -> None:
    with pytest.raises(WireError):
        build_vn_probe(RESERVED, dcid, scid, size=size)


def test_reserved_versions() -> None:
    assert is_reserved_version(0xBABABABA)
    assert is_reserved_version(0x1A2A3A4A)
    assert not is_reserved_version(QUIC_V1)
    assert not is_reserved_version(QUIC_V2)


@given(st.integers(0, 2**64))
def test_reserved_version_is_always_reserved(seed: int) -> None:
    version = reserved_version(seed)
    assert is_reserved_version(version)
    assert 0 < version <= 0xFFFFFFFF


def test_parse_aioquic_version_negotiation() -> None:
    data = encode_quic_version_negotiation(
        source_cid=DCID, destination_cid=SCID, supported_versions=[QUIC_V1, QUIC_V2]
    )
    vn = parse_version_negotiation(data)
    assert vn == VersionNegotiation(dcid=SCID, scid=DCID, versions=(QUIC_V1, QUIC_V2))
    assert vn.echoes(sent_dcid=DCID, sent_scid=SCID)
    assert not vn.echoes(sent_dcid=SCID, sent_scid=DCID)  # swapped IDs are no echo


def test_aioquic_parses_our_version_negotiation() -> None:
    data = build_version_negotiation(SCID, DCID, (QUIC_V2, RESERVED))
    header = pull_quic_header(Buffer(data=data), host_cid_length=8)
    assert header.packet_type == QuicPacketType.VERSION_NEGOTIATION
    assert header.supported_versions == [QUIC_V2, RESERVED]
    assert (header.destination_cid, header.source_cid) == (SCID, DCID)


@pytest.mark.parametrize(
    ("data", "why"),
    [
        (b"", "empty"),
        (b"\x40" + bytes(20), "short header"),
        (b"\x80\x00\x00", "truncated version"),
        (b"\x80\x00\x00\x00\x00\x08\x01", "truncated DCID"),
        (b"\x80\x00\x00\x00\x00\x00", "SCID length missing"),
        (b"\x80\x00\x00\x00\x00\x00\x00", "empty version list"),
        (b"\x80\x00\x00\x00\x00\x00\x00\x00\x00\x00", "version list not a multiple of 4"),
        (b"\xc0\x00\x00\x00\x01\x00\x00" + b"\x00" * 4, "a v1 packet is not a VN"),
        (b"\x80\x00\x00\x00\x00\x00\x00" + b"\x00\x00\x00\x01" * (MAX_VERSIONS + 1), "giant"),
    ],
)
def test_parse_version_negotiation_rejects(data: bytes, why: str) -> None:
    with pytest.raises(WireError):
        parse_version_negotiation(data)


def test_build_version_negotiation_rejects_version_zero_and_empty_offers() -> None:
    with pytest.raises(WireError):
        build_version_negotiation(DCID, SCID, ())
    with pytest.raises(WireError):
        build_version_negotiation(DCID, SCID, (QUIC_V1, 0))


def test_connection_ids_beyond_v1_s_20_bytes_are_refused_both_ways() -> None:
    # RFC 8999 allows 255 for unknown versions; we (and aioquic) stop at v1's 20, which
    # every VN answering our probe respects: it echoes the 8..20-byte IDs we sent.
    with pytest.raises(WireError):
        build_version_negotiation(b"x" * 21, SCID, (QUIC_V1,))
    long_cid = b"\x80\x00\x00\x00\x00\x15" + b"x" * 21 + b"\x00" + b"\x00\x00\x00\x01"
    with pytest.raises(WireError):
        parse_version_negotiation(long_cid)
    with pytest.raises(WireError):
        parse_long_header(long_cid)


def test_version_negotiation_bytes_match_rfc_8999_layout() -> None:
    # An independent oracle for aioquic's encoder: the RFC 8999 §6 layout, by hand.
    data = build_version_negotiation(SCID, DCID, (QUIC_V1, RESERVED))
    assert data[0] & 0x80
    assert data[1:] == (
        b"\x00\x00\x00\x00"
        + bytes([len(SCID)]) + SCID
        + bytes([len(DCID)]) + DCID
        + struct.pack("!II", QUIC_V1, RESERVED)
    )  # fmt: skip


@given(
    st.binary(max_size=MAX_CID_V1),
    st.binary(max_size=MAX_CID_V1),
    versions_st.filter(lambda vs: 0 not in vs),
)
def test_version_negotiation_round_trip(dcid: bytes, scid: bytes, versions: list[int]) -> None:
    data = build_version_negotiation(dcid, scid, tuple(versions))
    assert data[0] & 0x80
    assert parse_version_negotiation(data) == VersionNegotiation(dcid, scid, tuple(versions))


@given(st.binary(max_size=2048))
def test_parsers_raise_only_wire_error_on_arbitrary_bytes(data: bytes) -> None:
    for parse in (parse_long_header, parse_version_negotiation):
        with contextlib.suppress(WireError):
            parse(data)


@given(st.integers(0x80, 0xFF), st.binary(max_size=600))
def test_vn_parser_on_vn_shaped_garbage(first: int, rest: bytes) -> None:
    # Reach past the header checks: long-header bit set and version 0.
    data = bytes([first]) + b"\x00\x00\x00\x00" + rest
    try:
        vn = parse_version_negotiation(data)
    except WireError:
        return
    assert 1 <= len(vn.versions) <= MAX_VERSIONS
    assert len(data) == 7 + len(vn.dcid) + len(vn.scid) + 4 * len(vn.versions)
