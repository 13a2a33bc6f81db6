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
from typing import Any, NamedTuple

from .model import Failure, ProbeResult, SkipReason, Target, Vantage, VantageState
from .verdict.vocabulary import Verdict

__all__ = [
    "PHASE_BUCKETS",
    "VERDICTS",
    "Histogram",
    "Key",
    "ResultStore",
    "SeriesKey",
    "Snapshot",
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


EndpointKey = tuple[str, str]  # (service, endpoint name)
State = tuple[bool, Failure | None]  # (ok, failure kind) of a non-skipped result


def _frozen(d: dict[Any, Any]) -> Mapping[Any, Any]:
    return MappingProxyType(d)


def _empty() -> Mapping[Any, Any]:
    return MappingProxyType({})


_EMPTY = Histogram()


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
    series: Mapping[Key, SeriesKey] = field(default_factory=_empty)  # series_key() per key
    # The same phase durations summed per (service, probe, phase): the default export.
    aggregate_latency: Mapping[tuple[str, str, str], Histogram] = field(default_factory=_empty)
    vantage: Vantage = field(default_factory=Vantage)
    vantage_state: VantageState | None = None
    verdicts: tuple[Any, ...] = ()  # `probe.records.VerdictFields` objects
    verdict_vocabulary: tuple[str, ...] = VERDICTS
    config_reload_ok: bool | None = None  # None: the daemon has not reported yet
    config_reload_success_at: datetime | None = None
    schedule_lag_s: float = 0.0
    schedule_lag_quantiles: tuple[tuple[str, float], ...] = ()  # over recent round starts
    in_flight: int = 0
    archive_write_errors: int | None = None  # None: no archive configured
    # (reason, count) of HTTP connections closed on accept (probe.weblimits.Refusals)
    http_connections_refused: tuple[tuple[str, int], ...] = ()
    controls: tuple[Any, ...] = ()  # probe.control.ControlStatus, one per configured control
    generation: int = 0  # bumped on every swap


# The Snapshot fields the store keeps as maps (the rest is small metadata).
_MAPS: tuple[str, ...] = (
    "results",
    "changed_at",
    "states",
    "attempts",
    "failures",
    "skips",
    "phase_latency",
    "aggregate_latency",
    "series",
)


class ResultStore:
    """Holds the current state; every update is visible to the next `snapshot()`.

    Writers serialise on a lock (the daemon records from the event loop while a reload
    thread sets config status) and update mutable maps in place, so recording one
    endpoint's round costs O(that round), not O(store): at thousands of endpoints,
    copying every map per round made the store the agent's main CPU cost and stalled
    the loop the probes time themselves on.  `snapshot()` freezes copies of the maps,
    once per change (cached by data generation), for whoever reads: a scrape, the
    status page, the verdict judge.  A reader holding a snapshot sees one consistent
    state for as long as it likes, and never a half-applied round.
    """

    def __init__(self, vantage: Vantage | None = None, *, series_latency: bool = True) -> None:
        self._lock = threading.Lock()
        # Per-series latency histograms (the opt-in export): the daemon turns them off
        # when only the aggregate is exported, where they were 15k histograms at 5,000
        # endpoints, copied into every snapshot, that nothing read.
        self._series_latency = series_latency
        self._results: dict[Key, ProbeResult] = {}
        self._changed_at: dict[Key, datetime] = {}
        self._states: dict[Key, State] = {}
        self._attempts: dict[SeriesKey, int] = {}
        self._failures: dict[tuple[SeriesKey, Failure], int] = {}
        self._skips: dict[tuple[SeriesKey, SkipReason], int] = {}
        self._phase_latency: dict[tuple[SeriesKey, str], Histogram] = {}
        self._aggregate_latency: dict[tuple[str, str, str], Histogram] = {}
        # Indexes that make an endpoint's round and a removal O(what they touch).
        self._by_endpoint: dict[EndpointKey, dict[Key, None]] = {}  # ordered set
        self._series_of: dict[Key, SeriesKey] = {}
        self._series_keys: dict[SeriesKey, set[Key]] = {}
        self._series_slots: dict[SeriesKey, set[Any]] = {}  # failure/skip/phase map keys
        self._probe_series: dict[tuple[str, str], int] = {}  # live series per (service, probe)
        self._dirty: set[EndpointKey] = set()  # endpoints changed since take_dirty()
        self._data_generation = 0
        self._frozen: Snapshot | None = None  # maps frozen at _frozen_generation
        self._frozen_generation = -1
        self._meta = Snapshot(vantage=vantage or Vantage())  # everything but the maps
        self._generation = 0  # Snapshot.generation: bumped on every change

    def snapshot(self) -> Snapshot:
        with self._lock:
            if self._frozen is None or self._frozen_generation != self._data_generation:
                self._frozen = Snapshot(
                    results=_frozen(dict(self._results)),
                    changed_at=_frozen(dict(self._changed_at)),
                    states=_frozen(dict(self._states)),
                    attempts=_frozen(dict(self._attempts)),
                    failures=_frozen(dict(self._failures)),
                    skips=_frozen(dict(self._skips)),
                    phase_latency=_frozen(dict(self._phase_latency)),
                    aggregate_latency=_frozen(dict(self._aggregate_latency)),
                    series=_frozen(dict(self._series_of)),
                )
                self._frozen_generation = self._data_generation
            meta, maps, generation = self._meta, self._frozen, self._generation
        return replace(meta, generation=generation, **{name: getattr(maps, name) for name in _MAPS})

    @property
    def generation(self) -> int:
        """Bumped on every change; a reader can tell whether its copy is still current."""
        return self._generation

    # -- results ---------------------------------------------------------------

    def record(self, result: ProbeResult) -> None:
        self.record_many((result,))

    def record_many(self, results: Iterable[ProbeResult]) -> None:
        """Apply a batch (typically one round) in one step: O(batch)."""
        batch = list(results)
        if not batch:
            return
        with self._lock:
            for result in batch:
                self._add(result)
            self._changed()

    def record_round(self, results: Sequence[ProbeResult]) -> None:
        """Record an endpoint's round, which replaces its previous one: the endpoint's keys
        missing from it (addresses DNS stopped returning) go, in the same step."""
        if not results:
            return
        fresh = {r.target.key() for r in results}
        endpoints = {(r.target.service, r.target.endpoint.name) for r in results}
        with self._lock:
            for result in results:
                self._add(result)
            stale = [k for ep in endpoints for k in self._by_endpoint.get(ep, ()) if k not in fresh]
            for key in stale:
                self._forget(key)
            self._changed()

    def endpoint_results(self, service: str, endpoint: str) -> list[ProbeResult]:
        """The latest results of one endpoint: O(its targets), no snapshot needed."""
        with self._lock:
            keys = self._by_endpoint.get((service, endpoint), {})
            return [self._results[k] for k in keys]

    def take_dirty(self) -> set[EndpointKey]:
        """The endpoints whose results changed since the last call (for incremental
        judging), and forget them."""
        with self._lock:
            dirty, self._dirty = self._dirty, set()
            return dirty

    def endpoints(self) -> list[EndpointKey]:
        with self._lock:
            return list(self._by_endpoint)

    def replace_targets(self, keys: Iterable[Key]) -> None:
        """Forget every key not in ``keys`` (config reload, changed DNS answers).

        Counters and histograms go with them once no remaining result maps to
        their series, so a removed endpoint's series vanish from the next scrape.
        """
        wanted = set(keys)
        with self._lock:
            for key in [k for k in self._results if k not in wanted]:
                self._forget(key)
            self._changed()

    def _add(self, result: ProbeResult) -> None:
        key = result.target.key()
        series = series_key(result.target)
        old_series = self._series_of.get(key)
        if old_series is not None and old_series != series:
            self._forget(key)  # same key, another series (an endpoint's params changed)
        self._count(result, series)
        # The result recorded last wins, whatever its wall-clock time: one endpoint's
        # rounds never overlap, and after the clock steps back (NTP on a VM) comparing
        # times would ignore every new result until the clock caught up.
        self._results[key] = result
        self._series_of[key] = series
        keys = self._series_keys.get(series)
        if keys is None:
            keys = self._series_keys[series] = set()
            probe = (series.service, series.probe)
            self._probe_series[probe] = self._probe_series.get(probe, 0) + 1
        keys.add(key)
        self._by_endpoint.setdefault((key[0], key[1]), {})[key] = None
        self._dirty.add((key[0], key[1]))
        if result.skipped is None:
            state: State = (result.ok, result.failure_kind)
            if self._states.get(key) != state:
                self._states[key] = state
                self._changed_at[key] = result.t

    def _count(self, result: ProbeResult, series: SeriesKey) -> None:
        slots = self._series_slots.setdefault(series, set())
        if result.skipped is not None:
            skip = (series, result.skipped)
            self._skips[skip] = self._skips.get(skip, 0) + 1
            slots.add(("skip", skip))
            return
        self._attempts[series] = self._attempts.get(series, 0) + 1
        kind = result.failure_kind
        if kind is not None:
            failure = (series, kind)
            self._failures[failure] = self._failures.get(failure, 0) + 1
            slots.add(("failure", failure))
        if result.ok:
            # Only completed probes feed the latency histogram: a failed phase's
            # time is time-to-reset or a timeout, not a round-trip time.
            for phase, seconds in result.phases.items():
                if self._series_latency:
                    slot = (series, phase)
                    latency = self._phase_latency.get(slot, _EMPTY)
                    self._phase_latency[slot] = latency.observe(seconds)
                    slots.add(("phase", slot))
                agg = (series.service, series.probe, phase)
                self._aggregate_latency[agg] = self._aggregate_latency.get(agg, _EMPTY).observe(
                    seconds
                )

    def _forget(self, key: Key) -> None:
        self._results.pop(key, None)
        self._changed_at.pop(key, None)
        self._states.pop(key, None)
        endpoint_key = (key[0], key[1])
        self._dirty.add(endpoint_key)
        endpoint = self._by_endpoint.get(endpoint_key)
        if endpoint is not None:
            endpoint.pop(key, None)
            if not endpoint:
                del self._by_endpoint[endpoint_key]
        series = self._series_of.pop(key, None)
        if series is None:
            return
        keys = self._series_keys.get(series)
        if keys is not None:
            keys.discard(key)
            if keys:
                return  # another address still feeds this series
            del self._series_keys[series]
        self._attempts.pop(series, None)
        maps: dict[str, dict[Any, Any]] = {
            "skip": self._skips,
            "failure": self._failures,
            "phase": self._phase_latency,
        }
        for kind, slot in self._series_slots.pop(series, set()):
            maps[kind].pop(slot, None)
        # The aggregate histogram of (service, probe) goes with the last series feeding it.
        probe = (series.service, series.probe)
        self._probe_series[probe] = self._probe_series.get(probe, 1) - 1
        if self._probe_series[probe] <= 0:
            del self._probe_series[probe]
            for agg in [a for a in self._aggregate_latency if a[:2] == probe]:
                del self._aggregate_latency[agg]

    def keep_series_latency(self, keep: bool) -> None:
        """Whether to keep a latency histogram per series (``per_target_histograms``).
        Turned off, the ones kept go; turned on, they count from then on."""
        with self._lock:
            if keep == self._series_latency:
                return
            self._series_latency = keep
            if keep:
                return
            self._phase_latency.clear()
            for slots in self._series_slots.values():
                slots.difference_update([s for s in slots if s[0] == "phase"])
            self._changed()

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
        vocab = tuple(vocabulary) if vocabulary is not None else self._meta.verdict_vocabulary
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
        schedule_lag_quantiles: tuple[tuple[str, float], ...] | None = None,
        in_flight: int | None = None,
        archive_write_errors: int | None = None,
        http_connections_refused: tuple[tuple[str, int], ...] | None = None,
    ) -> None:
        changes: dict[str, Any] = {}
        if schedule_lag_s is not None:
            changes["schedule_lag_s"] = schedule_lag_s
        if schedule_lag_quantiles is not None:
            changes["schedule_lag_quantiles"] = schedule_lag_quantiles
        if in_flight is not None:
            changes["in_flight"] = in_flight
        if archive_write_errors is not None:
            changes["archive_write_errors"] = archive_write_errors
        if http_connections_refused is not None:
            changes["http_connections_refused"] = http_connections_refused
        if changes:
            self._update(**changes)

    def _update(self, **changes: Any) -> None:
        with self._lock:
            self._generation += 1
            self._meta = replace(self._meta, **changes)

    def _changed(self) -> None:
        # Called with the lock held, after the maps changed.
        # Counters only: rebuilding the metadata snapshot here (a dataclasses.replace of
        # 20 fields) was a tenth of what recording a round cost.
        self._data_generation += 1
        self._generation += 1
