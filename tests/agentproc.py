"""Running the `probe` command as a real process in tests (loopback only), and reading what
it exposes.  Shared by the CLI, daemon and operations tests."""

from __future__ import annotations

import asyncio
import json
import os
import shutil
import socket
import subprocess
import sys
from pathlib import Path
from typing import IO, Any

import pytest
from prometheus_client.parser import text_string_to_metric_families

REPO = Path(__file__).resolve().parents[1]
PROBE = [sys.executable, "-m", "probe"]
IN_CI = os.environ.get("CI") == "true"


def needs_unshare(why: str) -> pytest.MarkDecorator:
    """Skip unless this runs as root with unshare(1): a private namespace keeps the test's
    traffic (or its mounts) off the machine."""
    return pytest.mark.skipif(
        shutil.which("unshare") is None or os.geteuid() != 0,
        reason=f"needs root and unshare(1) {why}",
    )


def required_tool(name: str, *, package: str) -> str:
    """The tool's path; without it the test is skipped, or fails in CI (where
    scripts/test installs it, so its absence is a broken CI image, not a reason to skip)."""
    path = shutil.which(name)
    if path is None:
        if IN_CI:
            installs = "it" if package == name else package
            pytest.fail(f"{name} missing in CI (scripts/test installs {installs})")
        pytest.skip(f"{name} not installed (Debian package {package})")
    return path


def free_port() -> int:
    """A loopback TCP port that was free a moment ago (bound, then released)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


async def run_cli(*argv: str, timeout_s: float = 60) -> tuple[int, str, str]:
    """Run ARGV (``*PROBE, ...``) from the repository root without blocking the event loop
    that serves the test servers; (exit code, stdout, stderr)."""
    proc = await asyncio.create_subprocess_exec(
        *argv, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE, cwd=REPO
    )
    out, err = await asyncio.wait_for(proc.communicate(), timeout_s)
    assert proc.returncode is not None
    return proc.returncode, out.decode(), err.decode()


def run_probe(*args: str, timeout_s: float = 60) -> subprocess.CompletedProcess[str]:
    """``probe ARGS`` to completion from the repository root, output captured as text."""
    return subprocess.run(
        [*PROBE, *args], capture_output=True, text=True, timeout=timeout_s, cwd=REPO
    )


def start_agent(
    config: Path, *, stdout: IO[Any] | int | None, stderr: IO[Any] | int | None
) -> subprocess.Popen[bytes]:
    """``probe run -c CONFIG`` as a background process; the caller stops it."""
    return subprocess.Popen(
        [*PROBE, "run", "-c", str(config)], cwd=REPO, stdout=stdout, stderr=stderr
    )


def run_driver(
    source: str, unshare: str, *args: str, workdir: Path, cwd: Path, timeout_s: float
) -> dict[str, Any]:
    """Write the driver script SOURCE into WORKDIR and run it under ``unshare UNSHARE``
    (``-n``: an empty network namespace, ``-m``: a private mount namespace); the driver
    starts the agent itself and prints one JSON object, returned here."""
    driver = workdir / "driver.py"
    driver.write_text(source)
    done = subprocess.run(
        ["unshare", unshare, sys.executable, str(driver), *args],
        capture_output=True,
        text=True,
        timeout=timeout_s,
        cwd=cwd,
        env={**os.environ, "PYTHONPATH": str(REPO)},
    )
    assert done.returncode == 0, done.stderr[-3000:]
    out: dict[str, Any] = json.loads(done.stdout)
    return out


def samples(text: str) -> dict[tuple[str, frozenset[tuple[str, str]]], float]:
    """Every sample of a Prometheus exposition, by (name, labels)."""
    return {
        (s.name, frozenset(s.labels.items())): s.value
        for family in text_string_to_metric_families(text)
        for s in family.samples
    }


def sample(text: str, name: str, **labels: str) -> float | None:
    """The value of the first sample NAME whose labels include LABELS; None if none."""
    for (n, lbls), value in samples(text).items():
        if n == name and set(labels.items()) <= set(lbls):
            return value
    return None
