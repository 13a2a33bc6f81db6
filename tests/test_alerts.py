"""configs/alerts.yml: promtool lint, promtool unit tests (tests/rules/alerts_test.yml), and
the conventions every alert keeps (names, labels, annotations, links, `for:` durations).

The unit tests feed synthetic series to the real rule engine (promtool); whether the
rules' queries find data on a real agent is tests/test_dashboards.py's job.
"""

from __future__ import annotations

import json
import re
import subprocess
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, urlparse

import pytest
import yaml

from tests.agentproc import REPO
from tests.test_daemon import required_tool

RULES = REPO / "configs" / "alerts.yml"
UNIT_TESTS = REPO / "tests" / "rules" / "alerts_test.yml"
RUNBOOKS = REPO / "docs" / "runbooks.md"
DASHBOARDS = REPO / "dashboards"
# Every alert must be evaluated, and stay silent, in each of these unit-test groups.
SILENT_GROUPS = (
    "silent: a single failed round",
    "silent: an offline vantage",
    "silent: endpoint_down",
)
# The one alert whose job it is to fire on an offline vantage.
FIRES_WHEN_OFFLINE = {"VantageOffline"}
# Alerts judging verdicts: they must wait for two probe intervals.
VERDICT_ALERTS = {
    "EndpointBlocked",
    "ServiceBlocked",
    "NewBlockingKind",
    "CallRelaysUnreachable",
    "ThrottlingOrStalls",
    "DNSTampering",
    "BlockedHereFineAtControl",
    "VantageOffline",
    "VantageAllowlist",
    "ControlVantageUnreachable",
}


def _load(path: Path) -> Any:
    return yaml.safe_load(path.read_text(encoding="utf-8"))


def _alerts() -> list[dict[str, Any]]:
    return [r for g in _load(RULES)["groups"] for r in g["rules"] if "alert" in r]


def _seconds(duration: str) -> int:
    units = {"s": 1, "m": 60, "h": 3600, "d": 86400}
    return sum(int(n) * units[u] for n, u in re.findall(r"(\d+)([smhd])", duration))


def _run(*argv: str) -> subprocess.CompletedProcess[str]:
    promtool = required_tool("promtool", package="prometheus")
    return subprocess.run(
        [promtool, *argv], capture_output=True, text=True, timeout=120, cwd=REPO, check=False
    )


def test_promtool_check_rules_is_clean() -> None:
    done = _run("check", "rules", str(RULES))
    assert done.returncode == 0, done.stdout + done.stderr
    assert "SUCCESS" in done.stdout and "WARNING" not in done.stdout + done.stderr


def test_promtool_unit_tests_pass() -> None:
    done = _run("test", "rules", str(UNIT_TESTS))
    assert done.returncode == 0, done.stdout + done.stderr
    assert "SUCCESS" in done.stdout


def test_every_alert_has_a_unit_test_where_it_fires() -> None:
    fired = {
        case["alertname"]
        for group in _load(UNIT_TESTS)["tests"]
        for case in group.get("alert_rule_test", [])
        if case.get("exp_alerts")
    }
    assert {a["alert"] for a in _alerts()} <= fired


@pytest.mark.parametrize("situation", SILENT_GROUPS)
def test_every_alert_is_evaluated_in_each_situation_that_must_not_page(situation: str) -> None:
    (group,) = [g for g in _load(UNIT_TESTS)["tests"] if g["name"].startswith(situation)]
    silent = {c["alertname"] for c in group["alert_rule_test"] if not c.get("exp_alerts")}
    firing = {c["alertname"] for c in group["alert_rule_test"] if c.get("exp_alerts")}
    names = {a["alert"] for a in _alerts()}
    allowed = FIRES_WHEN_OFFLINE if "offline" in situation else set()
    assert firing == allowed
    assert names - allowed <= silent, f"not checked silent: {names - allowed - silent}"


def test_alerts_carry_severity_summary_description_runbook_and_dashboard() -> None:
    anchors = {
        re.sub(r"[^a-z0-9-]", "", line[3:].strip().lower().replace(" ", "-"))
        for line in RUNBOOKS.read_text(encoding="utf-8").splitlines()
        if line.startswith("## ")
    }
    panels = {
        d["uid"]: {p["id"] for p in d["panels"]}
        for d in (json.loads(f.read_text(encoding="utf-8")) for f in DASHBOARDS.glob("*.json"))
    }
    for alert in _alerts():
        name = alert["alert"]
        assert re.fullmatch(r"(?:[A-Z][a-z]*|DNS)+", name), name  # CamelCase
        assert alert["labels"]["severity"] in {"critical", "warning", "info"}, name
        notes = alert["annotations"]
        assert notes["summary"] and notes["description"], name
        runbook = urlparse(notes["runbook_url"])
        assert runbook.path.endswith("/docs/runbooks.md"), name
        assert runbook.fragment == name.lower() and runbook.fragment in anchors, name
        board = urlparse(notes["dashboard"])
        uid = board.path.rsplit("/", 1)[-1]
        panel = int(parse_qs(board.query)["viewPanel"][0])
        assert panel in panels.get(uid, set()), f"{name}: no panel {panel} on {uid}"


def test_verdict_alerts_wait_two_default_probe_intervals() -> None:
    """One failed round must never page: `for:` >= 2 x the default interval, and above one
    interval plus its jitter (docs/runbooks.md says how to adapt it)."""
    schedule = _load(REPO / "configs" / "agent.yaml")["schedule"]
    for alert in _alerts():
        if alert["alert"] in VERDICT_ALERTS:
            held = _seconds(alert["for"])
            assert held >= 2 * schedule["interval_s"], alert["alert"]
            assert held > schedule["interval_s"] + schedule["jitter_s"], alert["alert"]


def test_every_runbook_section_names_an_alert() -> None:
    names = {a["alert"] for a in _alerts()}
    sections = {
        line[3:].strip()
        for line in RUNBOOKS.read_text(encoding="utf-8").splitlines()
        if line.startswith("## ") and not line.startswith("## About")
    }
    assert sections == names


def test_rules_use_only_metrics_the_agent_documents() -> None:
    documented = set(
        re.findall(r"`(probe_[a-z0-9_]+)`", (REPO / "docs" / "metrics.md").read_text())
    )
    text = RULES.read_text(encoding="utf-8")
    used = {m for m in re.findall(r"\b(probe_[a-z0-9_]+)", text)}
    histogram = {"probe_phase_latency_seconds_bucket"}
    assert used - documented - histogram == set()
