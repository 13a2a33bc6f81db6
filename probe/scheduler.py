"""Independent probing schedule (never probe-on-scrape).

Each endpoint runs in its own loop, so rounds for one endpoint never overlap:
interval plus or minus jitter, and never sooner than ``min_spacing_s`` after its
last start (re-testing too fast can trigger residual blocking).  Start times are
moved up to a grid (``batch_s``) so the rounds due within one step start on one
wake-up of the process: CPU per round is several times lower in a burst than on a
wake-up of its own (bench/README.md, "Issue 13 targets, third session").  A config reload
replaces the scheduler without cancelling a measurement: the old one `retire`s
(its loops stop, its rounds in flight run to the end and are published), and the
new one takes over its `history` (spacing) and those rounds (an endpoint's next
round waits for the one in flight, so they never overlap).  The offline gate runs
in a loop of its own and every endpoint round uses its latest finding.  Global and
per-destination concurrency bounds come from the shared `Runner`.
"""

from __future__ import annotations

import asyncio
import logging
import math
import random
import time
from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

from .config.settings import AgentConfig
from .gate import inconclusive
from .model import Endpoint, ProbeResult, VantageState, utcnow
from .round import (
    Runner,
    all_endpoints,
    check_config_vantage,
    measure_endpoint,
    warm_tls_contexts,
)

log = logging.getLogger("probe.scheduler")

INCONCLUSIVE_RETRY_S = 5.0  # a gate run spoilt by the agent's own fd exhaustion is re-run

ResultSink = Callable[[Sequence[ProbeResult]], None]
VantageSink = Callable[[VantageState], None]
EndpointKey = tuple[str, str]  # (service, endpoint name)
# When an endpoint's latest round started (monotonic clock) and whether it finished
# (False: still running, or a shutdown cancelled it, so nothing of it was recorded).
History = dict[EndpointKey, tuple[float, bool]]
# Rounds still measuring when their scheduler retired, handed to its successor.
InFlight = dict[EndpointKey, asyncio.Task[None]]


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
        in_flight: InFlight | None = None,
        state: VantageState | None = None,
        runner: Runner | None = None,
    ) -> None:
        self.config = config
        self.on_results = on_results
        self.on_vantage = on_vantage
        self.rng = rng or random.Random()
        sched = config.schedule
        self.gate_interval_s = gate_interval_s or min(sched.interval_s, 60.0)
        # The predecessor's runner when the bounds are the same: its rounds still in
        # flight then count against the same concurrency limits as the new ones.
        self.runner = runner or Runner(
            config.settings,
            concurrency=sched.concurrency,
            per_destination=sched.per_destination,
            swaps=config.swaps,
        )
        self.stats = ScheduleStats()
        configured = {(ep.service, ep.name) for ep in all_endpoints(config)}
        self.history: History = {k: v for k, v in (history or {}).items() if k in configured}
        self._inherited: InFlight = {k: t for k, t in (in_flight or {}).items() if not t.done()}
        # The predecessor's finding: endpoints need not wait for a fresh gate run.
        self._state: VantageState | None = state
        self._state_ready = asyncio.Event()
        if state is not None:
            self._state_ready.set()
        self._warm = asyncio.Event()
        self._tasks: list[asyncio.Task[None]] = []
        self._rounds: InFlight = {}

    @property
    def vantage_state(self) -> VantageState | None:
        """The offline gate's latest finding (None before its first run)."""
        return self._state

    @property
    def in_flight(self) -> int:
        return self.runner.in_flight

    def start(self) -> None:
        self._tasks.append(asyncio.create_task(self._gate_loop(), name="gate"))
        self._tasks.append(asyncio.create_task(self._warm_up(), name="warm-up"))
        for ep in all_endpoints(self.config):
            name = f"endpoint {ep.service}/{ep.name}"
            self._tasks.append(asyncio.create_task(self._endpoint_loop(ep), name=name))

    def can_share_runner(self, config: AgentConfig) -> bool:
        """Whether a successor for ``config`` may keep this scheduler's runner."""
        old, new = self.config, config
        return (old.settings, old.schedule.concurrency, old.schedule.per_destination) == (
            new.settings,
            new.schedule.concurrency,
            new.schedule.per_destination,
        )

    def retire(self) -> InFlight:
        """Stop scheduling (a reload): the loops end, every round in flight runs on to the
        end and is published.  Returns those rounds for the successor to wait on."""
        for task in self._tasks:
            task.cancel()
        self._tasks.clear()
        running = {**self._inherited, **self._rounds}
        return {k: t for k, t in running.items() if not t.done()}

    async def stop(self, grace_s: float = 3.0) -> None:
        """Shutdown: end every loop; rounds in flight get ``grace_s`` to finish (and be
        published), then they are cancelled and nothing of them is recorded."""
        rounds = list(self.retire().values())
        if rounds:
            _, pending = await asyncio.wait(rounds, timeout=grace_s)
            for task in pending:
                task.cancel()
            if pending:
                await asyncio.wait(pending, timeout=grace_s)

    async def _gate_loop(self) -> None:
        while True:
            try:
                state = await check_config_vantage(self.config)
            except Exception as exc:  # a gate bug must not stop every endpoint from starting
                log.exception("vantage check failed; treating the vantage as offline")
                state = VantageState(False, False, utcnow(), {"error": type(exc).__name__})
            if inconclusive(state) and self._state is not None:
                # The controls failed because this process is out of descriptors: that
                # says nothing about the uplink.  Keep the last finding, check again soon.
                log.warning("vantage check inconclusive: the agent is out of file descriptors")
                await asyncio.sleep(min(self.gate_interval_s, INCONCLUSIVE_RETRY_S))
                continue
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

    def _on_grid(self, due: float) -> float:
        """``due`` moved up to the next step of the batch grid, so that rounds due within
        one step share a timer value and asyncio wakes them in one pass of the loop."""
        sched = self.config.schedule
        # At most a tenth of the interval: a short interval keeps its rhythm.
        step = min(sched.batch_s, sched.interval_s / 10)
        return math.ceil(due / step) * step if step > 0 else due

    async def _endpoint_loop(self, ep: Endpoint) -> None:
        key = (ep.service, ep.name)
        inherited = self._inherited.get(key)
        if inherited is not None:
            # The predecessor's round of this endpoint is still measuring: never overlap
            # it; once it is done, it counts as this endpoint's latest finished round.
            await asyncio.wait([inherited])
            if key in self.history:
                self.history[key] = (self.history[key][0], True)
        due = self._first_due(key)
        await self._state_ready.wait()
        await self._warm.wait()
        while True:
            due = self._on_grid(due)
            await _sleep_until(due)
            started = time.monotonic()
            self.stats.last_lag_s = started - due
            self.stats.recent_lags.append(started - due)
            self.history[key] = (started, False)
            assert self._state is not None  # set before _state_ready
            # The round is a task of its own: a reload cancels this loop, never the
            # measurement (cancelling it would hide exactly the slow, blackholed targets).
            task = asyncio.create_task(self._round(ep, self._state), name=f"round {ep.name}")
            self._rounds[key] = task
            await asyncio.shield(task)
            del self._rounds[key]
            self.history[key] = (started, True)
            self.stats.rounds += 1
            due = max(started + self._spacing(), time.monotonic())

    async def _round(self, ep: Endpoint, state: VantageState) -> None:
        try:
            results = await measure_endpoint(ep, self.runner, state)
            if results:
                self.on_results(results)
        except Exception:
            # A bug in a round, or in publishing it (archive, store, verdicts), must
            # stop neither this endpoint's loop nor the others.
            log.exception("endpoint round failed", extra={"endpoint": ep.name})


async def _sleep_until(when: float) -> None:
    """Sleep until the loop's clock (time.monotonic) reads ``when``.  Unlike
    ``asyncio.sleep(when - now)`` every sleeper of one ``when`` gets the same timer
    value, whatever moment it went to sleep, so they wake together."""
    loop = asyncio.get_running_loop()
    if when <= loop.time():
        await asyncio.sleep(0)
        return
    woken: asyncio.Future[None] = loop.create_future()
    timer = loop.call_at(when, _wake, woken)
    try:
        await woken
    finally:
        timer.cancel()


def _wake(future: asyncio.Future[None]) -> None:
    if not future.done():
        future.set_result(None)
