"""Attack 3: file-descriptor exhaustion through idle HTTP connections.

Before: 1,100 idle connections against nofile 1024 starved the agent of descriptors:
/metrics timed out, the offline gate declared the vantage offline, a healthy target got
``unknown_failure ... Too many open files`` and asyncio logged 176k lines in 40 s.  Now
HTTP connections are capped (a quarter of the descriptors, at most 128), an idle one is
closed after 5 s, the soft limit is raised to the hard one, the asyncio logger is capped,
and EMFILE/ENFILE/ENOBUFS make a skip (`agent_resources`), never a target failure or an
offline vantage.  All on loopback; the agent runs as a process with nofile 256.
"""

from __future__ import annotations

import errno
import json
import os
import resource
import socket
import subprocess
import sys
import time
from pathlib import Path

from probe.config.settings import ProbeSettings
from probe.model import SkipReason
from probe.round import Runner
from tests.agentproc import PROBE, REPO, free_port, sample
from tests.helpers import target
from tests.test_daemon import http, wait_until

NOFILE = 256
IDLE_CONNECTIONS = 400


def config_text(port: int, target_port: int) -> str:
    return f"""
schedule: {{interval_s: 0.5, jitter_s: 0, min_spacing_s: 0.2}}
timeouts: {{connect_s: 1}}
resolvers: {{system: false, udp: ["127.0.0.1:9"]}}
seeds: []
listen: 127.0.0.1:{port}
archive: {{path: null}}
services:
  - service: controls
    source: t
    endpoints:
      - {{name: ctl, host: 127.0.0.1, ports: [{target_port}], role: control, probes: [tcp],
          source: t, confidence: C}}
  - service: lab
    source: t
    endpoints:
      - {{name: up, host: 127.0.0.1, ports: [{target_port}], role: signalling, probes: [tcp],
          source: t, confidence: C}}
"""


def open_fds(pid: int) -> int:
    return len(os.listdir(f"/proc/{pid}/fd"))


def test_idle_connections_cannot_starve_the_probes(tmp_path: Path) -> None:
    port = free_port()
    # The healthy target: the kernel completes the handshakes from the listen backlog.
    healthy = socket.create_server(("127.0.0.1", 0), backlog=4096)
    config = tmp_path / "agent.yaml"
    config.write_text(config_text(port, healthy.getsockname()[1]))
    log = tmp_path / "agent.log"

    def limit_fds() -> None:
        resource.setrlimit(resource.RLIMIT_NOFILE, (NOFILE, NOFILE))

    with log.open("wb") as out:
        proc = subprocess.Popen(
            [*PROBE, "run", "-c", str(config)],
            cwd=REPO,
            stdout=out,
            stderr=out,
            preexec_fn=limit_fds,  # only setrlimit, before exec
        )
    url = f"http://127.0.0.1:{port}"
    idle: list[socket.socket] = []
    try:
        wait_until(lambda: sample(http(url + "/metrics")[1], "probe_success") == 1, "a result")
        before = sample(http(url + "/metrics")[1], "probe_attempts_total", endpoint="up")
        assert before is not None
        peak = 0
        for _ in range(IDLE_CONNECTIONS):  # connect and say nothing
            s = socket.socket()
            s.setblocking(False)
            s.connect_ex(("127.0.0.1", port))
            idle.append(s)
        deadline = time.monotonic() + 3  # several probe rounds under attack
        while time.monotonic() < deadline:
            peak = max(peak, open_fds(proc.pid))
            time.sleep(0.1)
        for s in idle:
            s.close()
        text = wait_until(lambda: http(url + "/metrics", timeout=2)[1], "/metrics again", 15)
        # One more idle connection: the agent closes it after 5 s (before: kept for an
        # hour; recv() would time out after 15 s).
        lingering = socket.create_connection(("127.0.0.1", port), timeout=15)
        idle.append(lingering)
        assert lingering.recv(1) == b""  # end of stream: closed by the agent
    finally:
        for s in idle:
            s.close()
        proc.terminate()
        proc.wait(timeout=10)
        healthy.close()
    print(f"peak open fds {peak} of {NOFILE}")
    assert peak < NOFILE - 32, peak  # room left for the probes throughout
    attempts = sample(text, "probe_attempts_total", endpoint="up")
    assert attempts is not None and attempts > before  # probing went on during the attack
    assert sample(text, "probe_success", endpoint="up") == 1
    assert sample(text, "probe_failures_total", endpoint="up") in (None, 0)
    assert sample(text, "probe_vantage_online") == 1
    events = [json.loads(line) for line in log.read_text().splitlines() if line.strip()]
    assert len(events) < 100, len(events)
    assert not [e for e in events if "Too many open files" in json.dumps(e)]


async def test_emfile_in_a_probe_is_an_agent_side_skip_not_a_target_failure() -> None:
    """The runner's probe table is its seam: a probe whose socket() fails with EMFILE."""

    async def out_of_fds(_target: object, _settings: object) -> object:
        raise OSError(errno.EMFILE, os.strerror(errno.EMFILE))

    runner = Runner(ProbeSettings(), probes={"tcp": out_of_fds})  # type: ignore[dict-item]
    result = await runner.one(target("tcp", "127.0.0.1", 9))
    assert result.skipped is SkipReason.AGENT_RESOURCES
    assert result.failure is None and not result.ok


GATE_DRIVER = r"""
import asyncio, json, os, resource, socket, sys
from probe.gate import check_vantage, inconclusive
from tests.helpers import endpoint
server = socket.create_server(("127.0.0.1", 0))  # a control that accepts
control = endpoint("127.0.0.1", ports=(server.getsockname()[1],), service="controls",
                   name="ctl", role="control")
async def main():
    before = await check_vantage([control], 2.0)
    # Leave no descriptor free: every socket() the gate opens fails with EMFILE.
    used = len(os.listdir("/proc/self/fd")) - 1  # not the one listdir itself held
    hard = resource.getrlimit(resource.RLIMIT_NOFILE)[1]
    resource.setrlimit(resource.RLIMIT_NOFILE, (used, hard))
    starved = await check_vantage([control], 2.0)
    return {"before": before.online, "starved_online": starved.online,
            "inconclusive": inconclusive(starved)}
print(json.dumps(asyncio.run(main())))
"""


def test_a_gate_run_starved_of_descriptors_is_inconclusive_not_offline() -> None:
    """Before: the controls' connects failed with EMFILE and the vantage read offline (every
    endpoint then skipped as vantage_offline for rounds).  Now the scheduler keeps the last
    finding when the gate says its run was spoilt by the agent's own exhaustion."""
    done = subprocess.run(
        [sys.executable, "-c", GATE_DRIVER],
        capture_output=True,
        text=True,
        timeout=60,
        cwd=REPO,
    )
    assert done.returncode == 0, done.stderr[-2000:]
    out = json.loads(done.stdout)
    assert out == {"before": True, "starved_online": False, "inconclusive": True}, out
