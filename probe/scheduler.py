"""Independent probing schedule (never probe-on-scrape).

Each endpoint runs in its own loop, so rounds for one endpoint never overlap:
interval plus jitter, and never sooner than ``min_spacing_s`` after its last
start (re-testing too fast can trigger residual blocking).  The offline gate
runs in a loop of its own and every endpoint round uses its latest finding.
Global and per-destination concurrency bounds come from the shared `Runner`.
"""

from __future__ import annotations

import asyncio
import logging
import random
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass

from .model import Endpoint, ProbeResult, VantageState
from .round import Runner, all_endpoints, check_config_vantage, measure_endpoint
from .settings import AgentConfig

log = logging.getLogger("probe.scheduler")

ResultSink = Callable[[Sequence[ProbeResult]], None]
VantageSink = Callable[[VantageState], None]


@dataclass
class ScheduleStats:
    """Self-metrics the exporter reads (lag of the last start, rounds done)."""

    last_lag_s: float = 0.0
    rounds: int = 0


class Scheduler:
    def __init__(
        self,
        config: AgentConfig,
        on_results: ResultSink,
        on_vantage: VantageSink,
        *,
        rng: random.Random | None = None,
        gate_interval_s: float | None = None,
    ) -> None:
        self.config = config
        self.on_results = on_results
        self.on_vantage = on_vantage
        self.rng = rng or random.Random()
        sched = config.schedule
        self.gate_interval_s = gate_interval_s or min(sched.interval_s, 60.0)
        self.runner = Runner(
            config.settings,
            concurrency=sched.concurrency,
            per_destination=sched.per_destination,
        )
        self.stats = ScheduleStats()
        self._state: VantageState | None = None
        self._state_ready = asyncio.Event()
        self._tasks: list[asyncio.Task[None]] = []

    @property
    def in_flight(self) -> int:
        return self.runner.in_flight

    def start(self) -> None:
        self._tasks.append(asyncio.create_task(self._gate_loop(), name="gate"))
        for ep in all_endpoints(self.config):
            name = f"endpoint {ep.service}/{ep.name}"
            self._tasks.append(asyncio.create_task(self._endpoint_loop(ep), name=name))

    async def stop(self, grace_s: float = 3.0) -> None:
        """Cancel every loop; in-flight probes are cancelled, nothing half-recorded."""
        for task in self._tasks:
            task.cancel()
        if self._tasks:
            await asyncio.wait(self._tasks, timeout=grace_s)
        self._tasks.clear()

    async def _gate_loop(self) -> None:
        while True:
            state = await check_config_vantage(self.config)
            if self._state is None or state.online != self._state.online:
                log.info("vantage state", extra={"state": state.state, "ipv6": state.ipv6})
            self._state = state
            self._state_ready.set()
            self.on_vantage(state)
            await asyncio.sleep(self.gate_interval_s)

    def _next_delay(self, started: float) -> float:
        sched = self.config.schedule
        wanted = sched.interval_s + self.rng.uniform(-sched.jitter_s, sched.jitter_s)
        wanted = max(wanted, sched.min_spacing_s)
        return max(0.0, started + wanted - time.monotonic())

    async def _endpoint_loop(self, ep: Endpoint) -> None:
        sched = self.config.schedule
        # spread the first round so a restart does not burst every target at once
        due = time.monotonic() + self.rng.uniform(0, min(sched.jitter_s, sched.interval_s))
        await self._state_ready.wait()
        while True:
            await asyncio.sleep(max(0.0, due - time.monotonic()))
            started = time.monotonic()
            self.stats.last_lag_s = started - due
            assert self._state is not None  # set before _state_ready
            try:
                results = await measure_endpoint(ep, self.runner, self._state)
            except Exception:  # a bug in one endpoint's round must not stop the others
                log.exception("endpoint round failed", extra={"endpoint": ep.name})
                results = []
            self.stats.rounds += 1
            if results:
                self.on_results(results)
            due = time.monotonic() + self._next_delay(started)
