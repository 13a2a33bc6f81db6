"""A vantage with ``role: control`` never reports a censorship verdict (issue 10, item 2).

Hand-built results (documentation prefixes, no socket) through the probes' own `Recorder`:
whatever would read as a block from a test vantage reads as ``endpoint_down`` (this
vantage reaches other endpoints) or ``inconclusive`` (nothing works from here) on a control.
"""

from __future__ import annotations

from probe.model import Operation
from probe.verdict.aggregate import judge_round
from probe.verdict.vocabulary import BLOCKING, EndpointVerdict, ServiceVerdict, Verdict
from tests.helpers import endpoint
from tests.test_verdict import run

DC1 = endpoint("192.0.2.1", probes=("tcp", "tls"), ports=(443,), service="tg", name="dc1")
DC2 = endpoint("192.0.2.2", probes=("tcp",), ports=(443,), service="tg", name="dc2")
NEUTRAL = endpoint(
    "198.51.100.1", probes=("tcp",), ports=(443,), service="ctl", name="neutral", role="control"
)
REFUSED = {"failure": "connection_refused", "op": Operation.CONNECT}


def by_key(
    verdicts: tuple[EndpointVerdict | ServiceVerdict, ...],
) -> dict[tuple[str, str | None], EndpointVerdict | ServiceVerdict]:
    return {(v.service, v.endpoint): v for v in verdicts}


def test_a_dead_server_is_a_block_on_a_test_vantage_but_down_on_a_control() -> None:
    results = [run("tcp", "192.0.2.1", ep=DC1, **REFUSED), run("tcp", "198.51.100.1", ep=NEUTRAL)]
    as_test = by_key(judge_round(results))
    assert as_test[("tg", "dc1")].verdict == Verdict.IP_BLOCKING
    as_control = by_key(judge_round(results, vantage_role="control"))
    dc1 = as_control[("tg", "dc1")]
    assert dc1.verdict == Verdict.ENDPOINT_DOWN
    assert dc1.evidence[0].startswith("control vantage: ")
    assert "tcp 192.0.2.1:443 connection_refused (connect)" in dc1.evidence
    assert as_control[("tg", None)].verdict == Verdict.ENDPOINT_DOWN
    assert as_control[("ctl", "neutral")].verdict == Verdict.OK


def test_a_control_that_reaches_nothing_is_inconclusive_not_down() -> None:
    results = [run("tcp", "192.0.2.1", ep=DC1, **REFUSED)]
    dc1 = by_key(judge_round(results, vantage_role="control"))[("tg", "dc1")]
    assert dc1.verdict == Verdict.INCONCLUSIVE


def test_partial_and_tls_failures_on_a_control_are_never_censorship() -> None:
    # dc1: TCP connects but the TLS handshake is reset (a test vantage would call that SNI
    # filtering or protocol filtering); dc2 refused, next to a working neutral endpoint.
    reset = {"failure": "connection_reset", "op": Operation.TLS_HANDSHAKE}
    results = [
        run("tcp", "192.0.2.1", ep=DC1),
        run("tls", "192.0.2.1", ep=DC1, **reset),
        run("tcp", "192.0.2.2", ep=DC2, **REFUSED),
        run("tcp", "198.51.100.1", ep=NEUTRAL),
    ]
    as_test = judge_round(results)
    assert {v.verdict for v in as_test} & (BLOCKING | {Verdict.PARTIAL})  # it would page
    as_control = judge_round(results, vantage_role="control")
    verdicts = {v.verdict for v in as_control}
    assert not verdicts & (BLOCKING | {Verdict.PARTIAL})
    assert verdicts <= {Verdict.OK, Verdict.ENDPOINT_DOWN, Verdict.INCONCLUSIVE}
