"""The schedule, against real loopback listeners: spacing, no overlap, bounded concurrency."""

from __future__ import annotations

import asyncio
import itertools
import random
import time
from collections.abc import Sequence

import pytest

from probe.config.settings import AgentConfig, Schedule, Timeouts
from probe.lab.servers.tcp import FullBacklogListener, TCPMode, TCPServer
from probe.model import ProbeResult, Service, SkipReason, VantageState
from probe.scheduler import Scheduler
from tests.helpers import endpoint


def config(
    port: int, schedule: Schedule, endpoints: int = 2, control_port: int | None = None
) -> AgentConfig:
    eps = tuple(
        endpoint("127.0.0.1", name=f"ep{i}", probes=("tcp",), ports=(port,))
        for i in range(endpoints)
    )
    control = endpoint(
        "127.0.0.1",
        name="ctl",
        ports=(control_port or port,),
        role="control",
        service="controls",
    )
    return AgentConfig(
        schedule=schedule,
        timeouts=Timeouts(connect_s=0.3),
        services=(Service("lab", "lab", eps), Service("controls", "controls", (control,))),
    )


class Recorder:
    def __init__(self) -> None:
        self.rounds: list[tuple[str, float, float]] = []  # endpoint, first start, end
        self.states: list[VantageState] = []

    def results(self, results: Sequence[ProbeResult]) -> None:
        starts = [r.t.timestamp() for r in results]
        ends = [r.t.timestamp() + r.duration_s for r in results]
        self.rounds.append((results[0].target.endpoint.name, min(starts), max(ends)))

    def vantage(self, state: VantageState) -> None:
        self.states.append(state)


async def run_for(scheduler: Scheduler, seconds: float) -> None:
    scheduler.start()
    try:
        await asyncio.sleep(seconds)
    finally:
        await scheduler.stop()


async def test_rounds_repeat_with_spacing_and_never_overlap() -> None:
    async with TCPServer("127.0.0.1", mode=TCPMode.CLOSE) as server:
        sched = Schedule(interval_s=0.4, jitter_s=0.1, min_spacing_s=0.3, concurrency=4)
        rec = Recorder()
        scheduler = Scheduler(
            config(server.port, sched), rec.results, rec.vantage, rng=random.Random(7)
        )
        await run_for(scheduler, 2.0)
    assert rec.states and rec.states[0].online
    for name in ("ep0", "ep1", "ctl"):
        mine = sorted((start, end) for ep, start, end in rec.rounds if ep == name)
        assert len(mine) >= 3, rec.rounds  # it keeps going on its own
        for (s1, e1), (s2, _) in itertools.pairwise(mine):
            assert s2 >= e1  # a round never starts before the previous one ended
            assert s2 - s1 >= sched.min_spacing_s - 0.01  # and respects the minimum spacing


async def test_global_concurrency_bound_holds() -> None:
    """Twelve endpoints whose connects hang until their timeout: never more than 3 at once."""
    async with (
        FullBacklogListener("127.0.0.1") as blackhole,
        TCPServer("127.0.0.1", mode=TCPMode.CLOSE) as control,
    ):
        sched = Schedule(
            interval_s=5, jitter_s=0, min_spacing_s=1, concurrency=3, per_destination=8
        )
        cfg = config(blackhole.port, sched, endpoints=12, control_port=control.port)
        rec = Recorder()
        scheduler = Scheduler(cfg, rec.results, rec.vantage, rng=random.Random(1))
        peak = 0
        scheduler.start()
        try:
            deadline = time.monotonic() + 5
            while time.monotonic() < deadline and len(rec.rounds) < 13:
                peak = max(peak, scheduler.in_flight)
                await asyncio.sleep(0.005)
        finally:
            await scheduler.stop()
    assert len(rec.rounds) == 13  # 12 endpoints and the control, each once
    assert peak == 3  # the bound was reached and never exceeded


async def test_stop_cancels_promptly_even_with_probes_in_flight() -> None:
    async with TCPServer("127.0.0.1", mode=TCPMode.HOLD) as server:
        sched = Schedule(interval_s=30, jitter_s=0, min_spacing_s=1)
        rec = Recorder()
        cfg = config(server.port, sched)
        scheduler = Scheduler(cfg, rec.results, rec.vantage)
        scheduler.start()
        await asyncio.sleep(0.3)
        started = time.monotonic()
        await scheduler.stop(grace_s=3.0)
        assert time.monotonic() - started < 3.0


async def test_a_failing_vantage_check_means_offline_not_a_dead_agent(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Fault injection into our own gate: endpoints still run, and count nothing as blocked."""

    async def broken(_config: AgentConfig) -> VantageState:
        raise RuntimeError("bug in the gate")

    monkeypatch.setattr("probe.scheduler.check_config_vantage", broken)
    async with TCPServer("127.0.0.1", mode=TCPMode.CLOSE) as server:
        sched = Schedule(interval_s=5, jitter_s=0, min_spacing_s=1)
        rec = Recorder()
        results: list[ProbeResult] = []

        def keep(batch: Sequence[ProbeResult]) -> None:
            results.extend(batch)
            rec.results(batch)

        scheduler = Scheduler(config(server.port, sched), keep, rec.vantage)
        await run_for(scheduler, 0.5)
    assert rec.states and not rec.states[0].online
    assert rec.states[0].evidence == {"error": "RuntimeError"}
    assert results and {r.skipped for r in results} == {SkipReason.VANTAGE_OFFLINE}


async def test_rounds_due_within_one_batch_step_start_together() -> None:
    """Thirteen first rounds spread over a second start on at most five wake-ups (a
    0.25 s grid), not thirteen: the daemon does its Python work in bursts."""
    async with TCPServer("127.0.0.1", mode=TCPMode.CLOSE) as server:
        sched = Schedule(interval_s=10, jitter_s=1.0, min_spacing_s=1, batch_s=0.25)
        rec = Recorder()
        all_in = asyncio.Event()

        def keep(results: Sequence[ProbeResult]) -> None:
            rec.results(results)
            if len(rec.rounds) == 13:
                all_in.set()

        cfg = config(server.port, sched, endpoints=12)
        scheduler = Scheduler(cfg, keep, rec.vantage, rng=random.Random(3))
        scheduler.start()
        try:
            await asyncio.wait_for(all_in.wait(), 5)
        finally:
            await scheduler.stop()
    starts = sorted(start for _, start, _ in rec.rounds)
    assert len(starts) == 13  # each endpoint and the control once
    # Starts less than 20 ms apart were started in one pass of the loop.  Unbatched, 13
    # starts uniform over a second sit ~80 ms apart on average.
    wake_ups = 1 + sum(1 for a, b in itertools.pairwise(starts) if b - a > 0.02)
    assert wake_ups <= 5, starts
