"""Append-only measurement archive: one JSON object per line, in OONI's envelope.

Every `ProbeResult` becomes one line shaped like an OONI measurement (ooni/spec
``data-formats``: df-000 base envelope, df-002 ``queries``, df-005
``tcp_connect``, df-006 ``tls_handshakes``/``quic_handshakes``, df-008
``network_events``) so OONI tooling and habits apply, with our complete result
under ``test_keys.probe_result``.  See docs/archive.md.

Crash safety.  The current file is opened with ``O_APPEND`` and each line is
handed to the kernel in one ``os.write`` (no user-space buffer, so nothing to
flush): a ``kill -9`` loses at most the line being written and can never tear
an earlier one.  If a write did leave a fragment (disk full, power loss), the
next line starts with a newline so the fragment stays alone on its line; the
reader skips and counts it.  No fsync per line: page cache survives the death
of the process, only a power loss can drop the last lines.

Event loop.  `ArchiveWriter.write` runs synchronously in the caller, on purpose.
The append itself is one syscall into the page cache (~10-70 us for a 2 KiB
line).  Building the envelope and encoding JSON costs a few hundred
microseconds of CPU, and that cost would not leave the loop by moving it to a
thread: it holds the GIL either way, and a loop waiting for the GIL can be
delayed by a whole switch interval (5 ms), worse for RTT timing than the work
itself.  Only the slow, I/O-heavy part, gzip of a rotated file and retention,
runs in one background thread.
"""

from __future__ import annotations

import base64
import contextlib
import dataclasses
import datetime as dt
import enum
import gzip
import ipaddress
import json
import logging
import math
import os
import platform
import re
import shutil
import ssl
import sys
import threading
import uuid
from collections.abc import Callable, Iterator, Mapping
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path
from typing import IO, Any, cast

import dns.rcode

from . import __version__
from .config.settings import ArchiveSettings
from .model import Failure, Operation, ProbeResult, Target, Vantage

__all__ = [
    "CURRENT_NAME",
    "ArchiveWriter",
    "ReadStats",
    "envelope",
    "iter_archive",
    "to_jsonable",
]

log = logging.getLogger(__name__)

TEST_NAME = "messenger_reachability"
TEST_VERSION = "0.1.0"
SOFTWARE_NAME = "messenger-reachability-probe"
DATA_FORMAT_VERSION = "0.2.0"  # OONI base data format version we follow
EXTENSIONS = {"dnst": 0, "netevents": 0, "tcpconnect": 0, "tlshandshake": 0}
OONI_TIME = "%Y-%m-%d %H:%M:%S"

CURRENT_NAME = "measurements.jsonl"
_ROTATED = re.compile(r"^measurements-(\d{8}T\d{12}Z)(?:-(\d+))?\.jsonl(\.gz)?$")
_MAX_DEPTH = 32
_UDP_PROBES = frozenset({"quic", "quic_vn", "stun"})  # UDP unless details say otherwise


# -- JSON-safe values -----------------------------------------------------------


def _binary(data: bytes) -> dict[str, str]:
    """OONI's BinaryData object (df-001)."""
    return {"data": base64.b64encode(data).decode("ascii"), "format": "base64"}


def to_jsonable(value: Any, _depth: int = 0) -> Any:
    """A JSON-safe copy of evidence: never raises, whatever a probe put in ``details``.

    bytes -> OONI BinaryData; non-finite floats -> "nan"/"inf"/"-inf" strings
    (JSON has no such numbers); sets -> sorted lists; unknown objects -> str().
    """
    if value is None or isinstance(value, bool | int | str):
        return value
    if isinstance(value, float):
        return value if math.isfinite(value) else str(value)
    if _depth >= _MAX_DEPTH:
        return "<too deep>"
    if isinstance(value, bytes | bytearray | memoryview):
        return _binary(bytes(value))
    if isinstance(value, enum.Enum):
        return to_jsonable(value.value, _depth + 1)
    if isinstance(value, dt.datetime | dt.date | dt.time):
        return value.isoformat()
    if isinstance(value, Mapping):
        return {str(k): to_jsonable(v, _depth + 1) for k, v in value.items()}
    if isinstance(value, set | frozenset):
        return sorted((to_jsonable(v, _depth + 1) for v in value), key=repr)
    if isinstance(value, list | tuple):
        return [to_jsonable(v, _depth + 1) for v in value]
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        fields = {f.name: getattr(value, f.name) for f in dataclasses.fields(value)}
        return to_jsonable(fields, _depth + 1)
    return str(value)  # ipaddress objects, paths, anything else: its readable form


def _dumps(record: Mapping[str, Any]) -> bytes:
    # ensure_ascii keeps lone surrogates (possible in decoded garbage) encodable
    # and guarantees no raw newline can appear inside the line.
    return json.dumps(record, separators=(",", ":"), allow_nan=False).encode("ascii") + b"\n"


# -- the OONI envelope ------------------------------------------------------------


def _hostport(address: str, port: int | None) -> str:
    host = f"[{address}]" if ":" in address else address
    return f"{host}:{port}" if port is not None else host


def _input(target: Target) -> str:
    """OONI-style input URL naming the target (cf. ``tcpconnect://149.154.175.50:443``)."""
    host = target.endpoint.host
    if target.address is None:
        return f"{target.probe}://{host}"
    return f"{target.probe}://{_hostport(host, target.port)}"


def _network(result: ProbeResult) -> str:
    for key in ("network", "transport"):  # e.g. STUN over TCP says transport=tcp
        declared = result.details.get(key)
        if declared in ("tcp", "udp"):
            return str(declared)
    if result.target.probe in _UDP_PROBES:
        return "udp"
    return result.target.endpoint.transport


def _timeline(result: ProbeResult) -> dict[str, tuple[float, float]]:
    """phase -> (t0, t) since the measurement start.

    The recorder keeps durations only, so phases are laid back to back in the
    order they were recorded: an approximation that ignores gaps between phases.
    """
    out: dict[str, tuple[float, float]] = {}
    cursor = 0.0
    for phase, seconds in result.phases.items():
        out[phase] = (cursor, cursor + seconds)
        cursor += seconds
    return out


def _span(
    timeline: Mapping[str, tuple[float, float]], names: tuple[str, ...], end: float
) -> tuple[float, float]:
    for name in names:
        if name in timeline:
            return timeline[name]
    return (0.0, end)


def _failure_at(result: ProbeResult, operation: Operation) -> str | None:
    return result.failure if result.failed_operation == operation else None


def _answer(value: Any) -> dict[str, Any]:
    if isinstance(value, Mapping):
        return {str(k): to_jsonable(v) for k, v in value.items()}
    text = str(value)
    try:
        ip = ipaddress.ip_address(text)
    except ValueError:
        return {"answer_type": "CNAME", "hostname": text, "ttl": None}
    if ip.version == 4:
        return {"answer_type": "A", "ipv4": text, "ttl": None}
    return {"answer_type": "AAAA", "ipv6": text, "ttl": None}


def _engine(resolver: str | None) -> tuple[str, str]:
    """(OONI engine name, resolver_address) for a Target.resolver id."""
    if resolver is None or resolver == "system":
        return "getaddrinfo", ""
    scheme, _, rest = resolver.partition(":")
    if scheme in ("udp", "tcp", "doh"):
        return scheme, rest
    return "unknown", resolver


def _as_list(value: Any) -> list[Any]:
    if value is None or isinstance(value, str | bytes | Mapping):
        return [] if value is None else [value]
    try:
        return list(value)
    except TypeError:
        return [value]


def _rcode(value: Any) -> int | None:
    """OONI wants the numeric rcode; our DNS probe records its text (NXDOMAIN)."""
    if isinstance(value, int) and not isinstance(value, bool):
        return value
    if isinstance(value, str):
        try:
            return int(dns.rcode.from_text(value))
        except (dns.rcode.UnknownRcode, ValueError):
            return None
    return None


def _query_failure(result: ProbeResult, answers: list[Any], bogons: set[str]) -> str | None:
    if result.failed_operation == Operation.RESOLVE:
        if not answers:
            return result.failure
        if result.failure_kind == Failure.DNS_BOGON and bogons & {str(a) for a in answers}:
            return result.failure
        return None
    # One family empty while the other answered: OONI's per-query word for it.
    return None if answers else str(Failure.DNS_NO_ANSWER)


def _queries(result: ProbeResult, timeline: Mapping[str, tuple[float, float]]) -> list[Any]:
    """One df-002 query per query type (``details["answers"]`` maps type -> addresses)."""
    target = result.target
    resolved = target.resolver is not None or "resolve" in result.phases
    if not resolved and result.failed_operation != Operation.RESOLVE:
        return []
    details = result.details
    engine, resolver_address = _engine(target.resolver)
    t0, t = _span(timeline, ("resolve",), result.duration_s)
    answers = details.get("answers")
    if isinstance(answers, Mapping):
        per_type = {str(qt): _as_list(v) for qt, v in answers.items()}
    else:  # a flat list from a probe that does not split by type
        per_type = {"ANY" if engine == "getaddrinfo" else "A": _as_list(answers)}
    rcodes = details.get("rcodes")
    rcodes = rcodes if isinstance(rcodes, Mapping) else {}
    bogons = {str(b) for b in _as_list(details.get("bogons"))}
    queries: list[Any] = []
    for query_type, values in per_type.items():
        query: dict[str, Any] = {
            "answers": [_answer(a) for a in values],
            "engine": engine,
            "failure": _query_failure(result, values, bogons),
            "hostname": target.endpoint.host,
            "query_type": query_type,
            "resolver_address": resolver_address,
            "t0": t0,
            "t": t,
            "tags": [],
        }
        rcode = _rcode(rcodes.get(query_type))
        if rcode is not None:
            query["rcode"] = rcode
        queries.append(query)
    return queries


def _tcp_connect(result: ProbeResult, timeline: Mapping[str, tuple[float, float]]) -> list[Any]:
    target = result.target
    if target.address is None or target.port is None or _network(result) != "tcp":
        return []
    if "connect" not in result.phases and result.failed_operation != Operation.CONNECT:
        return []
    failure = _failure_at(result, Operation.CONNECT)
    t0, t = _span(timeline, ("connect",), result.duration_s)
    return [
        {
            "ip": target.address,
            "port": target.port,
            "status": {"failure": failure, "success": failure is None},
            "t0": t0,
            "t": t,
            "tags": [],
        }
    ]


def _certificate(value: Any) -> Any:
    if isinstance(value, bytes | bytearray | memoryview):
        return _binary(bytes(value))
    if isinstance(value, str) and value.lstrip().startswith("-----BEGIN CERTIFICATE-----"):
        try:
            return _binary(ssl.PEM_cert_to_DER_cert(value))
        except ValueError:
            return value
    if isinstance(value, str):
        return {"data": value, "format": "base64"}  # already base64 DER
    return to_jsonable(value)


def _handshake(
    result: ProbeResult,
    timeline: Mapping[str, tuple[float, float]],
    network: str,
    operation: Operation,
    phases: tuple[str, ...],
) -> list[Any]:
    target = result.target
    if not any(p in result.phases for p in phases) and result.failed_operation != operation:
        return []
    details = result.details
    # The tls and quic probes keep the chain (base64 DER, leaf first) when verification
    # failed: that is where a MITM's forged certificate reaches the archive.
    certs = details.get("peer_certificates")
    t0, t = _span(timeline, phases, result.duration_s)
    return [
        {
            "network": network,
            "address": _hostport(target.address or target.endpoint.host, target.port),
            "cipher_suite": str(details.get("cipher_suite") or details.get("cipher") or ""),
            "failure": _failure_at(result, operation),
            "negotiated_protocol": str(details.get("alpn") or ""),
            # Our handshakes always verify; the evidence-only second connection of the
            # tls probe is not a handshake of the measurement.
            "no_tls_verify": False,
            "peer_certificates": [_certificate(c) for c in _as_list(certs)],
            "server_name": target.server_name or "",
            "t0": t0,
            "t": t,
            "tags": [],
            "tls_version": str(details.get("tls_version") or ""),
        }
    ]


def _network_events(result: ProbeResult, timeline: Mapping[str, tuple[float, float]]) -> list[Any]:
    target = result.target
    if target.address is None or target.port is None:
        return []
    network = _network(result)
    address = _hostport(target.address, target.port)
    events: list[dict[str, Any]] = []
    if network == "tcp" and (
        "connect" in result.phases or result.failed_operation == Operation.CONNECT
    ):
        t0, t = _span(timeline, ("connect",), result.duration_s)
        failure = _failure_at(result, Operation.CONNECT)
        events.append(
            {"address": address, "failure": failure, "operation": "connect", "proto": "tcp",
             "t0": t0, "t": t, "tags": []}
        )  # fmt: skip
    if result.failed_operation in (Operation.READ, Operation.WRITE):
        op = str(result.failed_operation)
        if network == "udp":
            op = "read_from" if op == "read" else "write_to"
        counted = result.details.get("bytes_received" if op.startswith("read") else "bytes_sent")
        last = next(reversed(list(timeline.values())), (0.0, result.duration_s))
        event: dict[str, Any] = {
            "address": address, "failure": result.failure, "operation": op, "proto": network,
            "t0": last[0], "t": result.duration_s, "tags": [],
        }  # fmt: skip
        if isinstance(counted, int) and not isinstance(counted, bool):
            event["num_bytes"] = counted
        events.append(event)
    received = result.details.get("bytes_received")
    if isinstance(received, int) and not isinstance(received, bool):
        # The byte count at which a transfer stopped is the signature of a freeze (B7).
        events.append(
            {"failure": None, "num_bytes": received, "operation": "bytes_received_cumulative",
             "proto": network, "t0": result.duration_s, "t": result.duration_s, "tags": []}
        )  # fmt: skip
    return events


def _test_keys(result: ProbeResult) -> dict[str, Any]:
    timeline = _timeline(result)
    network = _network(result)
    details = result.details
    built: dict[str, list[Any]] = {
        "queries": _queries(result, timeline),
        "tcp_connect": _tcp_connect(result, timeline),
        "tls_handshakes": (
            _handshake(result, timeline, "tcp", Operation.TLS_HANDSHAKE, ("tls", "tls_handshake"))
            if network == "tcp"
            else []
        ),
        "quic_handshakes": _handshake(
            result, timeline, "udp", Operation.QUIC_HANDSHAKE, ("quic", "quic_handshake")
        ),
        "network_events": _network_events(result, timeline),
    }
    if result.skipped is not None:
        built = {k: [] for k in built}  # nothing was sent: no observations to report
    # A probe that knows more (several queries, every read) may give OONI-shaped
    # lists itself under the same keys; they win over the reconstruction.
    for key in built:
        if key in details:
            built[key] = _as_list(to_jsonable(details[key]))
    return {**built, "probe_result": result_to_dict(result)}


def result_to_dict(result: ProbeResult) -> dict[str, Any]:
    """Our full result, JSON-safe."""
    target = result.target
    endpoint = target.endpoint
    return {
        "target": {
            "service": target.service,
            "endpoint": endpoint.name,
            "host": endpoint.host,
            "probe": target.probe,
            "variant": target.variant,
            "overrides": to_jsonable(target.overrides),
            "address": target.address,
            "port": target.port,
            "resolver": target.resolver,
            "address_source": target.address_source,
            "transport": endpoint.transport,
            "role": endpoint.role,
            "server_name": target.server_name,
            "key": list(target.key()),
        },
        "status": result.status,
        "ok": result.ok,
        "t": result.t.isoformat(),
        "duration_s": result.duration_s,
        "failure": result.failure,
        "failure_kind": str(result.failure_kind) if result.failure_kind else None,
        "failed_operation": str(result.failed_operation) if result.failed_operation else None,
        "phases": to_jsonable(result.phases),
        "details": to_jsonable(result.details),
        "flags": list(result.flags),
        "skipped": str(result.skipped) if result.skipped else None,
    }


def _platform() -> str:
    return {"linux": "linux", "darwin": "macos", "win32": "windows"}.get(sys.platform, "unknown")


def _architecture() -> str:
    """df-000's annotation names (Go's GOARCH): arm, arm64, 386, amd64; else the machine."""
    machine = platform.machine().lower()
    names = {"x86_64": "amd64", "amd64": "amd64", "aarch64": "arm64", "arm64": "arm64"}
    if machine in names:
        return names[machine]
    if machine in ("i386", "i486", "i586", "i686", "x86"):
        return "386"
    return "arm" if machine.startswith("arm") else machine or "unknown"


def envelope(
    result: ProbeResult,
    vantage: Vantage,
    *,
    test_start_time: dt.datetime | None = None,
    software_version: str = __version__,
) -> dict[str, Any]:
    """The OONI df-000 measurement for one result.

    ``test_start_time`` is when the round that produced the result started
    (OONI: the start of a related set of measurements); it defaults to the
    measurement's own start.
    """
    t = result.t.astimezone(dt.UTC)
    started = (test_start_time or result.t).astimezone(dt.UTC)
    target = result.target
    return {
        "annotations": {
            "engine_name": SOFTWARE_NAME,
            "engine_version": software_version,
            "architecture": _architecture(),
            "platform": _platform(),
            "vantage": vantage.name,
            "vantage_role": vantage.role,
            "service": target.service,
            "endpoint": target.endpoint.name,
            "endpoint_role": target.endpoint.role,
            "probe": target.label,  # as exported: "tls", or "tls/neutral_sni" for a variant
            "status": result.status,
        },
        "data_format_version": DATA_FORMAT_VERSION,
        "extensions": dict(EXTENSIONS),
        "id": str(uuid.uuid4()),
        "input": _input(target),
        "measurement_start_time": t.strftime(OONI_TIME),
        "probe_asn": vantage.asn,
        "probe_cc": vantage.country,
        "probe_ip": "127.0.0.1",  # OONI's value for "not shared"; we never record our IP
        # Required by df-000; an OONI collector assigns it on submission, which never
        # happens here, so it stays empty.
        "report_id": "",
        "software_name": SOFTWARE_NAME,
        "software_version": software_version,
        "test_helpers": {},  # required by df-000; the DoH control is in test_keys
        "test_keys": _test_keys(result),
        "test_name": TEST_NAME,
        "test_runtime": result.duration_s,
        "test_start_time": started.strftime(OONI_TIME),
        "test_version": TEST_VERSION,
    }


# -- writer --------------------------------------------------------------------------


def _rotated_files(directory: Path) -> list[Path]:
    """Rotated files oldest first; a plain .jsonl hides its .gz twin (mid-compression)."""
    by_stem: dict[str, Path] = {}
    for path in directory.iterdir():
        match = _ROTATED.match(path.name)
        if match is None:
            continue
        stem = path.name.removesuffix(".gz")
        if stem not in by_stem or not path.name.endswith(".gz"):
            by_stem[stem] = path
    return [by_stem[s] for s in sorted(by_stem, key=_rotation_order)]


def _rotation_order(stem: str) -> tuple[str, int]:
    match = _ROTATED.match(stem)
    assert match is not None
    return match.group(1), int(match.group(2) or 0)


def _rotation_time(path: Path) -> dt.datetime | None:
    match = _ROTATED.match(path.name)
    if match is None:
        return None
    return dt.datetime.strptime(match.group(1), "%Y%m%dT%H%M%S%fZ").replace(tzinfo=dt.UTC)


class ArchiveWriter:
    """Appends envelopes to ``<directory>/measurements.jsonl``; rotates and prunes.

    One writer per directory.  Thread-safe; meant to be called from the event
    loop (see the module docstring for why that does not block it).
    """

    def __init__(
        self,
        directory: str | os.PathLike[str],
        vantage: Vantage,
        *,
        max_bytes: int = ArchiveSettings.max_bytes,
        keep: int = ArchiveSettings.keep,
        compress: bool = ArchiveSettings.compress,
        software_version: str = __version__,
    ) -> None:
        if max_bytes <= 0 or keep < 0:
            raise ValueError("max_bytes must be > 0 and keep >= 0")
        self.directory = Path(directory)
        self.vantage = vantage
        self.max_bytes = max_bytes
        self.keep = keep
        self.compress = compress
        self.software_version = software_version
        self.write_errors = 0  # lines lost to OSError; the daemon exports it
        self._failing = 0  # consecutive failed writes (logged once, at the first)
        self._closed = False
        self._lock = threading.Lock()
        self._background = ThreadPoolExecutor(max_workers=1, thread_name_prefix="archive")
        self._pending: list[Future[None]] = []
        self.directory.mkdir(parents=True, exist_ok=True)
        self._fd = -1
        self._size = 0
        self._needs_newline = False
        self._open()
        self._submit(self._recover)

    @classmethod
    def from_settings(cls, settings: ArchiveSettings, vantage: Vantage) -> ArchiveWriter | None:
        if settings.path is None:
            return None
        return cls(
            settings.path,
            vantage,
            max_bytes=settings.max_bytes,
            keep=settings.keep,
            compress=settings.compress,
        )

    @property
    def current(self) -> Path:
        return self.directory / CURRENT_NAME

    def write(self, result: ProbeResult, *, test_start_time: dt.datetime | None = None) -> bool:
        """Append one measurement.  False if it could not be written (logged, counted)."""
        record = envelope(
            result,
            self.vantage,
            test_start_time=test_start_time,
            software_version=self.software_version,
        )
        return self.write_record(record)

    def write_record(self, record: Mapping[str, Any]) -> bool:
        line = _dumps(record)
        with self._lock:
            if self._closed:
                raise ValueError("archive writer is closed")
            try:
                if self._fd < 0 or _unlinked(self._fd):
                    # A reopen failed earlier (directory gone, disk full), or someone
                    # deleted the file: open it again rather than give up, or write
                    # on into an unlinked file whose lines are lost and space kept.
                    self._reopen()
                if self._size > 0 and self._size + len(line) > self.max_bytes:
                    self._rotate()
                self._append(line)
            except OSError as exc:
                self._write_failed(exc)
                return False
            if self._failing:
                log.warning("archive writes work again after %d failed", self._failing)
                self._failing = 0
        return True

    def _write_failed(self, exc: OSError) -> None:
        self.write_errors += 1
        self._needs_newline = True  # a fragment may be on disk: isolate it
        if not self._failing:
            # Once, not per line: on a full disk a log line per lost measurement would
            # make it fuller.  `write_errors` counts them (probe_archive_write_errors_total).
            log.error("archive write failed: %s (further failures are counted, not logged)", exc)
        self._failing += 1

    def close(self) -> None:
        """Close the file and wait for background compression and pruning."""
        with self._lock:
            self._closed = True
            if self._fd >= 0:
                os.close(self._fd)
                self._fd = -1
        self._background.shutdown(wait=True)
        for future in self._pending:
            future.result()  # surface background errors to the caller (tests, shutdown)

    def __enter__(self) -> ArchiveWriter:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -- internals (called with the lock held) ---------------------------------

    def _open(self) -> None:
        self._fd = os.open(
            self.current, os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_CLOEXEC, 0o644
        )
        self._size = os.fstat(self._fd).st_size
        self._needs_newline = self._size > 0 and not _ends_with_newline(self.current)

    def _reopen(self) -> None:
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1
        self.directory.mkdir(parents=True, exist_ok=True)
        self._open()

    def _append(self, line: bytes) -> None:
        data = (b"\n" + line) if self._needs_newline else line
        view = memoryview(data)
        while view:
            written = os.write(self._fd, view)  # one syscall per line unless the disk fills
            self._size += written
            view = view[written:]
        self._needs_newline = False

    def _rotate(self) -> None:
        os.close(self._fd)
        self._fd = -1
        stamp = dt.datetime.now(dt.UTC).strftime("%Y%m%dT%H%M%S%fZ")
        target = self.directory / f"measurements-{stamp}.jsonl"
        n = 0
        while target.exists() or target.with_name(target.name + ".gz").exists():
            n += 1  # same microsecond or a clock step back: never overwrite
            target = self.directory / f"measurements-{stamp}-{n}.jsonl"
        try:
            os.rename(self.current, target)
        finally:
            self._open()  # keep appending to some file even if the rename failed
        self._submit(lambda: self._after_rotation(target))

    def _submit(self, job: Callable[[], None]) -> None:
        self._pending = [f for f in self._pending if not f.done() or f.exception()]
        self._pending.append(self._background.submit(job))

    # -- background thread -------------------------------------------------------

    def _recover(self) -> None:
        """After a crash: drop half-written .gz files, finish compression, prune."""
        with _logged("archive recovery"):
            for path in self.directory.glob("measurements-*.jsonl.gz.tmp"):
                path.unlink(missing_ok=True)
            if self.compress:
                for path in _rotated_files(self.directory):
                    if path.suffix == ".jsonl":
                        _gzip(path)
        with _logged("archive retention"):
            self._prune()

    def _after_rotation(self, path: Path) -> None:
        # A full disk fails the gzip: the rotated file stays plain (compressed on the next
        # start) and retention still runs, since deleting old files is what frees space.
        if self.compress:
            with _logged(f"compressing {path.name}"):
                _gzip(path)
        with _logged("archive retention"):
            self._prune()

    def _prune(self) -> None:
        rotated = _rotated_files(self.directory)
        for path in rotated[: max(0, len(rotated) - self.keep)]:
            path.unlink(missing_ok=True)
            path.with_name(path.name + ".gz").unlink(missing_ok=True)


@contextlib.contextmanager
def _logged(what: str) -> Iterator[None]:
    """Background housekeeping that fails (disk full, I/O error) is logged, never raised:
    close() at shutdown must not die of a gzip that could not finish."""
    try:
        yield
    except OSError as exc:
        log.warning("%s failed: %s", what, exc)


def _unlinked(fd: int) -> bool:
    return os.fstat(fd).st_nlink == 0


def _ends_with_newline(path: Path) -> bool:
    with path.open("rb") as f:
        f.seek(-1, os.SEEK_END)
        return f.read(1) == b"\n"


def _gzip(path: Path) -> None:
    """Compress to .gz via a temp name, then remove the original (readers see one)."""
    tmp = path.with_name(path.name + ".gz.tmp")
    final = path.with_name(path.name + ".gz")
    try:
        src = path.open("rb")
    except FileNotFoundError:
        return  # already compressed by crash recovery, or pruned
    try:
        with src, gzip.open(tmp, "wb") as dst:
            shutil.copyfileobj(src, dst)
        os.replace(tmp, final)
    except BaseException:
        tmp.unlink(missing_ok=True)  # a partial .gz.tmp only takes space (disk full)
        raise
    path.unlink()


# -- reader ------------------------------------------------------------------------


@dataclasses.dataclass
class ReadStats:
    """What `iter_archive` skipped.  ``torn``: a file's last line without its newline
    (the line being written when the writer died); ``corrupt``: any other line
    that is not a JSON object (a fragment isolated by the writer)."""

    records: int = 0
    torn: int = 0
    corrupt: int = 0


def _open_archive(path: Path) -> IO[bytes]:
    if path.name.endswith(".gz"):
        return cast(IO[bytes], gzip.open(path, "rb"))  # typeshed: GzipFile is not IO[bytes]
    return path.open("rb")


def _read_file(path: Path, stats: ReadStats) -> Iterator[dict[str, Any]]:
    try:
        handle = _open_archive(path)
    except FileNotFoundError:
        # Compressed (or pruned) since the listing: read its .gz twin if there is one.
        twin = path.with_name(path.name + ".gz")
        if path.suffix != ".jsonl" or not twin.exists():
            return
        handle = _open_archive(twin)
    with handle:
        try:
            for line in handle:
                if not line.endswith(b"\n"):
                    stats.torn += 1  # only ever the last line of a file
                    continue
                if not line.strip():
                    continue  # the separator the writer adds after a lost write
                try:
                    record = json.loads(line)
                except ValueError:
                    record = None
                if isinstance(record, dict):
                    yield record
                else:
                    stats.corrupt += 1
        except (EOFError, gzip.BadGzipFile, OSError) as exc:
            log.warning("archive file %s is damaged: %s", path, exc)
            stats.torn += 1


def _record_time(record: Mapping[str, Any]) -> dt.datetime | None:
    try:
        t = dt.datetime.fromisoformat(record["test_keys"]["probe_result"]["t"])
    except (KeyError, TypeError, ValueError):
        return None
    return t if t.tzinfo else t.replace(tzinfo=dt.UTC)


def _matches(
    record: Mapping[str, Any],
    since: dt.datetime | None,
    service: str | None,
    probe: str | None,
    failed_only: bool,
) -> bool:
    annotations = record.get("annotations")
    if not isinstance(annotations, Mapping):  # a damaged or foreign record: no annotations
        annotations = {}
    if service is not None and annotations.get("service") != service:
        return False
    if probe is not None and annotations.get("probe") != probe:
        return False
    if failed_only and annotations.get("status") != "failed":
        return False
    if since is not None:
        t = _record_time(record)
        if t is None or t < since:
            return False
    return True


def iter_archive(
    directory: str | os.PathLike[str],
    since: dt.datetime | None = None,
    service: str | None = None,
    probe: str | None = None,
    failed_only: bool = False,
    *,
    stats: ReadStats | None = None,
) -> Iterator[dict[str, Any]]:
    """Every archived measurement, oldest file first, filtered.

    ``since`` (naive means UTC) compares with the result's precise start time.
    ``failed_only`` keeps failed results (skipped ones are not failures).
    Pass a `ReadStats` to learn how many lines were skipped.
    """
    stats = stats if stats is not None else ReadStats()
    if since is not None and since.tzinfo is None:
        since = since.replace(tzinfo=dt.UTC)
    root = Path(directory)
    if not root.is_dir():
        return
    files = _rotated_files(root)
    if (root / CURRENT_NAME).exists():
        files.append(root / CURRENT_NAME)
    for path in files:
        rotated_at = _rotation_time(path)
        if since is not None and rotated_at is not None and rotated_at < since:
            continue  # every line in it started before it was rotated away
        for record in _read_file(path, stats):
            if _matches(record, since, service, probe, failed_only):
                stats.records += 1
                yield record
