"""STUN (RFC 5389), sans-IO: Binding requests out, responses in; plus the two framings
a call relay needs (RFC 4571 over TCP) and Telegram's reflector hello.

Wire layout (all integers big-endian)::

    0                   1                   2                   3
    0 0 M M M M M C M M M C M M M M   message length (body bytes, multiple of 4)
    magic cookie 0x2112A442
    transaction id (96 bits)
    attributes:  type:16  length:16  value  (zero padding to a 4-byte boundary)

The 14 type bits interleave a 12-bit method and a 2-bit class (C bits).  Attributes
are table-driven (``_ATTRIBUTES``: type -> name, decoder, encoder); a type we do not
know is kept as raw bytes, so a relay's private attributes (WhatsApp's 0x4000-0x4007)
survive a round trip as evidence.  FINGERPRINT is CRC-32 of everything before it,
XOR 0x5354554E, and must be the last attribute; MESSAGE-INTEGRITY is HMAC-SHA1 over
the message up to it with the length field adjusted to end after it.

`parse()` raises only `WireError`; the hypothesis tests hold it to that.
"""

from __future__ import annotations

import binascii
import hashlib
import hmac
import ipaddress
import secrets
import struct
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from enum import IntEnum
from typing import Any

from . import WireError

__all__ = [
    "FINGERPRINT_XOR",
    "HEADER_LENGTH",
    "MAGIC_COOKIE",
    "REFLECTOR_HELLO_LENGTH",
    "Address",
    "Attr",
    "Attribute",
    "Class",
    "ErrorCode",
    "Message",
    "Method",
    "binding_error",
    "binding_request",
    "binding_success",
    "encode",
    "fingerprint_of",
    "frame",
    "is_stun",
    "parse",
    "read_frames",
    "reflector_hello",
    "reflector_tag_matches",
    "verify_integrity",
]

MAGIC_COOKIE = 0x2112A442
FINGERPRINT_XOR = 0x5354554E
HEADER_LENGTH = 20
_HEADER = struct.Struct("!HHI12s")
_ATTR_HEADER = struct.Struct("!HH")
_COOKIE_BYTES = MAGIC_COOKIE.to_bytes(4, "big")
_INTEGRITY_LENGTH = 20  # HMAC-SHA1
_MAX_BODY = 0xFFFF - 3  # the length field is 16 bits and a multiple of 4


class Class(IntEnum):
    REQUEST = 0b00
    INDICATION = 0b01
    SUCCESS = 0b10
    ERROR = 0b11


class Method(IntEnum):
    BINDING = 0x001


class Attr(IntEnum):
    """Attribute types this codec decodes; anything else is kept raw."""

    MAPPED_ADDRESS = 0x0001
    USERNAME = 0x0006
    MESSAGE_INTEGRITY = 0x0008
    ERROR_CODE = 0x0009
    UNKNOWN_ATTRIBUTES = 0x000A
    REALM = 0x0014
    NONCE = 0x0015
    XOR_MAPPED_ADDRESS = 0x0020
    PRIORITY = 0x0024
    USE_CANDIDATE = 0x0025
    SOFTWARE = 0x8022
    ALTERNATE_SERVER = 0x8023
    FINGERPRINT = 0x8028
    ICE_CONTROLLED = 0x8029
    ICE_CONTROLLING = 0x802A


@dataclass(frozen=True)
class Address:
    """A transport address from (XOR-)MAPPED-ADDRESS or ALTERNATE-SERVER."""

    host: str
    port: int

    @property
    def family(self) -> str:
        return "ipv6" if ":" in self.host else "ipv4"

    def __str__(self) -> str:
        return f"[{self.host}]:{self.port}" if ":" in self.host else f"{self.host}:{self.port}"


@dataclass(frozen=True)
class ErrorCode:
    """ERROR-CODE: ``code`` is class * 100 + number (300-699), ``reason`` UTF-8 text."""

    code: int
    reason: str = ""


@dataclass(frozen=True)
class Attribute:
    """One attribute in wire order; ``value`` is decoded, or raw bytes for unknown types."""

    type: int
    value: Any

    @property
    def name(self) -> str:
        try:
            return Attr(self.type).name.replace("_", "-")
        except ValueError:
            return f"0x{self.type:04x}"


@dataclass(frozen=True)
class Message:
    """A STUN message.  ``transaction_id`` is 12 bytes (RFC 5389, not RFC 3489's 16)."""

    msg_class: Class
    method: int
    transaction_id: bytes
    attributes: tuple[Attribute, ...] = ()

    @property
    def type(self) -> int:
        """The 14-bit message type: method bits M0-M11 with class bits C0, C1 interleaved."""
        m = self.method
        c = int(self.msg_class)
        return (
            (m & 0x000F)
            | ((m & 0x0070) << 1)
            | ((m & 0x0F80) << 2)
            | ((c & 1) << 4)
            | ((c & 2) << 7)
        )

    def get(self, attr_type: int) -> Any:
        """The first value of an attribute type, or None (duplicates are kept, in order)."""
        return next((a.value for a in self.attributes if a.type == attr_type), None)

    @property
    def xor_mapped_address(self) -> Address | None:
        value = self.get(Attr.XOR_MAPPED_ADDRESS)
        return value if isinstance(value, Address) else None

    @property
    def mapped_address(self) -> Address | None:
        value = self.get(Attr.MAPPED_ADDRESS)
        return value if isinstance(value, Address) else None

    @property
    def error_code(self) -> ErrorCode | None:
        value = self.get(Attr.ERROR_CODE)
        return value if isinstance(value, ErrorCode) else None

    @property
    def software(self) -> str | None:
        value = self.get(Attr.SOFTWARE)
        return value if isinstance(value, str) else None


# ---------------------------------------------------------------- attribute codecs
# Decoders take (value, transaction_id) because the XOR addresses need it; each checks
# its own lengths, so a hostile value can only ever raise WireError.

Decoder = Callable[[bytes, bytes], Any]
Encoder = Callable[[Any, bytes], bytes]


def _xor_key(transaction_id: bytes) -> bytes:
    return _COOKIE_BYTES + transaction_id


def _decode_address(value: bytes, transaction_id: bytes, *, xor: bool) -> Address:
    if len(value) < 4:
        raise WireError(f"address attribute of {len(value)} bytes")
    family, port = value[1], int.from_bytes(value[2:4], "big")
    raw = value[4:]
    if (family, len(raw)) not in ((0x01, 4), (0x02, 16)):
        raise WireError(f"address family 0x{family:02x} with {len(raw)} address bytes")
    if xor:
        port ^= MAGIC_COOKIE >> 16
        raw = bytes(a ^ b for a, b in zip(raw, _xor_key(transaction_id), strict=False))
    return Address(str(ipaddress.ip_address(raw)), port)


def _encode_address(addr: Address, transaction_id: bytes, *, xor: bool) -> bytes:
    raw = ipaddress.ip_address(addr.host).packed
    port = addr.port
    if xor:
        port ^= MAGIC_COOKIE >> 16
        raw = bytes(a ^ b for a, b in zip(raw, _xor_key(transaction_id), strict=False))
    family = 0x01 if len(raw) == 4 else 0x02
    return struct.pack("!BBH", 0, family, port) + raw


def _decode_text(value: bytes, _tid: bytes) -> str:
    # Text attributes are evidence (SOFTWARE names a relay's stack); a stray invalid
    # byte must not turn a reply that proved the path into "bad_response".
    return value.decode("utf-8", errors="replace")


def _encode_text(text: str, _tid: bytes) -> bytes:
    return text.encode("utf-8")


def _decode_error(value: bytes, _tid: bytes) -> ErrorCode:
    if len(value) < 4:
        raise WireError(f"ERROR-CODE of {len(value)} bytes")
    klass, number = value[2] & 0x07, value[3]
    if not 3 <= klass <= 6 or number > 99:
        raise WireError(f"ERROR-CODE class {klass} number {number} out of range")
    return ErrorCode(klass * 100 + number, _decode_text(value[4:], _tid))


def _encode_error(err: ErrorCode, _tid: bytes) -> bytes:
    return struct.pack("!HBB", 0, err.code // 100, err.code % 100) + err.reason.encode("utf-8")


def _fixed(size: int, name: str) -> Decoder:
    def decode(value: bytes, _tid: bytes) -> int:
        if len(value) != size:
            raise WireError(f"{name} of {len(value)} bytes, expected {size}")
        return int.from_bytes(value, "big")

    return decode


def _encode_uint(size: int) -> Encoder:
    return lambda number, _tid: int(number).to_bytes(size, "big")


def _decode_raw(size: int, name: str) -> Decoder:
    def decode(value: bytes, _tid: bytes) -> bytes:
        if len(value) != size:
            raise WireError(f"{name} of {len(value)} bytes, expected {size}")
        return value

    return decode


def _decode_empty(value: bytes, _tid: bytes) -> None:
    if value:
        raise WireError(f"USE-CANDIDATE carries {len(value)} bytes")


def _decode_type_list(value: bytes, _tid: bytes) -> tuple[int, ...]:
    if len(value) % 2:
        raise WireError("UNKNOWN-ATTRIBUTES of odd length")
    return tuple(int.from_bytes(value[i : i + 2], "big") for i in range(0, len(value), 2))


def _encode_type_list(types: Iterable[int], _tid: bytes) -> bytes:
    return b"".join(int(t).to_bytes(2, "big") for t in types)


_ATTRIBUTES: dict[int, tuple[Decoder, Encoder]] = {
    Attr.MAPPED_ADDRESS: (
        lambda v, t: _decode_address(v, t, xor=False),
        lambda a, t: _encode_address(a, t, xor=False),
    ),
    Attr.XOR_MAPPED_ADDRESS: (
        lambda v, t: _decode_address(v, t, xor=True),
        lambda a, t: _encode_address(a, t, xor=True),
    ),
    Attr.ALTERNATE_SERVER: (
        lambda v, t: _decode_address(v, t, xor=False),
        lambda a, t: _encode_address(a, t, xor=False),
    ),
    Attr.USERNAME: (_decode_text, _encode_text),
    Attr.REALM: (_decode_text, _encode_text),
    Attr.NONCE: (_decode_text, _encode_text),
    Attr.SOFTWARE: (_decode_text, _encode_text),
    Attr.ERROR_CODE: (_decode_error, _encode_error),
    Attr.UNKNOWN_ATTRIBUTES: (_decode_type_list, _encode_type_list),
    Attr.MESSAGE_INTEGRITY: (
        _decode_raw(_INTEGRITY_LENGTH, "MESSAGE-INTEGRITY"),
        lambda raw, _t: bytes(raw),
    ),
    Attr.FINGERPRINT: (_fixed(4, "FINGERPRINT"), _encode_uint(4)),
    Attr.PRIORITY: (_fixed(4, "PRIORITY"), _encode_uint(4)),
    Attr.USE_CANDIDATE: (_decode_empty, lambda _v, _t: b""),
    Attr.ICE_CONTROLLED: (_fixed(8, "ICE-CONTROLLED"), _encode_uint(8)),
    Attr.ICE_CONTROLLING: (_fixed(8, "ICE-CONTROLLING"), _encode_uint(8)),
}


# ---------------------------------------------------------------- messages


def _padded(length: int) -> int:
    return (length + 3) & ~3


def _encode_attribute(attr_type: int, value: bytes) -> bytes:
    if len(value) > 0xFFFF:
        raise ValueError(f"attribute 0x{attr_type:04x} value of {len(value)} bytes")
    padding = b"\x00" * (_padded(len(value)) - len(value))
    return _ATTR_HEADER.pack(attr_type, len(value)) + value + padding


def _header(message: Message, body_length: int) -> bytes:
    return _HEADER.pack(message.type, body_length, MAGIC_COOKIE, message.transaction_id)


def fingerprint_of(data: bytes) -> int:
    """The FINGERPRINT value for ``data`` (the message up to the attribute, length fixed)."""
    return (binascii.crc32(data) ^ FINGERPRINT_XOR) & 0xFFFFFFFF


def encode(
    message: Message, *, fingerprint: bool = False, integrity_key: bytes | None = None
) -> bytes:
    """Serialise ``message``; optionally append MESSAGE-INTEGRITY, then FINGERPRINT.

    Those two are computed here, never taken from ``message.attributes``: they depend
    on the final bytes, and a stale value would make our own requests look forged.
    """
    if len(message.transaction_id) != 12:
        raise ValueError("a transaction id is 12 bytes")
    body = bytearray()
    for attr in message.attributes:
        if attr.type in (Attr.FINGERPRINT, Attr.MESSAGE_INTEGRITY):
            raise ValueError(f"{attr.name} is computed by encode(), not given")
        codec = _ATTRIBUTES.get(attr.type)
        raw = codec[1](attr.value, message.transaction_id) if codec else bytes(attr.value)
        body += _encode_attribute(attr.type, raw)
    if integrity_key is not None:
        # HMAC over the header + body with the length already counting the integrity
        # attribute itself (RFC 5389 15.4), so a receiver can recompute it in place.
        header = _header(message, len(body) + 4 + _INTEGRITY_LENGTH)
        mac = hmac.new(integrity_key, header + body, hashlib.sha1).digest()
        body += _encode_attribute(Attr.MESSAGE_INTEGRITY, mac)
    if fingerprint:
        header = _header(message, len(body) + 8)
        crc = fingerprint_of(header + body)
        body += _encode_attribute(Attr.FINGERPRINT, crc.to_bytes(4, "big"))
    if len(body) > _MAX_BODY:
        raise ValueError(f"message body of {len(body)} bytes")
    return _header(message, len(body)) + bytes(body)


def is_stun(data: bytes) -> bool:
    """Cheap demultiplexing test (RFC 7983 style): header shape and magic cookie only."""
    return (
        len(data) >= HEADER_LENGTH
        and data[0] & 0xC0 == 0
        and data[4:8] == _COOKIE_BYTES
        and int.from_bytes(data[2:4], "big") % 4 == 0
    )


def _split_type(msg_type: int) -> tuple[Class, int]:
    klass = Class(((msg_type >> 4) & 0x1) | ((msg_type >> 7) & 0x2))
    method = (msg_type & 0x000F) | ((msg_type >> 1) & 0x0070) | ((msg_type >> 2) & 0x0F80)
    return klass, method


def parse(data: bytes) -> Message:
    """Parse one whole STUN message (a datagram, or one de-framed TCP message).

    Checks the two zero bits, the magic cookie, that the length field is a multiple of 4
    and matches the bytes given, that every attribute fits with its padding, and the
    FINGERPRINT (which must be last) when present.  Raises only `WireError`.
    """
    data = bytes(data)
    if len(data) < HEADER_LENGTH:
        raise WireError(f"STUN message of {len(data)} bytes, shorter than the header")
    msg_type, length, cookie, transaction_id = _HEADER.unpack_from(data)
    if msg_type & 0xC000:
        raise WireError("the two leading bits of a STUN message are not zero")
    if cookie != MAGIC_COOKIE:
        raise WireError(f"magic cookie 0x{cookie:08x}")
    if length % 4:
        raise WireError(f"message length {length} is not a multiple of 4")
    if length != len(data) - HEADER_LENGTH:
        raise WireError(f"message length {length} but {len(data) - HEADER_LENGTH} body bytes")
    klass, method = _split_type(msg_type)
    attributes = _parse_attributes(data, transaction_id)
    return Message(klass, method, transaction_id, attributes)


def _parse_attributes(data: bytes, transaction_id: bytes) -> tuple[Attribute, ...]:
    attributes: list[Attribute] = []
    offset = HEADER_LENGTH
    while offset < len(data):
        if offset + 4 > len(data):
            raise WireError("truncated attribute header")
        attr_type, attr_len = _ATTR_HEADER.unpack_from(data, offset)
        start = offset + 4
        end = start + _padded(attr_len)
        if end > len(data):
            raise WireError(f"attribute 0x{attr_type:04x} of {attr_len} bytes overruns")
        value = data[start : start + attr_len]
        if attr_type == Attr.FINGERPRINT:
            _check_fingerprint(data, offset, value, last=end == len(data))
        codec = _ATTRIBUTES.get(attr_type)
        decoded = codec[0](value, transaction_id) if codec else value
        attributes.append(Attribute(attr_type, decoded))
        offset = end
    return tuple(attributes)


def _check_fingerprint(data: bytes, offset: int, value: bytes, *, last: bool) -> None:
    if not last:
        raise WireError("FINGERPRINT is not the last attribute")
    if len(value) != 4:
        raise WireError(f"FINGERPRINT of {len(value)} bytes")
    if int.from_bytes(value, "big") != fingerprint_of(data[:offset]):
        raise WireError("FINGERPRINT does not match")


def verify_integrity(data: bytes, key: bytes) -> bool:
    """True when ``data`` carries a MESSAGE-INTEGRITY that ``key`` reproduces.

    ``data`` must already have passed `parse()`.  The key is the short-term password,
    or MD5(username:realm:password) for long-term credentials.
    """
    offset = HEADER_LENGTH
    while offset + 4 <= len(data):
        attr_type, attr_len = _ATTR_HEADER.unpack_from(data, offset)
        if attr_type == Attr.MESSAGE_INTEGRITY and attr_len == _INTEGRITY_LENGTH:
            adjusted = struct.pack("!H", offset + 4 + _INTEGRITY_LENGTH - HEADER_LENGTH)
            signed = data[:2] + adjusted + data[4:offset]
            mac = hmac.new(key, signed, hashlib.sha1).digest()
            return hmac.compare_digest(mac, data[offset + 4 : offset + 4 + _INTEGRITY_LENGTH])
        offset += 4 + _padded(attr_len)
    return False


# ---------------------------------------------------------------- builders


def binding_request(
    transaction_id: bytes | None = None,
    *,
    username: str | None = None,
    software: str | None = None,
    extra: Iterable[Attribute] = (),
) -> Message:
    """A Binding request; encode it with ``fingerprint=True`` as WebRTC clients do."""
    attributes = [Attribute(Attr.USERNAME, username)] if username is not None else []
    if software is not None:
        attributes.append(Attribute(Attr.SOFTWARE, software))
    attributes.extend(extra)
    tid = transaction_id if transaction_id is not None else secrets.token_bytes(12)
    return Message(Class.REQUEST, Method.BINDING, tid, tuple(attributes))


def binding_success(request: Message, mapped: Address, *, software: str | None = None) -> Message:
    attributes = [Attribute(Attr.XOR_MAPPED_ADDRESS, mapped)]
    if software is not None:
        attributes.append(Attribute(Attr.SOFTWARE, software))
    return Message(Class.SUCCESS, request.method, request.transaction_id, tuple(attributes))


def binding_error(request: Message, code: int, reason: str) -> Message:
    err = Attribute(Attr.ERROR_CODE, ErrorCode(code, reason))
    return Message(Class.ERROR, request.method, request.transaction_id, (err,))


# ---------------------------------------------------------------- RFC 4571 framing


def frame(packet: bytes) -> bytes:
    """Prefix a packet with its 16-bit length (RFC 4571, as ICE-TCP and relays use)."""
    if len(packet) > 0xFFFF:
        raise ValueError(f"a framed packet is at most 65535 bytes, not {len(packet)}")
    return len(packet).to_bytes(2, "big") + packet


def read_frames(buffer: bytes) -> tuple[list[bytes], bytes]:
    """Split a TCP byte stream into whole frames and the unfinished rest."""
    frames: list[bytes] = []
    offset = 0
    while offset + 2 <= len(buffer):
        size = int.from_bytes(buffer[offset : offset + 2], "big")
        if offset + 2 + size > len(buffer):
            break
        frames.append(bytes(buffer[offset + 2 : offset + 2 + size]))
        offset += 2 + size
    return frames, bytes(buffer[offset:])


# ---------------------------------------------------------------- Telegram reflector

REFLECTOR_HELLO_LENGTH = 40
_REFLECTOR_MARKER = b"\xff" * 12 + b"\xfe" + b"\xff" * 3
_REFLECTOR_HELLO_VALUE = 123


def reflector_hello(peer_tag: bytes) -> bytes:
    """tgcalls' UDP reflector ping: peer tag, 12x FF, FE, 3x FF, uint64 123, padded to 4.

    Layout read from tgcalls ``v2/ReflectorPort.cpp`` (``SendReflectorHello``).  The
    uint64 goes through WebRTC's ``ByteBufferWriter::WriteUInt64``, which writes network
    byte order, so 123 is big-endian: ``00 .. 00 7b``.  16 + 16 + 8 = 40 bytes, already
    a multiple of 4.  A real client's tag is 12 bytes of the call's credentials plus a
    4-byte random role tag; with a tag of our own a reflector may well stay silent.
    """
    if len(peer_tag) != 16:
        raise ValueError("a reflector peer tag is 16 bytes")
    hello = peer_tag + _REFLECTOR_MARKER + _REFLECTOR_HELLO_VALUE.to_bytes(8, "big")
    return hello + b"\x00" * (_padded(len(hello)) - len(hello))


def reflector_tag_matches(reply: bytes, peer_tag: bytes) -> bool:
    """tgcalls accepts a reflector packet whose first 12 bytes equal its tag's first 12."""
    return len(reply) >= 16 and reply[:12] == peer_tag[:12]
