"""Lab helper processes and their JSON-lines protocol, both sides of it.

The lab side (`LabProcess`, run by `probe.lab.topology.Lab.spawn`): start a helper inside a
namespace with ``ip netns exec``, wait for its one JSON ready line on stdout, then write one
JSON command per stdin line and read one JSON answer line.  Its stdin is a pipe from the
lab: if the lab's process dies, the helper reads EOF and exits.

The helper side (used by `probe.lab.serve`, `probe.lab.nfq`, `probe.lab.intercept`): a
helper installs `stop_on_signals` before it prints its ready line (the lab may stop it
right after reading that line), prints it with `emit`, then hands stdin to
`answer_commands` and cleans up when that returns.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import select
import signal
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .netns import LabError, ns_argv

__all__ = [
    "Answer",
    "LabProcess",
    "ProcResult",
    "answer_commands",
    "child_env",
    "emit",
    "signal_group",
    "stop_on_signals",
]

READY_TIMEOUT_S = 15.0  # a helper process importing aioquic on a loaded 2-core machine
_STOP_GRACE_S = 2.0
_MAX_LINE = 1 << 20  # a control line from a helper process; anything longer is a bug


# --- the lab side ---------------------------------------------------------------------------


@dataclass(frozen=True)
class ProcResult:
    argv: tuple[str, ...]
    returncode: int
    stdout: str
    stderr: str

    def json_lines(self) -> list[dict[str, Any]]:
        """stdout parsed as JSON Lines (blank lines ignored)."""
        return [json.loads(line) for line in self.stdout.splitlines() if line.strip()]


class LabProcess:
    """A long-running helper inside a namespace that prints one JSON ready line on stdout
    and then answers one JSON line per JSON command written to its stdin.

    Its stdin is a pipe from us: if this process dies, the helper reads EOF and exits.
    """

    def __init__(self, name: str, ns: str, argv: Sequence[str], env: Mapping[str, str]) -> None:
        self.name = name
        self.ns = ns
        self.argv = tuple(argv)
        self._lock = threading.Lock()
        # A file, never a pipe: a chatty helper cannot block on a full pipe.  Closed in stop().
        self._stderr = tempfile.TemporaryFile()  # noqa: SIM115
        self.popen = subprocess.Popen(
            ns_argv(ns, argv),
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=self._stderr,
            env=dict(env),
            start_new_session=True,  # its own process group: stop() reaches its children
        )
        self.ready: dict[str, Any] = {}

    def wait_ready(self, timeout_s: float = READY_TIMEOUT_S) -> dict[str, Any]:
        line = self._read_line(timeout_s)
        try:
            ready = json.loads(line)
        except ValueError as exc:
            raise LabError(f"{self.name}: bad ready line {line[:200]!r}{self._tail()}") from exc
        if not isinstance(ready, dict) or "error" in ready:
            raise LabError(f"{self.name}: failed to start: {ready}{self._tail()}")
        self.ready = ready
        return ready

    def command(self, cmd: Mapping[str, Any], timeout_s: float = 5.0) -> dict[str, Any]:
        """Send one JSON command and return the helper's JSON answer."""
        with self._lock:
            if self.popen.stdin is None or self.popen.poll() is not None:
                raise LabError(f"{self.name}: not running{self._tail()}")
            try:
                self.popen.stdin.write(json.dumps(cmd).encode() + b"\n")
                self.popen.stdin.flush()
            except OSError as exc:
                raise LabError(f"{self.name}: {exc}{self._tail()}") from exc
            try:
                answer = json.loads(self._read_line(timeout_s))
            except (LabError, ValueError):
                # A late answer would be taken for the answer to the next command: a
                # helper that missed its deadline is not asked again.
                self.stop()
                raise
        if not isinstance(answer, dict):
            raise LabError(f"{self.name}: answer is not an object: {answer!r}")
        if "error" in answer:
            raise LabError(f"{self.name}: {answer['error']}")
        return answer

    def _read_line(self, timeout_s: float) -> str:
        stdout = self.popen.stdout
        assert stdout is not None
        fd = stdout.fileno()
        buf = b""
        deadline = time.monotonic() + timeout_s
        while not buf.endswith(b"\n"):
            left = deadline - time.monotonic()
            if left <= 0:
                raise LabError(f"{self.name}: no answer within {timeout_s} s{self._tail()}")
            ready, _, _ = select.select([fd], [], [], left)
            if not ready:
                continue
            chunk = os.read(fd, 65536)  # unbuffered: select() must see what is left
            if not chunk:
                raise LabError(f"{self.name}: exited (code {self.popen.poll()}){self._tail()}")
            buf += chunk
            if len(buf) > _MAX_LINE:
                raise LabError(f"{self.name}: answer longer than {_MAX_LINE} bytes")
        return buf.decode()

    def _tail(self) -> str:
        with contextlib.suppress(OSError, ValueError):  # ValueError: already closed
            self._stderr.seek(0, os.SEEK_END)
            size = self._stderr.tell()
            self._stderr.seek(max(0, size - 2000))
            text = self._stderr.read().decode(errors="replace").strip()
            if text:
                return f"\n--- {self.name} stderr ---\n{text}"
        return ""

    @property
    def stderr(self) -> str:
        with contextlib.suppress(OSError, ValueError):
            self._stderr.seek(0)
            return self._stderr.read().decode(errors="replace")
        return ""

    def stop(self) -> None:
        """SIGTERM its process group, SIGKILL after a grace period; idempotent."""
        if self.popen.poll() is None:
            with contextlib.suppress(OSError):
                if self.popen.stdin is not None:
                    self.popen.stdin.close()  # EOF: helpers exit on their own
            signal_group(self.popen.pid, signal.SIGTERM)
            try:
                self.popen.wait(_STOP_GRACE_S)
            except subprocess.TimeoutExpired:
                signal_group(self.popen.pid, signal.SIGKILL)
                with contextlib.suppress(subprocess.TimeoutExpired):
                    self.popen.wait(_STOP_GRACE_S)
        for stream in (self.popen.stdin, self.popen.stdout):
            with contextlib.suppress(OSError, ValueError):
                if stream is not None:
                    stream.close()
        self._stderr.close()


def signal_group(pid: int, sig: int) -> None:
    """Signal a helper's whole process group (it runs in a session of its own)."""
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(pid, sig)


def child_env() -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("http_", "HTTP", "https_"))}
    # The helpers import `probe` from wherever this process found it.
    root = str(Path(__file__).resolve().parents[2])
    env["PYTHONPATH"] = os.pathsep.join(p for p in (root, env.get("PYTHONPATH")) if p)
    env["PYTHONUNBUFFERED"] = "1"
    return env


# --- the helper side ------------------------------------------------------------------------

# Answers one decoded command line (any JSON value; a non-object fails on ``.get``).
Answer = Callable[[Any], Mapping[str, Any]]


def emit(obj: Mapping[str, Any]) -> None:
    """One JSON line on stdout, flushed: the lab is blocked reading it."""
    sys.stdout.write(json.dumps(obj) + "\n")
    sys.stdout.flush()


def stop_on_signals() -> asyncio.Event:
    """An event that SIGTERM and SIGINT set, so the helper's cleanup runs on either."""
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    return stop


async def answer_commands(
    answer: Answer,
    stop: asyncio.Event,
    *,
    errors: tuple[type[Exception], ...],
    limit: int,
) -> None:
    """Answer each stdin line with one JSON line until ``stop`` is set: by a signal, by
    EOF or an unreadable stdin (a line over ``limit`` bytes, a broken pipe), or by
    ``answer`` itself (its answer is still sent).  ``answer`` raising one of ``errors``
    (undecodable JSON is a ValueError) sends ``{"error": "Type: message"}`` and goes on."""
    loop = asyncio.get_running_loop()
    reader = asyncio.StreamReader(limit=limit)
    await loop.connect_read_pipe(lambda: asyncio.StreamReaderProtocol(reader), sys.stdin)
    commands = asyncio.create_task(_command_loop(answer, reader, stop, errors))
    try:
        await stop.wait()
    finally:
        commands.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await commands


async def _command_loop(
    answer: Answer,
    reader: asyncio.StreamReader,
    stop: asyncio.Event,
    errors: tuple[type[Exception], ...],
) -> None:
    try:
        while line := await reader.readline():
            try:
                emit(answer(json.loads(line)))
            except errors as exc:
                emit({"error": f"{type(exc).__name__}: {exc}"})
            if stop.is_set():
                break
    except (ValueError, OSError):  # an over-long line or a broken pipe: stop
        pass
    finally:
        stop.set()
