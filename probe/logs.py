"""Structured logs on stderr: JSON (default) or logfmt, one event per line."""

from __future__ import annotations

import json
import logging
import sys
import time
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

_RESERVED = set(vars(logging.makeLogRecord({})))


def _fields(record: logging.LogRecord) -> dict[str, Any]:
    fields: dict[str, Any] = {
        "ts": datetime.fromtimestamp(record.created, UTC).isoformat().replace("+00:00", "Z"),
        "level": record.levelname.lower(),
        "logger": record.name,
        "msg": record.getMessage(),
    }
    fields.update({k: v for k, v in vars(record).items() if k not in _RESERVED})
    if record.exc_info and record.exc_info[1] is not None:
        fields["error"] = f"{type(record.exc_info[1]).__name__}: {record.exc_info[1]}"
    return fields


class JSONFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        return json.dumps(_fields(record), default=str)


class LogfmtFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        return " ".join(f"{k}={_logfmt_value(v)}" for k, v in _fields(record).items())


def _logfmt_value(value: Any) -> str:
    text = str(value)
    # Quote (JSON-escaped) anything with a separator or a non-printable character: a
    # value can come from the network, and a raw \r or escape sequence in a log line
    # forges lines or drives the reader's terminal.
    if not text or not text.isprintable() or any(c in text for c in ' "=\\'):
        return json.dumps(text)
    return text


# Libraries that log per packet or per connection: a hostile peer decides how often.
# aioquic logged 1,026 lines for one probe against a server flooding Version Negotiation.
QUIET_LIBRARIES = ("quic", "http3", "asyncio", "aiohttp")
THIRD_PARTY_BURST = 10  # records per library logger per window; then one notice, then none
THIRD_PARTY_WINDOW_S = 60.0


@dataclass(frozen=True, slots=True)
class Admission:
    """What `FloodCap.admit` decided for one record."""

    emit: bool  # write it
    notice: bool  # the first over the cap: write the "dropping the rest" notice instead
    suppressed: int | None  # the first of a new window: records dropped in the last one


class FloodCap:
    """At most ``burst`` records per key per window, then one notice, then none until the
    window ends; the first record of the next window says how many were dropped.

    The keys must be few (logger names, a reason): each keeps one entry."""

    def __init__(self, burst: int, window_s: float) -> None:
        self.burst = burst
        self.window_s = window_s
        self._windows: dict[str, tuple[float, int]] = {}  # key -> (window start, count)

    def admit(self, key: str) -> Admission:
        now = time.monotonic()
        start, count = self._windows.get(key, (now, 0))
        suppressed = None
        if now - start >= self.window_s:
            if count > self.burst:
                suppressed = count - self.burst - 1
            start, count = now, 0
        count += 1
        self._windows[key] = (start, count)
        return Admission(count <= self.burst + 1, count == self.burst + 1, suppressed)

    def notice(self) -> str:
        return f"dropping the rest for up to {self.window_s:g} s"


class ThirdPartyCap(logging.Filter):
    """At most `THIRD_PARTY_BURST` records per window from each logger outside ``probe``
    (a `FloodCap` per logger name).

    The first record over the cap is replaced by a notice; the first record of the next
    window says how many were dropped (``suppressed``).  Our own loggers are never capped.
    """

    def __init__(self, burst: int = THIRD_PARTY_BURST, window_s: float = THIRD_PARTY_WINDOW_S):
        super().__init__()
        self._cap = FloodCap(burst, window_s)

    def filter(self, record: logging.LogRecord) -> bool:
        if record.name == "probe" or record.name.startswith("probe."):
            return True
        admitted = self._cap.admit(record.name)
        if admitted.suppressed is not None:
            record.suppressed = admitted.suppressed
        if admitted.notice:
            record.msg, record.args, record.exc_info = (
                f"more than {self._cap.burst} messages from this library: {self._cap.notice()}",
                (),
                None,
            )
        return admitted.emit


def setup(fmt: str = "json", level: str = "info") -> None:
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(LogfmtFormatter() if fmt == "logfmt" else JSONFormatter())
    handler.addFilter(ThirdPartyCap())
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level.upper())
    # Their info lines are per connection; their warnings still show (capped).
    for name in QUIET_LIBRARIES:
        logging.getLogger(name).setLevel(max(logging.WARNING, root.level))
