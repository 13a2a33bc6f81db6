"""`probe lab demo --repeat N`: the tally line, and the scenario comparison it counts with
(pure: synthetic outcomes, no lab needed)."""

from __future__ import annotations

from typing import Any

from probe.lab.demo import tally
from probe.lab.scenarios import ENDPOINTS, SERVICES, Outcome, RoundOutcome, by_name, check


def _round(**verdicts: str) -> RoundOutcome:
    records: dict[str, dict[str, Any]] = {}
    for key in (*ENDPOINTS, *SERVICES):
        verdict = verdicts.get(key.replace("/", "__"), "ok")
        fraction = 0.2 if verdict == "partial" else None
        records[key] = {"verdict": verdict, "blocked_fraction": fraction}
    return RoundOutcome((), records, 0, 0)


def test_congestion_accepts_throttling_or_ok_and_nothing_else() -> None:
    scenario = by_name("congestion_policer")
    slow = _round(whatsapp__web="throttling", whatsapp="partial")
    fine = _round()
    sni = _round(whatsapp__web="tls_sni_filtering", whatsapp="partial")
    assert check(scenario, Outcome(scenario, (slow,), 1.0)) == []
    assert check(scenario, Outcome(scenario, (fine,), 1.0)) == []
    problems = check(scenario, Outcome(scenario, (sni,), 1.0))
    assert problems == ["round 1: whatsapp/web: expected throttling|ok, observed tls_sni_filtering"]


def test_tally_counts_passes_and_each_verdict_seen() -> None:
    scenario = by_name("congestion_policer")
    outcomes = [
        Outcome(scenario, (_round(whatsapp__web="throttling", whatsapp="partial"),), 1.0),
        Outcome(scenario, (_round(),), 1.0),
        Outcome(scenario, (_round(whatsapp__web="throttling", whatsapp="partial"),), 1.0),
    ]
    line = tally(scenario, outcomes, 3)
    assert line.startswith("congestion_policer: 3/3 as expected")
    assert "whatsapp/web: throttling x2, ok x1" in line
    assert "whatsapp: partial x2, ok x1" in line
