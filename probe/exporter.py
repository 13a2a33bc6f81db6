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

import functools
import time
from collections.abc import Callable, Collection, Iterable, Iterator, Mapping, Sequence
from datetime import datetime
from typing import Any, NamedTuple

from prometheus_client.core import (
    CounterMetricFamily,
    GaugeMetricFamily,
    HistogramMetricFamily,
    InfoMetricFamily,
    Metric,
)
from prometheus_client.registry import Collector, CollectorRegistry
from prometheus_client.utils import floatToGoString

from .config.settings import MetricsSettings
from .evidence import StunEvidence
from .exposition import escape_label, family_lines, format_value
from .model import ProbeResult
from .results import PHASE_BUCKETS, Histogram, Key, ResultStore, SeriesKey, Snapshot, series_key

__all__ = ["SERIES_LABELS", "ProbeCollector", "TextRenderer", "make_registry"]

SERIES_LABELS: tuple[str, ...] = SeriesKey._fields
TARGET_STATUSES: tuple[str, ...] = ("ok", "failed", "skipped")


MetricsOptions = Callable[[], MetricsSettings]


def make_registry(
    store: ResultStore, options: MetricsOptions = MetricsSettings
) -> CollectorRegistry:
    """A private registry holding only our collector (nothing process-global).

    ``options`` is read on every scrape, so a reload that changes ``metrics:`` applies
    to the next one.
    """
    registry = CollectorRegistry(auto_describe=False)
    registry.register(ProbeCollector(store, options))
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


def _groups(snapshot: Snapshot, only: Collection[SeriesKey] | None = None) -> list[_Group]:
    """The results grouped by series, sorted; ``only``: just those series' groups."""
    groups: dict[SeriesKey, _Group] = {}
    known = snapshot.series  # computed once per recorded result, not once per scrape
    if only is not None and not only:
        return []
    for key, result in snapshot.results.items():
        series = known.get(key) or series_key(result.target)
        if only is None or series in only:
            groups.setdefault(series, _Group(series)).add(key, result)
    return [groups[s] for s in sorted(groups)]  # stable order: readable diffs of scrapes


class ProbeCollector(Collector):
    """Yields every metric family from one snapshot per scrape."""

    def __init__(self, store: ResultStore, options: MetricsOptions = MetricsSettings) -> None:
        self._store = store
        self._options = options

    def describe(self) -> Iterable[Metric]:
        # Nothing to pre-declare: registering must not trigger a collect().
        return ()

    def collect(self) -> Iterator[Metric]:
        snapshot = self._store.snapshot()
        options = self._options()
        groups = _groups(snapshot)
        yield from _result_metrics(snapshot, groups)
        yield from _counter_metrics(snapshot)
        if options.per_target_histograms:
            yield _latency_histogram(snapshot)
        else:
            yield _aggregate_histogram(snapshot)
        yield from _verdict_metrics(snapshot, one_hot=options.verdict_one_hot)
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
        gauges = (self.loss, self.jitter, self.cutoff)
        for i, value in flow_values(result):
            gauges[i].add_metric(labels, value)

    def families(self) -> tuple[Metric, ...]:
        return (self.loss, self.jitter, self.cutoff)


def flow_values(result: ProbeResult) -> list[tuple[int, float]]:
    """(position in `_FlowGauges.families()`, value) of a flow result's figures."""
    evidence = result.evidence
    flow = evidence.flow if isinstance(evidence, StunEvidence) else None
    if flow is None:
        return []
    values = (flow.loss, flow.jitter_s, flow.cutoff_s)  # in `_FlowGauges.families()` order
    return [(i, float(value)) for i, value in enumerate(values) if value is not None]


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


_LATENCY_DOC = "Phase durations of successful probes"
_BOUNDS = [floatToGoString(b) for b in (*PHASE_BUCKETS, float("inf"))]


def _buckets(h: Histogram) -> list[tuple[str, float]]:
    return [(bound, float(n)) for bound, (_, n) in zip(_BOUNDS, h.cumulative(), strict=True)]


def _latency_histogram(snapshot: Snapshot) -> Metric:
    """Opt-in (``metrics.per_target_histograms``): one histogram per series and phase."""
    hist = HistogramMetricFamily(
        "probe_phase_latency_seconds", _LATENCY_DOC, labels=[*SERIES_LABELS, "phase"]
    )
    for (series, phase), h in sorted(snapshot.phase_latency.items()):
        hist.add_metric([*series, phase], _buckets(h), h.total)
    return hist


def _aggregate_histogram(snapshot: Snapshot) -> Metric:
    """The default: one histogram per (service, probe, phase), whatever the endpoint count.
    Per endpoint it cost 16 series a phase, more than every other family together."""
    hist = HistogramMetricFamily(
        "probe_phase_latency_seconds", _LATENCY_DOC, labels=["service", "probe", "phase"]
    )
    for labels, h in sorted(snapshot.aggregate_latency.items()):
        hist.add_metric(list(labels), _buckets(h), h.total)
    return hist


def _verdict_metrics(snapshot: Snapshot, *, one_hot: bool = False) -> Iterator[Metric]:
    """The current verdict as one series of value 1; with ``one_hot`` also a 0 series for
    every other value of the vocabulary (queries filter ``== 1`` and work with both)."""
    vocab = snapshot.verdict_vocabulary
    endpoint = GaugeMetricFamily(
        "probe_verdict",
        "1 for the current verdict of an endpoint (0 for other values only when one-hot)",
        labels=["service", "endpoint", "verdict"],
    )
    endpoint_conf = GaugeMetricFamily(
        "probe_verdict_confidence",
        "Confidence (0-1) of the current endpoint verdict",
        labels=["service", "endpoint"],
    )
    service = GaugeMetricFamily(
        "probe_service_verdict",
        "1 for the current verdict of a service (0 for other values only when one-hot)",
        labels=["service", "verdict"],
    )
    service_conf = GaugeMetricFamily(
        "probe_service_verdict_confidence",
        "Confidence (0-1) of the current service verdict",
        labels=["service"],
    )
    for v in snapshot.verdicts:
        values = vocab if one_hot else (str(v.verdict),)
        if v.endpoint is None:
            for value in values:
                service.add_metric([v.service, value], 1 if value == v.verdict else 0)
            service_conf.add_metric([v.service], float(v.confidence))
        else:
            for value in values:
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
    if snapshot.schedule_lag_quantiles:
        recent = GaugeMetricFamily(
            "probe_schedule_lag_recent_seconds",
            "Schedule lag over the most recent round starts, by percentile (100 = the maximum)",
            labels=["percentile"],
        )
        for q, seconds in snapshot.schedule_lag_quantiles:
            recent.add_metric([q], seconds)
        yield recent
    yield GaugeMetricFamily("probe_in_flight", "Probes running right now", value=snapshot.in_flight)
    if snapshot.archive_write_errors is not None:
        yield CounterMetricFamily(
            "probe_archive_write_errors_total",
            "Measurements that could not be appended to the archive (disk full, I/O error)",
            value=snapshot.archive_write_errors,
        )
    if snapshot.http_connections_refused:
        refused = CounterMetricFamily(
            "probe_http_connections_refused_total",
            "HTTP connections closed as soon as they were accepted, by the limit that refused them",
            labels=["reason"],
        )
        for reason, count in snapshot.http_connections_refused:
            refused.add_metric([reason], count)
        yield refused


# -- the /metrics text, incrementally ------------------------------------------------------


class TextRenderer:
    """The Prometheus text exposition of a store, re-rendering only what changed.

    Byte for byte what `prometheus_client.generate_latest` writes for `make_registry`
    (tested), but each series group's lines are kept while its latest results are the same
    objects: at 5,000 endpoints and a 60 s interval a quarter of them change between two
    15 s scrapes, so a scrape formats a quarter of the lines.  Those are written straight
    as text (`_group_text`), not through prometheus_client's metric objects, which cost
    three quarters of a render's CPU; so are the verdict families, each verdict's lines
    kept while its value is the same.  One render at a time (the daemon's single render
    thread): the caches have no lock.
    """

    def __init__(self, store: ResultStore, options: MetricsOptions = MetricsSettings) -> None:
        self._store = store
        self._options = options
        self._cache: dict[SeriesKey, _Text] = {}  # the text of each series group
        # What the cache was rendered from: the results map and the option it depends on.
        self._rendered: tuple[Mapping[Key, ProbeResult], Mapping[Key, SeriesKey], bool] | None
        self._rendered = None
        self._order: list[SeriesKey] = []  # every series, sorted (stable scrape diffs)
        # (service, endpoint, verdict, confidence) -> (verdict lines, confidence line)
        self._verdicts: dict[tuple[Any, ...], tuple[str, str]] = {}
        self._verdict_mode: tuple[bool, tuple[str, ...]] = (False, ())
        self.groups_rendered = 0  # groups formatted afresh (tests read it)

    def render(self) -> bytes:
        snapshot = self._store.snapshot()
        options = self._options()
        per_target = options.per_target_histograms
        dirty, order = self._dirty_series(snapshot, per_target)
        slots = _slots_by_series(snapshot) if dirty else {}
        for g in _groups(snapshot, dirty):
            self._cache[g.series] = _group_text(snapshot, g, slots.get(g.series, {}), per_target)
            self.groups_rendered += 1
        parts = [self._cache[series] for series in order]
        # Bytes throughout: the body is joined once, with no text copy of it to encode.
        out: list[bytes] = []
        for i, header in enumerate(_group_headers(per_target)):
            out.append(header.text)
            out.extend([p[i] for p in parts])
        if not per_target:
            out.append(_text([_aggregate_histogram(snapshot)]))
        out += self._verdict_text(snapshot, one_hot=options.verdict_one_hot)
        out.append(
            _text(
                [
                    *_vantage_metrics(snapshot),
                    *_control_metrics(snapshot),
                    *_agent_metrics(snapshot),
                ]
            )
        )
        return b"".join(out)

    def _dirty_series(
        self, snapshot: Snapshot, per_target: bool
    ) -> tuple[set[SeriesKey], list[SeriesKey]]:
        """The series to format again, and every series in order.

        A group's text is a function of its results, their change times and counters (all
        of which change only with a new result object or a removed key) and the option:
        so a pass comparing result identities finds the changed series, and the sorted
        order is kept while no key came or went.  At 5,000 endpoints that pass is a few
        milliseconds; building and checking every group each scrape was half a render."""
        results, known = snapshot.results, snapshot.series
        last = self._rendered
        if last is None or last[2] != per_target:
            self._cache.clear()
            last = ({}, {}, per_target)
        old_results, old_series = last[0], last[1]
        dirty: set[SeriesKey] = set()
        moved = False  # a key came, went or changed series: the set of series may differ
        for key, result in results.items():
            if old_results.get(key) is not result:
                series = known.get(key) or series_key(result.target)
                dirty.add(series)
                old = old_series.get(key)
                if old != series:
                    moved = True
                    if old is not None:
                        dirty.add(old)
        gone = old_results.keys() - results.keys()
        for key in gone:
            dirty.add(old_series.get(key) or series_key(old_results[key].target))
        if moved or gone or not self._order:
            live = {known.get(k) or series_key(r.target) for k, r in results.items()}
            for series in self._cache.keys() - live:
                del self._cache[series]
            dirty &= live
            self._order = sorted(live)
        self._rendered = (results, known, per_target)
        return dirty, self._order

    def _verdict_text(self, snapshot: Snapshot, *, one_hot: bool) -> list[bytes]:
        """`_verdict_metrics` as text: four families, a verdict's lines cached by value."""
        vocab = snapshot.verdict_vocabulary
        mode = (one_hot, vocab)
        if mode != self._verdict_mode:
            self._verdicts.clear()
            self._verdict_mode = mode
        old, cache = self._verdicts, {}
        endpoint: list[str] = []
        endpoint_conf: list[str] = []
        service: list[str] = []
        service_conf: list[str] = []
        for v in snapshot.verdicts:
            verdict, confidence = str(v.verdict), float(v.confidence)
            key = (v.service, v.endpoint, verdict, confidence)
            lines = old.get(key)
            if lines is None:
                values = vocab if one_hot else (verdict,)
                lines = _verdict_lines(v.service, v.endpoint, verdict, confidence, values)
            cache[key] = lines
            if v.endpoint is None:
                service.append(lines[0])
                service_conf.append(lines[1])
            else:
                endpoint.append(lines[0])
                endpoint_conf.append(lines[1])
        self._verdicts = cache
        out: list[bytes] = []
        for header, family in zip(
            _verdict_headers(), (endpoint, endpoint_conf, service, service_conf), strict=True
        ):
            out.append(header)
            out.append("".join(family).encode())
        return out


# The text of one series group: one string per per-series family (`_GROUP_FAMILIES`).
_Text = tuple[bytes, ...]

# The per-series families, in collect() order (`_result_metrics`, `_counter_metrics`,
# then the opt-in histogram); `_group_headers` checks it against the metric objects.
_GROUP_FAMILIES: tuple[str, ...] = (
    "probe_success",
    "probe_duration_seconds",
    "probe_dns_lookup_time_seconds",
    "probe_phase_duration_seconds",
    "probe_failure",
    "probe_last_run_timestamp_seconds",
    "probe_state_change_timestamp_seconds",
    "probe_skipped",
    "probe_targets",
    "probe_flow_loss_ratio",
    "probe_flow_jitter_seconds",
    "probe_flow_cutoff_seconds",
    "probe_attempts",
    "probe_failures",
    "probe_skips",
    "probe_phase_latency_seconds",
)
(
    _SUCCESS,
    _DURATION,
    _DNS_LOOKUP,
    _PHASES,
    _FAILURE,
    _LAST_RUN,
    _CHANGED,
    _SKIPPED,
    _TARGETS,
    _FLOW,  # and the next two
    _ATTEMPTS,
    _FAILURES,
    _SKIPS,
    _LATENCY,
) = (0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 12, 13, 14, 15)
_SORTED_LABELS = tuple(sorted(SERIES_LABELS))
_SORTED_INDEX = tuple(SERIES_LABELS.index(name) for name in _SORTED_LABELS)


class _Header(NamedTuple):
    name: str
    text: bytes


class _SeriesLabels:
    """The label text of one series, alone or with extra labels merged in, in the sorted
    order the exposition writes (`exposition.family_lines`)."""

    __slots__ = ("parts", "plain")

    def __init__(self, series: SeriesKey) -> None:
        self.parts = [
            f'{name}="{escape_label(series[i])}"'
            for name, i in zip(_SORTED_LABELS, _SORTED_INDEX, strict=True)
        ]
        self.plain = "{" + ",".join(self.parts) + "}"

    def extra(self, names: tuple[str, ...], values: Sequence[str]) -> str:
        pairs = [f'{n}="{escape_label(v)}"' for n, v in zip(names, values, strict=True)]
        parts = self.parts
        return "{" + ",".join([parts[i] if i >= 0 else pairs[~i] for i in _plan(names)]) + "}"


@functools.lru_cache(maxsize=32)
def _plan(extra: tuple[str, ...]) -> tuple[int, ...]:
    """Where each label goes once ``extra`` joins the series labels: an index into the
    series labels, or ~index into ``extra``."""
    names = sorted((*_SORTED_LABELS, *extra))
    return tuple(_SORTED_LABELS.index(n) if n in _SORTED_LABELS else ~extra.index(n) for n in names)


def _group_text(
    snapshot: Snapshot, g: _Group, slots: dict[str, dict[Any, Any]], per_target: bool
) -> _Text:
    """What `_result_metrics` and `_counter_metrics` (and `_latency_histogram`) write for
    one group, formatted directly."""
    fam: list[list[str]] = [[] for _ in _GROUP_FAMILIES]
    labels = _SeriesLabels(g.series)
    plain = labels.plain
    counts = dict.fromkeys(TARGET_STATUSES, 0)
    for r in g.results:
        counts[r.status] += 1
    for status, n in counts.items():
        fam[_TARGETS].append(
            f"probe_targets{labels.extra(('status',), (status,))} {format_value(n)}\n"
        )
    fam[_LAST_RUN].append(
        f"probe_last_run_timestamp_seconds{plain} {format_value(_ts(g.newest().t))}\n"
    )
    rep = g.representative()
    if rep is None:
        reason = labels.extra(("reason",), (str(g.newest().skipped),))
        fam[_SKIPPED].append(f"probe_skipped{reason} 1.0\n")
    else:
        fam[_SUCCESS].append(f"probe_success{plain} {'1.0' if rep.ok else '0.0'}\n")
        fam[_DURATION].append(f"probe_duration_seconds{plain} {format_value(rep.duration_s)}\n")
        for phase, seconds in rep.phases.items():
            fam[_PHASES].append(
                f"probe_phase_duration_seconds{labels.extra(('phase',), (phase,))}"
                f" {format_value(seconds)}\n"
            )
        if "resolve" in rep.phases:
            fam[_DNS_LOOKUP].append(
                f"probe_dns_lookup_time_seconds{plain} {format_value(rep.phases['resolve'])}\n"
            )
        for i, value in flow_values(rep):
            fam[_FLOW + i].append(f"{_GROUP_FAMILIES[_FLOW + i]}{plain} {format_value(value)}\n")
        if not rep.ok:
            info = labels.extra(
                ("failed_operation", "failure"),
                (str(rep.failed_operation or ""), str(rep.failure_kind)),
            )
            fam[_FAILURE].append(f"probe_failure_info{info} 1.0\n")
        change_times = [snapshot.changed_at[k] for k in g.keys if k in snapshot.changed_at]
        if change_times:
            at = format_value(_ts(max(change_times)))
            fam[_CHANGED].append(f"probe_state_change_timestamp_seconds{plain} {at}\n")
    attempts = snapshot.attempts.get(g.series)
    if attempts is not None:
        fam[_ATTEMPTS].append(f"probe_attempts_total{plain} {format_value(attempts)}\n")
    for (_, kind), n in sorted(slots.get("failures", {}).items()):
        failure = labels.extra(("failure",), (str(kind),))
        fam[_FAILURES].append(f"probe_failures_total{failure} {format_value(n)}\n")
    for (_, reason), n in sorted(slots.get("skips", {}).items()):
        skip = labels.extra(("reason",), (str(reason),))
        fam[_SKIPS].append(f"probe_skips_total{skip} {format_value(n)}\n")
    if per_target:  # opt-in: through the metric objects
        latency = Snapshot(phase_latency=slots.get("phase_latency", {}))
        family_lines(_latency_histogram(latency), fam[_LATENCY], header=False)
    return tuple("".join(lines).encode() for lines in fam)


def _verdict_lines(
    service: str, endpoint: str | None, verdict: str, confidence: float, values: Sequence[str]
) -> tuple[str, str]:
    """(the verdict's series, its confidence series) as `_verdict_metrics` writes them."""
    s = escape_label(service)
    if endpoint is None:
        lines = "".join(
            f'probe_service_verdict{{service="{s}",verdict="{escape_label(value)}"}}'
            f" {'1.0' if value == verdict else '0.0'}\n"
            for value in values
        )
        return (
            lines,
            f'probe_service_verdict_confidence{{service="{s}"}} {format_value(confidence)}\n',
        )
    e = escape_label(endpoint)
    lines = "".join(
        f'probe_verdict{{endpoint="{e}",service="{s}",verdict="{escape_label(value)}"}}'
        f" {'1.0' if value == verdict else '0.0'}\n"
        for value in values
    )
    conf = f'probe_verdict_confidence{{endpoint="{e}",service="{s}"}} {format_value(confidence)}\n'
    return lines, conf


@functools.lru_cache(maxsize=1)
def _verdict_headers() -> tuple[bytes, ...]:
    """HELP and TYPE of the four verdict families, in `_verdict_metrics` order."""
    return tuple(_text([metric]) for metric in _verdict_metrics(Snapshot()))


def _text(metrics: Iterable[Metric], *, header: bool = True) -> bytes:
    out: list[str] = []
    for metric in metrics:
        family_lines(metric, out, header=header)
    return "".join(out).encode()


def _slots_by_series(snapshot: Snapshot) -> dict[SeriesKey, dict[str, dict[Any, Any]]]:
    """The counter and histogram map entries of each series, in one pass over the maps."""
    out: dict[SeriesKey, dict[str, dict[Any, Any]]] = {}
    for name in ("failures", "skips", "phase_latency"):
        for key, value in getattr(snapshot, name).items():
            out.setdefault(key[0], {}).setdefault(name, {})[key] = value
    return out


def _group_metrics(snapshot: Snapshot, groups: list[_Group], per_target: bool) -> list[Metric]:
    metrics = [*_result_metrics(snapshot, groups), *_counter_metrics(snapshot)]
    if per_target:
        metrics.append(_latency_histogram(snapshot))
    return metrics


@functools.lru_cache(maxsize=2)
def _group_headers(per_target: bool) -> tuple[_Header, ...]:
    """HELP and TYPE of the per-series families, in collect() order (from an empty store);
    without the opt-in histogram its text is empty."""
    headers = [_Header(m.name, _text([m])) for m in _group_metrics(Snapshot(), [], True)]
    if tuple(h.name for h in headers) != _GROUP_FAMILIES:
        raise AssertionError(f"per-series families changed: {[h.name for h in headers]}")
    if not per_target:
        headers[_LATENCY] = _Header(headers[_LATENCY].name, b"")
    return tuple(headers)
