"""Shared pieces of the benchmark scripts: a private network namespace, loopback servers,
agent configs, process CPU/RSS readings and percentiles.

Every script keeps its traffic on loopback, and (as root) inside a network namespace of
its own that holds nothing but ``lo`` (`enter_private_netns`): there the servers can
listen on every 127/8 address at once and a ``drop`` rule can make some of them silent,
without touching the machine's own namespace.
"""

from __future__ import annotations

import json
import os
import resource
import shutil
import socket
import statistics
import subprocess
import sys
import threading
import time
import urllib.request
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
PYTHON = sys.executable
_MARK = "PROBE_BENCH_NETNS"
CLK_TCK = os.sysconf("SC_CLK_TCK")
PAGE = os.sysconf("SC_PAGE_SIZE")


def enter_private_netns() -> None:
    """Re-run this script under ``unshare -n`` (a namespace with only ``lo``), once."""
    if os.environ.get(_MARK):
        subprocess.run(["ip", "link", "set", "lo", "up"], check=True)
        return
    if os.geteuid() != 0 or shutil.which("unshare") is None:
        sys.exit("bench: needs root and unshare(1) (runs in a private network namespace)")
    env = {**os.environ, _MARK: "1", "PYTHONPATH": str(REPO)}
    done = subprocess.run(["unshare", "-n", PYTHON, *sys.argv], env=env, check=False)
    sys.exit(done.returncode)


def address(i: int, net: int = 10) -> str:
    """The i-th distinct loopback address 127.NET.x.y (never 127.0.0.x)."""
    return f"127.{net}.{i // 250 % 250 + 1}.{i % 250 + 1}"


def drop_to(prefix: str) -> None:
    """Make every address in ``prefix`` silent (SYNs dropped) inside the private namespace."""
    rules = (
        "table ip bench {\n chain out {\n  type filter hook output priority 0;\n"
        f"  ip daddr {prefix} drop\n }}\n}}\n"
    )
    subprocess.run(["nft", "-f", "-"], input=rules, text=True, check=True)


class Acceptor:
    """A TCP listener on every address of the namespace (only ``lo`` exists there) that
    accepts and closes in a thread: the kernel completes handshakes on its own, and this
    keeps the accept queue from filling."""

    def __init__(self, port: int = 0) -> None:
        self.sock = socket.create_server(("0.0.0.0", port), backlog=4096)
        self.port = int(self.sock.getsockname()[1])
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while True:
            try:
                conn, _ = self.sock.accept()
            except OSError:
                return
            conn.close()


def tcp_endpoints(n: int, port: int, *, silent_every: int = 0, probes: str = "tcp") -> str:
    """YAML for N IP-literal endpoints on distinct loopback addresses; every
    ``silent_every``-th one on 127.20/16 (silent once `drop_to` ran)."""
    lines = []
    for i in range(n):
        host = (
            address(i, 20) if silent_every and i % silent_every == silent_every - 1 else address(i)
        )
        lines.append(
            f"      - {{name: e{i}, host: {host}, ports: [{port}], role: signalling,"
            f" probes: [{probes}], source: bench, confidence: C}}"
        )
    return "\n".join(lines)


def agent_config(
    path: Path,
    endpoints_yaml: str,
    *,
    listen_port: int,
    control_port: int,
    interval_s: float = 60,
    jitter_s: float = 5,
    concurrency: int = 20,
    per_destination: int = 4,
    connect_s: float = 2,
    archive: Path | None = None,
    batch_s: float | None = None,
    extra: str = "",
) -> Path:
    archive_yaml = f"{{path: {archive}}}" if archive else "{path: null}"
    spacing = min(interval_s, 60) / 2
    batch = "" if batch_s is None else f", batch_s: {batch_s}"  # None: the agent's default
    path.write_text(
        f"""
vantage: {{name: bench, country: ZZ, asn: AS64500, role: test}}
schedule: {{interval_s: {interval_s}, jitter_s: {jitter_s}, min_spacing_s: {spacing},
            concurrency: {concurrency}, per_destination: {per_destination}{batch}}}
timeouts: {{connect_s: {connect_s}, tls_s: {connect_s}}}
resolvers: {{system: false, udp: ["127.0.0.1:9"]}}
seeds: []
listen: 127.0.0.1:{listen_port}
log_format: json
archive: {archive_yaml}
{extra}
services:
  - service: controls
    source: bench
    endpoints:
      - {{name: self, host: 127.0.0.1, ports: [{control_port}], role: control, probes: [tcp],
          source: bench, confidence: C}}
  - service: bench
    source: bench
    endpoints:
{endpoints_yaml}
"""
    )
    return path


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def cpu_s(pid: int) -> float:
    """User + system CPU seconds of one process (its threads included)."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / CLK_TCK


def rss_mib(pid: int) -> float:
    return int(Path(f"/proc/{pid}/statm").read_text().split()[1]) * PAGE / 2**20


def get(url: str, timeout_s: float = 30) -> tuple[float, bytes]:
    """(seconds, body) of one GET."""
    t0 = time.monotonic()
    with urllib.request.urlopen(url, timeout=timeout_s) as response:
        body = response.read()
    return time.monotonic() - t0, body


def wait_http(url: str, limit_s: float = 30) -> None:
    deadline = time.monotonic() + limit_s
    while True:
        try:
            get(url, 2)
            return
        except OSError:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.1)


def sample(text: str, name: str, **labels: str) -> float | None:
    """The value of the first sample NAME{labels...} in an exposition, or None."""
    for line in text.splitlines():
        if not line.startswith(name + "{") and not line.startswith(name + " "):
            continue
        head, _, value = line.rpartition(" ")
        if all(f'{k}="{v}"' in head for k, v in labels.items()):
            return float(value)
    return None


def total(text: str, name: str) -> float:
    return sum(
        float(line.rpartition(" ")[2])
        for line in text.splitlines()
        if line.startswith(name + "{") or line.startswith(name + " ")
    )


def pct(values: Sequence[float], q: float) -> float:
    if not values:
        return float("nan")
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


def median(values: Iterable[float]) -> float:
    v = list(values)
    return statistics.median(v) if v else float("nan")


def start_agent(config: Path, log: Path) -> subprocess.Popen[bytes]:
    with log.open("wb") as out:
        return subprocess.Popen(
            [PYTHON, "-m", "probe", "run", "-c", str(config)],
            cwd=REPO,
            stdout=out,
            stderr=subprocess.STDOUT,
            env={**os.environ, "PYTHONPATH": str(REPO)},
        )


def probe_once(config: Path, *args: str, timeout_s: float = 3600) -> tuple[float, float]:
    """(wall seconds, CPU seconds) of one `probe once --format json` (output discarded)."""
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    t0 = time.monotonic()
    subprocess.run(
        [PYTHON, "-m", "probe", "once", "-c", str(config), "--format", "json", *args],
        cwd=REPO,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        check=False,
        timeout=timeout_s,
        env={**os.environ, "PYTHONPATH": str(REPO)},
    )
    wall = time.monotonic() - t0
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    return wall, (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)


def stop(proc: subprocess.Popen[bytes], grace_s: float = 10) -> None:
    proc.terminate()
    try:
        proc.wait(grace_s)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()


def emit(figures: dict[str, Any]) -> None:
    """One JSON line with every figure (for the smoke test and for README tables)."""
    print(json.dumps(figures, sort_keys=True), flush=True)
