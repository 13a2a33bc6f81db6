"""QUIC version-negotiation probe: "does a QUIC stack answer at this address and port?"

Sends one 1200-byte long-header datagram carrying a reserved version
(``0x?a?a?a?a``, RFC 9000 §15) and random connection IDs, laid out like an
Initial (see `probe.wire.quic`).  Any live QUIC server must answer Version
Negotiation; success is a well-formed VN that echoes our connection IDs (an
off-path party cannot forge the echo without seeing our packet).

Paired with the ``quic`` probe against the same address it separates Russia's
TSPU QUIC filter (B8: drops UDP/443 datagrams >= 1001 bytes whose version field is
0x00000001, or filters on the SNI of the decrypted v1 Initial) from "UDP to this
address is dropped": under B8 this probe is answered while the v1 handshake times
out.  It is as large as a real Initial on purpose, so size alone is not what it
tests.

The datagram is resent at 1/4 and 1/2 of ``timeouts.quic_s`` (three sends at most)
so one lost packet does not read as blocking.  Failures (failed_operation
``quic_handshake``; ``connect`` only if the local socket cannot be set up):
``udp_no_response`` (silence), ``connection_refused`` (ICMP port unreachable on
our connected socket) and other socket errors via `classify`, ``bad_response``
(only replies that are not a VN echoing our IDs).

Params: ``version`` (int or "0x..." string; default a fresh random reserved version).
"""

from __future__ import annotations

import asyncio
import os
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, ClassVar, Self

from ..config.settings import ProbeSettings
from ..model import Failure, Operation, ProbeParams, ProbeResult, Target
from ..wire import WireError
from ..wire.quic import (
    MIN_INITIAL_SIZE,
    QUIC_V1,
    QUIC_V2,
    VersionNegotiation,
    build_vn_probe,
    parse_version_negotiation,
    reserved_version,
)
from .base import Recorder
from .params import ParamError, check_keys, shown
from .quic import connected_udp_socket
from .tcp import require_address

__all__ = ["QuicVnParams", "budget_s", "probe"]

_SEND_AT = (0.0, 0.25, 0.5)  # fractions of the timeout at which the datagram is (re)sent
_CID_LEN = 8
# Replies we inspect before giving up on a flood of garbage; each is at most one datagram.
_MAX_REPLIES = 16


class _VNProtocol(asyncio.DatagramProtocol):
    """Waits for a VN echoing our connection IDs; keeps the first reason a reply was not one."""

    def __init__(self, dcid: bytes, scid: bytes) -> None:
        self.dcid, self.scid = dcid, scid
        self.answer: asyncio.Future[VersionNegotiation] = asyncio.get_running_loop().create_future()
        self.replies = 0
        self.invalid: str | None = None

    def datagram_received(self, data: bytes, addr: Any) -> None:
        self.replies += 1
        if self.answer.done() or self.replies > _MAX_REPLIES:
            return
        try:
            vn = parse_version_negotiation(data)
        except WireError as exc:
            self.invalid = self.invalid or str(exc)
            return
        if not vn.echoes(self.dcid, self.scid):
            self.invalid = self.invalid or "version negotiation does not echo our connection IDs"
            return
        self.answer.set_result(vn)

    def error_received(self, exc: Exception) -> None:
        if not self.answer.done():
            self.answer.set_exception(exc)


@dataclass(frozen=True)
class QuicVnParams(ProbeParams):
    """``version``: None (default) for a fresh random reserved version per run."""

    PROBE: ClassVar[str] = "quic_vn"
    version: int | None = None

    @classmethod
    def parse(cls, params: Mapping[str, Any], base: Self | None = None) -> Self:
        """``version``: an int or a ``"0x..."`` string, one no server would accept."""
        b = base if base is not None else cls()
        check_keys("quic_vn", params, ("version",))
        raw = params.get("version", b.version)
        if raw is None:
            return cls(None)
        version = _as_int(raw)
        if version is None or not 0 <= version <= 0xFFFFFFFF:
            raise ParamError(
                "quic_vn", "version", f"must be a 32-bit version like 0xbabababa, got {shown(raw)}"
            )
        if version in (0, QUIC_V1, QUIC_V2):
            # a server processes these (or, for 0, reads the packet as a VN): no negotiation
            raise ParamError("quic_vn", "version", f"0x{version:08x} would not be negotiated")
        return cls(version)


def budget_s(_p: QuicVnParams, settings: ProbeSettings) -> float:
    """The longest correct run (`probes.ProbeType.budget`): the sends spread over ``quic_s``."""
    return settings.timeouts.quic_s


def _as_int(raw: object) -> int | None:
    if isinstance(raw, bool):
        return None
    if isinstance(raw, int):
        return raw
    if isinstance(raw, str):
        try:
            return int(raw, 0)
        except ValueError:
            return None
    return None


def _version(target: Target) -> int:
    version = QuicVnParams.of(target).version
    if version is None:
        return reserved_version(int.from_bytes(os.urandom(4), "big"))
    return version


async def probe(target: Target, settings: ProbeSettings) -> ProbeResult:
    rec = Recorder(target)
    version = _version(target)
    dcid, scid = os.urandom(_CID_LEN), os.urandom(_CID_LEN)
    packet = build_vn_probe(version, dcid, scid, noise=os.urandom(MIN_INITIAL_SIZE))
    rec.details.update(probe_version=f"0x{version:08x}", datagram_bytes=len(packet))
    try:
        sock = connected_udp_socket(*require_address(target))
    except OSError as exc:
        return rec.fail_exc(exc, Operation.CONNECT)

    loop = asyncio.get_running_loop()
    transport, proto = await loop.create_datagram_endpoint(
        lambda: _VNProtocol(dcid, scid), sock=sock
    )
    timeout = settings.timeouts.quic_s
    sent = 0
    try:
        with rec.phase("quic_vn"):
            start = loop.time()
            for i in range(len(_SEND_AT)):
                transport.sendto(packet)
                sent += 1
                until = _SEND_AT[i + 1] if i + 1 < len(_SEND_AT) else 1.0
                await asyncio.wait(
                    {proto.answer}, timeout=max(0.0, start + until * timeout - loop.time())
                )
                if proto.answer.done():
                    break
    finally:
        transport.close()
    rec.details.update(datagrams_sent=sent, datagrams_received=proto.replies)
    return _outcome(rec, proto)


def _outcome(rec: Recorder, proto: _VNProtocol) -> ProbeResult:
    op = Operation.QUIC_HANDSHAKE
    if not proto.answer.done():
        if proto.invalid is not None:
            return rec.fail(Failure.BAD_RESPONSE, op, invalid_reply=proto.invalid)
        return rec.fail(Failure.UDP_NO_RESPONSE, op)
    exc = proto.answer.exception()
    if exc is not None:
        return rec.fail_exc(exc, op)
    vn = proto.answer.result()
    return rec.ok(
        offered_versions=[f"0x{v:08x}" for v in vn.versions],
        offers_quic_v1=QUIC_V1 in vn.versions,
    )
