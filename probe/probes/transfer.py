"""Bulk transfer probe: HTTPS download (and optional upload) over several fresh connections,
to catch throttling (FIELD.md B6) and the "16-20 KB freeze" (B7).

Each of ``params.connections`` connections, one after the other: TCP connect to
``target.address`` (the IP, never a re-resolved name), a verifying TLS handshake with
SNI/Host = ``target.server_name`` (``params.sni`` overrides), ``GET params.path``, then
count the body up to ``params.max_bytes``.  B7 hits some connections and not others, so
one sample proves little; the per-connection records and the stalled fraction are the data.

Why a hand-written HTTP/1.1 client over a raw socket and ``ssl.MemoryBIO`` instead of
aiohttp: the B7 signature is a byte count of *server->client TCP payload* (handshake
included) at which the flow stops.  aiohttp and asyncio's SSL transport hide both the
wire bytes and the timing of each TCP piece; here every piece is counted and timed as it
leaves the kernel, and TLS records are decrypted by us.  The HTTP codec is sans-IO
(`probe.wire.http1`).

Clocks (``settings.timeouts``): the whole connection is bounded by ``transfer_s``
(connect and handshake also by ``connect_s`` / ``tls_s``).  After the request: up to
``app_s`` for the first TCP byte back, then a *stall* is ``stall_s`` without a new TCP
byte before the expected end of the body, *confirmed*: the connection is watched for a
confirm window after that (``CONFIRM_FACTOR`` times ``stall_s``, or times the longest
gap that already resumed on this probe's connections if that is longer: TCP's
retransmission back-off doubles each gap), up to the deadline, and counts as stalled only
if no byte ever comes again.  B7's defining property is that the flow never resumes; a
throttled flow whose retransmissions back off does, and then counts toward throughput
(``long_gaps``, ``longest_gap_s``).  The stall clock runs on wire bytes, not on
decrypted body bytes, because a real freeze usually stops the flow in the middle of a
16 KB TLS record: zero body bytes may have been decrypted although 15 KB arrived.
A transfer still flowing when ``transfer_s`` runs out is not a failure: its throughput
is measured over what arrived (``outcome: deadline``).

Verdict (documented in docs/probes/transfer.md):

- ``stall_after_bytes`` (ours), read: at least one connection stalled with at most
  ``params.stall_max_bytes`` (64 KiB) server->client wire bytes received: the B7 window.
- any other failure of a connection, first one wins: connect / TLS failures as classified
  by `probe.classify` (they end the probe: later connections would hit the same wall);
  a stall beyond the window -> ``generic_timeout_error`` (read); RST -> ``connection_reset``;
  FIN before the end -> ``eof_error``; not HTTP -> ``bad_response``.
- ``throttled`` (ours): every connection completed but the median throughput of those
  with at least ``params.throttle_min_bytes`` of body is below ``params.throttle_kbps``
  (read; write when only the upload is slow).
- ok otherwise; ``transfer_too_small_to_measure`` flags a body too small to judge.
"""

from __future__ import annotations

import ipaddress
import math
import os
import socket
import ssl
import statistics
import time
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass, fields, replace
from typing import Any, ClassVar, Literal, Self

from ..classify import Classified, classify
from ..config.settings import ProbeSettings, Timeouts
from ..evidence import (
    TransferConnection,
    TransferEvidence,
    TransferHandshake,
    TransferRequest,
    TransferSummary,
    TransferUploads,
)
from ..model import Failure, Operation, ProbeParams, ProbeResult, Target
from ..wire import WireError
from ..wire.http1 import (
    ChunkedDecoder,
    Framing,
    ResponseHead,
    build_request,
    framing,
    head_end,
    parse_response_head,
)
from ..wire.tlsrec import server_messages
from ._net.tcp import connect, since_last_ack, watch_path
from ._net.tls import TlsClient
from ._net.tls_pump import TlsPump
from .base import Recorder
from .params import ParamError, check_keys, number_param, shown, sni_param
from .tcp import require_address
from .tls import (
    STRETCH_MAX,
    client_context,
    handshake_timeout,
    server_names,
    while_progressing,
)

__all__ = ["TransferParams", "budget_s", "probe"]

KIB = 1024
_READ = 64 * KIB  # bytes per recv(): many TCP segments, never more than this in memory
_UPLOAD_CHUNK = 16 * KIB
_UPLOAD_REPLY_MAX = 64 * KIB  # the sink's answer is a line; never read more than this
_MAX_INTERIM = 4  # 1xx responses tolerated before the real one
# A stall is confirmed only after this many more stall periods of silence (or times the
# longest gap that resumed): an exponential retransmission back-off doubles each gap, so
# a flow that is merely shaped resumes within twice its last gap.
CONFIRM_FACTOR = 2.0
_ACK_MARGIN_S = 0.1  # an ACK this long after the last data byte was not part of it


@dataclass(frozen=True)
class TransferParams(ProbeParams):
    """The ``transfer`` probe's params (strict: unknown keys are errors).  ``sni`` is
    applied by `tls.server_names`, as for the ``tls`` probe."""

    PROBE: ClassVar[str] = "transfer"
    path: str = "/"
    connections: int = 3
    max_bytes: int = 1024 * KIB
    upload_bytes: int = 0
    upload_path: str | None = None  # default: `path`
    throttle_kbps: float = 300.0
    throttle_min_bytes: int = 64 * KIB
    stall_max_bytes: int = 64 * KIB
    sni: str | None = None
    sni_given: bool = False

    @classmethod
    def parse(cls, params: Mapping[str, Any], base: Self | None = None) -> Self:
        b = base if base is not None else cls()
        check_keys("transfer", params, _PARAM_KEYS)
        sni, given = sni_param("transfer", params, b)
        throttle = params.get("throttle_kbps", b.throttle_kbps)
        if (
            isinstance(throttle, bool)
            or not isinstance(throttle, int | float)
            or not math.isfinite(throttle)
            or throttle <= 0
        ):
            raise ParamError(
                "transfer", "throttle_kbps", f"must be a number > 0, got {shown(throttle)}"
            )

        def count(name: str, lo: int, hi: int) -> int:
            return int(
                number_param("transfer", params, name, getattr(b, name), lo, hi, integer=True)
            )

        return cls(
            path=_path_param(params, "path", b.path) or "/",
            connections=count("connections", 1, 20),
            max_bytes=count("max_bytes", 1, 1024 * 1024 * KIB),
            upload_bytes=count("upload_bytes", 0, 64 * 1024 * KIB),
            upload_path=_path_param(params, "upload_path", b.upload_path),
            throttle_kbps=float(throttle),
            throttle_min_bytes=count("throttle_min_bytes", 1, 1024 * 1024 * KIB),
            stall_max_bytes=count("stall_max_bytes", 1, 1024 * 1024 * KIB),
            sni=sni,
            sni_given=given,
        )


_PARAM_KEYS = (
    "sni",
    "path",
    "connections",
    "max_bytes",
    "upload_bytes",
    "upload_path",
    "throttle_kbps",
    "throttle_min_bytes",
    "stall_max_bytes",
)


def _path_param(params: Mapping[str, Any], name: str, default: str | None) -> str | None:
    value = params.get(name, default)
    if value is None:
        return None
    if not isinstance(value, str) or not value.startswith("/"):
        raise ParamError("transfer", name, f"must be a path starting with '/', got {shown(value)}")
    try:
        build_request("GET", value, "check")  # same rule the request builder enforces
    except ValueError as exc:
        raise ParamError("transfer", name, str(exc)) from None
    return value


def budget_s(p: TransferParams, settings: ProbeSettings) -> float:
    """The longest correct run (`probes.ProbeType.budget`): every connection, download
    and upload, one after the other, each within its ``transfer_s``."""
    return p.connections * (2 if p.upload_bytes else 1) * settings.timeouts.transfer_s


class _Connection:
    """One connection's evidence, replaced step by step as its steps learn more (as a
    probe's `Recorder.evidence` is): the async steps of one connection share this one
    reference.  Floats stay exact here; `_rounded` rounds them for the record, after the
    verdict's rates and the phases have read them."""

    def __init__(self, index: int, direction: Literal["download", "upload"]) -> None:
        self.ev = TransferConnection(index=index, direction=direction, outcome="failed")


def _measured(c: TransferConnection) -> bool:
    """A throughput we can trust: completed, cut by max_bytes or by the deadline."""
    return c.outcome in ("complete", "limit", "deadline")


def _rounded(c: TransferConnection) -> TransferConnection:
    """The record as archived: floats rounded to 4 places."""
    values = ((f.name, getattr(c, f.name)) for f in fields(c))
    rounded: dict[str, Any] = {k: round(v, 4) for k, v in values if isinstance(v, float)}
    return replace(c, **rounded)


class _Failed(Exception):
    """Ends one connection with a classified failure (or a stall)."""

    def __init__(
        self,
        failure: str | Classified,
        operation: Operation,
        stage: str | None = None,
        *,
        stalled: bool = False,
    ) -> None:
        super().__init__(str(failure))
        self.failure = str(failure)
        self.operation = operation
        self.stage = stage
        self.stalled = stalled


class _Timeout(Exception):
    """A read timed out; ``clock`` says which limit bound: first_byte, stall or deadline."""

    def __init__(self, clock: str) -> None:
        super().__init__(clock)
        self.clock = clock


class _TLSConn:
    """Client TLS (`_net`'s sans-IO `TlsClient`, moved by a `TlsPump`) over a raw socket.

    Counts and timestamps every piece of TCP payload from the server (``wire_in``);
    ``mark()`` starts the response window used for first-byte, stall and throughput.
    """

    def __init__(self, sock: socket.socket, ctx: ssl.SSLContext, verify_name: str) -> None:
        self._sock = sock
        self.client = TlsClient(ctx, verify_name)
        self._pump = TlsPump(sock, self.client, read_size=_READ, on_receive=self._piece)
        self.t_last_wire = 0.0
        self._mark_wire = 0
        self.marked = False
        self.t_first_piece: float | None = None  # first TCP piece after mark()
        self._wire_after_first_piece = 0
        self.head = bytearray()  # the server's handshake flight (bounded), as evidence
        self.long_gap_s = math.inf  # set by the reader: a gap this long that resumed counts
        self.longest_gap = 0.0
        self.long_gaps = 0

    @property
    def wire_in(self) -> int:
        """Server -> client TCP payload so far, TLS records included."""
        return self._pump.received

    @property
    def eof(self) -> str | None:
        """How the server ended the stream: close_notify, ragged (FIN alone), or not yet."""
        return self.client.close_kind

    @property
    def response_wire(self) -> int:
        return self.wire_in - self._mark_wire

    def mark(self) -> None:
        self._mark_wire = self.wire_in
        self.marked = True
        self.t_first_piece = None

    def kbps(self) -> float | None:
        """Rate of the response's wire bytes, the first piece excluded (it arrived 'at once')."""
        if self.t_first_piece is None:
            return None
        elapsed = self.t_last_wire - self.t_first_piece
        moved = self.wire_in - self._wire_after_first_piece
        return moved * 8 / 1000 / elapsed if elapsed > 0 and moved > 0 else None

    async def handshake(self, first_s: float, cap_s: float) -> None:
        await while_progressing(self._pump.handshake(), first_s, cap_s, lambda: self.wire_in)

    async def send(self, data: bytes, within_s: float) -> None:
        await self._pump.write(data, within_s)

    async def recv(self, budget: Callable[[], float]) -> bytes:
        """The next decrypted piece, ``b""`` at EOF; TimeoutError when ``budget()`` (asked
        before each TCP read) passes."""
        return await self._pump.read(budget)

    def since_last_ack(self) -> float | None:
        return since_last_ack(self._sock)

    def _piece(self, data: bytes) -> None:
        """Each TCP piece from the server, already counted in ``wire_in``: its timing."""
        now = time.monotonic()
        if self.marked and self.response_wire > len(data):  # a gap inside the response
            gap = now - self.t_last_wire
            self.longest_gap = max(self.longest_gap, gap)
            self.long_gaps += gap >= self.long_gap_s
        if not self.marked and len(self.head) < _READ:
            self.head += data[: _READ - len(self.head)]
        self.t_last_wire = now
        if self.marked and self.t_first_piece is None and self.response_wire > 0:
            self.t_first_piece = now
            self._wire_after_first_piece = self.wire_in


class _Reader:
    """Decrypted pieces of one response under the probe's three clocks."""

    def __init__(
        self,
        conn: _TLSConn,
        deadline: float,
        first_byte_s: float,
        stall_s: float,
        *,
        confirm_s: float,
        stall_from_plaintext: bool,
    ) -> None:
        conn.mark()
        conn.long_gap_s = stall_s
        self.conn = conn
        self.deadline = deadline
        self.t_sent = time.monotonic()
        self.first_byte_by = self.t_sent + first_byte_s
        self.stall_s = stall_s
        self.confirm_s = confirm_s
        self.watch_to_deadline = False  # the path answers keepalives: watch it to the end
        # uploads: bytes still queued in buffers may take long to drain, so the stall clock
        # starts only once the server has answered, not at the first TCP byte back
        self.stall_from_plaintext = stall_from_plaintext
        self.t_first_plaintext: float | None = None
        self.clock = "deadline"

    @property
    def started(self) -> bool:
        if self.stall_from_plaintext:
            return self.t_first_plaintext is not None
        return self.conn.response_wire > 0

    def silent_s(self) -> float:
        """Time since the last byte of the response (0 before it started)."""
        if not self.started:
            return 0.0
        last = self.t_first_plaintext if self.stall_from_plaintext else self.conn.t_last_wire
        last = max(last or 0.0, self.conn.t_last_wire)
        return time.monotonic() - last

    def _budget(self) -> float:
        now = time.monotonic()
        left = self.deadline - now
        # The confirm window grows with the longest gap that already resumed on this very
        # connection: each retransmission back-off doubles the gap.
        confirm = max(self.confirm_s, CONFIRM_FACTOR * self.conn.longest_gap)
        clock, limit = (
            ("stall", self.stall_s + confirm)
            if self.started
            else ("first_byte", self.first_byte_by - now)
        )
        if self.watch_to_deadline:
            clock, limit = "deadline", left
        if left <= limit:
            self.clock = "deadline"
            return max(left, 0.0)
        self.clock = clock
        return limit

    def path_alive(self) -> bool:
        """An ACK came back from the server's kernel during this silence (a keepalive's
        answer): the path works both ways, so the flow may yet resume."""
        since = self.conn.since_last_ack()
        return since is not None and since < self.silent_s() - _ACK_MARGIN_S

    async def next(self) -> bytes:
        while True:  # bounded: the second pass runs to the deadline at most
            try:
                data = await self.conn.recv(self._budget)
                break
            except TimeoutError:
                if self.clock == "stall" and not self.watch_to_deadline and self.path_alive():
                    self.watch_to_deadline = True
                    continue
                raise _Timeout(self.clock) from None
            except (OSError, EOFError) as exc:  # RST, TLS alert or bad record mid-stream
                raise _Failed(classify(exc, Operation.READ), Operation.READ) from exc
        if data and self.t_first_plaintext is None:
            self.t_first_plaintext = time.monotonic()
        return data


class _BodyCounter:
    """Counts body bytes under the response's framing; ``done`` at the framed end."""

    def __init__(self, fr: Framing) -> None:
        self.fr = fr
        self._remaining = fr.length if fr.kind == "length" else None
        self._chunked = ChunkedDecoder() if fr.kind == "chunked" else None

    @property
    def done(self) -> bool:
        if self._chunked is not None:
            return self._chunked.done
        return self._remaining == 0

    def feed(self, data: bytes) -> int:
        if self._chunked is not None:
            return self._chunked.feed(data)
        if self._remaining is None:
            return len(data)
        take = min(self._remaining, len(data))
        self._remaining -= take
        return take


def _host_header(name: str, port: int) -> str:
    try:
        literal = ipaddress.ip_address(name)
    except ValueError:
        host = name
    else:
        host = f"[{literal}]" if literal.version == 6 else str(literal)
    return host if port == 443 else f"{host}:{port}"


class _Transfer:
    """One probe run: the target, the clocks and the TLS context shared by its connections."""

    def __init__(self, target: Target, settings: ProbeSettings, params: TransferParams) -> None:
        self.address, self.port = require_address(target)
        self.sni, self.verify_name = server_names(target, params)
        self.host = _host_header(self.sni or self.verify_name, self.port)
        self.ctx = client_context(settings.tls.ca_file, ("http/1.1",))
        self.t: Timeouts = settings.timeouts
        self.p = params
        self.longest_gap = 0.0  # over this probe's connections: how slow the path showed
        self.slow = False  # an earlier connection was throttled or had to resume after a gap

    @property
    def confirm_s(self) -> float:
        """The stall confirm window: path-aware, so a path that already showed long
        resumed gaps gets proportionally longer before a silence counts as a freeze."""
        return CONFIRM_FACTOR * max(self.t.stall_s, self.longest_gap)

    async def download(self, index: int) -> TransferConnection:
        rec = _Connection(index, "download")
        request = build_request("GET", self.p.path, self.host)

        async def exchange(conn: _TLSConn, deadline: float) -> None:
            await self._send(conn, request, deadline, self.t.app_s)
            # app_s is a floor for the first byte too: after a slow connect, it grows
            first_byte_s, _ = handshake_timeout(self.t.app_s, rec.ev.connect_s)
            reader = _Reader(
                conn,
                deadline,
                first_byte_s,
                self.t.stall_s,
                confirm_s=self.confirm_s,
                stall_from_plaintext=False,
            )
            await self._response(rec, reader, "GET", self.p.max_bytes)

        return await self._connection(rec, exchange)

    async def upload(self, index: int) -> TransferConnection:
        rec = _Connection(index, "upload")
        size = self.p.upload_bytes
        head = build_request(
            "POST", self.p.upload_path or self.p.path, self.host, content_length=size
        )

        async def exchange(conn: _TLSConn, deadline: float) -> None:
            await self._send(conn, head, deadline, self.t.app_s)
            block = os.urandom(_UPLOAD_CHUNK)  # incompressible, though TLS hides it anyway
            t_start = time.monotonic()
            sent = 0
            while sent < size:  # bounded: each pass sends >= 1 byte or raises
                chunk = block[: min(_UPLOAD_CHUNK, size - sent)]
                await self._send(conn, chunk, deadline, self.t.stall_s)
                sent += len(chunk)
                rec.ev = replace(rec.ev, upload_bytes=sent)
            reader = _Reader(
                conn,
                deadline,
                math.inf,
                self.t.stall_s,
                confirm_s=self.confirm_s,
                stall_from_plaintext=True,
            )
            await self._response(rec, reader, "POST", _UPLOAD_REPLY_MAX)
            if reader.t_first_plaintext is not None and reader.t_first_plaintext > t_start:
                # the sink answers after reading everything: this is end-to-end upstream rate
                kbps = size * 8 / 1000 / (reader.t_first_plaintext - t_start)
                rec.ev = replace(rec.ev, upload_kbps=kbps)

        return await self._connection(rec, exchange)

    async def _connection(
        self, rec: _Connection, exchange: Callable[[_TLSConn, float], Awaitable[None]]
    ) -> TransferConnection:
        t0 = time.monotonic()
        deadline = t0 + self.t.transfer_s
        sock: socket.socket | None = None
        conn: _TLSConn | None = None
        try:
            sock = await self._connect(rec, deadline)
            watch_path(sock)
            conn = _TLSConn(sock, self.ctx, self.verify_name)
            await self._handshake(rec, conn, deadline)
            await exchange(conn, deadline)
        except _Failed as failed:
            rec.ev = replace(
                rec.ev,
                outcome="stalled" if failed.stalled else "failed",
                failure=failed.failure,
                failed_operation=str(failed.operation),
                stage=rec.ev.stage or failed.stage,
            )
        finally:
            rec.ev = replace(rec.ev, duration_s=time.monotonic() - t0)
            if conn is not None:
                self._ended(rec, conn)
            if sock is not None:
                sock.close()  # FIN (RST if unread data remains): we are done either way
        return rec.ev

    def _ended(self, rec: _Connection, conn: _TLSConn) -> None:
        """What the connection's wire showed, into its record and into what the probe
        knows of the path (``longest_gap``, ``slow``)."""
        c = rec.ev = replace(
            rec.ev,
            wire_bytes=conn.wire_in,
            response_wire_bytes=conn.response_wire if conn.marked else 0,
            # an upload's reply is a line: its rate says nothing, upload_kbps does
            kbps=conn.kbps() if rec.ev.direction == "download" else None,
            eof=conn.eof,
            long_gaps=conn.long_gaps,
            longest_gap_s=conn.longest_gap or rec.ev.longest_gap_s,
        )
        if c.outcome != "stalled":  # a stall's silence is not a resumed gap
            self.longest_gap = max(self.longest_gap, conn.longest_gap)
        slow_rate = c.kbps is not None and c.kbps < self.p.throttle_kbps
        self.slow = self.slow or c.long_gaps > 0 or (_measured(c) and slow_rate)

    async def _connect(self, rec: _Connection, deadline: float) -> socket.socket:
        start = time.monotonic()
        try:
            # On a path an earlier connection showed to be slow, the shaper's queue may still
            # hold that connection's tail: the SYN-ACK can wait for a retransmission.
            limit = self.t.connect_s * (STRETCH_MAX if self.slow else 1.0)
            return await connect(self.address, self.port, _left(deadline, limit))
        except OSError as exc:  # TimeoutError included
            raise _Failed(classify(exc, Operation.CONNECT), Operation.CONNECT) from exc
        finally:
            rec.ev = replace(rec.ev, connect_s=time.monotonic() - start)

    async def _handshake(self, rec: _Connection, conn: _TLSConn, deadline: float) -> None:
        start = time.monotonic()
        first_s, cap_s = handshake_timeout(self.t.tls_s, rec.ev.connect_s)
        try:
            await conn.handshake(_left(deadline, first_s), _left(deadline, cap_s))
        except (OSError, EOFError) as exc:  # SSLError and TimeoutError are OSErrors
            messages = tuple(server_messages(bytes(conn.head)))
            rec.ev = replace(rec.ev, handshake_messages=messages)
            raise _Failed(classify(exc, Operation.TLS_HANDSHAKE), Operation.TLS_HANDSHAKE) from exc
        finally:
            tls_s = time.monotonic() - start
            rec.ev = replace(rec.ev, tls_s=tls_s, handshake_wire_bytes=conn.wire_in)

    async def _send(self, conn: _TLSConn, data: bytes, deadline: float, limit: float) -> None:
        try:
            await conn.send(data, _left(deadline, limit))
        except (OSError, ssl.SSLError) as exc:
            raise _Failed(classify(exc, Operation.WRITE), Operation.WRITE) from exc

    async def _response(
        self, rec: _Connection, reader: _Reader, method: str, max_bytes: int
    ) -> None:
        try:
            head, rest = await self._head(rec, reader)
            await self._body(rec, reader, head, rest, method, max_bytes)
        except _Timeout as timeout:
            self._timed_out(rec, reader, timeout.clock)
        except _Failed as failed:
            failed.stage = failed.stage or ("body" if rec.ev.status is not None else "head")
            raise
        except WireError as exc:
            stage = "body" if rec.ev.status is not None else "head"
            raise _Failed(Failure.BAD_RESPONSE, Operation.READ, stage) from exc

    async def _head(self, rec: _Connection, reader: _Reader) -> tuple[ResponseHead, bytes]:
        buf = bytearray()
        interim = 0
        while True:  # bounded: head_end() caps the head size, _MAX_INTERIM the 1xx count
            end = head_end(bytes(buf))
            if end is None:
                data = await reader.next()
                if not data:
                    raise _Failed(Failure.EOF, Operation.READ, "head")
                if rec.ev.ttfb_s is None:
                    rec.ev = replace(rec.ev, ttfb_s=time.monotonic() - reader.t_sent)
                buf += data
                continue
            head = parse_response_head(bytes(buf[:end]))
            del buf[:end]
            if 100 <= head.status < 200 and head.status != 101:
                interim += 1
                if interim > _MAX_INTERIM:
                    raise WireError("too many interim (1xx) responses")
                continue
            return head, bytes(buf)

    async def _body(
        self,
        rec: _Connection,
        reader: _Reader,
        head: ResponseHead,
        rest: bytes,
        method: str,
        max_bytes: int,
    ) -> None:
        fr = framing(head, request_method=method)
        rec.ev = replace(rec.ev, status=head.status, framing=fr.kind, content_length=fr.length)
        counter = _BodyCounter(fr)
        body = counter.feed(rest)
        try:
            while not counter.done and body < max_bytes:
                data = await reader.next()  # bounded by the clocks; each piece is >= 1 byte
                if not data:
                    if fr.kind == "close":
                        break  # the end of a close-delimited body
                    raise _Failed(Failure.EOF, Operation.READ, "body")
                body += counter.feed(data)
        finally:  # a stall or a failure reports the body counted so far
            rec.ev = replace(rec.ev, body_bytes=body)
        # the framed end, or the EOF of a close-delimited body; otherwise we stopped at max
        outcome = "complete" if counter.done or body < max_bytes else "limit"
        rec.ev = replace(rec.ev, outcome=outcome)

    def _timed_out(self, rec: _Connection, reader: _Reader, clock: str) -> None:
        """Turn a read timeout into an outcome: first-byte timeout, stall, or deadline."""
        stage = "body" if rec.ev.status is not None else "head"
        if clock == "first_byte":
            raise _Failed(Failure.GENERIC_TIMEOUT, Operation.READ, "first_byte")
        silent = reader.silent_s()
        # At the deadline, a flow silent for at least stall_s never resumed: a stall
        # confirmed as far as we could watch.  Otherwise it was still flowing.
        if clock == "deadline" and silent < self.t.stall_s:
            if rec.ev.status is not None:
                rec.ev = replace(rec.ev, outcome="deadline")  # still flowing: measured
                return
            raise _Failed(Failure.GENERIC_TIMEOUT, Operation.READ, stage)
        rec.ev = replace(
            rec.ev,
            silent_s=silent,
            acks_in_silence=reader.watch_to_deadline,
            stalled_at_bytes=rec.ev.body_bytes,
            stalled_at_wire_bytes=reader.conn.wire_in,
        )
        in_window = reader.conn.wire_in <= self.p.stall_max_bytes
        failure = Failure.STALL_AFTER_BYTES if in_window else Failure.GENERIC_TIMEOUT
        raise _Failed(failure, Operation.READ, stage, stalled=True)


def _left(deadline: float, limit: float) -> float:
    return max(0.0, min(limit, deadline - time.monotonic()))


def _ends_probe(c: TransferConnection) -> bool:
    """Connect and TLS failures stop the run: further connections hit the same wall."""
    return c.failed_operation in (Operation.CONNECT, Operation.TLS_HANDSHAKE)


async def probe(target: Target, settings: ProbeSettings) -> ProbeResult:
    """Download (and optionally upload) over fresh TLS connections; judge stalls and rate."""
    rec = Recorder(target, TransferEvidence())
    params = TransferParams.of(target)
    run = _Transfer(target, settings, params)
    rec.evidence = TransferEvidence(request=TransferRequest(sni=run.sni, path=params.path))
    downloads: list[TransferConnection] = []
    for index in range(params.connections):  # sequential: one flow at a time, like a client
        downloads.append(await run.download(index))
        if _ends_probe(downloads[-1]):
            break
    uploads: list[TransferConnection] = []
    if params.upload_bytes and not _ends_probe(downloads[-1]):
        for index in range(params.connections):
            uploads.append(await run.upload(index))
            if _ends_probe(uploads[-1]):
                break
    _phases(rec, downloads[0])
    return _verdict(rec, params, downloads, uploads)


def _phases(rec: Recorder[TransferEvidence], first: TransferConnection) -> None:
    for name, value in (
        ("connect", first.connect_s),
        ("tls", first.tls_s),
        ("first_byte", first.ttfb_s),
        ("transfer", first.duration_s),
    ):
        if value is not None:
            rec.phases[name] = value


def _median(values: list[float]) -> float | None:
    return round(statistics.median(values), 1) if values else None


def _verdict(
    rec: Recorder[TransferEvidence],
    params: TransferParams,
    downloads: list[TransferConnection],
    uploads: list[TransferConnection],
) -> ProbeResult:
    stalled = [c for c in downloads if c.outcome == "stalled"]
    # A connection the deadline cut short is measured whatever its size: it ran for the
    # whole of transfer_s without reaching max_bytes, which is itself the finding.
    down_kbps = [
        c.kbps
        for c in downloads
        if _measured(c)
        and c.kbps is not None
        and (c.body_bytes >= params.throttle_min_bytes or c.outcome == "deadline")
    ]
    up_kbps = [
        c.upload_kbps
        for c in uploads
        if _measured(c)
        and c.upload_kbps is not None
        and params.upload_bytes >= params.throttle_min_bytes
    ]
    median_down, median_up = _median(down_kbps), _median(up_kbps)
    summary = TransferSummary(
        connections=tuple(_rounded(c) for c in downloads),
        connections_attempted=len(downloads),
        stalled_connections=len(stalled),
        stalled_fraction=round(len(stalled) / len(downloads), 3),
        stalled_at_bytes=tuple(c.stalled_at_bytes for c in stalled),
        stalled_at_wire_bytes=tuple(c.stalled_at_wire_bytes for c in stalled),
        median_kbps=median_down,
        measured_connections=len(down_kbps),
        throttle_kbps=params.throttle_kbps,
    )
    rec.evidence = replace(rec.evidence, summary=summary)
    if uploads:
        upload = TransferUploads(
            uploads=tuple(_rounded(c) for c in uploads), median_upload_kbps=median_up
        )
        rec.evidence = replace(rec.evidence, upload=upload)
    if any(c.status is not None and c.status >= 400 for c in downloads + uploads):
        rec.flag("http_error_status")

    if any(c.failure == Failure.STALL_AFTER_BYTES for c in downloads):
        return rec.fail(Failure.STALL_AFTER_BYTES, Operation.READ)
    # A later connection that could not connect or finish its handshake after an earlier
    # one was measured met the path's congestion (the shaper's queue), not a block: the
    # measured throughput stands, the failure stays in its connection record.
    measured_before = False
    counted: list[TransferConnection] = []
    for c in downloads + uploads:
        if measured_before and _ends_probe(c):
            rec.flag("transfer_connection_failed_after_measured")
            continue
        measured_before = measured_before or _measured(c)
        counted.append(c)
    failed = next((c for c in counted if c.failure is not None), None)
    if failed is not None and failed.failed_operation == Operation.TLS_HANDSHAKE:
        # the same shape as the tls probe's, for the verdict's handshake-progress rule
        handshake = TransferHandshake(
            bytes_received=failed.handshake_wire_bytes or 0,
            server_messages=tuple(failed.handshake_messages or ()),
        )
        rec.evidence = replace(rec.evidence, handshake=handshake)
    if failed is not None and failed.failure is not None and failed.failed_operation is not None:
        return rec.fail(failed.failure, Operation(failed.failed_operation))

    slow = []
    if median_down is not None and median_down < params.throttle_kbps:
        slow.append("download")
    if median_up is not None and median_up < params.throttle_kbps:
        slow.append("upload")
    if not down_kbps and not up_kbps:
        rec.flag("transfer_too_small_to_measure")
    if slow:
        rec.evidence = replace(rec.evidence, throttled_directions=tuple(slow))
        operation = Operation.READ if "download" in slow else Operation.WRITE
        return rec.fail(Failure.THROTTLED, operation)
    return rec.ok()
