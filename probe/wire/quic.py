"""QUIC Version Negotiation for the reserved-version probe, sans-IO, over aioquic's codec.

Just enough of QUIC to ask a UDP endpoint "do you speak QUIC?" without speaking any
QUIC version: send a long-header packet carrying a reserved version, and a live QUIC
server must answer Version Negotiation (RFC 9000 §6.1).  Sources: RFC 8999
(version-independent properties: long header, VN layout), RFC 9000 §15 (reserved
versions ``0x?a?a?a?a``), §17.2 (long header), §17.2.1 (VN), §17.2.2 and §14.1 (Initial
layout, 1200-byte minimum).

aioquic already parses every long header and VN packet (``pull_quic_header``) and
encodes VN (``encode_quic_version_negotiation``): this module wraps them, so that
bytes from a censor or a hostile endpoint raise only `WireError`, and keeps what aioquic
has no word for:

- reserved versions (`is_reserved_version`, `reserved_version`);
- the probe packet (`build_vn_probe`): aioquic only builds packets of versions it
  speaks, with keys; ours is laid out like a v1 Initial (fixed bit, type 0, token
  length 0, a Length field covering the rest) although the version is reserved, because
  some servers (aioquic among them) parse the v1 layout before looking at the version
  and silently drop anything else;
- `VersionNegotiation.echoes`: whether a VN answers *our* packet.

Connection IDs are at most 20 bytes here (aioquic's limit, QUIC v1 and v2's): RFC 8999
allows 255 for other versions, but a VN echoes the IDs we sent, and we send v1-sized ones.
"""

from __future__ import annotations

from dataclasses import dataclass

from aioquic.buffer import Buffer, BufferReadError  # type: ignore[attr-defined]  # re-exported
from aioquic.quic.packet import (
    CONNECTION_ID_MAX_SIZE,
    QuicPacketType,
    QuicProtocolVersion,
    encode_long_header_first_byte,
    encode_quic_version_negotiation,
    pull_quic_header,
)
from aioquic.quic.packet import is_long_header as _is_long_header_byte

from . import WireError

__all__ = [
    "MAX_CID_V1",
    "MAX_VERSIONS",
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

QUIC_V1 = int(QuicProtocolVersion.VERSION_1)
QUIC_V2 = int(QuicProtocolVersion.VERSION_2)  # RFC 9369
VERSION_NEGOTIATION = int(QuicProtocolVersion.NEGOTIATION)

# RFC 9000 §14.1: a client pads every datagram carrying an Initial to >= 1200 bytes,
# and servers drop smaller ones.  It is also why TSPU's ">= 1001 bytes" rule hits
# every real QUIC v1 client.
MIN_INITIAL_SIZE = 1200
# Keep the probe inside one Ethernet-MTU IPv6 datagram (1500 - 40 - 8).
MAX_PROBE_SIZE = 1452
MAX_CID_V1 = CONNECTION_ID_MAX_SIZE  # 20, RFC 9000 §17.2
# A VN reply carries a handful of versions; a list longer than this is not a server
# describing itself, and refusing it keeps evidence small.
MAX_VERSIONS = 64

_RESERVED_MASK = 0x0F0F0F0F
_RESERVED_PATTERN = 0x0A0A0A0A
_VARINT_2_BYTES = 0x4000  # RFC 9000 §16: top bits 01 = two-byte varint
_VARINT_2_MAX = 0x3FFF


@dataclass(frozen=True)
class LongHeader:
    """The version-independent part of a long-header packet."""

    version: int
    dcid: bytes
    scid: bytes


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
    return bool(data) and _is_long_header_byte(data[0])


def is_reserved_version(version: int) -> bool:
    """RFC 9000 §15: versions 0x?a?a?a?a are reserved to exercise version negotiation."""
    return version & _RESERVED_MASK == _RESERVED_PATTERN


def reserved_version(seed: int) -> int:
    """A reserved version whose free nibbles come from ``seed`` (caller supplies randomness)."""
    return (seed & ~_RESERVED_MASK & 0xFFFFFFFF) | _RESERVED_PATTERN


def _pull_long_header(data: bytes) -> tuple[int, bytes, bytes, list[int]]:
    """aioquic's header parser, made total: (version, DCID, SCID, VN versions)."""
    if not is_long_header(data):
        raise WireError("not a long-header packet")
    try:
        header = pull_quic_header(Buffer(data=data))
    except (BufferReadError, ValueError, KeyError) as exc:  # aioquic's ways of saying "no"
        raise WireError(f"unparsable long header: {exc}") from exc
    assert header.version is not None  # a long header always has one
    return header.version, header.destination_cid, header.source_cid, header.supported_versions


def parse_long_header(data: bytes) -> LongHeader:
    """Parse a long-header packet's version and CIDs; raise `WireError` if ``data`` is not one."""
    version, dcid, scid, _ = _pull_long_header(data)
    return LongHeader(version, dcid, scid)


def parse_version_negotiation(data: bytes) -> VersionNegotiation:
    """Parse a Version Negotiation packet; raise `WireError` on anything else."""
    version, dcid, scid, versions = _pull_long_header(data)
    if version != VERSION_NEGOTIATION:
        raise WireError(f"not version negotiation (version 0x{version:08x})")
    if not versions:
        raise WireError("version negotiation offers no version")
    if len(versions) > MAX_VERSIONS:
        raise WireError(f"{len(versions)} versions offered (max {MAX_VERSIONS})")
    return VersionNegotiation(dcid, scid, tuple(versions))


def build_version_negotiation(dcid: bytes, scid: bytes, versions: tuple[int, ...]) -> bytes:
    """A VN packet (server side): ``dcid``/``scid`` are the client's SCID/DCID swapped.
    aioquic fills the first byte's unused bits with random ones (RFC 8999 §6)."""
    if not versions or len(versions) > MAX_VERSIONS:
        raise WireError(f"a VN offers 1..{MAX_VERSIONS} versions")
    if VERSION_NEGOTIATION in versions:
        raise WireError("version 0 cannot be offered")
    if len(dcid) > MAX_CID_V1 or len(scid) > MAX_CID_V1:
        raise WireError(f"a connection ID is at most {MAX_CID_V1} bytes here")
    return bytes(
        encode_quic_version_negotiation(
            source_cid=scid, destination_cid=dcid, supported_versions=list(versions)
        )
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
    head_len = 1 + 4 + 1 + len(dcid) + 1 + len(scid) + 1  # ... token length 0
    rest = size - head_len - 2  # what the two-byte Length field covers
    if not MIN_INITIAL_SIZE <= size <= MAX_PROBE_SIZE or not 0 < rest <= _VARINT_2_MAX:
        raise WireError(f"probe size must be {MIN_INITIAL_SIZE}..{MAX_PROBE_SIZE} bytes")
    buf = Buffer(capacity=size)
    # a reserved version is not v2, so aioquic lays the first byte out as v1's Initial
    buf.push_uint8(encode_long_header_first_byte(version, QuicPacketType.INITIAL, 0))
    buf.push_uint32(version)
    for cid in (dcid, scid):
        buf.push_uint8(len(cid))
        buf.push_bytes(cid)
    buf.push_uint_var(0)  # token length
    buf.push_uint16(_VARINT_2_BYTES | rest)  # fixed two-byte varint: the size is exact
    buf.push_bytes(noise[:rest].ljust(rest, b"\x00"))
    return bytes(buf.data)
