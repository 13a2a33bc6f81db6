"""`ArchiveWriter`: crash-safe appends of OONI envelopes, rotation, retention.

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

import contextlib
import datetime as dt
import gzip
import json
import logging
import os
import re
import shutil
import threading
from collections.abc import Callable, Iterator, Mapping
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path
from typing import Any

from .. import __version__
from ..config.settings import ArchiveSettings
from ..model import ProbeResult, Vantage
from .ooni import envelope

# The package's name, as before the split: log records and filters keep their logger.
log = logging.getLogger("probe.archive")

CURRENT_NAME = "measurements.jsonl"
_ROTATED = re.compile(r"^measurements-(\d{8}T\d{12}Z)(?:-(\d+))?\.jsonl(\.gz)?$")


# One encoder for every line: json.dumps with options builds a new JSONEncoder per call.
# ensure_ascii (its default) keeps lone surrogates (possible in decoded garbage) encodable
# and guarantees no raw newline can appear inside the line.
_ENCODE = json.JSONEncoder(separators=(",", ":"), allow_nan=False).encode


def _dumps(record: Mapping[str, Any]) -> bytes:
    return _ENCODE(record).encode("ascii") + b"\n"


def rotated_files(directory: Path) -> list[Path]:
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


def rotation_time(path: Path) -> dt.datetime | None:
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
                for path in rotated_files(self.directory):
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
        rotated = rotated_files(self.directory)
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
