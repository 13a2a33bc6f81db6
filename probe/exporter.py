"""Prometheus metrics over the result store: a custom Collector on a private registry.

`collect()` reads one `Snapshot` and yields fresh metric families on every
scrape (prometheus/client_python "custom collectors"), so a target removed by a
config reload simply stops appearing: no global metrics, no ``.remove()``, no
stale series.  The exporter never probes: it only reads what the scheduler
already measured.  Serving ``/metrics`` is the daemon's job
(`prometheus_client.generate_latest(registry)`).

Cardinality rules (every label value is configuration or a closed vocabulary):
``address`` only for IP-literal endpoints; hostname endpoints get ``ip_family``
instead of their resolved addresses; failures use `failure_kind()` (never the
``unknown_failure`` message); no exception text anywhere.

Several targets can share a series (a hostname endpoint resolving to several
addresses of one family).  For such a group the gauges describe the *worst*
latest result: the most recent failure if any address failed, else the most
recent success, so one blocked address is never hidden by a working one
(OONI's "OK if any endpoint works" hides partial blocking).
``probe_targets{status}`` gives the blocked fraction.  See docs/metrics.md.
"""

from __future__ import annotations

import time
from collections.abc import Iterable, Iterator, Sequence
from datetime import datetime

from prometheus_client.core import (
    CounterMetricFamily,
    GaugeMetricFamily,
    HistogramMetricFamily,
    InfoMetricFamily,
    Metric,
)
from prometheus_client.registry import Collector, CollectorRegistry
from prometheus_client.utils import floatToGoString

from .model import ProbeResult
from .results import Key, ResultStore, SeriesKey, Snapshot, series_key

__all__ = ["SERIES_LABELS", "ProbeCollector", "make_registry"]

SERIES_LABELS: tuple[str, ...] = SeriesKey._fields
TARGET_STATUSES: tuple[str, ...] = ("ok", "failed", "skipped")


def make_registry(store: ResultStore) -> CollectorRegistry:
    """A private registry holding only our collector (nothing process-global)."""
    registry = CollectorRegistry(auto_describe=False)
    registry.register(ProbeCollector(store))
    return registry


def _ts(t: datetime) -> float:
    return t.timestamp()


class _Group:
    """The latest results that share one series, and the one the gauges describe."""

    def __init__(self, series: SeriesKey) -> None:
        self.series = series
        self.labels = list(series)
        self.keys: list[Key] = []
        self.results: list[ProbeResult] = []

    def add(self, key: Key, result: ProbeResult) -> None:
        self.keys.append(key)
        self.results.append(result)

    @property
    def measured(self) -> list[ProbeResult]:
        return [r for r in self.results if r.skipped is None]

    def representative(self) -> ProbeResult | None:
        """Most recent failure if any, else most recent success; None if all skipped."""
        measured = self.measured
        failed = [r for r in measured if not r.ok]
        pool = failed or measured
        return max(pool, key=lambda r: r.t) if pool else None

    def newest(self) -> ProbeResult:
        return max(self.results, key=lambda r: r.t)


def _groups(snapshot: Snapshot) -> list[_Group]:
    groups: dict[SeriesKey, _Group] = {}
    for key, result in snapshot.results.items():
        series = series_key(result.target)
        groups.setdefault(series, _Group(series)).add(key, result)
    return [groups[s] for s in sorted(groups)]  # stable order: readable diffs of scrapes


class ProbeCollector(Collector):
    """Yields every metric family from one snapshot per scrape."""

    def __init__(self, store: ResultStore) -> None:
        self._store = store

    def describe(self) -> Iterable[Metric]:
        # Nothing to pre-declare: registering must not trigger a collect().
        return ()

    def collect(self) -> Iterator[Metric]:
        snapshot = self._store.snapshot()
        groups = _groups(snapshot)
        yield from _result_metrics(snapshot, groups)
        yield from _counter_metrics(snapshot)
        yield _latency_histogram(snapshot)
        yield from _verdict_metrics(snapshot)
        yield from _vantage_metrics(snapshot)
        yield from _control_metrics(snapshot)
        yield from _agent_metrics(snapshot)


def _gauge(name: str, doc: str, extra: Sequence[str] = ()) -> GaugeMetricFamily:
    return GaugeMetricFamily(name, doc, labels=[*SERIES_LABELS, *extra])


def _result_metrics(snapshot: Snapshot, groups: list[_Group]) -> Iterator[Metric]:
    success = _gauge(
        "probe_success", "1 if the latest probe succeeded (every address of the series), else 0"
    )
    duration = _gauge("probe_duration_seconds", "How long the latest probe took, in seconds")
    dns_lookup = _gauge(
        "probe_dns_lookup_time_seconds", "Duration of the resolve phase of the latest probe"
    )
    phases = _gauge(
        "probe_phase_duration_seconds", "Duration of each phase of the latest probe", ["phase"]
    )
    failure = InfoMetricFamily(
        "probe_failure",
        "The latest probe's failure (closed vocabulary) and the operation that failed",
        labels=SERIES_LABELS,
    )
    last_run = _gauge(
        "probe_last_run_timestamp_seconds", "Start time of the newest result (skips included)"
    )
    changed = _gauge(
        "probe_state_change_timestamp_seconds",
        "When the series last changed between ok and a failure kind",
    )
    skipped = _gauge(
        "probe_skipped", "1 when the latest results were skipped, not measured", ["reason"]
    )
    targets = _gauge(
        "probe_targets", "Targets (addresses) behind the series by latest status", ["status"]
    )
    flow = _FlowGauges()

    for g in groups:
        counts = dict.fromkeys(TARGET_STATUSES, 0)
        for r in g.results:
            counts[r.status] += 1
        for status, n in counts.items():
            targets.add_metric([*g.labels, status], n)
        last_run.add_metric(g.labels, _ts(g.newest().t))
        rep = g.representative()
        if rep is None:
            # Nothing measured: export the reason, never a probe_success=0.
            skipped.add_metric([*g.labels, str(g.newest().skipped)], 1)
            continue
        success.add_metric(g.labels, 1 if rep.ok else 0)
        duration.add_metric(g.labels, rep.duration_s)
        for phase, seconds in rep.phases.items():
            phases.add_metric([*g.labels, phase], seconds)
        if "resolve" in rep.phases:
            dns_lookup.add_metric(g.labels, rep.phases["resolve"])
        flow.add(g.labels, rep)
        if not rep.ok:
            failure.add_metric(
                g.labels,
                {
                    "failure": str(rep.failure_kind),
                    "failed_operation": str(rep.failed_operation or ""),
                },
            )
        change_times = [snapshot.changed_at[k] for k in g.keys if k in snapshot.changed_at]
        if change_times:
            changed.add_metric(g.labels, _ts(max(change_times)))
    yield from (success, duration, dns_lookup, phases, failure, last_run, changed, skipped)
    yield targets
    yield from flow.families()


class _FlowGauges:
    """Loss, jitter and cut-off of the latest call-like flow (``stun`` with ``mode:
    flow``), from the result's details: numbers the probe already computed, so a
    dashboard can show call-path quality without reading the archive."""

    def __init__(self) -> None:
        self.loss = _gauge(
            "probe_flow_loss_ratio", "Share of the latest flow's packets that got no answer"
        )
        self.jitter = _gauge(
            "probe_flow_jitter_seconds", "RFC 3550 interarrival jitter of the latest flow"
        )
        self.cutoff = _gauge(
            "probe_flow_cutoff_seconds",
            "Seconds into the latest flow when its answers stopped for good (cut-off flows only)",
        )

    def add(self, labels: list[str], result: ProbeResult) -> None:
        details = result.details
        if details.get("mode") != "flow":
            return
        for gauge, key in (
            (self.loss, "loss"),
            (self.jitter, "jitter_s"),
            (self.cutoff, "cutoff_s"),
        ):
            value = details.get(key)
            if isinstance(value, int | float) and not isinstance(value, bool):
                gauge.add_metric(labels, float(value))

    def families(self) -> tuple[Metric, ...]:
        return (self.loss, self.jitter, self.cutoff)


def _counter_metrics(snapshot: Snapshot) -> Iterator[Metric]:
    attempts = CounterMetricFamily(
        "probe_attempts_total", "Probes run (skips excluded)", labels=SERIES_LABELS
    )
    for series, n in sorted(snapshot.attempts.items()):
        attempts.add_metric(list(series), n)
    failures = CounterMetricFamily(
        "probe_failures_total", "Failed probes by failure kind", labels=[*SERIES_LABELS, "failure"]
    )
    for (series, kind), n in sorted(snapshot.failures.items()):
        failures.add_metric([*series, str(kind)], n)
    skips = CounterMetricFamily(
        "probe_skips_total", "Probes not run, by reason", labels=[*SERIES_LABELS, "reason"]
    )
    for (series, reason), n in sorted(snapshot.skips.items()):
        skips.add_metric([*series, str(reason)], n)
    yield from (attempts, failures, skips)


def _latency_histogram(snapshot: Snapshot) -> Metric:
    hist = HistogramMetricFamily(
        "probe_phase_latency_seconds",
        "Phase durations of successful probes",
        labels=[*SERIES_LABELS, "phase"],
    )
    for (series, phase), h in sorted(snapshot.phase_latency.items()):
        buckets = [(floatToGoString(bound), float(n)) for bound, n in h.cumulative()]
        hist.add_metric([*series, phase], buckets, h.total)
    return hist


def _verdict_metrics(snapshot: Snapshot) -> Iterator[Metric]:
    vocab = snapshot.verdict_vocabulary
    endpoint = GaugeMetricFamily(
        "probe_verdict",
        "1 for the current verdict of an endpoint, 0 for every other verdict value",
        labels=["service", "endpoint", "verdict"],
    )
    endpoint_conf = GaugeMetricFamily(
        "probe_verdict_confidence",
        "Confidence (0-1) of the current endpoint verdict",
        labels=["service", "endpoint"],
    )
    service = GaugeMetricFamily(
        "probe_service_verdict",
        "1 for the current verdict of a service, 0 for every other verdict value",
        labels=["service", "verdict"],
    )
    service_conf = GaugeMetricFamily(
        "probe_service_verdict_confidence",
        "Confidence (0-1) of the current service verdict",
        labels=["service"],
    )
    for v in snapshot.verdicts:
        if v.endpoint is None:
            for value in vocab:
                service.add_metric([v.service, value], 1 if value == v.verdict else 0)
            service_conf.add_metric([v.service], float(v.confidence))
        else:
            for value in vocab:
                endpoint.add_metric([v.service, v.endpoint, value], 1 if value == v.verdict else 0)
            endpoint_conf.add_metric([v.service, v.endpoint], float(v.confidence))
    yield from (endpoint, endpoint_conf, service, service_conf)


def _vantage_metrics(snapshot: Snapshot) -> Iterator[Metric]:
    v = snapshot.vantage
    info = InfoMetricFamily("probe_vantage", "This agent's vantage point (from config)")
    info.add_metric([], {"vantage": v.name, "country": v.country, "asn": v.asn, "role": v.role})
    yield info
    state = snapshot.vantage_state
    if state is None:
        return  # the offline gate has not run yet: unknown is not "offline"
    yield GaugeMetricFamily(
        "probe_vantage_online", "1 if the offline gate reached a control target", value=state.online
    )
    yield GaugeMetricFamily(
        "probe_vantage_allowlist",
        "1 if only domestic controls answer: an allowlist regime (FIELD.md B10)",
        value=state.allowlist,
    )
    yield GaugeMetricFamily(
        "probe_vantage_ipv6", "1 if an IPv6 connect to a control target worked", value=state.ipv6
    )
    yield GaugeMetricFamily(
        "probe_vantage_check_timestamp_seconds",
        "When the offline gate last ran",
        value=_ts(state.t),
    )


def _control_metrics(snapshot: Snapshot) -> Iterator[Metric]:
    """Only on a test vantage with a ``control:`` section (label: the configured URL)."""
    if not snapshot.controls:
        return
    up = GaugeMetricFamily(
        "probe_control_up",
        "1 if the latest poll of this control vantage gave usable results",
        labels=["control"],
    )
    age = GaugeMetricFamily(
        "probe_control_age_seconds",
        "Seconds since the newest usable measurement of this control vantage",
        labels=["control"],
    )
    now = time.time()
    for status in snapshot.controls:
        up.add_metric([status.url], 1 if status.up else 0)
        seconds = status.age_s(now)
        if seconds is not None:
            age.add_metric([status.url], seconds)
    yield from (up, age)


def _agent_metrics(snapshot: Snapshot) -> Iterator[Metric]:
    if snapshot.config_reload_ok is not None:
        yield GaugeMetricFamily(
            "probe_config_last_reload_successful",
            "1 if the last configuration (re)load succeeded",
            value=snapshot.config_reload_ok,
        )
    if snapshot.config_reload_success_at is not None:
        yield GaugeMetricFamily(
            "probe_config_last_reload_success_timestamp_seconds",
            "Time of the last successful configuration (re)load",
            value=_ts(snapshot.config_reload_success_at),
        )
    yield GaugeMetricFamily(
        "probe_schedule_lag_seconds",
        "How late the scheduler started the latest probe versus its planned time",
        value=snapshot.schedule_lag_s,
    )
    yield GaugeMetricFamily("probe_in_flight", "Probes running right now", value=snapshot.in_flight)
    if snapshot.archive_write_errors is not None:
        yield CounterMetricFamily(
            "probe_archive_write_errors_total",
            "Measurements that could not be appended to the archive (disk full, I/O error)",
            value=snapshot.archive_write_errors,
        )
