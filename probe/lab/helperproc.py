"""The helper-process side of the lab's JSON-lines protocol (`probe.lab.topology.LabProcess`
is the other side): one JSON line on stdout per answer, one JSON command per stdin line.

Used by `probe.lab.serve` and `probe.lab.nfq`.  A helper installs `stop_on_signals` before
it prints its ready line (the lab may stop it right after reading that line), prints it
with `emit`, then hands stdin to `answer_commands` and cleans up when that returns.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import signal
import sys
from collections.abc import Callable, Mapping
from typing import Any

__all__ = ["Answer", "answer_commands", "emit", "stop_on_signals"]

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
