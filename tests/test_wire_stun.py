"""The sans-IO STUN codec: RFC 5769 test vectors, round trips, every check, fuzzing."""

from __future__ import annotations

import contextlib
import struct

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from probe.wire import WireError, stun


def hexbytes(text: str) -> bytes:
    return bytes.fromhex("".join(text.split()))


# RFC 5769 (Test Vectors for STUN, IETF, April 2010) sections 2.1-2.3, typed in from the
# RFC text.  The RFC pads SOFTWARE and USERNAME with 0x20, not zero: receivers must
# ignore padding bytes, so these vectors also check that we do.
RFC5769_PASSWORD = b"VOkJxbRl1RmTxUk/WvJxBt"
RFC5769_TID = hexbytes("b7 e7 a7 01 bc 34 d6 86 fa 87 df ae")
RFC5769_REQUEST = hexbytes(
    """
    00 01 00 58 21 12 a4 42 b7 e7 a7 01 bc 34 d6 86 fa 87 df ae
    80 22 00 10 53 54 55 4e 20 74 65 73 74 20 63 6c 69 65 6e 74
    00 24 00 04 6e 00 01 ff
    80 29 00 08 93 2f f9 b1 51 26 3b 36
    00 06 00 09 65 76 74 6a 3a 68 36 76 59 20 20 20
    00 08 00 14 9a ea a7 0c bf d8 cb 56 78 1e f2 b5 b2 d3 f2 49 c1 b5 71 a2
    80 28 00 04 e5 7a 3b cf
    """
)
RFC5769_IPV4_RESPONSE = hexbytes(
    """
    01 01 00 3c 21 12 a4 42 b7 e7 a7 01 bc 34 d6 86 fa 87 df ae
    80 22 00 0b 74 65 73 74 20 76 65 63 74 6f 72 20
    00 20 00 08 00 01 a1 47 e1 12 a6 43
    00 08 00 14 2b 91 f5 99 fd 9e 90 c3 8c 74 89 f9 2a f9 ba 53 f0 6b e7 d7
    80 28 00 04 c0 7d 4c 96
    """
)
RFC5769_IPV6_RESPONSE = hexbytes(
    """
    01 01 00 48 21 12 a4 42 b7 e7 a7 01 bc 34 d6 86 fa 87 df ae
    80 22 00 0b 74 65 73 74 20 76 65 63 74 6f 72 20
    00 20 00 14 00 02 a1 47 01 13 a9 fa a5 d3 f1 79 bc 25 f4 b5 be d2 b9 d9
    00 08 00 14 a3 82 95 4e 4b e6 7b f1 17 84 c9 7c 82 92 c2 75 bf e3 ed 41
    80 28 00 04 c8 fb 0b 4c
    """
)


# ---------------------------------------------------------------- RFC 5769


def test_rfc5769_request_parses_with_its_fingerprint_and_integrity() -> None:
    msg = stun.parse(RFC5769_REQUEST)
    assert (msg.msg_class, msg.method, msg.type) == (stun.Class.REQUEST, stun.Method.BINDING, 1)
    assert msg.transaction_id == RFC5769_TID
    assert msg.software == "STUN test client"
    assert msg.get(stun.Attr.USERNAME) == "evtj:h6vY"
    assert msg.get(stun.Attr.PRIORITY) == 0x6E0001FF
    assert msg.get(stun.Attr.ICE_CONTROLLED) == 0x932FF9B151263B36
    assert msg.attributes[-1].name == "FINGERPRINT"
    assert stun.verify_integrity(RFC5769_REQUEST, RFC5769_PASSWORD)
    assert not stun.verify_integrity(RFC5769_REQUEST, b"wrong password")


def test_rfc5769_ipv4_response_xor_mapped_address() -> None:
    msg = stun.parse(RFC5769_IPV4_RESPONSE)
    assert msg.msg_class == stun.Class.SUCCESS
    assert msg.type == 0x0101
    assert msg.xor_mapped_address == stun.Address("192.0.2.1", 32853)
    assert msg.software == "test vector"
    assert stun.verify_integrity(RFC5769_IPV4_RESPONSE, RFC5769_PASSWORD)


def test_rfc5769_ipv6_response_xor_mapped_address() -> None:
    msg = stun.parse(RFC5769_IPV6_RESPONSE)
    assert msg.xor_mapped_address == stun.Address("2001:db8:1234:5678:11:2233:4455:6677", 32853)
    assert msg.xor_mapped_address.family == "ipv6"
    assert str(msg.xor_mapped_address) == "[2001:db8:1234:5678:11:2233:4455:6677]:32853"
    assert stun.verify_integrity(RFC5769_IPV6_RESPONSE, RFC5769_PASSWORD)


@pytest.mark.parametrize(
    ("address", "value"),
    [
        (stun.Address("192.0.2.1", 32853), "00 01 a1 47 e1 12 a6 43"),
        (
            stun.Address("2001:db8:1234:5678:11:2233:4455:6677", 32853),
            "00 02 a1 47 01 13 a9 fa a5 d3 f1 79 bc 25 f4 b5 be d2 b9 d9",
        ),
    ],
)
def test_xor_mapped_address_encodes_as_in_rfc5769(address: stun.Address, value: str) -> None:
    msg = stun.Message(
        stun.Class.SUCCESS,
        stun.Method.BINDING,
        RFC5769_TID,
        (stun.Attribute(stun.Attr.XOR_MAPPED_ADDRESS, address),),
    )
    body = stun.encode(msg)[stun.HEADER_LENGTH :]
    assert body[4:] == hexbytes(value)


@pytest.mark.parametrize("vector", [RFC5769_REQUEST, RFC5769_IPV4_RESPONSE, RFC5769_IPV6_RESPONSE])
def test_rfc5769_vectors_with_one_flipped_bit_fail_the_fingerprint(vector: bytes) -> None:
    spoilt = bytearray(vector)
    spoilt[30] ^= 0x01  # inside SOFTWARE: structure intact, only the CRC can notice
    with pytest.raises(WireError, match="FINGERPRINT does not match"):
        stun.parse(bytes(spoilt))


# ---------------------------------------------------------------- round trips


def test_binding_request_round_trip_with_fingerprint() -> None:
    request = stun.binding_request(b"\x01" * 12, username="token:peer", software="probe")
    data = stun.encode(request, fingerprint=True)
    assert len(data) % 4 == 0
    back = stun.parse(data)
    assert back.transaction_id == b"\x01" * 12
    assert back.get(stun.Attr.USERNAME) == "token:peer"
    assert back.software == "probe"
    assert back.attributes[-1].type == stun.Attr.FINGERPRINT
    assert back.attributes[-1].value == stun.fingerprint_of(data[:-8])


def test_binding_request_has_a_fresh_random_transaction_id() -> None:
    a, b = stun.binding_request(), stun.binding_request()
    assert len(a.transaction_id) == 12
    assert a.transaction_id != b.transaction_id
    assert stun.encode(a) == struct.pack("!HHI", 1, 0, stun.MAGIC_COOKIE) + a.transaction_id


def test_success_response_round_trip() -> None:
    request = stun.binding_request(b"\x02" * 12)
    response = stun.binding_success(request, stun.Address("::1", 40000), software="srv")
    back = stun.parse(stun.encode(response, fingerprint=True))
    assert back.msg_class == stun.Class.SUCCESS
    assert back.method == stun.Method.BINDING
    assert back.xor_mapped_address == stun.Address("::1", 40000)
    assert back.transaction_id == request.transaction_id


@pytest.mark.parametrize(("code", "reason"), [(401, "Unauthorized"), (300, ""), (699, "é ✓")])
def test_error_code_round_trip(code: int, reason: str) -> None:
    request = stun.binding_request(b"\x03" * 12)
    data = stun.encode(stun.binding_error(request, code, reason), fingerprint=True)
    back = stun.parse(data)
    assert back.type == 0x0111
    assert back.error_code == stun.ErrorCode(code, reason)


@pytest.mark.parametrize(("klass", "number"), [(2, 0), (7, 1), (4, 100)])
def test_error_code_out_of_range_is_rejected(klass: int, number: int) -> None:
    value = struct.pack("!HBB", 0, klass, number)
    with pytest.raises(WireError, match="ERROR-CODE"):
        stun.parse(_raw_message(0x0111, [(0x0009, value)]))


def test_mapped_address_and_alternate_server_are_plain_not_xored() -> None:
    value = struct.pack("!BBH", 0, 1, 3478) + bytes([198, 51, 100, 7])
    msg = stun.parse(_raw_message(0x0101, [(0x0001, value), (0x8023, value)]))
    assert msg.mapped_address == stun.Address("198.51.100.7", 3478)
    assert msg.get(stun.Attr.ALTERNATE_SERVER) == stun.Address("198.51.100.7", 3478)


def test_unknown_attributes_are_kept_raw_and_survive_a_round_trip() -> None:
    # WhatsApp's relays use private attributes (0x4000-0x4007): keep them as evidence.
    raw = _raw_message(0x0101, [(0x4003, b"\xaa\xbb\xcc\xdd\xee"), (0x000A, b"\x40\x03")])
    msg = stun.parse(raw)
    assert msg.attributes[0] == stun.Attribute(0x4003, b"\xaa\xbb\xcc\xdd\xee")
    assert msg.attributes[0].name == "0x4003"
    assert msg.get(stun.Attr.UNKNOWN_ATTRIBUTES) == (0x4003,)
    assert stun.encode(msg) == raw


def test_message_type_interleaves_method_and_class_bits() -> None:
    for klass in stun.Class:
        for method in (0x001, 0x003, 0x00F, 0x010, 0x070, 0x080, 0xFFF):
            msg = stun.Message(klass, method, b"\x00" * 12)
            assert msg.type & 0xC000 == 0
            back = stun.parse(stun.encode(msg))
            assert (back.msg_class, back.method) == (klass, method)
    assert stun.Message(stun.Class.INDICATION, 1, b"\x00" * 12).type == 0x0011


def test_encode_refuses_what_it_must_compute_itself() -> None:
    fp = stun.Attribute(stun.Attr.FINGERPRINT, 0)
    with pytest.raises(ValueError, match="computed by encode"):
        stun.encode(stun.Message(stun.Class.REQUEST, 1, b"\x00" * 12, (fp,)))
    with pytest.raises(ValueError, match="12 bytes"):
        stun.encode(stun.Message(stun.Class.REQUEST, 1, b"\x00" * 16))


def test_integrity_then_fingerprint_round_trip() -> None:
    msg = stun.binding_request(b"\x04" * 12, username="u:v")
    data = stun.encode(msg, integrity_key=b"secret", fingerprint=True)
    parsed = stun.parse(data)
    assert [a.name for a in parsed.attributes] == ["USERNAME", "MESSAGE-INTEGRITY", "FINGERPRINT"]
    assert stun.verify_integrity(data, b"secret")
    assert not stun.verify_integrity(data, b"other")
    assert not stun.verify_integrity(stun.encode(msg), b"secret")  # none present


# ---------------------------------------------------------------- checks


def _raw_message(msg_type: int, attrs: list[tuple[int, bytes]], tid: bytes = b"\x05" * 12) -> bytes:
    body = b""
    for attr_type, value in attrs:
        body += struct.pack("!HH", attr_type, len(value)) + value
        body += b"\x00" * (-len(value) % 4)
    return struct.pack("!HHI", msg_type, len(body), stun.MAGIC_COOKIE) + tid + body


def _good_response() -> bytes:
    request = stun.binding_request(b"\x06" * 12)
    return stun.encode(
        stun.binding_success(request, stun.Address("127.0.0.1", 5000)), fingerprint=True
    )


@pytest.mark.parametrize(
    ("mutate", "message"),
    [
        (lambda d: d[:19], "shorter than the header"),
        (lambda d: b"\x40" + d[1:], "leading bits"),
        (lambda d: d[:4] + b"\x21\x12\xa4\x43" + d[8:], "magic cookie"),
        (
            lambda d: d[:2] + (int.from_bytes(d[2:4], "big") + 4).to_bytes(2, "big") + d[4:],
            "body bytes",
        ),
        (
            lambda d: d[:2] + (int.from_bytes(d[2:4], "big") - 2).to_bytes(2, "big") + d[4:],
            "multiple of 4",
        ),
        (lambda d: d[:-6], "body bytes"),
        (lambda d: d + b"\x00\x00\x00\x00", "body bytes"),
    ],
)
def test_header_checks(mutate, message: str) -> None:  # type: ignore[no-untyped-def]
    with pytest.raises(WireError, match=message):
        stun.parse(mutate(_good_response()))


def test_attribute_overrunning_the_message_is_rejected() -> None:
    data = bytearray(_raw_message(0x0101, [(0x8022, b"abcd")]))
    data[22:24] = (9).to_bytes(2, "big")  # SOFTWARE claims 9 bytes (12 padded), 4 present
    with pytest.raises(WireError, match="overruns"):
        stun.parse(bytes(data))


def test_fingerprint_must_be_last_and_four_bytes() -> None:
    moved = _raw_message(0x0101, [(0x8028, b"\x00" * 4), (0x8022, b"abcd")])
    with pytest.raises(WireError, match="not the last"):
        stun.parse(moved)
    with pytest.raises(WireError, match="FINGERPRINT of 8 bytes"):
        stun.parse(_raw_message(0x0101, [(0x8028, b"\x00" * 8)]))


@pytest.mark.parametrize(
    "value",
    [
        b"\x00\x01\x00",  # shorter than family + port
        b"\x00\x03\x00\x50\x01\x02\x03\x04",  # no such family
        b"\x00\x01\x00\x50\x01\x02\x03\x04\x05",  # IPv4 with 5 address bytes
        b"\x00\x02\x00\x50" + b"\x00" * 4,  # IPv6 with 4 address bytes
    ],
)
def test_malformed_addresses_are_rejected(value: bytes) -> None:
    with pytest.raises(WireError, match="address"):
        stun.parse(_raw_message(0x0101, [(0x0020, value)]))


def test_is_stun_demultiplexes_on_cookie_and_shape() -> None:
    assert stun.is_stun(_good_response())
    assert not stun.is_stun(b"\x80" + _good_response()[1:])  # RTP's first byte
    assert not stun.is_stun(_good_response()[:19])
    assert not stun.is_stun(b"\x00" * 20)


# ---------------------------------------------------------------- framing, reflector


def test_rfc4571_frames_split_a_stream_whatever_the_chunking() -> None:
    packets = [b"", b"a", _good_response(), b"\xff" * 300]
    stream = b"".join(stun.frame(p) for p in packets)
    for cut in range(len(stream) + 1):
        first, rest = stun.read_frames(stream[:cut])
        second, tail = stun.read_frames(rest + stream[cut:])
        assert first + second == packets
        assert tail == b""
    with pytest.raises(ValueError, match="at most 65535"):
        stun.frame(b"\x00" * 65536)


def test_reflector_hello_layout() -> None:
    tag = bytes(range(16))
    hello = stun.reflector_hello(tag)
    assert len(hello) == stun.REFLECTOR_HELLO_LENGTH == 40
    assert hello[:16] == tag
    assert hello[16:32] == b"\xff" * 12 + b"\xfe" + b"\xff" * 3
    assert hello[32:] == (123).to_bytes(8, "big")  # WebRTC ByteBufferWriter: network order
    assert stun.reflector_tag_matches(tag[:12] + b"\x00" * 20, tag)
    assert not stun.reflector_tag_matches(b"\x01" + tag[1:], tag)
    assert not stun.reflector_tag_matches(tag[:12], tag)  # shorter than a tag
    with pytest.raises(ValueError, match="16 bytes"):
        stun.reflector_hello(b"short")


# ---------------------------------------------------------------- fuzzing

_KNOWN_TYPES = [int(a) for a in stun.Attr] + [0x4000, 0x0000, 0xFFFF]


@settings(max_examples=250, deadline=None)
@given(st.binary(max_size=200))
def test_arbitrary_bytes_raise_only_wire_error(data: bytes) -> None:
    with contextlib.suppress(WireError):
        stun.parse(data)


@settings(max_examples=250, deadline=None)
@given(st.integers(0, 0x3FFF), st.binary(min_size=12, max_size=12), st.binary(max_size=120))
def test_valid_header_with_arbitrary_body_raises_only_wire_error(
    msg_type: int, tid: bytes, body: bytes
) -> None:
    body += b"\x00" * (-len(body) % 4)
    data = struct.pack("!HHI", msg_type, len(body), stun.MAGIC_COOKIE) + tid + body
    with contextlib.suppress(WireError):
        stun.parse(data)


@settings(max_examples=300, deadline=None)
@given(
    st.lists(
        st.tuples(st.sampled_from(_KNOWN_TYPES), st.binary(max_size=40)),
        max_size=6,
    )
)
def test_well_framed_attributes_with_arbitrary_values_raise_only_wire_error(
    attrs: list[tuple[int, bytes]],
) -> None:
    # Framing is right, so every attribute decoder sees hostile values.
    with contextlib.suppress(WireError):
        stun.parse(_raw_message(0x0101, attrs))


_addresses = st.one_of(st.ip_addresses(v=4).map(str), st.ip_addresses(v=6).map(str)).flatmap(
    lambda host: st.builds(stun.Address, st.just(host), st.integers(0, 65535))
)
_attributes = st.one_of(
    st.builds(stun.Attribute, st.just(stun.Attr.XOR_MAPPED_ADDRESS), _addresses),
    st.builds(stun.Attribute, st.just(stun.Attr.MAPPED_ADDRESS), _addresses),
    st.builds(stun.Attribute, st.just(stun.Attr.SOFTWARE), st.text(max_size=30)),
    st.builds(
        stun.Attribute,
        st.just(stun.Attr.ERROR_CODE),
        st.builds(stun.ErrorCode, st.integers(300, 699), st.text(max_size=20)),
    ),
    st.builds(
        stun.Attribute,
        st.integers(0xC000, 0xFFFF).filter(lambda t: t not in _KNOWN_TYPES),
        st.binary(max_size=30),
    ),
)


@settings(max_examples=300, deadline=None)
@given(
    st.sampled_from(list(stun.Class)),
    st.integers(0, 0xFFF),
    st.binary(min_size=12, max_size=12),
    st.lists(_attributes, max_size=5),
    st.booleans(),
)
def test_encode_then_parse_is_identity(
    klass: stun.Class, method: int, tid: bytes, attrs: list[stun.Attribute], fingerprint: bool
) -> None:
    msg = stun.Message(klass, method, tid, tuple(attrs))
    back = stun.parse(stun.encode(msg, fingerprint=fingerprint))
    got = back.attributes[:-1] if fingerprint else back.attributes
    assert (back.msg_class, back.method, back.transaction_id, got) == (
        klass,
        method,
        tid,
        msg.attributes,
    )


@settings(max_examples=300, deadline=None)
@given(st.binary(max_size=300))
def test_read_frames_never_raises_and_loses_nothing(stream: bytes) -> None:
    frames, rest = stun.read_frames(stream)
    assert b"".join(stun.frame(f) for f in frames) + rest == stream
