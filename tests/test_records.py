"""The flat result and verdict records (`probe.records`): one shape for JSON Lines,
/api/results and a control's document, and reading a record back gives what was written.
Data only: no socket."""

from __future__ import annotations

import json
from dataclasses import replace
from datetime import UTC, datetime, timedelta

import pytest

from probe.control import ControlError, parse_document
from probe.evidence import TlsEvidence
from probe.model import Operation, ProbeResult, SkipReason, Vantage, VantageState, freeze
from probe.output import json_lines
from probe.records import (
    RecordFields,
    is_result_record,
    read_result_record,
    result_record,
    verdict_line,
    verdict_record,
)
from probe.results import ResultStore
from probe.round import RoundReport
from probe.statuspage import results_json
from probe.verdict.aggregate import judge_round
from probe.verdict.observations import from_record, from_result
from tests.helpers import RawEvidence, target

T0 = datetime(2025, 3, 1, 12, 0, 5, 250000, tzinfo=UTC)
TLS = replace(
    target("tls", "192.0.2.3", 443, host="web.example", service="lab", name="web"),
    variant="neutral_sni",
    address_source="doh",
)
FAILED = ProbeResult(
    TLS,
    False,
    T0,
    1.23456789,
    failure="ssl_unknown_authority",
    failed_operation=Operation.TLS_HANDSHAKE,
    phases=freeze({"connect": 0.1000004, "tls": 1.1345}),
    evidence=TlsEvidence(verify_code=20),
    flags=("dns_injection_suspected",),
)
SKIPPED = ProbeResult(
    target("tcp", "192.0.2.9", 443, service="lab", name="a"),
    False,
    T0,
    0.0,
    skipped=SkipReason.VANTAGE_OFFLINE,
)

# The record's fields in the order they are written: scripts depend on these names.
RESULT_KEYS = [
    "type", "t", "vantage", "vantage_state", "service", "endpoint", "role", "probe",
    "address", "port", "resolver", "address_source", "status", "ok", "failure",
    "failed_operation", "skipped", "duration_s", "phases", "flags", "details",
]  # fmt: skip
VERDICT_KEYS = ["service", "endpoint", "verdict", "confidence", "blocked_fraction", "evidence"]


def test_a_result_record_has_the_documented_fields_json_safe() -> None:
    # hand-made details of any shape (bytes, NaN): the record is plain JSON all the same
    hostile = RawEvidence(raw={"cert": b"\x30\x82", "nan": float("nan"), "verify_code": 20})
    record = result_record(replace(FAILED, evidence=hostile), "msk-1", "online")
    assert list(record) == RESULT_KEYS
    assert record == {
        **record,
        "type": "result",
        "t": "2025-03-01T12:00:05.250000Z",
        "probe": "tls/neutral_sni",
        "address_source": "doh",
        "status": "failed",
        "failed_operation": "tls_handshake",
        "skipped": None,
        "duration_s": 1.234568,
        "phases": {"connect": 0.1, "tls": 1.1345},
        "flags": ["dns_injection_suspected"],
        "details": {"cert": {"data": "MII=", "format": "base64"}, "nan": "nan", "verify_code": 20},
    }
    json.dumps(record, allow_nan=False)  # raises if anything is not plain JSON


def test_reading_a_record_back_gives_the_fields_of_the_result() -> None:
    record = json.loads(json.dumps(result_record(FAILED, "msk-1", "allowlist")))
    fields = read_result_record(record)
    assert fields == RecordFields(
        service="lab",
        endpoint="web",
        probe="tls/neutral_sni",
        address="192.0.2.3",
        port=443,
        ok=False,
        failure="ssl_unknown_authority",
        failed_operation="tls_handshake",
        resolver=None,
        skipped=None,
        role="signalling",
        details=fields.details,
        flags=("dns_injection_suspected",),
        t="2025-03-01T12:00:05.250000Z",
        vantage="msk-1",
        vantage_state="allowlist",
    )
    assert dict(fields.details) == record["details"]
    assert fields.evidence == TlsEvidence(verify_code=20)  # typed: what the probe recorded
    assert fields.measured_at() == T0
    # and the verdict engine sees the same observation from the record as from the result
    assert from_record(record) == from_result(FAILED)


def test_a_skipped_result_reads_back_as_skipped() -> None:
    fields = read_result_record(result_record(SKIPPED, "msk-1", "offline"))
    assert (fields.skipped, fields.ok, fields.failure) == ("vantage_offline", False, None)


def test_a_record_from_an_older_or_foreign_agent_still_reads() -> None:
    minimal = {"service": "s", "endpoint": "e", "probe": "tcp", "port": "443", "flags": "one"}
    fields = read_result_record(minimal)
    assert (fields.port, fields.flags, fields.role, fields.t) == (443, ("one",), "", None)
    assert is_result_record(minimal)  # /api/results records carry no "type"
    assert not is_result_record({**minimal, "type": "verdict"})
    assert read_result_record({**minimal, "t": "2025-03-01T12:00:05"}).measured_at() == (
        T0 - timedelta(microseconds=250000)
    )  # no offset means UTC
    with pytest.raises(ValueError, match="no time"):
        fields.measured_at()
    with pytest.raises(KeyError):
        read_result_record({"service": "s", "probe": "tcp"})
    with pytest.raises(ValueError, match="invalid literal"):
        read_result_record({**minimal, "port": "https"})


def _report() -> RoundReport:
    tcp = target("tcp", "192.0.2.1", 443, service="lab", name="a")
    results = [
        ProbeResult(tcp, True, T0, 0.01, phases=freeze({"connect": 0.01})),
        ProbeResult(
            replace(tcp, address="192.0.2.2"),
            False,
            T0,
            2.5,
            failure="generic_timeout_error",
            failed_operation=Operation.CONNECT,
        ),
    ]
    state = VantageState(online=True, ipv6=False, t=T0)
    return RoundReport(Vantage("msk-1"), state, tuple(results), T0, 0.1, judge_round(results))


def test_json_lines_and_the_api_write_the_same_records() -> None:
    """`probe once --format json` and /api/results carry one shape: the API adds only
    ``changed_at`` to a result and leaves out the JSON Lines bookkeeping of a verdict."""
    report = _report()
    lines = [json.loads(line) for line in json_lines(report)]
    store = ResultStore(report.vantage)
    store.record_vantage(report.state)
    store.record_many(report.results)
    store.set_verdicts(report.verdicts)
    api = json.loads(json.dumps(results_json(store.snapshot())))

    line_results = [r for r in lines if is_result_record(r)]
    assert [list(r) for r in api["results"]] == [[*RESULT_KEYS, "changed_at"]] * 2
    assert sorted(line_results, key=lambda r: r["address"]) == [
        {k: v for k, v in r.items() if k != "changed_at"} for r in api["results"]
    ]
    line_verdicts = [r for r in lines if not is_result_record(r)]
    assert [list(v) for v in api["verdicts"]] == [VERDICT_KEYS] * len(report.verdicts)
    assert any(v["blocked_fraction"] for v in api["verdicts"])  # one of two addresses fails
    assert [{k: v[k] for k in VERDICT_KEYS} for v in line_verdicts] == api["verdicts"]
    assert {(v["type"], v["t"], v["vantage"]) for v in line_verdicts} == {
        ("verdict", "2025-03-01T12:00:05.250000Z", "msk-1")
    }
    assert [v["level"] for v in line_verdicts] == ["endpoint", "service"]


def test_a_verdict_line_is_the_api_record_with_its_bookkeeping() -> None:
    service = _report().verdicts[-1]
    assert verdict_line(service, "msk-1", "T") == {
        "type": "verdict",
        "t": "T",
        "vantage": "msk-1",
        "level": "service",
        **verdict_record(service),
    }


def test_a_control_document_is_read_through_the_record_reader() -> None:
    report = _report()
    records = [json.loads(line) for line in json_lines(report)]  # verdicts are skipped
    skipped = result_record(SKIPPED, "ctl", "online")
    body = {"vantage": {"name": "ctl", "state": "online"}, "results": [*records, skipped]}
    received = T0 + timedelta(minutes=1)
    document = parse_document(json.dumps(body).encode(), received)
    assert [(t, o.address) for t, o in document.observations] == [
        (T0, "192.0.2.1"),
        (T0, "192.0.2.2"),
    ]  # the skipped result measured nothing
    body["results"] = [{**records[0], "t": None}]
    with pytest.raises(ControlError):
        parse_document(json.dumps(body).encode(), received)
