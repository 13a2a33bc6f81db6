"""UDP answered with ICMP unreachable (IP_RECVERR): a censor rejecting instead of dropping
is the same block as silence, and an outage still reads as one.

Hand-built results (documentation addresses, nothing is contacted), in the probes' JSON
shape: ``icmp_errors`` as `probe.probes._net.udp.icmp_evidence` records them.
"""

from __future__ import annotations

from typing import Any

import pytest

from probe.evidence import QuicVnEvidence, evidence_from_json
from probe.verdict.aggregate import judge_endpoint
from probe.verdict.vocabulary import BLOCKING, Verdict
from tests.test_verdict import QHS, READ, A, run

ROUTER = "198.51.100.1"  # a router on the path (the censor's, in the lab)


def icmp(kind: str, reporter: str | None) -> list[dict[str, Any]]:
    """One recorded ICMP error of the kind a failure string names."""
    type_code = {"host_unreachable": (3, 1), "network_unreachable": (3, 0)}
    icmp_type, code = type_code.get(kind, (3, 3))
    report: dict[str, Any] = {"icmp": "icmp", "type": icmp_type, "code": code, "errno": "E"}
    if reporter is not None:
        report["reporter"] = reporter
    return [report]


def udp_run(probe: str, failure: str, reporter: str | None = ROUTER, **kw: Any) -> Any:
    if probe == "stun":
        return run(
            "stun",
            A,
            3478,
            failure=failure,
            op=READ,
            mode="binding",
            transport="udp",
            icmp_errors=icmp(failure, reporter),
            **kw,
        )
    return run(probe, failure=failure, op=QHS, icmp_errors=icmp(failure, reporter), **kw)


def ok_run(probe: str) -> Any:
    if probe == "stun":
        return run("stun", A, 3478, mode="binding", transport="udp")
    return run(probe)


PROBES = ("quic", "quic_vn", "stun")
UNREACHABLE = ("host_unreachable", "network_unreachable")


@pytest.mark.parametrize("failure", UNREACHABLE)
@pytest.mark.parametrize("probe", PROBES)
def test_a_router_rejecting_udp_while_the_control_gets_through_is_udp_blocking(
    probe: str, failure: str
) -> None:
    v = judge_endpoint([udp_run(probe, failure)], [ok_run(probe)])
    assert v.verdict == Verdict.UDP_BLOCKING, v.evidence
    name = failure.replace("_", " ")
    code = 1 if failure == "host_unreachable" else 0
    assert f"ICMP {name} (icmp type 3 code {code}) from {ROUTER}" in v.evidence


@pytest.mark.parametrize("probe", PROBES)
def test_a_router_rejecting_udp_to_an_address_that_accepts_tcp_is_udp_blocking(
    probe: str,
) -> None:
    v = judge_endpoint([udp_run(probe, "host_unreachable"), run("tcp")], [])
    assert v.verdict == Verdict.UDP_BLOCKING, v.evidence
    assert "a router rejects UDP to an address that accepts TCP" in v.evidence


@pytest.mark.parametrize("reporter", [A, None])
def test_the_target_itself_refusing_udp_is_its_service_not_a_block(reporter: str | None) -> None:
    """Port unreachable from the target (or from nobody recorded: an older record) with
    TCP working: the QUIC server is down on a live host, not censored."""
    v = judge_endpoint([udp_run("quic_vn", "connection_refused", reporter), run("tcp")], [])
    assert v.verdict not in BLOCKING, v.evidence  # ok: TCP works, UDP says nothing more
    assert "the target itself refuses UDP on that port: its service" in v.evidence


@pytest.mark.parametrize("failure", UNREACHABLE)
@pytest.mark.parametrize("probe", PROBES)
def test_unreachable_for_everyone_is_an_outage(probe: str, failure: str) -> None:
    """The server is down: its last-hop router answers host unreachable to the control too."""
    v = judge_endpoint([udp_run(probe, failure)], [udp_run(probe, failure)])
    assert v.verdict == Verdict.ENDPOINT_DOWN, v.evidence


@pytest.mark.parametrize("probe", PROBES)
def test_unreachable_alone_proves_nothing(probe: str) -> None:
    v = judge_endpoint([udp_run(probe, "host_unreachable")], [])
    assert v.verdict == Verdict.INCONCLUSIVE, v.evidence


def test_records_without_icmp_errors_still_read() -> None:
    """Archives written before the field: the evidence reads, with nothing recorded."""
    ev = evidence_from_json("quic_vn", {"probe_version": "0x1a2a3a4a", "datagrams_sent": 2})
    assert isinstance(ev, QuicVnEvidence) and ev.icmp_errors is None and ev.icmp_stray is None
    new = evidence_from_json("quic_vn", {"icmp_errors": icmp("host_unreachable", ROUTER)})
    assert isinstance(new, QuicVnEvidence) and new.icmp_errors is not None
    assert new.icmp_errors[0].reporter == ROUTER
    assert new.to_json()["icmp_errors"][0] == icmp("host_unreachable", ROUTER)[0]
