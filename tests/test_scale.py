"""Work that must stay O(what changed) at thousands of endpoints, checked for the same
answers as the whole-store computation it replaces (speed itself is in bench/)."""

from __future__ import annotations

import json
import random
import subprocess
import sys
from datetime import timedelta
from pathlib import Path

from prometheus_client import generate_latest

from probe.config.settings import MetricsSettings
from probe.control import judged_alone
from probe.daemon import IncrementalJudge
from probe.evidence import evidence_from_json
from probe.exporter import TextRenderer, make_registry
from probe.exposition import text_exposition
from probe.model import Operation, ProbeResult, SkipReason, freeze
from probe.results import ResultStore
from probe.verdict.aggregate import judge_round
from tests.helpers import T0, failed, ok, skipped, target

REPO = Path(__file__).resolve().parents[1]


def _round(rng: random.Random, service: str, i: int, minute: int) -> list[ProbeResult]:
    """One endpoint's round: tcp on one or two addresses, each ok, refused or skipped."""
    at = T0 + timedelta(minutes=minute)
    out = []
    for n in range(rng.choice((1, 2))):
        t = target("tcp", f"192.0.2.{i * 2 + n + 1}", 443, service=service, name=f"e{i}")
        kind = rng.random()
        if kind < 0.6:
            out.append(ok(t, at=at, connect=0.02, connect_rtt=0.019))
        elif kind < 0.9:
            out.append(failed(t, "connection_refused", Operation.CONNECT, at=at, connect=0.001))
        else:
            out.append(skipped(t, at=at))
    return out


def test_incremental_verdicts_equal_judging_the_whole_store_every_time() -> None:
    """Random rounds, removals, reloads, control results coming and going and a role
    change: after every step the incremental judge gives exactly `judge_round` over every
    latest result (the daemon's previous behaviour), `judged_alone` when told why."""
    rng = random.Random(13)
    store = ResultStore()
    judge = IncrementalJudge()
    endpoints = [(s, i) for s in ("alpha", "beta") for i in range(12)]
    control: list[ProbeResult] = []
    role = "test"
    for step in range(160):
        action = rng.random()
        if action < 0.75:
            service, i = rng.choice(endpoints)
            store.record_round(_round(rng, service, i, step))
        elif action < 0.85:  # a control poll: new results for a few endpoints, or none
            picked = rng.sample(endpoints, rng.choice((0, 3)))
            control = [r for service, i in picked for r in _round(rng, service, i, step)]
        elif action < 0.88:
            role = "control" if role == "test" else "test"
        else:  # a reload that drops a random share of the keys
            keys = list(store.snapshot().results)
            store.replace_targets(k for k in keys if rng.random() < 0.8)
        why = "no fresh control" if step % 7 == 0 else None
        expected = judge_round(
            store.snapshot().results.values(), control=control, vantage_role=role
        )
        if why is not None:
            expected = judged_alone(expected, why)
        assert judge(store, control, why, role) == expected, f"step {step}"


def test_the_fast_exposition_is_byte_for_byte_prometheus_clients() -> None:
    """`text_exposition` (what /metrics serves) against `generate_latest`, with both
    metric forms and label values that need escaping."""
    store = ResultStore()
    for i in range(30):
        store.record_round(_round(random.Random(i), "svc", i, 0))
    odd = target("tcp", "192.0.2.200", 443, service='we"ird\\name', name="line\nbreak")
    store.record(ok(odd, connect=1e-7))
    store.set_verdicts(judge_round(store.snapshot().results.values()))
    for options in (MetricsSettings(), MetricsSettings(True, True)):
        registry = make_registry(store, lambda o=options: o)  # type: ignore[misc]
        assert text_exposition(registry) == generate_latest(registry)


def test_incremental_text_equals_prometheus_client_and_reformats_only_changed_series() -> None:
    """What /metrics serves (`TextRenderer`, per-series lines cached while their results
    are unchanged) stays byte-for-byte `generate_latest` through rounds, removals, new
    verdicts and a switch of the metric options."""
    rng = random.Random(5)
    store = ResultStore()
    options = [MetricsSettings()]
    renderer = TextRenderer(store, lambda: options[0])
    registry = make_registry(store, lambda: options[0])
    for i in range(20):
        store.record_round(_round(rng, "svc", i, 0))
    assert renderer.render() == generate_latest(registry)
    first = renderer.groups_rendered
    for i in (3, 7):  # two endpoints' next rounds
        store.record_round(_round(rng, "svc", i, 1))
    store.set_verdicts(judge_round(store.snapshot().results.values()))
    assert renderer.render() == generate_latest(registry)
    assert 2 <= renderer.groups_rendered - first <= 4  # their 1-2 series each, no others
    store.replace_targets(k for k in store.snapshot().results if k[1] != "e5")
    assert renderer.render() == generate_latest(registry)
    options[0] = MetricsSettings(verdict_one_hot=True, per_target_histograms=True)
    assert renderer.render() == generate_latest(registry)


def _varied_round(rng: random.Random, i: int, minute: int) -> list[ProbeResult]:
    """Every shape of result the direct text path formats: hostname endpoints (several
    addresses in one series, one failing), DNS with a resolve phase, call-like flows with
    and without figures, skips only, failures of several kinds, names needing escapes."""
    at = T0 + timedelta(minutes=minute, seconds=rng.random())
    service = ("plain", 'qu"ote\\d', "new\nline")[i % 3]
    out: list[ProbeResult] = []
    host = f"h{i}.example"
    for n in range(rng.choice((1, 2, 3))):
        t = target("tls", f"198.51.100.{i * 3 + n + 1}", 443, host=host, service=service, name=host)
        roll = rng.random()
        if roll < 0.5:
            out.append(ok(t, at=at, connect=rng.random() / 10, tls=1e-7, connect_rtt=123.5))
        elif roll < 0.8:
            kind = rng.choice(("connection_reset", "generic_timeout_error", "ssl_invalid_hostname"))
            out.append(failed(t, kind, rng.choice(list(Operation)), at=at, connect=0.5))
        else:
            out.append(skipped(t, rng.choice(list(SkipReason)), at=at))
    dns = target("dns", None, host=host, resolver="udp:192.0.2.53:53", service=service, name=host)
    out.append(ok(dns, at=at, resolve=rng.random()))
    if i % 4 == 0:
        stun = target("stun", f"203.0.113.{i + 1}", 3478, service=service, name=f"relay{i}")
        figures = {"mode": "flow", "loss": rng.random(), "jitter_s": 0.002, "cutoff_s": None}
        if rng.random() < 0.5:
            figures = {"mode": "flow", "loss": 1, "jitter_s": True, "cutoff_s": 2.5e-9}
        out.append(
            ProbeResult(
                stun,
                True,
                at,
                3.2,
                phases=freeze({"flow": 3.2}),
                evidence=evidence_from_json("stun", figures),
            )
        )
    return out


def test_the_direct_text_is_byte_for_byte_prometheus_clients_for_every_result_shape() -> None:
    """The renderer formats series and verdicts as text itself: against `generate_latest`
    over many random rounds, under all four metric option combinations."""
    rng = random.Random(21)
    store = ResultStore()
    options = [MetricsSettings()]
    renderer = TextRenderer(store, lambda: options[0])
    registry = make_registry(store, lambda: options[0])
    combos = [MetricsSettings(one_hot, per_target) for one_hot in (False, True)
              for per_target in (False, True)]  # fmt: skip
    for step in range(40):
        for i in rng.sample(range(24), 6):
            store.record_round(_varied_round(rng, i, step))
        if step % 3 == 0:
            store.set_verdicts(judge_round(store.snapshot().results.values()))
        if step % 5 == 0:
            options[0] = combos[step // 5 % 4]
            store.keep_series_latency(options[0].per_target_histograms)
        if step == 30:
            store.replace_targets(k for k in store.snapshot().results if rng.random() < 0.7)
        if step in (11, 12, 13):
            # Endpoint 0 on three addresses (one series); then two of its keys move to
            # series of their own (the same keys as literal hosts), and back.
            for n in range(3) if step != 12 else (1, 2):
                address = f"198.51.100.{n + 1}"
                host = address if step == 12 else "h0.example"
                t = target("tls", address, 443, host=host, service="plain", name="h0.example")
                store.record(ok(t, at=T0 + timedelta(minutes=step), connect=0.1))
        if step == 14:  # one key of that series goes, the others stay
            store.replace_targets(k for k in store.snapshot().results if k[3] != "198.51.100.2")
        assert renderer.render() == generate_latest(registry), f"step {step}"


def test_render_cost_bench_smoke() -> None:
    """bench/render_cost.py (no root, no network) runs and prints its figures: the smoke
    keeps it from rotting; the figures themselves are in bench/README.md."""
    done = subprocess.run(
        [sys.executable, str(REPO / "bench" / "render_cost.py"), "--smoke"],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert done.returncode == 0, done.stderr[-2000:]
    figures = [json.loads(line) for line in done.stdout.splitlines()]
    assert [f["endpoints"] for f in figures] == [40]
    assert figures[0]["series"] > 40 * 10  # every per-series family, verdicts included
    assert figures[0]["first_render_cpu_s"] >= 0 and figures[0]["quarter_changed_render_cpu_s"] >= 0
