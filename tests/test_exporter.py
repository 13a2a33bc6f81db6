"""The Prometheus collector: names, bounded labels, skipped results, promtool lint."""

from __future__ import annotations

import os
import shutil
import subprocess
from datetime import timedelta
from pathlib import Path
from typing import Any

import pytest
from prometheus_client import REGISTRY, generate_latest
from prometheus_client.openmetrics.exposition import generate_latest as openmetrics_latest
from prometheus_client.openmetrics.parser import text_string_to_metric_families as openmetrics_parse
from prometheus_client.parser import text_string_to_metric_families
from prometheus_client.registry import CollectorRegistry

from probe.config.settings import AgentConfig, MetricsSettings
from probe.evidence import StunEvidence, StunFlow
from probe.exporter import SERIES_LABELS, TextRenderer, make_registry
from probe.lab.servers.tcp import TCPMode, TCPServer
from probe.model import (
    Failure,
    Operation,
    ProbeResult,
    SkipReason,
    Target,
    Vantage,
    VantageState,
    freeze,
)
from probe.probes import REGISTRY as PROBE_TYPES
from probe.probes import tcp
from probe.results import PHASE_BUCKETS, VERDICTS, ResultStore, series_key
from probe.round import Runner, measure_endpoint
from probe.statuspage import render_status_page
from probe.verdict.aggregate import judge_round
from tests.helpers import T0, endpoint, failed, ok, refusing_port, settings, skipped, target

# Data only: nothing in this file opens a socket.
DC1 = target("mtproto", "192.0.2.10", 443, service="telegram", name="dc1")
G_V4A = target("tls", "192.0.2.21", 443, host="g.whatsapp.example", service="whatsapp", name="g")
G_V4B = target("tls", "192.0.2.22", 443, host="g.whatsapp.example", service="whatsapp", name="g")
G_V6 = target("tls", "2001:db8::21", 443, host="g.whatsapp.example", service="whatsapp", name="g")
DNS = target(
    "dns", None, None, host="web.whatsapp.example", resolver="udp:127.0.0.1:53", service="whatsapp"
)
RELAY = target("stun", "192.0.2.30", 3478, service="whatsapp", name="relay")


def flow(cutoff_s: float | None) -> ProbeResult:
    """A call-like STUN flow (details as the stun probe writes them)."""
    evidence = StunEvidence(
        stun_transport="udp",
        mode="flow",
        flow=StunFlow(sent=60, loss=0.25, jitter_s=0.002, cutoff_s=cutoff_s),
    )
    if cutoff_s is None:
        return ProbeResult(RELAY, True, T0, 3.2, phases=freeze({"flow": 3.2}), evidence=evidence)
    return ProbeResult(
        RELAY,
        False,
        T0,
        3.2,
        failure=Failure.UDP_NO_RESPONSE,
        failed_operation=Operation.READ,
        phases=freeze({"flow": 3.2}),
        evidence=evidence,
    )


def labels(t: Target, **extra: str) -> dict[str, str]:
    return {**series_key(t)._asdict(), **extra}


def scrape(
    store: ResultStore, options: MetricsSettings | None = None
) -> tuple[CollectorRegistry, str]:
    registry = make_registry(store, lambda: options or MetricsSettings())
    return registry, generate_latest(registry).decode()


def test_success_and_failure_of_an_ip_literal_endpoint() -> None:
    store = ResultStore()
    store.record(ok(DC1, connect=0.03, app=0.05))
    store.record(
        failed(
            DC1,
            "connection_reset",
            Operation.READ,
            at=T0 + timedelta(minutes=5),
            connect=0.03,
            app=0.01,
        )
    )
    registry, _ = scrape(store)
    lab = labels(DC1)
    assert lab["address"] == "192.0.2.10"
    assert lab["ip_family"] == "ipv4"
    assert registry.get_sample_value("probe_success", lab) == 0
    assert registry.get_sample_value("probe_duration_seconds", lab) == 2.5
    assert (
        registry.get_sample_value("probe_phase_duration_seconds", {**lab, "phase": "app"}) == 0.01
    )
    info = {**lab, "failure": "connection_reset", "failed_operation": "read"}
    assert registry.get_sample_value("probe_failure_info", info) == 1
    assert registry.get_sample_value("probe_attempts_total", lab) == 2
    assert (
        registry.get_sample_value("probe_failures_total", {**lab, "failure": "connection_reset"})
        == 1
    )
    last_run = T0 + timedelta(minutes=5)
    assert (
        registry.get_sample_value("probe_last_run_timestamp_seconds", lab) == last_run.timestamp()
    )
    assert (
        registry.get_sample_value("probe_state_change_timestamp_seconds", lab)
        == last_run.timestamp()
    )


def test_a_success_has_no_failure_info() -> None:
    store = ResultStore()
    store.record(ok(DC1, connect=0.03))
    registry, text = scrape(store)
    assert registry.get_sample_value("probe_success", labels(DC1)) == 1
    assert "probe_failure_info{" not in text
    assert registry.get_sample_value("probe_dns_lookup_time_seconds", labels(DC1)) is None


def test_unknown_failure_text_never_reaches_a_label() -> None:
    store = ResultStore()
    store.record(failed(DC1, "unknown_failure socket exploded near [scrubbed]", Operation.WRITE))
    registry, text = scrape(store)
    info = {**labels(DC1), "failure": "unknown_failure", "failed_operation": "write"}
    assert registry.get_sample_value("probe_failure_info", info) == 1
    assert "exploded" not in text


def test_hostname_endpoints_export_the_family_never_resolved_addresses() -> None:
    store = ResultStore()
    store.record_many(
        [
            ok(G_V4A, connect=0.02, tls=0.04),
            failed(G_V4B, "connection_reset", Operation.TLS_HANDSHAKE, connect=0.02, tls=0.001),
            ok(G_V6, connect=0.03, tls=0.05),
        ]
    )
    registry, text = scrape(store)
    assert "192.0.2.21" not in text
    assert "192.0.2.22" not in text
    assert "2001:db8::21" not in text
    v4 = labels(G_V4A)
    assert v4["address"] == ""
    assert v4["ip_family"] == "ipv4"
    # One blocked address of two makes the series fail (partial blocking is visible) ...
    assert registry.get_sample_value("probe_success", v4) == 0
    info = {**v4, "failure": "connection_reset", "failed_operation": "tls_handshake"}
    assert registry.get_sample_value("probe_failure_info", info) == 1
    # ... and the blocked fraction is exported.
    assert registry.get_sample_value("probe_targets", {**v4, "status": "ok"}) == 1
    assert registry.get_sample_value("probe_targets", {**v4, "status": "failed"}) == 1
    assert registry.get_sample_value("probe_attempts_total", v4) == 2
    v6 = labels(G_V6)
    assert v6["ip_family"] == "ipv6"
    assert registry.get_sample_value("probe_success", v6) == 1


def test_a_call_like_flow_exports_loss_jitter_and_its_cutoff() -> None:
    store = ResultStore()
    store.record(flow(cutoff_s=None))
    registry, _ = scrape(store)
    lab = labels(RELAY)
    assert registry.get_sample_value("probe_flow_loss_ratio", lab) == 0.25
    assert registry.get_sample_value("probe_flow_jitter_seconds", lab) == 0.002
    assert registry.get_sample_value("probe_flow_cutoff_seconds", lab) is None  # not cut off
    store.record(flow(cutoff_s=1.05))
    registry, _ = scrape(store)
    assert registry.get_sample_value("probe_flow_cutoff_seconds", lab) == 1.05
    assert registry.get_sample_value("probe_success", lab) == 0
    # a binding-mode STUN result (no flow) exports none of them
    store = ResultStore()
    store.record(ok(RELAY, stun=0.01))
    registry, _ = scrape(store)
    sampled = {sample.name for family in registry.collect() for sample in family.samples}
    assert not {name for name in sampled if name.startswith("probe_flow_")}


def test_dns_probe_series_carry_the_resolver_and_the_lookup_time() -> None:
    store = ResultStore()
    store.record(failed(DNS, "dns_nxdomain_error", Operation.RESOLVE, resolve=0.004))
    registry, _ = scrape(store)
    lab = labels(DNS)
    assert lab["resolver"] == "udp:127.0.0.1:53"
    assert (lab["address"], lab["ip_family"], lab["port"]) == ("", "", "")
    assert registry.get_sample_value("probe_dns_lookup_time_seconds", lab) == 0.004
    assert (
        registry.get_sample_value(
            "probe_failure_info",
            {**lab, "failure": "dns_nxdomain_error", "failed_operation": "resolve"},
        )
        == 1
    )


@pytest.mark.parametrize("reason", list(SkipReason))
def test_skipped_results_never_report_probe_success(reason: SkipReason) -> None:
    store = ResultStore()
    store.record(failed(G_V6, "generic_timeout_error", at=T0))
    store.record(skipped(G_V6, reason, at=T0 + timedelta(minutes=5)))
    registry, text = scrape(store)
    lab = labels(G_V6)
    assert registry.get_sample_value("probe_success", lab) is None
    assert "probe_success{" not in text
    assert "probe_failure_info{" not in text
    assert registry.get_sample_value("probe_skipped", {**lab, "reason": str(reason)}) == 1
    assert registry.get_sample_value("probe_targets", {**lab, "status": "skipped"}) == 1
    assert registry.get_sample_value("probe_skips_total", {**lab, "reason": str(reason)}) == 1
    # The earlier real failure stays counted; the skip adds no attempt and no failure.
    assert registry.get_sample_value("probe_attempts_total", lab) == 1
    assert (
        registry.get_sample_value(
            "probe_failures_total", {**lab, "failure": "generic_timeout_error"}
        )
        == 1
    )


def test_removed_targets_vanish_from_the_next_scrape() -> None:
    store = ResultStore()
    store.record_many([failed(DC1, "connection_refused"), ok(G_V4A, connect=0.01)])
    registry = make_registry(store)
    assert registry.get_sample_value("probe_success", labels(DC1)) == 0
    store.replace_targets([G_V4A.key()])
    assert registry.get_sample_value("probe_success", labels(DC1)) is None
    assert registry.get_sample_value("probe_attempts_total", labels(DC1)) is None
    assert registry.get_sample_value("probe_success", labels(G_V4A)) == 1


def _latency_store() -> ResultStore:
    store = ResultStore()
    store.record_many(
        ok(DC1, at=T0 + timedelta(minutes=i), connect=rtt)
        for i, rtt in enumerate([0.004, 0.03, 0.03, 0.2, 40.0])
    )
    return store


def _check_buckets(registry: CollectorRegistry, lab: dict[str, str]) -> None:
    def bucket(le: str) -> float | None:
        return registry.get_sample_value("probe_phase_latency_seconds_bucket", {**lab, "le": le})

    assert bucket("0.005") == 1
    assert bucket("0.05") == 3
    assert bucket("0.25") == 4
    assert bucket(str(PHASE_BUCKETS[-1])) == 4
    assert bucket("+Inf") == 5
    assert registry.get_sample_value("probe_phase_latency_seconds_count", lab) == 5
    assert registry.get_sample_value("probe_phase_latency_seconds_sum", lab) == pytest.approx(
        40.264
    )


def test_phase_latency_histogram_per_target_when_opted_in() -> None:
    registry, _ = scrape(_latency_store(), MetricsSettings(per_target_histograms=True))
    _check_buckets(registry, {**labels(DC1), "phase": "connect"})


def test_phase_latency_histogram_is_summed_per_service_probe_and_phase_by_default() -> None:
    store = _latency_store()
    other = target("mtproto", "192.0.2.11", 443, service="telegram", name="dc2")
    store.record(ok(other, connect=0.004))
    registry, text = scrape(store)
    lab = {"service": "telegram", "probe": "mtproto", "phase": "connect"}
    assert registry.get_sample_value("probe_phase_latency_seconds_count", lab) == 6
    first = {**lab, "le": "0.005"}
    assert registry.get_sample_value("probe_phase_latency_seconds_bucket", first) == 2
    assert "dc1" not in "".join(line for line in text.splitlines() if "latency" in line)
    # The aggregate goes with the last series of its (service, probe), not before.
    store.replace_targets([other.key()])
    registry, _ = scrape(store)
    assert registry.get_sample_value("probe_phase_latency_seconds_count", lab) == 6
    store.replace_targets([])
    registry, _ = scrape(store)
    assert registry.get_sample_value("probe_phase_latency_seconds_count", lab) is None


class _Verdict:
    def __init__(self, service: str, endpoint: str | None, verdict: str, confidence: float):
        self.service = service
        self.endpoint = endpoint
        self.verdict = verdict
        self.confidence = confidence
        self.evidence: dict[str, Any] = {"why": "test"}


def _verdict_store() -> ResultStore:
    store = ResultStore()
    store.set_verdicts(
        [
            _Verdict("telegram", "dc1", "ip_blocking", 0.8),
            _Verdict("telegram", None, "ip_blocking", 0.7),
        ]
    )
    return store


def test_verdicts_export_only_the_current_value_by_default() -> None:
    registry, text = scrape(_verdict_store())
    for value in VERDICTS:
        expected = 1 if value == "ip_blocking" else None
        ep = {"service": "telegram", "endpoint": "dc1", "verdict": value}
        assert registry.get_sample_value("probe_verdict", ep) == expected
        svc = {"service": "telegram", "verdict": value}
        assert registry.get_sample_value("probe_service_verdict", svc) == expected
    assert text.count("probe_verdict{") == 1
    assert text.count("probe_service_verdict{") == 1
    assert (
        registry.get_sample_value(
            "probe_verdict_confidence", {"service": "telegram", "endpoint": "dc1"}
        )
        == 0.8
    )
    assert (
        registry.get_sample_value("probe_service_verdict_confidence", {"service": "telegram"})
        == 0.7
    )
    assert "why" not in text  # evidence is never a label


def test_verdicts_export_one_series_per_possible_value_when_one_hot() -> None:
    registry, _ = scrape(_verdict_store(), MetricsSettings(verdict_one_hot=True))
    for value in VERDICTS:
        expected = 1 if value == "ip_blocking" else 0
        ep = {"service": "telegram", "endpoint": "dc1", "verdict": value}
        assert registry.get_sample_value("probe_verdict", ep) == expected
        svc = {"service": "telegram", "verdict": value}
        assert registry.get_sample_value("probe_service_verdict", svc) == expected


def test_vantage_config_and_agent_metrics() -> None:
    store = ResultStore(Vantage("msk-1", "RU", "AS12389", "test"))
    registry = make_registry(store)
    # Before the gate and the first load report, nothing claims online/offline.
    assert registry.get_sample_value("probe_vantage_online") is None
    assert registry.get_sample_value("probe_config_last_reload_successful") is None
    store.record_vantage(VantageState(online=True, ipv6=False, t=T0))
    store.set_config_reload(True, T0)
    store.set_config_reload(False, T0 + timedelta(minutes=1))
    store.set_agent_stats(schedule_lag_s=0.5, in_flight=3)
    info = {"vantage": "msk-1", "country": "RU", "asn": "AS12389", "role": "test"}
    assert registry.get_sample_value("probe_vantage_info", info) == 1
    assert registry.get_sample_value("probe_vantage_online") == 1
    assert registry.get_sample_value("probe_vantage_ipv6") == 0
    assert registry.get_sample_value("probe_vantage_allowlist") == 0
    store.record_vantage(VantageState(online=True, ipv6=False, t=T0, allowlist=True))
    assert registry.get_sample_value("probe_vantage_allowlist") == 1
    assert registry.get_sample_value("probe_vantage_online") == 1
    # the status page says so too: a network state, not a list of blocked services
    page = render_status_page(store.snapshot(), AgentConfig())
    assert "ALLOWLIST REGIME" in page and "only domestic controls answer" in page
    assert registry.get_sample_value("probe_vantage_check_timestamp_seconds") == T0.timestamp()
    assert registry.get_sample_value("probe_config_last_reload_successful") == 0
    assert (
        registry.get_sample_value("probe_config_last_reload_success_timestamp_seconds")
        == T0.timestamp()
    )
    assert registry.get_sample_value("probe_schedule_lag_seconds") == 0.5
    assert registry.get_sample_value("probe_in_flight") == 3


def test_nothing_lands_in_the_global_registry() -> None:
    store = ResultStore()
    store.record(ok(DC1, connect=0.01))
    make_registry(store)
    assert REGISTRY.get_sample_value("probe_success", labels(DC1)) is None
    assert REGISTRY.get_sample_value("probe_in_flight") is None


def test_every_failure_label_value_is_in_the_closed_vocabulary() -> None:
    store = ResultStore()
    for i, kind in enumerate(Failure):
        t = target("tcp", f"192.0.2.{i + 1}", 443, service="lab", name=f"ep{i}")
        store.record(failed(t, f"{kind} with a message" if kind is Failure.UNKNOWN else kind))
    store.record(failed(DC1, "not_a_vocabulary_word"))  # a bug upstream still stays bounded
    registry = make_registry(store)
    values = {
        s.labels["failure"]
        for m in registry.collect()
        if m.name in ("probe_failure", "probe_failures")
        for s in m.samples
    }
    assert values == {str(f) for f in Failure}


@pytest.mark.parametrize("host", ["127.0.0.1", "::1"])
async def test_real_tcp_probe_results_end_to_end(host: str) -> None:
    fast = settings(connect_s=2.0)
    async with TCPServer(host, mode=TCPMode.HOLD) as server:
        up = await tcp.probe(target("tcp", host, server.port, service="lab", name="up"), fast)
    with refusing_port(host) as refused_port:
        down = await tcp.probe(target("tcp", host, refused_port, service="lab", name="down"), fast)
    store = ResultStore()
    store.record_many([up, down])
    registry = make_registry(store)
    assert registry.get_sample_value("probe_success", labels(up.target)) == 1
    assert registry.get_sample_value("probe_success", labels(down.target)) == 0
    info = {**labels(down.target), "failure": "connection_refused", "failed_operation": "connect"}
    assert registry.get_sample_value("probe_failure_info", info) == 1
    connect = {"service": "lab", "probe": "tcp", "phase": "connect"}
    assert registry.get_sample_value("probe_phase_latency_seconds_count", connect) == 1
    # The kernel's SYN/SYN-ACK time sits beside the loop-timed connect (Linux TCP_INFO).
    rtt = registry.get_sample_value(
        "probe_phase_duration_seconds", {**labels(up.target), "phase": "connect_rtt"}
    )
    assert rtt is not None and 0 < rtt <= up.phases["connect"]
    assert labels(up.target)["ip_family"] == ("ipv6" if ":" in host else "ipv4")


def _rich_store() -> ResultStore:
    store = ResultStore(Vantage("lab-1", "ZZ", "AS0", "control"))
    store.record_many(
        [
            ok(DC1, connect=0.03, app=0.04),
            ok(G_V4A, connect=0.02, tls=0.04),
            failed(G_V4B, "unknown_failure x", Operation.TLS_HANDSHAKE, connect=0.02, tls=0.3),
            skipped(G_V6, SkipReason.IPV6_UNAVAILABLE),
            failed(DNS, "dns_nxdomain_error", Operation.RESOLVE, resolve=0.01),
            flow(cutoff_s=1.05),
        ]
    )
    store.record_vantage(VantageState(online=True, ipv6=False, t=T0))
    store.set_config_reload(True, T0)
    store.set_agent_stats(
        schedule_lag_s=0.01,
        in_flight=2,
        http_connections_refused=(("per_client", 4), ("global", 0)),
    )
    store.set_verdicts(
        [
            _Verdict("whatsapp", "g", "partial", 0.6),
            _Verdict("whatsapp", None, "ip_blocking", 0.5),
        ]
    )
    return store


def test_openmetrics_exposition_parses_without_name_clashes() -> None:
    # Family names must be unique in OpenMetrics, where a counter's family drops _total.
    families = list(make_registry(_rich_store()).collect())
    assert len({m.name for m in families}) == len(families)
    text = openmetrics_latest(make_registry(_rich_store())).decode()
    parsed = {m.name for m in openmetrics_parse(text)}
    assert {"probe_success", "probe_attempts", "probe_phase_latency_seconds"} <= parsed


def test_label_names_are_uniform_across_target_series() -> None:
    registry = make_registry(_rich_store())
    for metric in registry.collect():
        for sample in metric.samples:
            if sample.name.startswith(("probe_success", "probe_duration", "probe_attempts")):
                assert tuple(sorted(sample.labels)) == tuple(sorted(SERIES_LABELS))


def test_promtool_accepts_the_exposition(tmp_path: Any) -> None:
    promtool = shutil.which("promtool")
    if promtool is None:
        if os.environ.get("CI") == "true":
            pytest.fail("promtool missing in CI: install Debian's 'prometheus' package")
        pytest.skip("promtool not installed (apt-get install -y prometheus)")
    _, text = scrape(_rich_store())
    done = subprocess.run(
        [promtool, "check", "metrics"],
        input=text.encode(),
        capture_output=True,
        timeout=30,
        check=False,
    )
    assert done.returncode == 0, done.stdout.decode() + done.stderr.decode()
    assert done.stdout.decode().strip() == ""  # no lint warnings either


def test_docs_list_every_metric_and_label_value() -> None:
    doc = (Path(__file__).resolve().parent.parent / "docs" / "metrics.md").read_text()
    # Family names without the suffixes prometheus_client adds back (_total, _info).
    suffix = {"counter": "_total", "info": "_info"}
    names = {m.name + suffix.get(m.type, "") for m in make_registry(_rich_store()).collect()}
    assert "probe_success" in names
    for name in names:
        assert f"`{name}`" in doc, name
    words = [*Failure, *Operation, *SkipReason, *VERDICTS, *PROBE_TYPES]
    for word in words:
        assert f"`{word}`" in doc, word


def test_archive_write_errors_are_a_counter_only_when_an_archive_is_configured() -> None:
    store = ResultStore()
    registry = make_registry(store)
    assert registry.get_sample_value("probe_archive_write_errors_total") is None
    store.set_agent_stats(archive_write_errors=3)
    assert registry.get_sample_value("probe_archive_write_errors_total") == 3
    doc = (Path(__file__).resolve().parent.parent / "docs" / "metrics.md").read_text()
    assert "`probe_archive_write_errors_total`" in doc


def test_refused_http_connections_are_a_counter_per_reason_once_the_agent_reports() -> None:
    store = ResultStore()
    registry = make_registry(store)
    name = "probe_http_connections_refused_total"
    assert registry.get_sample_value(name, {"reason": "per_client"}) is None
    store.set_agent_stats(http_connections_refused=(("per_client", 7), ("global", 0)))
    assert registry.get_sample_value(name, {"reason": "per_client"}) == 7
    assert registry.get_sample_value(name, {"reason": "global"}) == 0
    assert TextRenderer(store).render() == generate_latest(registry)


def _series_per_endpoint_and_probe(text: str) -> dict[tuple[str, str, str], int]:
    """Series of the exposition per (service, endpoint, probe); endpoint-level series (the
    verdict) under probe ``""``.  Family-level series (aggregates, agent) are not counted."""
    counts: dict[tuple[str, str, str], int] = {}
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            if "endpoint" in s.labels:
                key = (s.labels["service"], s.labels["endpoint"], s.labels.get("probe", ""))
                counts[key] = counts.get(key, 0) + 1
    return counts


async def test_series_budget_per_endpoint_and_probe() -> None:
    """docs/metrics.md "Budget": at most 12 series per endpoint and probe by default, plus 2
    per endpoint for its verdict; measured on real rounds (a working endpoint, a refused one
    with its repeat), three rounds each so counters and histograms have accumulated."""
    runner = Runner(settings(connect_s=2.0))
    online = VantageState(online=True, ipv6=False, t=T0)
    store = ResultStore()
    async with TCPServer("127.0.0.1", mode=TCPMode.HOLD) as server:
        with refusing_port() as closed:
            up = endpoint(probes=("tcp",), ports=(server.port,), name="up")
            down = endpoint(probes=("tcp",), ports=(closed,), name="down")
            for _ in range(3):
                for ep in (up, down):
                    store.record_round(await measure_endpoint(ep, runner, online))
    store.set_verdicts(judge_round(store.snapshot().results.values()))
    _, text = scrape(store)
    counts = _series_per_endpoint_and_probe(text)
    assert set(counts) == {
        ("lab", "up", "tcp"),
        ("lab", "up", ""),
        ("lab", "down", "tcp"),
        ("lab", "down", "tcp/repeat"),
        ("lab", "down", ""),
    }, counts
    for (_, _, probe), n in counts.items():
        assert n <= (2 if probe == "" else 12), counts
    assert counts[("lab", "up", "tcp")] == 10  # the breakdown docs/metrics.md gives
    # The expensive forms are opt-in, and they are what the budget keeps out.
    _, full = scrape(store, MetricsSettings(verdict_one_hot=True, per_target_histograms=True))
    heavy = _series_per_endpoint_and_probe(full)
    assert heavy[("lab", "up", "")] == 1 + len(VERDICTS)
    assert heavy[("lab", "up", "tcp")] == 10 + 2 * (len(PHASE_BUCKETS) + 3)  # 2 phases
