"""QUIC's version-independent long header and Version Negotiation, sans-IO.

Just enough of QUIC to ask a UDP endpoint "do you speak QUIC?" without
speaking any QUIC version: send a long-header packet carrying a reserved
version, and a live QUIC server must answer Version Negotiation (RFC 9000
§6.1).  Sources: RFC 8999 (version-independent properties: long header, VN
layout), RFC 9000 §15 (reserved versions ``0x?a?a?a?a``), §17.2 (long header),
§17.2.1 (VN), §17.2.2 and §14.1 (Initial layout, 1200-byte minimum).

Long header (RFC 8999 §5.1), the part every QUIC version shares::

    first byte:    1 (long header) + 7 version-specific bits
    version:       uint32, big-endian (0 = Version Negotiation)
    DCID length:   uint8, DCID           (<= 255 bytes in RFC 8999; <= 20 in v1)
    SCID length:   uint8, SCID
    ...            version-specific

Version Negotiation (RFC 8999 §6)::

    first byte:    1 + 7 unused (random) bits
    version:       0x00000000
    DCID, SCID:    the client's SCID and DCID, echoed (that is the proof)
    versions:      uint32 each, to the end of the datagram

Our probe packet is laid out like a v1 Initial (fixed bit, type 0, token
length 0, a Length field covering the rest) although the version is reserved:
some servers (aioquic among them) parse the v1 layout before looking at the
version and silently drop anything else.  Parsers raise only `WireError`.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass

from . import WireError

__all__ = [
    "MAX_CID_V1",
    "MIN_INITIAL_SIZE",
    "QUIC_V1",
    "QUIC_V2",
    "VERSION_NEGOTIATION",
    "LongHeader",
    "VersionNegotiation",
    "build_version_negotiation",
    "build_vn_probe",
    "is_long_header",
    "is_reserved_version",
    "parse_long_header",
    "parse_version_negotiation",
    "reserved_version",
]

QUIC_V1 = 0x00000001
QUIC_V2 = 0x6B3343CF  # RFC 9369
VERSION_NEGOTIATION = 0x00000000

# RFC 9000 §14.1: a client pads every datagram carrying an Initial to >= 1200 bytes,
# and servers drop smaller ones.  It is also why TSPU's ">= 1001 bytes" rule hits
# every real QUIC v1 client.
MIN_INITIAL_SIZE = 1200
# Keep the probe inside one Ethernet-MTU IPv6 datagram (1500 - 40 - 8).
MAX_PROBE_SIZE = 1452
MAX_CID_V1 = 20  # RFC 9000 §17.2; RFC 8999 allows up to 255 for other versions
# A VN reply carries a handful of versions; a list longer than this is not a server
# describing itself, and refusing it keeps evidence small.
MAX_VERSIONS = 64

_LONG_HEADER_BIT = 0x80
_FIXED_BIT = 0x40
_RESERVED_MASK = 0x0F0F0F0F
_RESERVED_PATTERN = 0x0A0A0A0A
_VARINT_2_BYTES = 0x4000  # RFC 9000 §16: top bits 01 = two-byte varint
_VARINT_2_MAX = 0x3FFF


@dataclass(frozen=True)
class LongHeader:
    """The version-independent part of a long-header packet."""

    first_byte: int
    version: int
    dcid: bytes
    scid: bytes
    header_len: int  # bytes up to and including the SCID


@dataclass(frozen=True)
class VersionNegotiation:
    """A Version Negotiation packet: the versions the server offers and the echoed CIDs."""

    dcid: bytes  # must equal the SCID we sent
    scid: bytes  # must equal the DCID we sent
    versions: tuple[int, ...]

    def echoes(self, sent_dcid: bytes, sent_scid: bytes) -> bool:
        """True when this VN answers the packet we sent (RFC 9000 §6.2 / RFC 8999 §6).

        An off-path party that never saw our packet cannot produce this echo,
        which is what makes a VN proof that our datagram reached a QUIC stack.
        """
        return self.dcid == sent_scid and self.scid == sent_dcid


def is_long_header(data: bytes) -> bool:
    return bool(data) and bool(data[0] & _LONG_HEADER_BIT)


def is_reserved_version(version: int) -> bool:
    """RFC 9000 §15: versions 0x?a?a?a?a are reserved to exercise version negotiation."""
    return version & _RESERVED_MASK == _RESERVED_PATTERN


def reserved_version(seed: int) -> int:
    """A reserved version whose free nibbles come from ``seed`` (caller supplies randomness)."""
    return (seed & ~_RESERVED_MASK & 0xFFFFFFFF) | _RESERVED_PATTERN


def parse_long_header(data: bytes) -> LongHeader:
    """Parse the RFC 8999 long header; raise `WireError` if ``data`` is not one."""
    if not is_long_header(data):
        raise WireError("not a long-header packet")
    if len(data) < 7:
        raise WireError("long header truncated")
    (version,) = struct.unpack_from("!I", data, 1)
    pos = 5
    dcid, pos = _cid(data, pos, "DCID")
    scid, pos = _cid(data, pos, "SCID")
    return LongHeader(data[0], version, dcid, scid, pos)


def _cid(data: bytes, pos: int, what: str) -> tuple[bytes, int]:
    if pos >= len(data):
        raise WireError(f"{what} length missing")
    length = data[pos]
    end = pos + 1 + length
    if end > len(data):
        raise WireError(f"{what} truncated")
    return bytes(data[pos + 1 : end]), end


def parse_version_negotiation(data: bytes) -> VersionNegotiation:
    """Parse a Version Negotiation packet; raise `WireError` on anything else."""
    header = parse_long_header(data)
    if header.version != VERSION_NEGOTIATION:
        raise WireError(f"not version negotiation (version 0x{header.version:08x})")
    body = data[header.header_len :]
    if not body or len(body) % 4:
        raise WireError(f"version list of {len(body)} bytes is not a non-empty multiple of 4")
    count = len(body) // 4
    if count > MAX_VERSIONS:
        raise WireError(f"{count} versions offered (max {MAX_VERSIONS})")
    versions = struct.unpack(f"!{count}I", body)
    return VersionNegotiation(header.dcid, header.scid, versions)


def build_version_negotiation(
    dcid: bytes, scid: bytes, versions: tuple[int, ...], unused_bits: int = 0
) -> bytes:
    """A VN packet (server side): ``dcid``/``scid`` are the client's SCID/DCID swapped."""
    if not versions or len(versions) > MAX_VERSIONS:
        raise WireError(f"a VN offers 1..{MAX_VERSIONS} versions")
    if VERSION_NEGOTIATION in versions:
        raise WireError("version 0 cannot be offered")
    return (
        bytes([_LONG_HEADER_BIT | (unused_bits & 0x7F)])
        + struct.pack("!I", VERSION_NEGOTIATION)
        + _pack_cid(dcid)
        + _pack_cid(scid)
        + struct.pack(f"!{len(versions)}I", *versions)
    )


def build_vn_probe(
    version: int,
    dcid: bytes,
    scid: bytes,
    *,
    size: int = MIN_INITIAL_SIZE,
    noise: bytes = b"",
) -> bytes:
    """A client long-header packet of exactly ``size`` bytes that only VN can answer.

    Laid out as a v1 Initial (first byte 0xc0, empty token, two-byte Length) so
    that servers parsing the v1 layout first still reach their version check.
    The payload is ``noise`` (pass random bytes so it looks encrypted), zero-padded.
    """
    if version in (VERSION_NEGOTIATION, QUIC_V1, QUIC_V2):
        raise WireError(f"version 0x{version:08x} would be processed, not negotiated")
    if not 0 <= version <= 0xFFFFFFFF:
        raise WireError("version is a uint32")
    if not 8 <= len(dcid) <= MAX_CID_V1 or len(scid) > MAX_CID_V1:
        raise WireError("a client Initial DCID is 8..20 bytes and an SCID <= 20 (RFC 9000)")
    head = (
        bytes([_LONG_HEADER_BIT | _FIXED_BIT])  # long header, fixed bit, type Initial
        + struct.pack("!I", version)
        + _pack_cid(dcid)
        + _pack_cid(scid)
        + b"\x00"  # token length 0
    )
    rest = size - len(head) - 2  # what the two-byte Length field covers
    if not MIN_INITIAL_SIZE <= size <= MAX_PROBE_SIZE or not 0 < rest <= _VARINT_2_MAX:
        raise WireError(f"probe size must be {MIN_INITIAL_SIZE}..{MAX_PROBE_SIZE} bytes")
    payload = (noise[:rest]).ljust(rest, b"\x00")
    return head + struct.pack("!H", _VARINT_2_BYTES | rest) + payload


def _pack_cid(cid: bytes) -> bytes:
    if len(cid) > 255:
        raise WireError("a connection ID is at most 255 bytes")
    return bytes([len(cid)]) + cid
