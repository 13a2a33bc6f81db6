"""MTProto's first exchange, sans-IO: ``req_pq_multi`` out, ``resPQ`` back.

What a probe needs to ask a Telegram data centre "are you there?" without an
account, and nothing more (no DH, no auth key).  Sources: the MTProto docs at
core.telegram.org -- ``mtproto/mtproto-transports`` (intermediate transport),
``mtproto/description`` (unencrypted message, message_id), ``mtproto/auth_key``
and ``mtproto/samples-auth_key`` (req_pq_multi / resPQ byte layout),
``mtproto/serialize`` (TL ``bytes`` and ``Vector``).

Wire layout, all integers little-endian::

    client, once per connection:   ee ee ee ee            intermediate transport tag
    every packet, both directions: len:int32  payload      (len = payload bytes)
    unencrypted payload:           auth_key_id:int64 = 0
                                   message_id:int64        ~ unixtime * 2^32, client's % 4 == 0
                                   message_data_length:int32
                                   message_data            (a TL-serialised object)
    req_pq_multi#be7e8ef1 nonce:int128 = ResPQ
    resPQ#05162463 nonce:int128 server_nonce:int128 pq:bytes
                   server_public_key_fingerprints:Vector<long> = ResPQ

A transport error is a packet whose whole payload is one negative int32
(``-404`` auth key not found, ``-429`` transport flood, ``-444`` invalid DC).
Parsers raise only `WireError`.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass

from . import WireError

__all__ = [
    "INTERMEDIATE_TAG",
    "MAX_PACKET",
    "REQ_PQ_MULTI",
    "RES_PQ",
    "VECTOR",
    "ResPQ",
    "TransportError",
    "decode_header",
    "decode_tl_bytes",
    "encode_res_pq",
    "encode_tl_bytes",
    "encode_transport_error",
    "frame",
    "message_id",
    "parse_reply",
    "parse_req_pq_multi",
    "parse_res_pq",
    "parse_unencrypted",
    "req_pq_multi",
    "req_pq_multi_packet",
    "unencrypted_message",
]

INTERMEDIATE_TAG = b"\xee\xee\xee\xee"
REQ_PQ_MULTI = 0xBE7E8EF1
RES_PQ = 0x05162463
VECTOR = 0x1CB5C415

# A resPQ is about 100 bytes; anything near this bound is not the answer we asked
# for, and refusing it before reading keeps a hostile peer from eating memory.
MAX_PACKET = 4096
# Transport error codes are small negative numbers; a wider range would let most
# random garbage (high bit set) pass for an "error code".
_MIN_TRANSPORT_ERROR = -0xFFFF
_UNENCRYPTED_HEADER = struct.Struct("<qqi")  # auth_key_id, message_id, length
_NONCE_LEN = 16
_MAX_FINGERPRINTS = 64


@dataclass(frozen=True)
class ResPQ:
    """The server's answer to req_pq_multi."""

    nonce: bytes  # must echo ours: that is what proves a live DC read our request
    server_nonce: bytes
    pq: bytes
    fingerprints: tuple[int, ...]  # RSA key fingerprints, signed 64-bit


@dataclass(frozen=True)
class TransportError:
    """A DC's 4-byte negative error code instead of a message (e.g. -404)."""

    code: int
    framed: bool = True  # False: the code came bare, where a length was expected


# ---------------------------------------------------------------- client side


def message_id(now: float) -> int:
    """A client message_id for wall-clock time ``now``: ~ now * 2^32, divisible by 4.

    The DC rejects ids far from its own clock or not divisible by 4 (bad_msg
    codes 16-18), so the low two bits are cleared rather than randomised.
    """
    if not 0 <= now < 2**31:
        raise WireError(f"time {now!r} out of message_id range")
    return int(now * 2**32) & ~3


def req_pq_multi(nonce: bytes) -> bytes:
    """TL body of ``req_pq_multi#be7e8ef1 nonce:int128``."""
    if len(nonce) != _NONCE_LEN:
        raise WireError(f"nonce must be {_NONCE_LEN} bytes, got {len(nonce)}")
    return struct.pack("<I", REQ_PQ_MULTI) + nonce


def unencrypted_message(msg_id: int, body: bytes) -> bytes:
    """Wrap a TL body in the plain-text envelope (auth_key_id = 0)."""
    if not -(2**63) <= msg_id < 2**63:
        raise WireError("message_id out of int64 range")
    return _UNENCRYPTED_HEADER.pack(0, msg_id, len(body)) + body


def frame(payload: bytes) -> bytes:
    """One intermediate-transport packet: 4-byte little-endian length, then payload."""
    if len(payload) >= 2**31:
        raise WireError("payload too large for an int32 length")
    return struct.pack("<i", len(payload)) + payload


def req_pq_multi_packet(nonce: bytes, now: float) -> bytes:
    """Everything a client sends first: the transport tag and a framed req_pq_multi."""
    return INTERMEDIATE_TAG + frame(unencrypted_message(message_id(now), req_pq_multi(nonce)))


# ---------------------------------------------------------------- reply side


def decode_header(header: bytes, max_len: int = MAX_PACKET) -> int | TransportError:
    """Length of the packet that follows this 4-byte header, or a bare transport error.

    Servers frame their error codes (length 4, then the code), but a negative
    "length" in the small error range is read as the code itself so that a
    middlebox or server sending it bare is still named correctly.
    """
    if len(header) != 4:
        raise WireError(f"packet header must be 4 bytes, got {len(header)}")
    length: int = struct.unpack("<i", header)[0]
    if length < 0:
        if length >= _MIN_TRANSPORT_ERROR:
            return TransportError(length, framed=False)
        raise WireError(f"negative packet length {length}")
    if length < 4:
        raise WireError(f"packet length {length} shorter than any MTProto payload")
    if length > max_len:
        raise WireError(f"packet length {length} exceeds the {max_len}-byte bound")
    return length


def parse_unencrypted(payload: bytes) -> tuple[int, bytes]:
    """Split a plain-text message into (message_id, TL body)."""
    if len(payload) < _UNENCRYPTED_HEADER.size:
        raise WireError(f"message of {len(payload)} bytes shorter than the 20-byte header")
    auth_key_id, msg_id, length = _UNENCRYPTED_HEADER.unpack_from(payload)
    if auth_key_id != 0:
        raise WireError("auth_key_id is not 0: an encrypted message where a plain one belongs")
    body = payload[_UNENCRYPTED_HEADER.size :]
    if length != len(body):
        raise WireError(f"message_data_length {length} but {len(body)} bytes follow")
    return msg_id, body


def parse_reply(payload: bytes) -> ResPQ | TransportError:
    """Parse one packet's payload from the DC: a resPQ or a framed transport error."""
    if len(payload) == 4:
        (code,) = struct.unpack("<i", payload)
        if code < 0:
            return TransportError(code)
        raise WireError(f"4-byte packet {code} is neither a message nor an error code")
    _msg_id, body = parse_unencrypted(payload)
    return parse_res_pq(body)


def parse_res_pq(body: bytes) -> ResPQ:
    """Parse the TL body of a resPQ."""
    reader = _Reader(body)
    constructor = reader.uint32()
    if constructor != RES_PQ:
        raise WireError(f"constructor 0x{constructor:08x} is not resPQ")
    nonce = reader.take(_NONCE_LEN)
    server_nonce = reader.take(_NONCE_LEN)
    pq = reader.tl_bytes()
    fingerprints = reader.vector_of_longs()
    reader.end()
    return ResPQ(nonce, server_nonce, pq, fingerprints)


def decode_tl_bytes(data: bytes, offset: int = 0) -> tuple[bytes, int]:
    """Decode TL ``bytes``/``string`` at ``offset``; return (value, offset after padding)."""
    reader = _Reader(data, offset)
    value = reader.tl_bytes()
    return value, reader.pos


# ---------------------------------------------------------------- server side (lab stubs)


def parse_req_pq_multi(payload: bytes) -> tuple[int, bytes]:
    """Parse a client's req_pq_multi packet payload into (message_id, nonce)."""
    msg_id, body = parse_unencrypted(payload)
    reader = _Reader(body)
    constructor = reader.uint32()
    if constructor != REQ_PQ_MULTI:
        raise WireError(f"constructor 0x{constructor:08x} is not req_pq_multi")
    nonce = reader.take(_NONCE_LEN)
    reader.end()
    return msg_id, nonce


def encode_tl_bytes(value: bytes) -> bytes:
    """TL ``bytes``: short (1-byte length) or long (0xfe + 3 bytes) form, padded to 4."""
    if len(value) <= 253:
        out = bytes([len(value)]) + value
    elif len(value) < 2**24:
        out = b"\xfe" + len(value).to_bytes(3, "little") + value
    else:
        raise WireError("TL bytes longer than 2^24 - 1")
    return out + b"\x00" * (-len(out) % 4)


def encode_res_pq(res: ResPQ) -> bytes:
    """TL body of a resPQ (for the lab DC stub)."""
    if len(res.nonce) != _NONCE_LEN or len(res.server_nonce) != _NONCE_LEN:
        raise WireError("nonce and server_nonce must be 16 bytes")
    try:
        longs = struct.pack(f"<{len(res.fingerprints)}q", *res.fingerprints)
    except struct.error as exc:
        raise WireError(f"fingerprint out of int64 range: {exc}") from None
    return (
        struct.pack("<I", RES_PQ)
        + res.nonce
        + res.server_nonce
        + encode_tl_bytes(res.pq)
        + struct.pack("<Ii", VECTOR, len(res.fingerprints))
        + longs
    )


def encode_transport_error(code: int) -> bytes:
    """A framed transport error packet, as a DC sends it."""
    if not _MIN_TRANSPORT_ERROR <= code < 0:
        raise WireError(f"transport error code {code} is not a small negative number")
    return frame(struct.pack("<i", code))


class _Reader:
    """Bounds-checked cursor over TL data; every overrun is a WireError."""

    def __init__(self, data: bytes, pos: int = 0) -> None:
        if not 0 <= pos <= len(data):
            raise WireError("offset outside the data")
        self.data = data
        self.pos = pos

    def take(self, n: int) -> bytes:
        if n < 0 or self.pos + n > len(self.data):
            raise WireError(
                f"truncated: need {n} bytes at offset {self.pos}, have {len(self.data)}"
            )
        chunk = self.data[self.pos : self.pos + n]
        self.pos += n
        return chunk

    def uint32(self) -> int:
        return int.from_bytes(self.take(4), "little")

    def int32(self) -> int:
        return int.from_bytes(self.take(4), "little", signed=True)

    def tl_bytes(self) -> bytes:
        start = self.pos
        first = self.take(1)[0]
        if first == 255:
            raise WireError("TL bytes length byte 0xff is invalid")
        length = int.from_bytes(self.take(3), "little") if first == 254 else first
        value = self.take(length)
        self.take(-(self.pos - start) % 4)  # padding to a multiple of 4 bytes
        return value

    def vector_of_longs(self) -> tuple[int, ...]:
        constructor = self.uint32()
        if constructor != VECTOR:
            raise WireError(f"constructor 0x{constructor:08x} is not a Vector")
        count = self.int32()
        if not 0 <= count <= _MAX_FINGERPRINTS:
            raise WireError(f"vector count {count} out of range")
        raw = self.take(8 * count)
        return struct.unpack(f"<{count}q", raw)

    def end(self) -> None:
        if self.pos != len(self.data):
            raise WireError(f"{len(self.data) - self.pos} trailing bytes after the object")
