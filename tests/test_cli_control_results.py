"""``probe once --control-results FILE``: verdicts judged next to a control vantage.

Real subprocesses against a real loopback server; the control vantage's results are the
JSON a control agent prints (``probe once --format json``) or serves (``/api/results``).
The endpoint ``dead`` (127.0.0.1:1, nothing listens) fails to connect here; what the
control saw there decides between a block and an outage.
"""

from __future__ import annotations

import json
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest

from probe.lab.servers.tcp import TCPMode, TCPServer
from tests.agentproc import PROBE, run_cli


@pytest.fixture
async def config(tmp_path: Path) -> AsyncIterator[Path]:
    async with TCPServer("127.0.0.1", mode=TCPMode.CLOSE) as alive:
        path = tmp_path / "agent.yaml"
        path.write_text(
            f"""
vantage: {{name: test-box, role: test}}
resolvers: {{system: false}}
timeouts: {{connect_s: 2}}
seeds: []
archive: {{path: null}}
services:
  - service: lab
    source: test
    endpoints:
      - {{name: dead, host: 127.0.0.1, ports: [1], role: signalling, probes: [tcp],
          source: test, confidence: C}}
      - {{name: alive, host: 127.0.0.1, ports: [{alive.port}], role: signalling,
          probes: [tcp], source: test, confidence: C}}
  - service: controls
    source: test
    endpoints:
      - {{name: loopback, host: 127.0.0.1, ports: [{alive.port}], role: control,
          probes: [tcp], source: test, confidence: C}}
"""
        )
        yield path


async def once(config: Path, *extra: str) -> tuple[int, dict[Any, dict[str, Any]], str]:
    """Run ``probe once --format json``; (exit code, verdicts by (service, endpoint), stderr)."""
    rc, out, err = await run_cli(*PROBE, "once", "-c", str(config), "--format", "json", *extra)
    records = [json.loads(line) for line in out.splitlines()]
    verdicts = {(r["service"], r["endpoint"]): r for r in records if r["type"] == "verdict"}
    return rc, verdicts, err


def control_record(ok: bool) -> dict[str, Any]:
    """What a control agent reports for ``dead``: connected, or refused like us."""
    return {
        "type": "result",
        "service": "lab",
        "endpoint": "dead",
        "probe": "tcp",
        "address": "127.0.0.1",
        "port": 1,
        "ok": ok,
        "failure": None if ok else "connection_refused",
        "failed_operation": None if ok else "connect",
        "details": {},
        "flags": [],
    }


async def test_without_a_control_a_refused_connect_is_a_weak_block(config: Path) -> None:
    rc, verdicts, err = await once(config)
    assert rc == 1, err
    dead = verdicts[("lab", "dead")]
    assert dead["verdict"] == "ip_blocking" and dead["confidence"] <= 0.5
    assert not any(line.startswith("control ") for line in dead["evidence"])


async def test_control_json_lines_that_connect_make_it_a_strong_block(
    config: Path, tmp_path: Path
) -> None:
    control = tmp_path / "control.jsonl"
    verdict_line = {"type": "verdict", "service": "lab", "endpoint": "dead", "verdict": "ok"}
    control.write_text(json.dumps(control_record(True)) + "\n" + json.dumps(verdict_line) + "\n")
    rc, verdicts, err = await once(config, "--control-results", str(control))
    assert rc == 1, err
    dead = verdicts[("lab", "dead")]
    assert dead["verdict"] == "ip_blocking" and dead["confidence"] >= 0.85
    assert "control tcp 127.0.0.1:1 ok" in dead["evidence"]
    assert verdicts[("lab", "alive")]["verdict"] == "ok"  # no control record: judged alone


async def test_control_api_results_that_fail_too_make_it_an_outage(
    config: Path, tmp_path: Path
) -> None:
    control = tmp_path / "api-results.json"
    control.write_text(json.dumps({"vantage": {"name": "ctl"}, "results": [control_record(False)]}))
    rc, verdicts, err = await once(config, "--control-results", str(control))
    assert rc == 1, err
    dead = verdicts[("lab", "dead")]
    assert dead["verdict"] == "endpoint_down"
    assert "control tcp 127.0.0.1:1 connection_refused (connect)" in dead["evidence"]
    assert verdicts[("lab", None)]["verdict"] == "ok"  # a down endpoint next to a working one


@pytest.mark.parametrize(
    ("content", "error"),
    [
        (None, "FileNotFoundError"),
        ("not json at all\n", "JSONDecodeError"),
        ('{"type": "result", "ok": true}\n{"type": "result"}\n', "KeyError"),
        ("[1, 2]\n", "AttributeError"),
    ],
)
async def test_unreadable_control_results_are_a_one_line_usage_error(
    config: Path, tmp_path: Path, content: str | None, error: str
) -> None:
    control = tmp_path / "control.jsonl"
    if content is not None:
        control.write_text(content)
    rc, verdicts, err = await once(config, "--control-results", str(control))
    assert rc == 2
    assert verdicts == {}  # refused before anything was measured
    assert err.count("\n") == 1 and err.startswith(f"probe: --control-results {control}: {error}")
