"""Work that must stay O(what changed) at thousands of endpoints, checked for the same
answers as the whole-store computation it replaces (speed itself is in bench/)."""

from __future__ import annotations

import random
from datetime import timedelta

from prometheus_client import generate_latest

from probe.config.settings import MetricsSettings
from probe.control import judged_alone
from probe.daemon import IncrementalJudge
from probe.exporter import TextRenderer, make_registry
from probe.exposition import text_exposition
from probe.model import Operation, ProbeResult
from probe.results import ResultStore
from probe.verdict.aggregate import judge_round
from tests.helpers import T0, failed, ok, skipped, target


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
