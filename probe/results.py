"""The latest results, swapped atomically: what the exporter and status page read.

The round runner writes here; scrapes read `ResultStore.snapshot()`.  Every
update builds a new frozen `Snapshot` from the previous one and replaces it with
a single attribute assignment, so a reader holding a snapshot sees one
consistent state for as long as it likes, and never a half-applied round
(`record_many()` applies a whole round in one swap).  There is no global state:
the daemon creates one store and passes it to whoever needs it.

Besides the latest `ProbeResult` per `Target.key()` the store keeps what a
single latest result cannot tell:

* when each key last changed state (ok / failed with which failure kind), so
  "blocked since" survives a restart of the scrape side;
* monotonic counters of attempts, failures (by failure kind) and skips, and
  bucket counts of phase durations, per *series* (`SeriesKey`).  A series is a
  target key with the resolved address of a hostname endpoint replaced by its
  address family: DNS answers change every few minutes and would otherwise
  create new counters (and new Prometheus series) on every change.

Skipped results (vantage offline, no IPv6) are kept as the latest result but
never change a key's state, never count as an attempt and never as a failure.
"""

from __future__ import annotations

import bisect
import threading
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field, replace
from datetime import datetime
from types import MappingProxyType
from typing import Any, NamedTuple, Protocol

from .model import Failure, ProbeResult, SkipReason, Target, Vantage, VantageState
from .verdict import Verdict

__all__ = [
    "PHASE_BUCKETS",
    "VERDICTS",
    "Histogram",
    "Key",
    "ResultStore",
    "SeriesKey",
    "Snapshot",
    "VerdictLike",
    "series_key",
]

Key = tuple[str, str, str, str, str]  # Target.key()

# Upper bounds (seconds) for phase-duration histograms.  Network RTTs from a
# vantage span ~1 ms (same city) to ~500 ms (satellite, throttled paths); the
# long tail up to 30 s covers slow TLS under throttling and bulk transfers.
PHASE_BUCKETS: tuple[float, ...] = (
    0.005, 0.01, 0.025, 0.05, 0.075, 0.1, 0.15, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0,
)  # fmt: skip

# The verdict vocabulary: the verdict engine's closed `Verdict` values.  The exporter
# emits one series per value for each verdict, 1 for the current value and 0 for the rest.
VERDICTS: tuple[str, ...] = tuple(str(v) for v in Verdict)


class VerdictLike(Protocol):
    """The fields the exporter reads from a verdict (`probe.verdict.EndpointVerdict` and
    `probe.verdict.ServiceVerdict` satisfy it).

    ``endpoint`` is None for a service-level verdict.  ``evidence`` is carried
    for the status page and is never exported as a label.
    """

    @property
    def service(self) -> str: ...
    @property
    def endpoint(self) -> str | None: ...
    @property
    def verdict(self) -> str: ...
    @property
    def confidence(self) -> float: ...
    @property
    def blocked_fraction(self) -> float | None: ...
    @property
    def evidence(self) -> Any: ...


class SeriesKey(NamedTuple):
    """Bounded identity of a metric series; see `series_key()`."""

    service: str
    endpoint: str
    probe: str
    address: str  # only for IP-literal endpoints, else ""
    ip_family: str  # "ipv4" | "ipv6" | "" (DNS probes)
    port: str  # "" when the probe has no port
    resolver: str  # DNS probes only, else ""


def series_key(target: Target) -> SeriesKey:
    """The series a target's results are counted under.

    The address is kept only when the endpoint itself is an IP literal (its
    address is configuration, hence bounded); a hostname endpoint's resolved
    addresses are data and collapse to their family.
    """
    address = target.address or ""
    if address and not target.endpoint.is_ip_literal:
        address = ""
    return SeriesKey(
        service=target.service,
        endpoint=target.endpoint.name,
        probe=target.label,  # "tls" or "tls/neutral_sni": a swap test is its own series
        address=address,
        ip_family=target.family or "",
        port=str(target.port) if target.port is not None else "",
        resolver=target.resolver or "",
    )


@dataclass(frozen=True)
class Histogram:
    """Bucket counts for `PHASE_BUCKETS` (non-cumulative; the last slot is +Inf)."""

    counts: tuple[int, ...] = (0,) * (len(PHASE_BUCKETS) + 1)
    total: float = 0.0

    @property
    def count(self) -> int:
        return sum(self.counts)

    def observe(self, value: float) -> Histogram:
        slot = bisect.bisect_left(PHASE_BUCKETS, value)  # le semantics: value <= bound
        counts = list(self.counts)
        counts[slot] += 1
        return Histogram(tuple(counts), self.total + value)

    def cumulative(self) -> list[tuple[float, int]]:
        """(upper bound, cumulative count) pairs ending with (+Inf, count)."""
        out: list[tuple[float, int]] = []
        running = 0
        for bound, n in zip((*PHASE_BUCKETS, float("inf")), self.counts, strict=True):
            running += n
            out.append((bound, running))
        return out


State = tuple[bool, Failure | None]  # (ok, failure kind) of a non-skipped result


def _frozen(d: dict[Any, Any]) -> Mapping[Any, Any]:
    return MappingProxyType(d)


def _empty() -> Mapping[Any, Any]:
    return MappingProxyType({})


@dataclass(frozen=True)
class Snapshot:
    """One consistent view of everything the store holds.  Never mutated."""

    results: Mapping[Key, ProbeResult] = field(default_factory=_empty)
    changed_at: Mapping[Key, datetime] = field(default_factory=_empty)
    states: Mapping[Key, State] = field(default_factory=_empty)
    attempts: Mapping[SeriesKey, int] = field(default_factory=_empty)
    failures: Mapping[tuple[SeriesKey, Failure], int] = field(default_factory=_empty)
    skips: Mapping[tuple[SeriesKey, SkipReason], int] = field(default_factory=_empty)
    phase_latency: Mapping[tuple[SeriesKey, str], Histogram] = field(default_factory=_empty)
    vantage: Vantage = field(default_factory=Vantage)
    vantage_state: VantageState | None = None
    verdicts: tuple[Any, ...] = ()  # VerdictLike objects
    verdict_vocabulary: tuple[str, ...] = VERDICTS
    config_reload_ok: bool | None = None  # None: the daemon has not reported yet
    config_reload_success_at: datetime | None = None
    schedule_lag_s: float = 0.0
    in_flight: int = 0
    archive_write_errors: int | None = None  # None: no archive configured
    controls: tuple[Any, ...] = ()  # probe.control.ControlStatus, one per configured control
    generation: int = 0  # bumped on every swap


class ResultStore:
    """Holds the current `Snapshot`; every update swaps in a new one.

    Writers serialise on a lock (the daemon may record from the event loop while
    a reload thread sets config status); readers never lock: reading
    ``self._snapshot`` is one attribute load.
    """

    def __init__(self, vantage: Vantage | None = None) -> None:
        self._lock = threading.Lock()
        self._snapshot = Snapshot(vantage=vantage or Vantage())

    def snapshot(self) -> Snapshot:
        return self._snapshot

    # -- results ---------------------------------------------------------------

    def record(self, result: ProbeResult) -> None:
        self.record_many((result,))

    def record_many(self, results: Iterable[ProbeResult]) -> None:
        """Apply a batch (typically one round) in a single swap."""
        batch = list(results)
        if not batch:
            return
        with self._lock:
            old = self._snapshot
            acc = _Accumulator(old)
            for result in batch:
                acc.add(result)
            self._swap(acc.build())

    def replace_targets(self, keys: Iterable[Key]) -> None:
        """Forget every key not in ``keys`` (config reload, changed DNS answers).

        Counters and histograms go with them once no remaining result maps to
        their series, so a removed endpoint's series vanish from the next scrape.
        """
        wanted = set(keys)
        with self._lock:
            old = self._snapshot
            results = {k: r for k, r in old.results.items() if k in wanted}
            live = {series_key(r.target) for r in results.values()}
            self._swap(
                replace(
                    old,
                    results=_frozen(results),
                    changed_at=_frozen({k: v for k, v in old.changed_at.items() if k in wanted}),
                    states=_frozen({k: v for k, v in old.states.items() if k in wanted}),
                    attempts=_frozen({s: n for s, n in old.attempts.items() if s in live}),
                    failures=_frozen({k: n for k, n in old.failures.items() if k[0] in live}),
                    skips=_frozen({k: n for k, n in old.skips.items() if k[0] in live}),
                    phase_latency=_frozen(
                        {k: h for k, h in old.phase_latency.items() if k[0] in live}
                    ),
                )
            )

    # -- everything else the exporter shows ------------------------------------

    def record_vantage(self, state: VantageState) -> None:
        self._update(vantage_state=state)

    def set_vantage(self, vantage: Vantage) -> None:
        """The configured vantage identity (changes only on config reload)."""
        self._update(vantage=vantage)

    def set_verdicts(
        self, verdicts: Sequence[Any], vocabulary: Sequence[str] | None = None
    ) -> None:
        """Replace all verdicts.  Every verdict value must be in the vocabulary.

        A value outside it would add an unplanned label value, so it is a bug
        in the verdict engine and raises `ValueError` instead of being exported.
        """
        vocab = tuple(vocabulary) if vocabulary is not None else self._snapshot.verdict_vocabulary
        for v in verdicts:
            if v.verdict not in vocab:
                raise ValueError(f"verdict {v.verdict!r} is not in the vocabulary {vocab}")
        self._update(verdicts=tuple(verdicts), verdict_vocabulary=vocab)

    def set_controls(self, statuses: Sequence[Any]) -> None:
        """The configured control vantages' state (`probe.control.ControlStatus`)."""
        self._update(controls=tuple(statuses))

    def set_config_reload(self, ok: bool, at: datetime) -> None:
        """Report a config (re)load; ``at`` becomes the success time only when ok."""
        if ok:
            self._update(config_reload_ok=True, config_reload_success_at=at)
        else:
            self._update(config_reload_ok=False)

    def set_agent_stats(
        self,
        *,
        schedule_lag_s: float | None = None,
        in_flight: int | None = None,
        archive_write_errors: int | None = None,
    ) -> None:
        changes: dict[str, Any] = {}
        if schedule_lag_s is not None:
            changes["schedule_lag_s"] = schedule_lag_s
        if in_flight is not None:
            changes["in_flight"] = in_flight
        if archive_write_errors is not None:
            changes["archive_write_errors"] = archive_write_errors
        if changes:
            self._update(**changes)

    def _update(self, **changes: Any) -> None:
        with self._lock:
            self._swap(replace(self._snapshot, **changes))

    def _swap(self, new: Snapshot) -> None:
        # Called with the lock held; the assignment itself is what readers see.
        self._snapshot = replace(new, generation=self._snapshot.generation + 1)


class _Accumulator:
    """Mutable copies of one snapshot's maps while a batch is applied."""

    def __init__(self, base: Snapshot) -> None:
        self.base = base
        self.results = dict(base.results)
        self.changed_at = dict(base.changed_at)
        self.states = dict(base.states)
        self.attempts = dict(base.attempts)
        self.failures = dict(base.failures)
        self.skips = dict(base.skips)
        self.phase_latency = dict(base.phase_latency)

    def add(self, result: ProbeResult) -> None:
        key = result.target.key()
        series = series_key(result.target)
        self._count(result, series)
        # The result recorded last wins, whatever its wall-clock time: one endpoint's
        # rounds never overlap, and after the clock steps back (NTP on a VM) comparing
        # times would ignore every new result until the clock caught up.
        self.results[key] = result
        if result.skipped is None:
            state: State = (result.ok, result.failure_kind)
            if self.states.get(key) != state:
                self.states[key] = state
                self.changed_at[key] = result.t

    def _count(self, result: ProbeResult, series: SeriesKey) -> None:
        if result.skipped is not None:
            skip = (series, result.skipped)
            self.skips[skip] = self.skips.get(skip, 0) + 1
            return
        self.attempts[series] = self.attempts.get(series, 0) + 1
        kind = result.failure_kind
        if kind is not None:
            self.failures[(series, kind)] = self.failures.get((series, kind), 0) + 1
        if result.ok:
            # Only completed probes feed the latency histogram: a failed phase's
            # time is time-to-reset or a timeout, not a round-trip time.
            for phase, seconds in result.phases.items():
                slot = (series, phase)
                self.phase_latency[slot] = self.phase_latency.get(slot, Histogram()).observe(
                    seconds
                )

    def build(self) -> Snapshot:
        return replace(
            self.base,
            results=_frozen(self.results),
            changed_at=_frozen(self.changed_at),
            states=_frozen(self.states),
            attempts=_frozen(self.attempts),
            failures=_frozen(self.failures),
            skips=_frozen(self.skips),
            phase_latency=_frozen(self.phase_latency),
        )
