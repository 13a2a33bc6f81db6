"""Independent probing schedule (never probe-on-scrape).

Each endpoint runs in its own loop, so rounds for one endpoint never overlap:
interval plus or minus jitter, and never sooner than ``min_spacing_s`` after its
last start (re-testing too fast can trigger residual blocking).  A config reload
replaces the scheduler; passing the old one's `Scheduler.history` keeps that
spacing across the swap.  The offline gate runs in a loop of its own and every
endpoint round uses its latest finding.  Global and per-destination concurrency
bounds come from the shared `Runner`.
"""

from __future__ import annotations

import asyncio
import logging
import random
import time
from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

from .model import Endpoint, ProbeResult, VantageState, utcnow
from .round import (
    Runner,
    all_endpoints,
    check_config_vantage,
    measure_endpoint,
    warm_tls_contexts,
)
from .settings import AgentConfig

log = logging.getLogger("probe.scheduler")

ResultSink = Callable[[Sequence[ProbeResult]], None]
VantageSink = Callable[[VantageState], None]
EndpointKey = tuple[str, str]  # (service, endpoint name)
# When an endpoint's latest round started (monotonic clock) and whether it finished
# (False: a reload or shutdown cancelled it, so nothing of it was recorded).
History = dict[EndpointKey, tuple[float, bool]]


LAG_WINDOW = 1024  # recent round starts whose lag the quantiles describe


@dataclass
class ScheduleStats:
    """Self-metrics the exporter reads (lag of the last start and of recent ones, rounds)."""

    last_lag_s: float = 0.0
    rounds: int = 0
    recent_lags: deque[float] = field(default_factory=lambda: deque(maxlen=LAG_WINDOW))

    def lag_quantiles(self) -> tuple[tuple[str, float], ...]:
        """(percentile, seconds) over the recent starts: a late loop shows in p99, not p50."""
        lags = sorted(self.recent_lags)
        if not lags:
            return ()
        return tuple(
            (str(p), lags[min(len(lags) - 1, p * len(lags) // 100)]) for p in (50, 99, 100)
        )


class Scheduler:
    def __init__(
        self,
        config: AgentConfig,
        on_results: ResultSink,
        on_vantage: VantageSink,
        *,
        rng: random.Random | None = None,
        gate_interval_s: float | None = None,
        history: History | None = None,
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
            swaps=config.swaps,
        )
        self.stats = ScheduleStats()
        configured = {(ep.service, ep.name) for ep in all_endpoints(config)}
        self.history: History = {k: v for k, v in (history or {}).items() if k in configured}
        self._state: VantageState | None = None
        self._state_ready = asyncio.Event()
        self._warm = asyncio.Event()
        self._tasks: list[asyncio.Task[None]] = []

    @property
    def in_flight(self) -> int:
        return self.runner.in_flight

    def start(self) -> None:
        self._tasks.append(asyncio.create_task(self._gate_loop(), name="gate"))
        self._tasks.append(asyncio.create_task(self._warm_up(), name="warm-up"))
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
            try:
                state = await check_config_vantage(self.config)
            except Exception as exc:  # a gate bug must not stop every endpoint from starting
                log.exception("vantage check failed; treating the vantage as offline")
                state = VantageState(False, False, utcnow(), {"error": type(exc).__name__})
            if self._state is None or state.state != self._state.state:
                log.info("vantage state", extra={"state": state.state, "ipv6": state.ipv6})
            self._state = state
            self._state_ready.set()
            self.on_vantage(state)
            await asyncio.sleep(self.gate_interval_s)

    async def _warm_up(self) -> None:
        """TLS contexts are built once, in a thread, before the first round (tls.py)."""
        await warm_tls_contexts(self.config)
        self._warm.set()

    def _spacing(self) -> float:
        """Start-to-start time to the next round: interval +/- jitter, at least min_spacing."""
        sched = self.config.schedule
        wanted = sched.interval_s + self.rng.uniform(-sched.jitter_s, sched.jitter_s)
        return max(wanted, sched.min_spacing_s)

    def _first_due(self, key: EndpointKey) -> float:
        now = time.monotonic()
        previous = self.history.get(key)
        if previous is None:
            # spread the first round so a start does not burst every target at once
            sched = self.config.schedule
            return now + self.rng.uniform(0, min(sched.jitter_s, sched.interval_s))
        # Known from before a reload: keep its rhythm (a finished round) or re-run a
        # cancelled one as soon as min_spacing_s allows, never sooner.
        started, finished = previous
        spacing = self._spacing() if finished else self.config.schedule.min_spacing_s
        return max(now, started + spacing)

    async def _endpoint_loop(self, ep: Endpoint) -> None:
        key = (ep.service, ep.name)
        due = self._first_due(key)
        await self._state_ready.wait()
        await self._warm.wait()
        while True:
            await asyncio.sleep(max(0.0, due - time.monotonic()))
            started = time.monotonic()
            self.stats.last_lag_s = started - due
            self.stats.recent_lags.append(started - due)
            self.history[key] = (started, False)
            assert self._state is not None  # set before _state_ready
            try:
                results = await measure_endpoint(ep, self.runner, self._state)
                if results:
                    self.on_results(results)
            except Exception:
                # A bug in a round, or in publishing it (archive, store, verdicts), must
                # stop neither this endpoint's loop nor the others.
                log.exception("endpoint round failed", extra={"endpoint": ep.name})
            self.history[key] = (started, True)
            self.stats.rounds += 1
            due = max(started + self._spacing(), time.monotonic())
