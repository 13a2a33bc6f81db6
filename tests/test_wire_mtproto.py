"""MTProto first-exchange codec: layouts from the MTProto docs, round trips, and fuzzing."""

from __future__ import annotations

import contextlib
import struct

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from probe.wire import WireError
from probe.wire import mtproto as m

NONCE = bytes.fromhex("75e622f3bc7d714632b833821fd7bb0c")

# "Received payload" of the resPQ in core.telegram.org/mtproto/samples-auth_key
DOCS_RES_PQ = bytes.fromhex(
    "0000000000000000014c527921a97268"
    "500000006324160575e622f3bc7d7146"
    "32b833821fd7bb0c8ec53ec050cb2d47"
    "5b457baf445b49f50816e748b29522c6"
    "8f00000015c4b51c0300000085fd64de"
    "851d9dd0a5b7f709355fc30b216be86c"
    "022bb4c3"
)


def _valid_res_pq_payload(nonce: bytes = NONCE, fingerprints: tuple[int, ...] = (1, -2)) -> bytes:
    res = m.ResPQ(nonce, bytes(range(16)), bytes.fromhex("17ed48941a08f981"), fingerprints)
    return m.unencrypted_message(m.message_id(1_700_000_000.5) | 1, m.encode_res_pq(res))


def test_req_pq_multi_packet_matches_the_documented_layout() -> None:
    packet = m.req_pq_multi_packet(NONCE, 1_750_000_000.25)
    assert packet[:4] == b"\xee\xee\xee\xee"
    assert struct.unpack("<i", packet[4:8]) == (40,)  # 20-byte header + 20-byte body
    payload = packet[8:]
    assert payload[:8] == bytes(8)  # auth_key_id = 0: a plain-text message
    assert struct.unpack("<i", payload[16:20]) == (20,)
    assert payload[20:24] == bytes.fromhex("f18e7ebe")  # constructor as the docs print it
    assert payload[24:] == NONCE


def test_message_id_is_time_based_and_divisible_by_4() -> None:
    msg_id = m.message_id(1_750_000_000.75)
    assert msg_id % 4 == 0
    assert msg_id >> 32 == 1_750_000_000
    assert m.message_id(1_750_000_001.0) > msg_id


def test_message_id_rejects_times_outside_int64() -> None:
    with pytest.raises(WireError):
        m.message_id(-1.0)
    with pytest.raises(WireError):
        m.message_id(2.0**31)


def test_nonce_must_be_16_bytes() -> None:
    with pytest.raises(WireError):
        m.req_pq_multi(b"short")


def test_docs_sample_res_pq_parses() -> None:
    reply = m.parse_reply(DOCS_RES_PQ)
    assert isinstance(reply, m.ResPQ)
    assert reply.nonce == NONCE
    assert reply.server_nonce == bytes.fromhex("8ec53ec050cb2d475b457baf445b49f5")
    assert reply.pq == bytes.fromhex("16e748b29522c68f")
    assert len(reply.fingerprints) == 3
    assert m.parse_unencrypted(DOCS_RES_PQ)[0] % 4 == 1  # a server's answer id


def test_res_pq_round_trip() -> None:
    fingerprints = (0x7FFF_FFFF_FFFF_FFFF, -(2**63), 0)
    reply = m.parse_reply(_valid_res_pq_payload(fingerprints=fingerprints))
    assert reply == m.ResPQ(
        NONCE, bytes(range(16)), bytes.fromhex("17ed48941a08f981"), fingerprints
    )


def test_req_pq_multi_round_trip_for_the_server_side() -> None:
    packet = m.req_pq_multi_packet(NONCE, 1_750_000_000.0)
    assert m.decode_header(packet[4:8]) == 40
    msg_id, nonce = m.parse_req_pq_multi(packet[8:])
    assert nonce == NONCE
    assert msg_id == m.message_id(1_750_000_000.0)


@pytest.mark.parametrize("length", [0, 1, 5, 253, 254, 255, 1000, 70_000])
def test_tl_bytes_round_trip_and_padding(length: int) -> None:
    value = bytes(i % 251 for i in range(length))
    encoded = m.encode_tl_bytes(value)
    assert len(encoded) % 4 == 0
    assert encoded[0] == (254 if length > 253 else length)
    decoded, end = m.decode_tl_bytes(encoded + b"tail")
    assert (decoded, end) == (value, len(encoded))


def test_tl_bytes_length_byte_255_is_invalid() -> None:
    with pytest.raises(WireError, match="0xff"):
        m.decode_tl_bytes(b"\xff\x00\x00\x00")


def test_framed_transport_error_is_recognised() -> None:
    packet = m.encode_transport_error(-404)
    assert packet == struct.pack("<ii", 4, -404)
    assert m.decode_header(packet[:4]) == 4
    assert m.parse_reply(packet[4:]) == m.TransportError(-404, framed=True)


def test_bare_transport_error_is_recognised() -> None:
    assert m.decode_header(struct.pack("<i", -429)) == m.TransportError(-429, framed=False)


def test_positive_4_byte_packet_is_not_an_error_code() -> None:
    with pytest.raises(WireError, match="neither"):
        m.parse_reply(struct.pack("<i", 7))


@pytest.mark.parametrize(
    ("header", "match"),
    [
        (struct.pack("<i", 4097), "exceeds"),
        (struct.pack("<i", 2), "shorter"),
        (struct.pack("<i", -(2**31)), "negative"),
        (b"HTTP", "exceeds"),  # a block page where a length belongs
        (b"\x01\x00", "4 bytes"),
    ],
)
def test_bad_headers_are_rejected(header: bytes, match: str) -> None:
    with pytest.raises(WireError, match=match):
        m.decode_header(header)


def test_encrypted_message_is_rejected() -> None:
    payload = bytearray(_valid_res_pq_payload())
    payload[0] = 1
    with pytest.raises(WireError, match="auth_key_id"):
        m.parse_reply(bytes(payload))


def test_length_mismatch_is_rejected() -> None:
    with pytest.raises(WireError, match="message_data_length"):
        m.parse_reply(_valid_res_pq_payload() + b"\x00\x00\x00\x00")


def test_wrong_constructor_is_rejected() -> None:
    body = struct.pack("<I", 0x60469778) + NONCE  # req_pq, not resPQ
    with pytest.raises(WireError, match="not resPQ"):
        m.parse_reply(m.unencrypted_message(5, body))


def test_wrong_vector_constructor_is_rejected() -> None:
    body = bytearray(m.encode_res_pq(m.ResPQ(NONCE, NONCE, b"pq", (1,))))
    vector_at = 4 + 16 + 16 + 4
    body[vector_at] ^= 0xFF
    with pytest.raises(WireError, match="Vector"):
        m.parse_res_pq(bytes(body))


def test_every_truncation_of_a_valid_reply_is_a_wire_error() -> None:
    payload = _valid_res_pq_payload()
    for cut in range(len(payload)):
        if cut == 4:
            continue  # 4 bytes is the transport-error shape, covered above
        with pytest.raises(WireError):
            m.parse_reply(payload[:cut])


def test_encoders_reject_out_of_range_values() -> None:
    with pytest.raises(WireError):
        m.encode_transport_error(404)
    with pytest.raises(WireError):
        m.encode_res_pq(m.ResPQ(NONCE, NONCE, b"", (2**63,)))
    with pytest.raises(WireError):
        m.encode_res_pq(m.ResPQ(b"x", NONCE, b"", ()))


@settings(max_examples=400, deadline=None)
@given(st.binary(max_size=200))
def test_fuzz_reply_parsers_raise_only_wire_error(data: bytes) -> None:
    for parse in (m.parse_reply, m.parse_req_pq_multi, m.parse_res_pq, m.decode_tl_bytes):
        with contextlib.suppress(WireError):
            parse(data)
    with contextlib.suppress(WireError):
        m.decode_header(data[:4])


@settings(max_examples=300, deadline=None)
@given(st.integers(min_value=0, max_value=111), st.integers(min_value=0, max_value=255))
def test_fuzz_mutated_valid_reply_raises_only_wire_error(index: int, value: int) -> None:
    payload = bytearray(_valid_res_pq_payload())
    payload[index % len(payload)] = value
    try:
        reply = m.parse_reply(bytes(payload))
    except WireError:
        return
    assert isinstance(reply, m.ResPQ | m.TransportError)


@settings(max_examples=200, deadline=None)
@given(
    st.binary(min_size=16, max_size=16),
    st.binary(min_size=16, max_size=16),
    st.binary(max_size=600),
    st.lists(st.integers(min_value=-(2**63), max_value=2**63 - 1), max_size=8),
)
def test_fuzz_res_pq_round_trip(
    nonce: bytes, server_nonce: bytes, pq: bytes, fingerprints: list[int]
) -> None:
    res = m.ResPQ(nonce, server_nonce, pq, tuple(fingerprints))
    assert m.parse_res_pq(m.encode_res_pq(res)) == res
