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

import contextlib
import os
import time
from collections.abc import Mapping
from dataclasses import dataclass, replace
from typing import Any, ClassVar, Self

from ..config.settings import ProbeSettings
from ..evidence import QuicVnEvidence
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
from ._net.udp import UdpChannel, icmp_evidence
from .base import Recorder
from .params import ParamError, check_keys, shown
from .tcp import require_address

__all__ = ["QuicVnParams", "budget_s", "probe"]

_SEND_AT = (0.0, 0.25, 0.5)  # fractions of the timeout at which the datagram is (re)sent
_CID_LEN = 8
# Replies we inspect before giving up on a flood of garbage; each is at most one datagram.
_MAX_REPLIES = 16


class _VNWait:
    """Reads replies until a VN echoes our connection IDs or an ICMP error arrives; keeps
    the first reason a reply was not such a VN."""

    def __init__(self, dcid: bytes, scid: bytes) -> None:
        self.dcid, self.scid = dcid, scid
        self.answer: VersionNegotiation | None = None
        self.error: OSError | None = None
        self.replies = 0
        self.invalid: str | None = None

    @property
    def done(self) -> bool:
        return self.answer is not None or self.error is not None

    async def until(self, channel: UdpChannel, until: float) -> bool:
        """Read until done or ``until`` (monotonic) passes; True once done."""
        while not self.done:  # bounded: each pass reads a datagram or ends at ``until``
            try:
                item = await channel.recv(until)
            except OSError as exc:  # ICMP on our connected socket (port unreachable ...)
                self.error = exc
                break
            if item is None:
                break
            self._handle(item[1])
        return self.done

    def _handle(self, data: bytes) -> None:
        self.replies += 1
        if self.replies > _MAX_REPLIES:
            return
        try:
            vn = parse_version_negotiation(data)
        except WireError as exc:
            self.invalid = self.invalid or str(exc)
            return
        if not vn.echoes(self.dcid, self.scid):
            self.invalid = self.invalid or "version negotiation does not echo our connection IDs"
            return
        self.answer = vn


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
    rec = Recorder(target, QuicVnEvidence())
    version = _version(target)
    dcid, scid = os.urandom(_CID_LEN), os.urandom(_CID_LEN)
    packet = build_vn_probe(version, dcid, scid, noise=os.urandom(MIN_INITIAL_SIZE))
    rec.evidence = QuicVnEvidence(probe_version=f"0x{version:08x}", datagram_bytes=len(packet))
    try:
        channel = await UdpChannel.open(*require_address(target))
    except OSError as exc:
        return rec.fail_exc(exc, Operation.CONNECT)
    wait = _VNWait(dcid, scid)
    timeout = settings.timeouts.quic_s
    with contextlib.closing(channel), rec.phase("quic_vn"):
        start = time.monotonic()
        for i in range(len(_SEND_AT)):
            channel.send(packet)
            until = _SEND_AT[i + 1] if i + 1 < len(_SEND_AT) else 1.0
            if await wait.until(channel, start + until * timeout):
                break
    icmp_errors, icmp_stray = icmp_evidence([channel.icmp])
    rec.evidence = replace(
        rec.evidence,
        datagrams_sent=channel.sent,
        datagrams_received=wait.replies,
        icmp_errors=icmp_errors,
        icmp_stray=icmp_stray,
    )
    return _outcome(rec, wait)


def _outcome(rec: Recorder[QuicVnEvidence], wait: _VNWait) -> ProbeResult:
    op = Operation.QUIC_HANDSHAKE
    if wait.error is not None:
        return rec.fail_exc(wait.error, op)
    if wait.answer is None:
        if wait.invalid is not None:
            invalid = replace(rec.evidence, invalid_reply=wait.invalid)
            return rec.fail(Failure.BAD_RESPONSE, op, invalid)
        return rec.fail(Failure.UDP_NO_RESPONSE, op)
    vn = wait.answer
    return rec.ok(
        replace(
            rec.evidence,
            offered_versions=tuple(f"0x{v:08x}" for v in vn.versions),
            offers_quic_v1=QUIC_V1 in vn.versions,
        )
    )
