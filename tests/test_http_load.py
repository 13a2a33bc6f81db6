"""HTTP load must not distort measured latency (issue 11, item 5).

The agent runs in a lab client namespace and probes TCP targets whose SYN-ACKs the censor
delays by a known DELAY_MS (NFQUEUE: this kernel has no netem).  While a driver in the
same namespace floods ``/metrics`` with FLOODERS concurrent clients, the connect times
the agent records (its archive: every measurement) must stay close to the delay.

Before the render cache, each of the 50 concurrent scrapes rendered the whole exposition
(one after another in the render thread, holding the GIL) while the loop served them:
the loop-timed connect of an undelayed loopback target read p50 41 ms, p99 165 ms.  Now a
render runs at most once a second and concurrent requests share it.  The bounds below are
generous (a shared, busy CI machine); the old behaviour exceeds them several times over.
"""

from __future__ import annotations

import json
import statistics
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from probe.lab import censor as c
from probe.lab.netns import ns_argv
from probe.lab.topology import Lab
from tests.agentproc import REPO, free_port

pytestmark = pytest.mark.lab

DELAY_MS = 50.0
PORT = 7
ENDPOINTS = 60
FLOODERS = 50
FLOOD_S = 6.0

FLOOD = """
import sys, threading, time, urllib.request
url, seconds, workers = sys.argv[1], float(sys.argv[2]), int(sys.argv[3])
served = [0] * workers
def hammer(i):
    end = time.monotonic() + seconds
    while time.monotonic() < end:
        try:
            with urllib.request.urlopen(url, timeout=10) as r:
                r.read()
            served[i] += 1
        except OSError:
            pass
threads = [threading.Thread(target=hammer, args=(i,)) for i in range(workers)]
for t in threads: t.start()
for t in threads: t.join()
print(sum(served))
"""


def _nfqueue_available() -> None:
    try:
        import netfilterqueue  # noqa: F401
    except ImportError:
        pytest.skip("netfilterqueue not installed (pip install -e '.[lab]')")


def _config(lab: Lab, port: int, archive: Path) -> str:
    endpoints = "\n".join(
        f"      - {{name: e{i}, host: {lab.addr.service(1 + i % 4)}, ports: [{PORT}],"
        " role: signalling, probes: [tcp], source: test, confidence: C}"
        for i in range(ENDPOINTS)
    )
    # The expensive metric forms make every render as heavy as a big deployment's.
    return f"""
vantage: {{name: flood-test, country: ZZ, asn: AS64500, role: test}}
schedule: {{interval_s: 2, jitter_s: 0.5, min_spacing_s: 1, concurrency: 64, per_destination: 64}}
timeouts: {{connect_s: 5}}
resolvers: {{system: false, udp: ["127.0.0.1:9"]}}
seeds: []
listen: 127.0.0.1:{port}
archive: {{path: {archive}}}
metrics: {{verdict_one_hot: true, per_target_histograms: true}}
services:
  - service: controls
    source: test
    endpoints:
      - {{name: ctl, host: {lab.addr.service(5)}, ports: [{PORT}], role: control,
          probes: [tcp], source: test, confidence: C}}
  - service: lab
    source: test
    endpoints:
{endpoints}
"""


@pytest.fixture(scope="module")
def lab(netns_lab: Lab) -> Iterator[Lab]:
    _nfqueue_available()
    handle = netns_lab.serve(
        [
            {"kind": "tcp", "host": netns_lab.addr.service(i), "port": PORT, "mode": "echo"}
            for i in range(1, 6)
        ]
    )
    yield netns_lab
    handle.stop()


def _records(archive: Path) -> list[dict[str, Any]]:
    out = []
    for path in sorted(archive.glob("*.jsonl")):
        for line in path.read_text().splitlines():
            if line.strip():
                out.append(json.loads(line))
    return out


def _connects(records: list[dict[str, Any]]) -> list[tuple[float, float]]:
    """(loop-timed connect, kernel connect_rtt) in ms of the lab's successful tcp probes."""
    out = []
    for record in records:
        r = record["test_keys"]["probe_result"]  # our complete result (docs/archive.md)
        lab_tcp = r["target"]["service"] == "lab" and r["target"]["probe"] == "tcp"
        if r["ok"] and lab_tcp and "connect_rtt" in r["phases"]:
            out.append((1000 * r["phases"]["connect"], 1000 * r["phases"]["connect_rtt"]))
    return out


def test_a_metrics_flood_does_not_bend_recorded_connect_times(lab: Lab, tmp_path: Path) -> None:
    port = free_port()
    archive = tmp_path / "archive"
    config = tmp_path / "agent.yaml"
    config.write_text(_config(lab, port, archive))
    config.chmod(0o644)
    tmp_path.chmod(0o755)
    delayed = [lab.addr.service(i) for i in range(1, 6)]
    with lab.censor.active(c.Delay(DELAY_MS, delayed, direction="down")):
        agent = subprocess.Popen(
            ns_argv(lab.ns("client"), [sys.executable, "-m", "probe", "run", "-c", str(config)]),
            cwd=REPO,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
        )
        try:
            deadline = time.monotonic() + 30  # first round done: the store is full
            while len(_connects(_records(archive))) < ENDPOINTS:
                assert time.monotonic() < deadline, "no first round within 30 s"
                assert agent.poll() is None, "the agent exited"
                time.sleep(0.2)
            before = len(_records(archive))
            flood = lab.exec(
                "client",
                [
                    sys.executable,
                    "-c",
                    FLOOD,
                    f"http://127.0.0.1:{port}/metrics",
                    str(FLOOD_S),
                    str(FLOODERS),
                ],
                timeout_s=FLOOD_S + 60,
            )
            during = _records(archive)[before:]
        finally:
            agent.terminate()
            _, err = agent.communicate(timeout=15)
    served = int(flood.stdout.strip() or 0)
    assert served > FLOODERS, f"the flood never got going: {flood.stderr[-500:]} {err[-500:]!r}"
    pairs = _connects(during)
    assert len(pairs) >= ENDPOINTS, f"too few measurements during the flood: {len(pairs)}"
    # The path's own delay is what the kernel timed: the injected one, plus the NFQUEUE
    # handler's queueing when the machine is busy (that is the path, not the agent).
    kernel = statistics.median(k for _, k in pairs)
    assert DELAY_MS - 1 < kernel < DELAY_MS + 100, kernel
    # What the agent adds on top (its loop noticing the connection) must stay small while
    # the flood runs.  With the flood served on the probing loop it was p50 81 ms, p90
    # 214 ms; the bounds sit well below that and well above today's ~0.4 / ~1.3 ms, so a
    # busy CI machine does not trip them but the old behaviour does.
    excess = sorted(loop - k for loop, k in pairs)
    p50, p90 = statistics.median(excess), excess[int(0.9 * len(excess))]
    print(  # the figures, for docs (pytest -s)
        f"flood: {served} scrapes served; kernel connect p50 {kernel:.2f} ms;"
        f" loop over kernel p50 {p50:.2f} ms, p90 {p90:.2f} ms, n={len(excess)}"
    )
    assert p50 < 20 and p90 < 60, (p50, p90, served, len(pairs))
