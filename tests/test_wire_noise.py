"""WhatsApp Noise opening codec: header, framing, protobuf subset, hellos, and fuzzing."""

from __future__ import annotations

import contextlib

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from probe.wire import WireError
from probe.wire import noise as n

KEY = bytes(range(32))


def _server_hello(**overrides: bytes) -> n.ServerHello:
    fields = {"ephemeral": KEY, "static": bytes(48), "payload": b"\x01" * 40} | overrides
    return n.ServerHello(**fields)


def test_header_is_wa_and_two_version_bytes() -> None:
    assert n.header() == bytes.fromhex("57410603")
    assert n.header((5, 2)) == b"WA\x05\x02"
    assert n.parse_header(n.header((6, 5))) == (6, 5)


@pytest.mark.parametrize("version", [(6,), (6, 256), (-1, 3), "63", (6, 3, 1)])
def test_header_rejects_bad_versions(version: object) -> None:
    with pytest.raises(WireError):
        n.header(version)  # type: ignore[arg-type]


def test_parse_header_rejects_other_protocols() -> None:
    with pytest.raises(WireError):
        n.parse_header(b"\x16\x03\x01\x02")  # a TLS record, e.g. a client on the wrong port


def test_client_hello_bytes_are_minimal_protobuf() -> None:
    # field 2 (len) { field 1 (len) 32 bytes }: 0x12 0x22 0x0a 0x20 <key>
    assert n.client_hello(KEY) == bytes.fromhex("12220a20") + KEY


def test_client_hello_packet_layout() -> None:
    packet = n.client_hello_packet(KEY)
    assert packet[:4] == b"WA\x06\x03"
    assert int.from_bytes(packet[4:7], "big") == len(packet) - 7 == 36
    assert n.parse_client_hello(packet[7:]) == KEY


def test_client_hello_needs_a_32_byte_key() -> None:
    with pytest.raises(WireError):
        n.client_hello(KEY[:31])


def test_fresh_ephemeral_keys_are_32_bytes_and_differ() -> None:
    first = n.public_bytes(n.new_ephemeral())
    second = n.public_bytes(n.new_ephemeral())
    assert len(first) == len(second) == 32
    assert first != second


def test_server_hello_round_trip() -> None:
    hello = _server_hello()
    assert n.parse_server_hello(n.encode_server_hello(hello)) == hello


@pytest.mark.parametrize("value", [0, 1, 127, 128, 300, 2**21, 2**63])
def test_varint_round_trip(value: int) -> None:
    encoded = n.encode_varint(value)
    assert n.decode_varint(encoded + b"\xff", 0) == (value, len(encoded))


def test_varint_limits() -> None:
    with pytest.raises(WireError, match="truncated"):
        n.decode_varint(b"\x80\x80", 0)
    with pytest.raises(WireError, match="10 bytes"):
        n.decode_varint(b"\x80" * 11, 0)
    with pytest.raises(WireError):
        n.encode_varint(-1)


def test_unknown_fields_are_skipped() -> None:
    # varint field 9, fixed64 field 10 and fixed32 field 11 around the real content
    extra = bytes([9 << 3 | 0, 0x96, 0x01]) + bytes([10 << 3 | 1]) + bytes(8)
    extra += bytes([11 << 3 | 5]) + bytes(4)
    payload = extra + n.encode_server_hello(_server_hello())
    assert n.parse_server_hello(payload).ephemeral == KEY


@pytest.mark.parametrize(
    ("hello", "match"),
    [
        (_server_hello(ephemeral=KEY[:16]), "ephemeral"),
        (_server_hello(static=b""), "static"),
        (_server_hello(static=bytes(32)), "static"),  # a plaintext key: not encrypted
        (_server_hello(payload=b""), "payload"),
        (_server_hello(payload=bytes(16)), "payload"),  # a bare tag carries no certificate
    ],
)
def test_structurally_invalid_server_hello_is_rejected(hello: n.ServerHello, match: str) -> None:
    with pytest.raises(WireError, match=match):
        n.parse_server_hello(n.encode_server_hello(hello))


def test_a_reflected_client_hello_is_not_a_server_hello() -> None:
    with pytest.raises(WireError, match="without serverHello"):
        n.parse_server_hello(n.client_hello(KEY))


def test_repeated_and_overrunning_fields_are_rejected() -> None:
    encoded = n.encode_server_hello(_server_hello())
    with pytest.raises(WireError, match="repeated"):
        n.parse_server_hello(encoded + encoded)
    with pytest.raises(WireError, match="overruns"):
        n.parse_server_hello(encoded[:-1])
    with pytest.raises(WireError, match="wire type"):
        n.parse_server_hello(bytes([1 << 3 | 3]))  # start-group: not in these messages
    with pytest.raises(WireError, match="field number 0"):
        n.parse_server_hello(b"\x02\x00")


@pytest.mark.parametrize(
    ("data", "match"),
    [(b"\x00\x00\x00", "empty"), (b"HTT", "exceeds"), (b"\x00\x01", "3 bytes")],
)
def test_frame_length_bounds(data: bytes, match: str) -> None:
    with pytest.raises(WireError, match=match):
        n.decode_frame_length(data)


def test_frame_round_trip() -> None:
    framed = n.frame(b"x" * 300)
    assert n.decode_frame_length(framed[:3]) == 300
    assert framed[3:] == b"x" * 300


@settings(max_examples=500, deadline=None)
@given(st.binary(max_size=300))
def test_fuzz_parsers_raise_only_wire_error(data: bytes) -> None:
    for parse in (n.parse_server_hello, n.parse_client_hello, n.parse_header):
        with contextlib.suppress(WireError):
            parse(data)
    with contextlib.suppress(WireError):
        n.decode_frame_length(data[:3])


@settings(max_examples=300, deadline=None)
@given(st.data())
def test_fuzz_mutated_server_hello_raises_only_wire_error(data: st.DataObject) -> None:
    payload = bytearray(n.encode_server_hello(_server_hello(payload=b"\x5a" * 40)))
    index = data.draw(st.integers(min_value=0, max_value=len(payload) - 1))
    payload[index] = data.draw(st.integers(min_value=0, max_value=255))
    cut = data.draw(st.integers(min_value=0, max_value=len(payload)))
    try:
        hello = n.parse_server_hello(bytes(payload[:cut]))
    except WireError:
        return
    assert len(hello.ephemeral) == 32
