"""Structured logs: one JSON object or one logfmt line per event, extra fields included."""

from __future__ import annotations

import json
import logging

import pytest

from probe import logs


def emit(fmt: str, capsys: pytest.CaptureFixture[str]) -> str:
    logs.setup(fmt, "info")
    log = logging.getLogger("probe.test")
    log.info("vantage state", extra={"state": "offline", "note": 'a "quoted" value'})
    log.debug("hidden at info")
    logging.getLogger().handlers.clear()
    return capsys.readouterr().err


def test_json_lines(capsys: pytest.CaptureFixture[str]) -> None:
    lines = emit("json", capsys).splitlines()
    assert len(lines) == 1
    event = json.loads(lines[0])
    assert event["level"] == "info" and event["logger"] == "probe.test"
    assert event["msg"] == "vantage state" and event["state"] == "offline"
    assert event["ts"].endswith("Z")


def test_logfmt(capsys: pytest.CaptureFixture[str]) -> None:
    lines = emit("logfmt", capsys).splitlines()
    assert len(lines) == 1
    assert " level=info logger=probe.test " in lines[0]
    assert 'msg="vantage state"' in lines[0] and "state=offline" in lines[0]
    assert 'note="a \\"quoted\\" value"' in lines[0]


def test_logfmt_quotes_control_characters(capsys: pytest.CaptureFixture[str]) -> None:
    """A value from the network (an exception message quoting a peer) must not forge a log
    line with a carriage return or drive the operator's terminal with escape sequences."""
    logs.setup("logfmt", "info")
    log = logging.getLogger("probe.test")
    log.info("round failed", extra={"error": "x\rlevel=error msg=forged", "peer": "\x1b[2Jboom"})
    logging.getLogger().handlers.clear()
    out = capsys.readouterr().err
    assert out.count("\n") == 1 and "\r" not in out and "\x1b" not in out
    assert 'error="x\\rlevel=error msg=forged"' in out
    assert 'peer="\\u001b[2Jboom"' in out
