"""Attack 1: a reload storm must not hide the slow (blackholed) endpoints.

Before: every reload cancelled the rounds in flight, so with a reload every 2 s an
endpoint whose probe takes longer (a TLS handshake into a silent server, exactly what a
censor's blackhole looks like) recorded nothing at all, while fast endpoints reported.
Now a reload lets rounds in flight finish and applies the new config to what comes next.
In-process, against real loopback servers; nothing leaves loopback.
"""

from __future__ import annotations

import asyncio
import itertools
import time
from pathlib import Path

import pytest

from probe.agent_config import load_config
from probe.daemon import Agent
from probe.lab.servers.tcp import TCPMode, TCPServer
from tests.test_agent_ops import endpoint_loops, wait_for

SLOW_S = 1.0  # the silent endpoint's TLS handshake times out after this long


def storm_config(path: Path, up: int, silent: int, concurrency: int) -> Path:
    """ctl and up answer at once; `silent` accepts TCP and never says a word (TLS waits)."""
    # Written aside and renamed into place: a reload reading the file meanwhile sees the
    # old or the new config, never a half-written one.
    fresh = path.with_suffix(".new")
    fresh.write_text(
        f"""
schedule: {{interval_s: 1, jitter_s: 0, min_spacing_s: 0.5, concurrency: {concurrency}}}
timeouts: {{connect_s: 1, tls_s: {SLOW_S}}}
resolvers: {{system: false, udp: ["127.0.0.1:9"]}}
seeds: []
archive: {{path: null}}
services:
  - service: controls
    source: t
    endpoints:
      - {{name: ctl, host: 127.0.0.1, ports: [{up}], role: control, probes: [tcp],
          source: t, confidence: C}}
  - service: lab
    source: t
    endpoints:
      - {{name: up, host: 127.0.0.1, ports: [{up}], role: signalling, probes: [tcp],
          source: t, confidence: C}}
      - {{name: silent, host: 127.0.0.1, ports: [{silent}], role: signalling, probes: [tls],
          source: t, confidence: C}}
"""
    )
    fresh.replace(path)
    return path


def endpoints_measured(agent: Agent) -> set[str]:
    return {key[1] for key in agent.store.snapshot().results}


async def test_a_reload_every_half_second_never_hides_a_slow_endpoint(tmp_path: Path) -> None:
    """Changed configs reloaded back to back (every 0.5 s, for 3x the slow probe's time):
    the silent endpoint gets its (failed) result during the storm; before, it had none
    until the storm ended."""
    async with (
        TCPServer("127.0.0.1", mode=TCPMode.CLOSE) as up,
        TCPServer("127.0.0.1", mode=TCPMode.HOLD) as silent,
    ):
        path = storm_config(tmp_path / "agent.yaml", up.port, silent.port, 10)
        agent = Agent(load_config(path), str(path))
        agent.start()
        try:
            deadline = time.monotonic() + 3 * SLOW_S + 0.5
            flip = 0
            while time.monotonic() < deadline:
                flip ^= 1  # a real change each time, so no reload is a no-op
                storm_config(path, up.port, silent.port, 10 + flip)
                reload = asyncio.ensure_future(agent.reload())
                await asyncio.sleep(0.5)
                assert not reload.done() or reload.result() is None
            assert endpoints_measured(agent) == {"ctl", "up", "silent"}
            assert len(endpoint_loops()) == 3  # still one loop per endpoint
        finally:
            await agent.stop()
    silent_results = [r for k, r in agent.store.snapshot().results.items() if k[1] == "silent"]
    assert silent_results and all(r.failure for r in silent_results), silent_results


async def test_a_reload_that_changes_nothing_changes_nothing(tmp_path: Path) -> None:
    """The same file reloaded: same scheduler, same loops, the round in flight untouched."""
    async with (
        TCPServer("127.0.0.1", mode=TCPMode.CLOSE) as up,
        TCPServer("127.0.0.1", mode=TCPMode.HOLD) as silent,
    ):
        path = storm_config(tmp_path / "agent.yaml", up.port, silent.port, 10)
        agent = Agent(load_config(path), str(path))
        agent.start()
        try:
            await wait_for(lambda: agent.scheduler and agent.scheduler.in_flight, "a round")
            scheduler, loops = agent.scheduler, set(endpoint_loops())
            assert await agent.reload() is None
            assert agent.scheduler is scheduler
            assert set(endpoint_loops()) == loops
            assert agent.store.snapshot().config_reload_ok
        finally:
            await agent.stop()


async def test_reloads_are_coalesced_and_rate_limited(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """30 changed-config reload requests over 1.5 s cost at most 3 reloads (one a second;
    the requests in between share one), and every request gets its answer."""
    async with TCPServer("127.0.0.1", mode=TCPMode.CLOSE) as up:
        path = storm_config(tmp_path / "agent.yaml", up.port, up.port, 10)
        agent = Agent(load_config(path), str(path))
        agent.start()
        try:
            pending = []
            with caplog.at_level("INFO", logger="probe.daemon"):
                for i in range(30):
                    storm_config(path, up.port, up.port, 11 + i % 2)
                    pending.append(asyncio.ensure_future(agent.reload()))
                    await asyncio.sleep(0.05)
                assert await asyncio.gather(*pending) == [None] * 30
        finally:
            await agent.stop()
    loaded = [r.created for r in caplog.records if r.getMessage() == "config reloaded"]
    assert 1 <= len(loaded) <= 3, loaded
    gaps = [b - a for a, b in itertools.pairwise(loaded)]
    assert all(g >= 0.9 for g in gaps), gaps
