"""ResultStore: latest result per key, state-change times, counters, atomic snapshots."""

from __future__ import annotations

import threading
from dataclasses import FrozenInstanceError, replace
from datetime import timedelta
from typing import Any

import pytest

from probe.model import (
    Failure,
    ProbeResult,
    SkipReason,
    Target,
    Vantage,
    VantageState,
    freeze,
)
from probe.results import PHASE_BUCKETS, Histogram, ResultStore, SeriesKey, series_key
from tests.helpers import T0, failed, ok, skipped, target

# Data only: nothing in this file opens a socket.
DC1 = target("tcp", "192.0.2.10", 443, service="telegram", name="dc1")


def hostname_target(address: str) -> Target:
    return target("tls", address, 443, host="g.whatsapp.example", service="whatsapp", name="g")


def test_record_keeps_the_latest_result_per_key() -> None:
    store = ResultStore()
    store.record(ok(DC1))
    later = failed(DC1, at=T0 + timedelta(minutes=5))
    store.record(later)
    snap = store.snapshot()
    assert snap.results == {DC1.key(): later}


def test_the_last_recorded_result_wins_even_after_the_clock_stepped_back() -> None:
    """The wall clock can step back (NTP correcting a VM's clock).  One endpoint's rounds
    never overlap, so the result recorded last is the newest: comparing wall-clock times
    kept the pre-step result and froze the endpoint's metrics until the clock caught up."""
    store = ResultStore()
    store.record(ok(DC1, at=T0 + timedelta(hours=1)))
    stepped_back = failed(DC1, at=T0)
    store.record(stepped_back)
    snap = store.snapshot()
    assert snap.results[DC1.key()] is stepped_back
    assert snap.states[DC1.key()] == (False, Failure.CONNECTION_RESET)
    assert snap.attempts[series_key(DC1)] == 2


def test_snapshots_are_frozen_and_unaffected_by_later_updates() -> None:
    store = ResultStore()
    store.record(ok(DC1))
    before = store.snapshot()
    store.record(failed(DC1, at=T0 + timedelta(minutes=1)))
    assert before.results[DC1.key()].ok
    assert before.attempts[series_key(DC1)] == 1
    with pytest.raises(FrozenInstanceError):
        before.in_flight = 3  # type: ignore[misc]
    with pytest.raises(TypeError):
        before.results[DC1.key()] = ok(DC1)  # type: ignore[index]


def test_state_change_time_moves_only_when_ok_or_failure_kind_changes() -> None:
    store = ResultStore()
    key = DC1.key()
    store.record(ok(DC1, at=T0))
    assert store.snapshot().changed_at[key] == T0
    store.record(ok(DC1, at=T0 + timedelta(minutes=1)))
    assert store.snapshot().changed_at[key] == T0
    store.record(failed(DC1, "connection_reset", at=T0 + timedelta(minutes=2)))
    assert store.snapshot().changed_at[key] == T0 + timedelta(minutes=2)
    # A censor switching from RST to silent drop is a change of state too.
    store.record(failed(DC1, "generic_timeout_error", at=T0 + timedelta(minutes=3)))
    assert store.snapshot().changed_at[key] == T0 + timedelta(minutes=3)
    # unknown_failure messages differ run to run; the kind does not.
    store.record(failed(DC1, "unknown_failure a", at=T0 + timedelta(minutes=4)))
    store.record(failed(DC1, "unknown_failure b", at=T0 + timedelta(minutes=5)))
    assert store.snapshot().changed_at[key] == T0 + timedelta(minutes=4)


def test_skipped_results_change_no_state_and_count_no_attempt_or_failure() -> None:
    store = ResultStore()
    store.record(failed(DC1, at=T0))
    store.record(skipped(DC1, at=T0 + timedelta(minutes=1)))
    store.record(failed(DC1, at=T0 + timedelta(minutes=2)))
    snap = store.snapshot()
    series = series_key(DC1)
    assert snap.changed_at[DC1.key()] == T0  # offline gap did not reset "failing since"
    assert snap.attempts[series] == 2
    assert snap.failures[(series, Failure.CONNECTION_RESET)] == 2
    assert snap.skips[(series, SkipReason.VANTAGE_OFFLINE)] == 1


def test_failures_are_counted_by_bounded_kind() -> None:
    store = ResultStore()
    store.record_many(
        [
            failed(DC1, "unknown_failure weird 192.0.2.1", at=T0),
            failed(DC1, "unknown_failure other", at=T0 + timedelta(seconds=1)),
            failed(DC1, "connection_refused", at=T0 + timedelta(seconds=2)),
        ]
    )
    series = series_key(DC1)
    assert dict(store.snapshot().failures) == {
        (series, Failure.UNKNOWN): 2,
        (series, Failure.CONNECTION_REFUSED): 1,
    }


def test_resolved_addresses_of_a_hostname_share_one_series() -> None:
    a, b = hostname_target("192.0.2.1"), hostname_target("192.0.2.2")
    v6 = hostname_target("2001:db8::1")
    assert series_key(a) == series_key(b) != series_key(v6)
    assert series_key(a) == SeriesKey("whatsapp", "g", "tls", "", "ipv4", "443", "")
    assert series_key(DC1).address == "192.0.2.10"  # IP-literal endpoints keep theirs
    store = ResultStore()
    store.record_many([ok(a), failed(b)])
    snap = store.snapshot()
    assert len(snap.results) == 2
    assert snap.attempts == {series_key(a): 2}


def test_a_swap_test_variant_is_its_own_series() -> None:
    neutral = replace(DC1, variant="neutral_sni", overrides=freeze({"sni": "example.org"}))
    assert series_key(neutral).probe == "tcp/neutral_sni"
    store = ResultStore()
    store.record_many([failed(DC1), ok(neutral)])
    snap = store.snapshot()
    assert snap.attempts == {series_key(DC1): 1, series_key(neutral): 1}


def test_dns_targets_are_keyed_by_resolver() -> None:
    dns = target("dns", None, None, host="web.whatsapp.example", resolver="udp:127.0.0.1:53")
    assert series_key(dns) == SeriesKey(
        "lab", "web.whatsapp.example", "dns", "", "", "", "udp:127.0.0.1:53"
    )


def test_histogram_counts_only_successful_phases_with_le_buckets() -> None:
    store = ResultStore()
    store.record_many(
        [
            ok(DC1, at=T0, connect=0.01),  # exactly on a bound: counted in that bucket
            ok(DC1, at=T0 + timedelta(seconds=1), connect=0.2),
            ok(DC1, at=T0 + timedelta(seconds=2), connect=99.0),  # beyond the last bound
            failed(DC1, at=T0 + timedelta(seconds=3), connect=10.0),  # a timeout: not an RTT
        ]
    )
    hist = store.snapshot().phase_latency[(series_key(DC1), "connect")]
    cumulative = dict(hist.cumulative())
    assert hist.count == 3
    assert hist.total == pytest.approx(99.21)
    assert cumulative[0.005] == 0
    assert cumulative[0.01] == 1
    assert cumulative[0.15] == 1
    assert cumulative[0.25] == 2
    assert cumulative[PHASE_BUCKETS[-1]] == 2
    assert cumulative[float("inf")] == 3


def test_per_series_histograms_are_kept_only_when_asked_for() -> None:
    """Off (only the aggregate is exported): none kept, the aggregate unchanged; turned
    off later, the kept ones go; turned on again, they count from then on."""
    rounds = [ok(DC1, connect=0.02), ok(hostname_target("192.0.2.1"), connect=0.3)]
    kept, lean = ResultStore(), ResultStore(series_latency=False)
    for store in (kept, lean):
        store.record_many(rounds)
    assert len(kept.snapshot().phase_latency) == 2
    assert lean.snapshot().phase_latency == {}
    assert dict(lean.snapshot().aggregate_latency) == dict(kept.snapshot().aggregate_latency)
    kept.keep_series_latency(False)
    assert kept.snapshot().phase_latency == {}
    kept.replace_targets([DC1.key()])  # forgetting a series finds no histogram slot to drop
    lean.keep_series_latency(True)
    lean.record(ok(DC1, connect=0.05))
    hist = lean.snapshot().phase_latency[(series_key(DC1), "connect")]
    assert (hist.count, hist.total) == (1, 0.05)


def test_histogram_observe_returns_a_new_value() -> None:
    empty = Histogram()
    one = empty.observe(0.05)
    assert empty.count == 0
    assert one.count == 1


def test_replace_targets_drops_vanished_keys_and_orphaned_series() -> None:
    a, b = hostname_target("192.0.2.1"), hostname_target("192.0.2.2")
    store = ResultStore()
    store.record_many([failed(a), ok(b, connect=0.02), failed(DC1)])
    # DNS now answers only b: a's result goes, the shared series' counters stay.
    store.replace_targets([b.key(), DC1.key()])
    snap = store.snapshot()
    assert set(snap.results) == {b.key(), DC1.key()}
    assert snap.attempts[series_key(b)] == 2
    # Config reload removed telegram: every trace of its series goes too.
    store.replace_targets([b.key()])
    snap = store.snapshot()
    assert set(snap.results) == {b.key()}
    assert series_key(DC1) not in snap.attempts
    assert all(k[0] != series_key(DC1) for k in snap.failures)
    assert DC1.key() not in snap.changed_at
    assert (series_key(b), "connect") in snap.phase_latency


def test_a_batch_is_applied_in_one_swap() -> None:
    store = ResultStore()
    start = store.snapshot().generation
    store.record_many([ok(DC1), ok(hostname_target("192.0.2.1"))])
    assert store.snapshot().generation == start + 1
    store.record_many([])
    assert store.snapshot().generation == start + 1


def test_readers_never_see_half_a_round() -> None:
    """A scrape running while rounds are recorded sees every key from one round."""
    targets = [hostname_target(f"192.0.2.{i}") for i in range(1, 41)]
    store = ResultStore()
    rounds = 200
    seen_mixed: list[set[int]] = []
    done = threading.Event()

    def scrape() -> None:
        while not done.is_set():
            snap = store.snapshot()
            ids = {r.t for r in snap.results.values()}  # each round has its own time
            if len(ids) > 1 or (ids and len(snap.results) != len(targets)):
                seen_mixed.append(ids)

    reader = threading.Thread(target=scrape)
    reader.start()
    try:
        for n in range(rounds):
            at = T0 + timedelta(minutes=n)
            store.record_many(ProbeResult(t, True, at, 0.01) for t in targets)
    finally:
        done.set()
        reader.join(timeout=10)
    assert not reader.is_alive()
    assert seen_mixed == []
    assert store.snapshot().attempts[series_key(targets[0])] == rounds * len(targets)


class _Verdict:
    def __init__(self, service: str, endpoint: str | None, verdict: str) -> None:
        self.service = service
        self.endpoint = endpoint
        self.verdict = verdict
        self.confidence = 0.9
        self.evidence: dict[str, Any] = {}


def test_set_verdicts_rejects_values_outside_the_vocabulary() -> None:
    store = ResultStore()
    with pytest.raises(ValueError, match="not in the vocabulary"):
        store.set_verdicts([_Verdict("telegram", None, "kinda_blocked")])
    store.set_verdicts([_Verdict("telegram", None, "up")], vocabulary=("up", "down"))
    snap = store.snapshot()
    assert snap.verdict_vocabulary == ("up", "down")
    assert [v.verdict for v in snap.verdicts] == ["up"]


def test_vantage_config_and_agent_status_are_kept() -> None:
    store = ResultStore(Vantage("msk-1", "RU", "AS12389", "test"))
    state = VantageState(online=True, ipv6=False, t=T0)
    store.record_vantage(state)
    store.set_config_reload(True, T0)
    store.set_config_reload(False, T0 + timedelta(minutes=1))
    store.set_agent_stats(schedule_lag_s=0.25)
    store.set_agent_stats(in_flight=7)
    snap = store.snapshot()
    assert snap.vantage.name == "msk-1"
    assert snap.vantage_state is state
    assert snap.config_reload_ok is False
    assert snap.config_reload_success_at == T0  # the failed reload keeps the last success
    assert (snap.schedule_lag_s, snap.in_flight) == (0.25, 7)
