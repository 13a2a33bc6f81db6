"""The verdict engine over hand-built results with real failure strings and details.

Addresses are documentation prefixes (192.0.2.0/24, 198.51.100.0/24, 2001:db8::/32):
nothing here opens a socket.  Results are built with the probes' own `Recorder`, so
failure strings, operations, details and flags have exactly the shape probes produce.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import pytest

from probe.model import Operation, ProbeResult, SkipReason, Target, freeze
from probe.probes.base import Recorder
from probe.results import VERDICTS, ResultStore
from probe.statuspage import results_json
from probe.verdict.aggregate import ALLOWLIST_FLAG, judge_endpoint, judge_round, judge_service
from probe.verdict.observations import Observation, from_api, from_record, from_result
from probe.verdict.vocabulary import BLOCKING, EndpointVerdict, ServiceVerdict, Verdict
from tests.helpers import endpoint

A, B = "192.0.2.10", "192.0.2.11"
V6 = "2001:db8::10"
DOH = "doh:https://dns.example/dns-query"
SYSTEM = "system"

CONN, HS, QHS, READ, RES = (
    Operation.CONNECT,
    Operation.TLS_HANDSHAKE,
    Operation.QUIC_HANDSHAKE,
    Operation.READ,
    Operation.RESOLVE,
)

EP = endpoint(
    "g.example",
    probes=("dns", "tcp", "tls", "quic", "quic_vn", "stun", "mtproto", "transfer"),
    ports=(443,),
    service="svc",
    name="g",
)


def run(
    probe: str,
    address: str | None = A,
    port: int | None = 443,
    *,
    failure: str | None = None,
    op: Operation | None = None,
    variant: str = "",
    overrides: dict[str, Any] | None = None,
    resolver: str | None = None,
    flags: Sequence[str] = (),
    ep: Any = EP,
    **details: Any,
) -> ProbeResult:
    """One result as a probe would have recorded it (ok unless ``failure`` is given)."""
    target = Target(
        ep,
        probe,
        address,
        port if address is not None else None,
        resolver,
        "literal",
        variant,
        freeze(overrides or {}),
    )
    rec = Recorder(target)
    for flag in flags:
        rec.flag(flag)
    if failure is None:
        return rec.ok(**details)
    assert op is not None
    return rec.fail(failure, op, **details)


def stun_silence(**kw: Any) -> ProbeResult:
    """A STUN binding run over UDP that got no answer (variants and details via ``kw``)."""
    return run(
        "stun", A, 3478, failure="udp_no_response", op=READ, mode="binding", transport="udp", **kw
    )


def dns(resolver: str, *addresses: str, failure: str | None = None, **kw: Any) -> ProbeResult:
    answers = {
        "A": [a for a in addresses if ":" not in a],
        "AAAA": [a for a in addresses if ":" in a],
    }
    op = RES if failure else None
    return run("dns", None, resolver=resolver, failure=failure, op=op, answers=answers, **kw)


def cert(sha: str, issuer: str = "CN=probe lab CA") -> dict[str, Any]:
    return {"sha256": sha, "issuer": issuer, "subject": "CN=g.example"}


def skipped(probe: str, address: str, reason: SkipReason) -> ProbeResult:
    return Recorder(Target(EP, probe, address, 443)).skip(reason)


RESET_AFTER_HELLO = {"handshake": {"stage": "awaiting_server_hello", "bytes_sent": 517}}


@dataclass(frozen=True)
class Case:
    id: str
    results: list[ProbeResult]
    verdict: Verdict
    control: list[ProbeResult] = field(default_factory=list)
    others_ok: bool = False
    min_conf: float = 0.0
    max_conf: float = 1.0
    evidence: tuple[str, ...] = ()  # substrings that must appear in the evidence
    fraction: float | None = None


CASES = [
    Case(
        "ok_everything_answers",
        [dns(SYSTEM, A, B), dns(DOH, A, B), run("tcp"), run("tls"), run("tls", B), run("tcp", B)],
        Verdict.OK,
        min_conf=0.9,
        evidence=("tls 192.0.2.10:443 ok",),
    ),
    # --- DNS (B1) ------------------------------------------------------------------
    Case(
        "dns_nxdomain_over_system_while_doh_answers",
        [dns(SYSTEM, failure="dns_nxdomain_error"), dns(DOH, A), run("tls")],
        Verdict.DNS_TAMPERING,
        min_conf=0.8,
        evidence=("dns system dns_nxdomain_error (resolve)", "nxdomain", DOH),
    ),
    Case(
        "dns_bogon_while_doh_answers",
        [dns(SYSTEM, "127.0.0.1", failure="dns_bogon_error", bogons=["127.0.0.1"]), dns(DOH, A)],
        Verdict.DNS_TAMPERING,
        min_conf=0.9,
        evidence=("bogon", "127.0.0.1"),
    ),
    Case(
        "dns_no_answer_over_udp_while_tcp_answers",
        [dns("udp:192.0.2.53:53", failure="dns_no_answer"), dns("tcp:192.0.2.53:53", A)],
        Verdict.DNS_TAMPERING,
        min_conf=0.8,
        evidence=("no answer",),
    ),
    Case(
        "dns_answer_outside_prefixes_while_doh_in_prefix",
        [dns(SYSTEM, "198.51.100.7", flags=["dns_answer_outside_prefixes"]), dns(DOH, A)],
        Verdict.DNS_TAMPERING,
        min_conf=0.65,
        evidence=("outside the service's prefixes",),
    ),
    Case(
        "dns_injection_flag",
        [dns("udp:192.0.2.53:53", A, flags=["dns_injection_suspected"])],
        Verdict.DNS_TAMPERING,
        min_conf=0.8,
        evidence=("injected",),
    ),
    Case(
        "dns_nxdomain_without_a_clean_resolver_is_inconclusive",
        [dns(SYSTEM, failure="dns_nxdomain_error")],
        Verdict.INCONCLUSIVE,
        max_conf=0.3,
    ),
    Case(
        "dns_nxdomain_answered_by_the_control_vantage",
        [dns(SYSTEM, failure="dns_nxdomain_error")],
        Verdict.DNS_TAMPERING,
        control=[dns(SYSTEM, A)],
        min_conf=0.8,
        evidence=("control dns system ok",),
    ),
    Case(
        "dns_nxdomain_everywhere_is_the_name_gone",
        [dns(SYSTEM, failure="dns_nxdomain_error"), dns(DOH, failure="dns_nxdomain_error")],
        Verdict.ENDPOINT_DOWN,
    ),
    # --- IP blocking (B2) ------------------------------------------------------------
    Case(
        "ip_blackhole_confirmed_by_control",
        [
            run("tcp", failure="generic_timeout_error", op=CONN),
            run("tcp", B, failure="generic_timeout_error", op=CONN),
        ],
        Verdict.IP_BLOCKING,
        control=[run("tcp"), run("tcp", B)],
        min_conf=0.85,
        evidence=("tcp 192.0.2.10:443 generic_timeout_error (connect)", "control tcp"),
    ),
    Case(
        "ip_block_over_ipv6",
        [run("tls", V6, failure="connection_refused", op=CONN)],
        Verdict.IP_BLOCKING,
        control=[run("tls", V6)],
        evidence=("tls [2001:db8::10]:443 connection_refused (connect)",),
    ),
    Case(
        "ip_reset_on_connect_control_reaches_a_later_step",
        [run("mtproto", failure="connection_refused", op=CONN)],
        Verdict.IP_BLOCKING,
        control=[run("mtproto", failure="connection_reset", op=READ)],
        min_conf=0.85,
    ),
    Case(
        "ip_block_without_control_but_other_services_work",
        [run("tcp", failure="generic_timeout_error", op=CONN)],
        Verdict.IP_BLOCKING,
        others_ok=True,
        max_conf=0.5,
        evidence=("other endpoints reachable",),
    ),
    Case(
        "connect_failure_alone_is_inconclusive",
        [run("tcp", failure="generic_timeout_error", op=CONN)],
        Verdict.INCONCLUSIVE,
    ),
    # --- TLS (B3, MITM) --------------------------------------------------------------
    Case(
        "sni_filter_neutral_swap_completes",
        [
            run("tcp"),
            run("tls", failure="connection_reset", op=HS, **RESET_AFTER_HELLO),
            run("tls", failure="connection_reset", op=HS, variant="repeat", **RESET_AFTER_HELLO),
            run("tls", variant="neutral_sni", overrides={"sni": "example.com"}),
        ],
        Verdict.TLS_SNI_FILTERING,
        min_conf=0.85,
        evidence=("awaiting_server_hello", "tls/neutral_sni 192.0.2.10:443 ok"),
    ),
    Case(
        "sni_filter_neutral_swap_with_name_mismatch_still_confirms",
        [
            run("tls", failure="generic_timeout_error", op=HS, **RESET_AFTER_HELLO),
            run("transfer", failure="generic_timeout_error", op=HS),  # the same name, alike
            run("tls", failure="ssl_invalid_hostname", op=HS, variant="neutral_sni"),
        ],
        Verdict.TLS_SNI_FILTERING,
        min_conf=0.85,
        evidence=("tls/neutral_sni 192.0.2.10:443 ssl_invalid_hostname",),
    ),
    Case(
        "sni_filter_confirmed_by_control_too",
        [
            run("tls", failure="eof_error", op=HS),
            run("tls", failure="eof_error", op=HS, variant="repeat"),
            run("tls", variant="neutral_sni"),
        ],
        Verdict.TLS_SNI_FILTERING,
        control=[run("tls")],
        min_conf=0.95,
    ),
    Case(
        "neutral_swap_fails_too_with_control_is_not_sni_specific",
        [
            run("tls", failure="connection_reset", op=HS),
            run("tls", failure="connection_reset", op=HS, variant="repeat"),
            run("tls", failure="connection_reset", op=HS, variant="neutral_sni"),
        ],
        Verdict.PROTOCOL_FILTERING,
        control=[run("tls")],
        evidence=("not SNI-specific",),
    ),
    Case(
        "neutral_swap_fails_too_without_control_is_inconclusive",
        [
            run("tls", failure="connection_reset", op=HS),
            run("tls", failure="connection_reset", op=HS, variant="neutral_sni"),
        ],
        Verdict.INCONCLUSIVE,
    ),
    Case(
        "mitm_certificate_differs_from_the_controls",
        [
            run(
                "tls",
                failure="ssl_unknown_authority",
                op=HS,
                certificate=cert("aa" * 32, "CN=Gov CA"),
            )
        ],
        Verdict.TLS_MITM,
        control=[run("tls", certificate=cert("bb" * 32))],
        min_conf=0.95,
        evidence=("differs from the control's", "CN=Gov CA"),
    ),
    Case(
        "mitm_without_control_is_a_weak_finding",
        [run("tls", failure="ssl_unknown_authority", op=HS, certificate=cert("aa" * 32))],
        Verdict.TLS_MITM,
        max_conf=0.5,
    ),
    Case(
        "same_bad_certificate_at_the_control_is_the_server",
        [run("tls", failure="ssl_invalid_certificate", op=HS, certificate=cert("aa" * 32))],
        Verdict.ENDPOINT_DOWN,
        control=[run("tls", failure="ssl_invalid_certificate", op=HS, certificate=cert("aa" * 32))],
    ),
    # --- QUIC and UDP (B8, B9) -------------------------------------------------------
    Case(
        "quic_v1_dropped_while_version_negotiation_answers",
        [
            run("quic", failure="generic_timeout_error", op=QHS),
            run("quic_vn", variant="swap", offers_quic_v1=True),
        ],
        Verdict.QUIC_FILTERING,
        min_conf=0.85,
        evidence=("quic_vn/swap 192.0.2.10:443 ok",),
    ),
    Case(
        "quic_filtered_while_tls_works_is_not_partial",
        [
            run("tls"),
            run("tls", B),
            run("quic", failure="generic_timeout_error", op=QHS),
            run("quic", B, failure="generic_timeout_error", op=QHS),
            run("quic_vn", offers_quic_v1=True),
            run("quic_vn", B, offers_quic_v1=True),
        ],
        Verdict.QUIC_FILTERING,
    ),
    Case(
        "quic_and_vn_silent_while_tcp_works_is_udp_blocking",
        [
            run("tls"),
            run("quic", failure="generic_timeout_error", op=QHS),
            run("quic_vn", variant="swap", failure="udp_no_response", op=QHS),
        ],
        Verdict.UDP_BLOCKING,
        evidence=("UDP silent while TCP to the same address works",),
    ),
    Case(
        "stun_silence_where_the_control_is_answered",
        [run("stun", A, 3478, failure="udp_no_response", op=READ, mode="binding", transport="udp")],
        Verdict.UDP_BLOCKING,
        control=[run("stun", A, 3478, mode="binding", transport="udp")],
        min_conf=0.85,
    ),
    Case(
        "stun_silence_alone_is_inconclusive",
        [
            stun_silence(),
            stun_silence(variant="random_udp", control={"sent": 3, "replied": False}),
        ],
        Verdict.INCONCLUSIVE,
        evidence=("proves nothing",),
    ),
    Case(
        "stun_silence_while_random_udp_is_answered",
        [
            stun_silence(),
            stun_silence(
                variant="random_udp", control={"sent": 3, "replied": True, "echoed": True}
            ),
        ],
        Verdict.UDP_BLOCKING,
        max_conf=0.75,
        evidence=("random UDP of the same size",),
    ),
    Case(
        "flow_cut_off_after_t_seconds",
        [run("stun", A, 3478, failure="udp_no_response", op=READ, mode="flow", cutoff_s=2.5)],
        Verdict.UDP_BLOCKING,
        evidence=("2.5 s into the flow",),
    ),
    # --- transfer (B5-B7) and application filtering -----------------------------------
    Case(
        "stall_after_bytes",
        [
            run(
                "transfer",
                failure="stall_after_bytes",
                op=READ,
                stalled_connections=2,
                connections_attempted=3,
                stalled_at_wire_bytes=[16384, 20480],
            )
        ],
        Verdict.STALL_AFTER_BYTES,
        evidence=("2 of 3 connections stalled at 16384, 20480 bytes",),
    ),
    Case(
        "throttled",
        [run("transfer", failure="throttled", op=READ, median_kbps=140.0, throttle_kbps=500.0)],
        Verdict.THROTTLING,
        control=[run("transfer", median_kbps=20000.0)],
        min_conf=0.85,
        evidence=("median 140.0 kbps below 500.0 kbps",),
    ),
    Case(
        "mtproto_reset_after_connect_while_control_answers",
        [run("tcp"), run("mtproto", failure="connection_reset", op=READ)],
        Verdict.PROTOCOL_FILTERING,
        control=[run("mtproto")],
        min_conf=0.85,
    ),
    # --- partial, down, offline, skips ------------------------------------------------
    Case(
        "one_address_of_two_blocked_is_partial",
        [run("tls"), run("tls", B, failure="generic_timeout_error", op=CONN)],
        Verdict.PARTIAL,
        control=[run("tls"), run("tls", B)],
        fraction=0.5,
        evidence=("1 of 2 paths blocked (ip_blocking)",),
    ),
    Case(
        "one_port_of_two_blocked_is_partial",
        [run("mtproto", A, 443, failure="connection_refused", op=CONN), run("mtproto", A, 80)],
        Verdict.PARTIAL,
        control=[run("mtproto", A, 443), run("mtproto", A, 80)],
        fraction=0.5,
    ),
    Case(
        "control_fails_the_same_way_is_endpoint_down",
        [run("tcp", failure="connection_refused", op=CONN)],
        Verdict.ENDPOINT_DOWN,
        control=[run("tcp", failure="connection_refused", op=CONN)],
        min_conf=0.85,
    ),
    Case(
        "everything_skipped_offline_is_vantage_offline",
        [
            skipped("tls", A, SkipReason.VANTAGE_OFFLINE),
            skipped("tcp", A, SkipReason.VANTAGE_OFFLINE),
        ],
        Verdict.VANTAGE_OFFLINE,
    ),
    Case(
        "failure_under_an_allowlist_regime_is_the_regime",
        [run("tcp", failure="generic_timeout_error", op=CONN, flags=[ALLOWLIST_FLAG])],
        Verdict.ALLOWLIST_REGIME,
        control=[run("tcp")],
        min_conf=0.85,
        max_conf=0.85,
        evidence=("allowlist regime",),
    ),
    Case(
        "ipv6_unavailable_never_counts",
        [run("tls"), skipped("tls", V6, SkipReason.IPV6_UNAVAILABLE)],
        Verdict.OK,
        min_conf=0.9,
    ),
    Case(
        "only_ipv6_skips_is_inconclusive_not_blocked",
        [skipped("tls", V6, SkipReason.IPV6_UNAVAILABLE)],
        Verdict.INCONCLUSIVE,
        max_conf=0.0,
    ),
]


@pytest.mark.parametrize("case", CASES, ids=[c.id for c in CASES])
def test_endpoint_verdicts(case: Case) -> None:
    v = judge_endpoint(case.results, case.control or None, others_ok=case.others_ok)
    text = "\n".join(v.evidence)
    assert v.verdict == case.verdict, text
    assert (v.service, v.endpoint) == ("svc", "g")
    assert case.min_conf <= v.confidence <= case.max_conf, (v.confidence, text)
    for needle in case.evidence:
        assert needle in text, (needle, text)
    assert v.blocked_fraction == case.fraction
    assert all(isinstance(e, str) and len(e) < 200 for e in v.evidence)


def test_every_verdict_value_is_covered_by_a_case() -> None:
    # partial at service level is covered below; the table must reach every other value
    covered = {c.verdict for c in CASES}
    assert covered == set(Verdict), set(Verdict) - covered


# --- repetition ---------------------------------------------------------------------


def test_a_block_must_be_reproduced_by_the_repeat_before_it_is_claimed() -> None:
    timeout = run("tcp", failure="generic_timeout_error", op=CONN)
    control = [run("tcp")]
    alone = judge_endpoint([timeout], control)
    agreeing = judge_endpoint(
        [timeout, run("tcp", failure="generic_timeout_error", op=CONN, variant="repeat")], control
    )
    disagreeing = judge_endpoint([timeout, run("tcp", variant="repeat")], control)
    assert alone.verdict == agreeing.verdict == Verdict.IP_BLOCKING
    assert alone.confidence < agreeing.confidence
    assert any("2 of 2 attempts failed the same way" in e for e in agreeing.evidence)
    # one timed-out SYN on a lossy path is not an IP block when the repeat connects
    assert disagreeing.verdict not in BLOCKING, disagreeing.evidence
    assert any("not reproduced" in e and "tcp/repeat" in e for e in disagreeing.evidence)


def test_a_transient_non_blocking_failure_next_to_a_success_is_ok() -> None:
    v = judge_endpoint(
        [
            run("tls", failure="connection_reset", op=HS),
            run("tls", failure="connection_reset", op=HS, variant="neutral_sni"),
            run("tls", variant="repeat"),
        ]
    )
    assert v.verdict == Verdict.OK
    assert v.confidence < 0.9
    assert any("not reproduced" in e for e in v.evidence)


def test_a_connect_failure_is_no_ip_block_when_another_probe_connects_there() -> None:
    v = judge_endpoint(
        [
            run("tcp", failure="generic_timeout_error", op=CONN),
            run("tcp", failure="generic_timeout_error", op=CONN, variant="repeat"),
            run("mtproto"),
        ],
        [run("tcp"), run("mtproto")],
    )
    assert v.verdict == Verdict.OK, v.evidence
    assert any("same address and port got through" in e for e in v.evidence)


def _sni_case(first: dict[str, Any], repeat: dict[str, Any] | None) -> Verdict:
    results = [
        run("tcp"),
        run("tls", failure="generic_timeout_error", op=HS, handshake=first),
        run("tls", failure="ssl_invalid_hostname", op=HS, variant="neutral_sni"),
    ]
    if repeat is not None:
        results.append(
            run("tls", failure="generic_timeout_error", op=HS, variant="repeat", handshake=repeat)
        )
    return judge_endpoint(results, [run("tls")]).verdict


SILENT = {"stage": "awaiting_server_hello", "bytes_received": 0, "server_messages": []}
ANSWERED = {
    "stage": "mid_handshake",
    "bytes_received": 2900,
    "server_messages": ["server_hello", "change_cipher_spec", "encrypted"],
}


def test_sni_filtering_needs_no_server_byte_and_a_repeat_that_agrees() -> None:
    assert _sni_case(SILENT, SILENT) == Verdict.TLS_SNI_FILTERING
    # the server answered the ClientHello: a congested path, however lucky the swap was
    assert _sni_case(ANSWERED, ANSWERED) not in BLOCKING
    assert _sni_case(SILENT, ANSWERED) not in BLOCKING
    # a record without message names: server bytes before a timeout still count
    assert _sni_case({"bytes_received": 1200}, {"bytes_received": 900}) not in BLOCKING
    # an injected alert is no handshake progress
    alert = {"bytes_received": 7, "server_messages": ["alert"]}
    assert _sni_case(alert, alert) == Verdict.TLS_SNI_FILTERING


def test_quic_silence_after_server_datagrams_is_not_quic_filtering() -> None:
    def verdict(received: int) -> Verdict:
        quic = run("quic", failure="generic_timeout_error", op=QHS, datagrams_received=received)
        return judge_endpoint([quic, run("quic_vn", offers_quic_v1=True)], [run("quic")]).verdict

    assert verdict(0) == Verdict.QUIC_FILTERING
    assert verdict(3) not in BLOCKING

    def typed(*types: str, received: int | None = None) -> Verdict:
        quic = run(
            "quic",
            failure="generic_timeout_error",
            op=QHS,
            datagrams_received=len(types) if received is None else received,
            server_packet_types=list(types),
        )
        return judge_endpoint([quic, run("quic_vn", offers_quic_v1=True)], [run("quic")]).verdict

    assert typed("initial", "handshake") not in BLOCKING  # the server answered the Initial
    assert typed("version_negotiation") == Verdict.QUIC_FILTERING  # a VN is no progress
    assert typed() == Verdict.QUIC_FILTERING
    # packet types kept but none parsed: datagrams that were not QUIC (a censor's junk)
    # are no handshake progress; only a record without packet types falls back to the count
    assert typed(received=2) == Verdict.QUIC_FILTERING


def test_one_stalled_transfer_connection_reads_by_the_others_speed() -> None:
    def verdict(stalled: int, median: float) -> Verdict:
        t = run(
            "transfer",
            failure="stall_after_bytes",
            op=READ,
            stalled_connections=stalled,
            connections_attempted=3,
            stalled_at_wire_bytes=[15000] * stalled,
            median_kbps=median,
            throttle_kbps=300.0,
        )
        return judge_endpoint([t], [run("transfer")]).verdict

    assert verdict(3, 900.0) == Verdict.STALL_AFTER_BYTES
    assert verdict(2, 900.0) == Verdict.STALL_AFTER_BYTES
    # the others crawled: a slow path, where a long silence is congestion's doing
    assert verdict(1, 120.0) == Verdict.THROTTLING
    # one stall the other connections do not reproduce accuses no one (loss can do it)
    assert verdict(1, 900.0) == Verdict.INCONCLUSIVE


def test_clean_results_over_several_rounds_are_only_ok() -> None:
    dcs = [
        endpoint(
            f"192.0.2.{i}", probes=("tcp", "mtproto"), ports=(443, 80), service="tg", name=f"dc{i}"
        )
        for i in range(1, 4)
    ]
    web = endpoint("web.example", probes=("dns", "tls"), ports=(443,), service="wa", name="web")
    rounds = []
    for _ in range(3):
        for ep in dcs:
            for port in (443, 80):
                rounds += [run("tcp", ep.host, port, ep=ep), run("mtproto", ep.host, port, ep=ep)]
        rounds += [dns(SYSTEM, A, ep=web), dns(DOH, A, ep=web), run("tls", A, ep=web)]
    verdicts = judge_round(rounds)
    assert {v.verdict for v in verdicts} == {Verdict.OK}
    assert [(v.service, v.endpoint) for v in verdicts] == [
        ("tg", "dc1"),
        ("tg", "dc2"),
        ("tg", "dc3"),
        ("tg", None),
        ("wa", "web"),
        ("wa", None),
    ]
    assert all(v.blocked_fraction is None for v in verdicts)


# --- services -------------------------------------------------------------------------


def _dcs(blocked: int, total: int = 5) -> tuple[list[ProbeResult], list[ProbeResult]]:
    results, control = [], []
    for i in range(1, total + 1):
        ep = endpoint(
            f"192.0.2.{i}", probes=("mtproto",), ports=(443,), service="telegram", name=f"dc{i}"
        )
        if i <= blocked:
            results.append(run("mtproto", ep.host, failure="generic_timeout_error", op=CONN, ep=ep))
        else:
            results.append(run("mtproto", ep.host, ep=ep))
        control.append(run("mtproto", ep.host, ep=ep))
    return results, control


def test_two_of_five_telegram_dcs_blocked_is_partial_0_4() -> None:
    results, control = _dcs(blocked=2)
    verdicts = judge_round(results, control)
    by_endpoint = {v.endpoint: v for v in verdicts}
    assert [by_endpoint[f"dc{i}"].verdict for i in range(1, 6)] == [
        Verdict.IP_BLOCKING,
        Verdict.IP_BLOCKING,
        Verdict.OK,
        Verdict.OK,
        Verdict.OK,
    ]
    service = by_endpoint[None]
    assert isinstance(service, ServiceVerdict)
    assert service.verdict == Verdict.PARTIAL
    assert service.blocked_fraction == 0.4
    assert "dc1: ip_blocking" in service.evidence[0]


def test_all_dcs_blocked_is_the_shared_verdict_never_ok_if_any() -> None:
    results, control = _dcs(blocked=5)
    service = judge_round(results, control)[-1]
    assert service.verdict == Verdict.IP_BLOCKING
    assert service.blocked_fraction is None
    # and OONI's "ok if any endpoint works" is never what we say: one open DC of five
    results, control = _dcs(blocked=4)
    service = judge_round(results, control)[-1]
    assert service.verdict == Verdict.PARTIAL and service.blocked_fraction == 0.8


@pytest.mark.parametrize(
    ("endpoints", "expected", "fraction"),
    [
        ([Verdict.OK, Verdict.OK], Verdict.OK, None),
        ([Verdict.TLS_SNI_FILTERING] * 3, Verdict.TLS_SNI_FILTERING, None),
        (
            [Verdict.IP_BLOCKING, Verdict.TLS_SNI_FILTERING, Verdict.IP_BLOCKING],
            Verdict.IP_BLOCKING,
            None,
        ),
        ([Verdict.UDP_BLOCKING, Verdict.OK], Verdict.PARTIAL, 0.5),
        ([Verdict.OK, Verdict.ENDPOINT_DOWN], Verdict.OK, None),
        ([Verdict.IP_BLOCKING, Verdict.ENDPOINT_DOWN, Verdict.OK], Verdict.PARTIAL, 0.5),
        ([Verdict.ENDPOINT_DOWN, Verdict.ENDPOINT_DOWN], Verdict.ENDPOINT_DOWN, None),
        ([Verdict.ENDPOINT_DOWN, Verdict.INCONCLUSIVE], Verdict.INCONCLUSIVE, None),
        ([Verdict.VANTAGE_OFFLINE, Verdict.VANTAGE_OFFLINE], Verdict.VANTAGE_OFFLINE, None),
    ],
)
def test_service_rules(endpoints: list[Verdict], expected: Verdict, fraction: float | None) -> None:
    eps = [EndpointVerdict("svc", f"e{i}", v, 0.8) for i, v in enumerate(endpoints)]
    service = judge_service(eps)
    assert service.verdict == expected
    assert service.blocked_fraction == fraction
    assert service.endpoint is None


def test_partial_endpoints_count_with_their_own_fraction() -> None:
    eps = [
        EndpointVerdict("svc", "a", Verdict.PARTIAL, 0.8, (), 0.5),
        EndpointVerdict("svc", "b", Verdict.OK, 0.9),
    ]
    service = judge_service(eps)
    assert service.verdict == Verdict.PARTIAL and service.blocked_fraction == 0.25
    both_partial = judge_service(
        [eps[0], EndpointVerdict("svc", "c", Verdict.PARTIAL, 0.8, (), 0.25)]
    )
    assert both_partial.verdict == Verdict.PARTIAL and both_partial.blocked_fraction == 0.38


def test_offline_round_is_vantage_offline_for_endpoints_and_services() -> None:
    results = [
        skipped("tls", A, SkipReason.VANTAGE_OFFLINE),
        skipped("tls", V6, SkipReason.IPV6_UNAVAILABLE),
    ]
    verdicts = judge_round(results)
    assert [v.verdict for v in verdicts] == [Verdict.VANTAGE_OFFLINE, Verdict.VANTAGE_OFFLINE]


def test_allowlist_regime_is_the_vantage_state_not_a_block_of_each_service() -> None:
    """FIELD.md B10: the round flags every result; failures read as the regime's."""
    dc1 = endpoint("192.0.2.1", probes=("tcp",), ports=(443,), service="tg", name="dc1")
    dc2 = endpoint("192.0.2.2", probes=("tcp",), ports=(443,), service="tg", name="dc2")
    ya = endpoint("198.51.100.1", probes=("tcp",), ports=(443,), service="ctl", role="control")
    regime = [ALLOWLIST_FLAG]
    timeout = {"failure": "generic_timeout_error", "op": CONN, "flags": regime}
    results = [
        run("tcp", "192.0.2.1", ep=dc1, **timeout),
        run("tcp", "192.0.2.2", ep=dc2, flags=regime),  # an allowlisted (working) endpoint
        run("tcp", "198.51.100.1", ep=ya, flags=regime),
    ]
    control = [run("tcp", "192.0.2.1", ep=dc1)]  # the control connects: ip_blocking alone
    by_key = {(v.service, v.endpoint): v for v in judge_round(results, control)}
    blocked = by_key[("tg", "dc1")]
    assert blocked.verdict == Verdict.ALLOWLIST_REGIME and blocked.blocked_fraction is None
    assert blocked.evidence[0].startswith("allowlist regime: only domestic controls answer")
    assert blocked.evidence[1].startswith("the rules alone would say ip_blocking")
    assert by_key[("tg", "dc2")].verdict == Verdict.OK
    assert by_key[("tg", None)].verdict == Verdict.ALLOWLIST_REGIME  # never "partial"
    assert by_key[("ctl", None)].verdict == Verdict.OK
    # the same results without the flag: an ordinary block
    plain = [replace(r, flags=()) for r in results]
    by_key = {(v.service, v.endpoint): v for v in judge_round(plain, control)}
    assert by_key[("tg", "dc1")].verdict == Verdict.IP_BLOCKING
    assert by_key[("tg", None)].verdict == Verdict.PARTIAL


def test_a_lying_resolver_under_an_allowlist_is_still_dns_tampering() -> None:
    flags = [ALLOWLIST_FLAG]
    results = [
        dns(SYSTEM, failure="dns_nxdomain_error", flags=flags),
        dns("tcp:192.0.2.53:53", A, flags=flags),
    ]
    assert judge_endpoint(results).verdict == Verdict.DNS_TAMPERING


def flow(loss: float, sent: int = 50, **kw: Any) -> ProbeResult:
    return run("stun", A, 3479, mode="flow", sent=sent, loss=loss, cutoff_s=None, **kw)


@pytest.mark.parametrize(
    ("ours", "sent", "theirs", "expected"),
    [
        (0.4, 50, 0.0, Verdict.UDP_BLOCKING),  # sustained loss, the control sees none
        (0.2, 50, 0.04, Verdict.UDP_BLOCKING),  # past the threshold, control nearly clean
        (0.14, 100, 0.0, Verdict.OK),  # below the threshold (15%)
        (0.5, 10, 0.0, Verdict.OK),  # 5 packets lost: too few to call it sustained
        (0.4, 50, 0.2, Verdict.OK),  # the control loses too: the path, not a censor
        (0.4, 50, None, Verdict.OK),  # no control: loss alone proves nothing
    ],
)
def test_sustained_call_flow_loss_is_udp_blocking_only_next_to_a_clean_control(
    ours: float, sent: int, theirs: float | None, expected: Verdict
) -> None:
    control = [] if theirs is None else [flow(theirs)]
    verdict = judge_endpoint([flow(ours, sent)], control)
    assert verdict.verdict == expected
    if expected == Verdict.UDP_BLOCKING:
        assert verdict.confidence == 0.85
        assert any(e.startswith(f"sustained loss: {ours:.0%} of {sent}") for e in verdict.evidence)


def test_a_partial_split_by_address_family_is_named() -> None:
    v4_ok, v6_blocked = run("tcp", A), run("tcp", V6, failure="generic_timeout_error", op=CONN)
    verdict = judge_endpoint([v4_ok, v6_blocked], [run("tcp", V6)])
    assert verdict.verdict == Verdict.PARTIAL
    assert (
        verdict.evidence[0]
        == "1 of 2 paths blocked (ip_blocking): only IPv6 is blocked, IPv4 works"
    )
    same_family = judge_endpoint(
        [v4_ok, run("tcp", B, failure="generic_timeout_error", op=CONN)], [run("tcp", B)]
    )
    assert same_family.evidence[0] == "1 of 2 paths blocked (ip_blocking)"


def test_more_than_one_forged_reply_is_counted_in_the_evidence() -> None:
    replies = [
        {"qtype": "A", "answers": ["10.10.34.35"]},
        {"qtype": "A", "answers": ["10.10.34.36"]},
        {"qtype": "A", "answers": [A]},
    ]
    udp = dns(
        "udp:192.0.2.53:53", "10.10.34.35", flags=["dns_injection_suspected"], replies=replies
    )
    verdict = judge_endpoint([udp, dns(DOH, A)])
    assert verdict.verdict == Verdict.DNS_TAMPERING
    assert f"3 differing replies to one A query (10.10.34.35; 10.10.34.36; {A}): injected" in (
        verdict.evidence
    )


def test_tcp_lying_with_udp_leaves_doh_as_the_evidence() -> None:
    results = [
        dns("udp:192.0.2.53:53", "10.10.34.35", failure="dns_bogon_error"),
        dns("tcp:192.0.2.53:53", "10.10.34.35", failure="dns_bogon_error"),
        dns(DOH, A),
    ]
    verdict = judge_endpoint(results)
    assert verdict.verdict == Verdict.DNS_TAMPERING and verdict.confidence == 0.95
    assert f"dns {DOH} ok {A}" in verdict.evidence
    assert verdict.evidence[-1] == (
        "bogon from the system/UDP resolver; DoH answer; TCP lies too (10.10.34.35)"
    )


def hello_swaps(shape: str | None, split: str | None) -> list[ProbeResult]:
    """The B4 swaps: ``tls/other_shape`` and ``tls/split_hello`` failing (or not)."""
    return [
        run("tls", failure=failure, op=HS if failure else None, variant=variant)
        for variant, failure in (("other_shape", shape), ("split_hello", split))
    ]


def test_another_client_hello_shape_getting_through_is_b4_even_without_control() -> None:
    reset = run("tls", failure="connection_reset", op=HS, handshake=RESET_AFTER_HELLO)
    neutral = run("tls", failure="connection_reset", op=HS, variant="neutral_sni")
    before = judge_endpoint([reset, neutral])
    assert before.verdict == Verdict.INCONCLUSIVE  # without the shape swap: nothing to say
    after = judge_endpoint([reset, neutral, *hello_swaps(None, "connection_reset")])
    assert after.verdict == Verdict.PROTOCOL_FILTERING and after.confidence == 0.85
    assert any("keys on the ClientHello fingerprint (B4)" in e for e in after.evidence)
    assert any("censor reassembles" in e for e in after.evidence)
    with_control = judge_endpoint([reset, neutral, *hello_swaps(None, None)], [run("tls")])
    assert with_control.confidence == 0.95


def test_sni_filter_with_the_client_hello_swaps_says_what_it_keys_on() -> None:
    reset = run("tls", failure="connection_reset", op=HS, handshake=RESET_AFTER_HELLO)
    again = run("tls", failure="connection_reset", op=HS, variant="repeat")
    neutral = run("tls", variant="neutral_sni")
    sni_only = judge_endpoint([reset, again, neutral, *hello_swaps("connection_reset", None)])
    assert sni_only.verdict == Verdict.TLS_SNI_FILTERING
    assert sni_only.evidence[1].endswith("the filter keys on the SNI")
    assert "does not reassemble" in sni_only.evidence[2]
    both = judge_endpoint([reset, again, neutral, *hello_swaps(None, "connection_reset")])
    assert both.verdict == Verdict.TLS_SNI_FILTERING
    assert "fingerprint together with the SNI" in both.evidence[1]


def test_without_control_other_services_working_lets_a_block_count() -> None:
    blocked_ep = endpoint("192.0.2.1", probes=("tcp",), ports=(443,), service="tg", name="dc1")
    other = endpoint(
        "198.51.100.1", probes=("tcp",), ports=(443,), service="ctl", name="neutral", role="control"
    )
    timeout = run("tcp", "192.0.2.1", failure="generic_timeout_error", op=CONN, ep=blocked_ep)
    alone = judge_round([timeout])
    assert alone[0].verdict == Verdict.INCONCLUSIVE  # maybe our own uplink: say nothing
    with_other = {
        v.endpoint: v for v in judge_round([timeout, run("tcp", "198.51.100.1", ep=other)])
    }
    assert with_other["dc1"].verdict == Verdict.IP_BLOCKING
    assert with_other["dc1"].confidence <= 0.5


# --- control in every accepted form ---------------------------------------------------


def test_control_as_api_records_gives_the_same_verdict_as_probe_results() -> None:
    results = [run("tls", failure="ssl_unknown_authority", op=HS, certificate=cert("aa" * 32))]
    control = [run("tls", certificate=cert("bb" * 32)), dns(SYSTEM, A)]
    store = ResultStore()
    store.record_many(control)
    payload = json.loads(json.dumps(results_json(store.snapshot())))  # over the wire
    observations = from_api(payload)
    assert {o.probe for o in observations} == {"tls", "dns"}
    from_results = judge_endpoint(results, control)
    from_records = judge_endpoint(results, payload["results"])
    from_observations = judge_endpoint(results, observations)
    assert from_results == from_records == from_observations
    assert from_results.verdict == Verdict.TLS_MITM and from_results.confidence >= 0.95


def test_minimal_normalised_form_is_enough_for_a_control() -> None:
    control = Observation("svc", "g", "tcp", A, 443, ok=True)
    v = judge_endpoint([run("tcp", failure="generic_timeout_error", op=CONN)], [control])
    assert v.verdict == Verdict.IP_BLOCKING
    assert "control tcp 192.0.2.10:443 ok" in v.evidence


def test_control_of_a_hostname_endpoint_at_another_address_still_counts() -> None:
    # the control vantage's DNS gave it another address of the same CDN
    control = [run("tls", "198.51.100.20")]
    failed = [
        run("tls", failure="connection_reset", op=HS),
        run("tls", failure="connection_reset", op=HS, variant="repeat"),
    ]
    v = judge_endpoint(failed, control)
    assert v.verdict == Verdict.TLS_SNI_FILTERING  # no swap: the lower-confidence reading
    assert v.confidence == 0.65  # 0.6, and the repeat agreed


def test_control_results_of_other_endpoints_are_ignored() -> None:
    other = endpoint("192.0.2.99", probes=("tcp",), ports=(443,), service="svc", name="other")
    v = judge_endpoint([run("tcp", failure="connection_refused", op=CONN)], [run("tcp", ep=other)])
    assert v.verdict == Verdict.INCONCLUSIVE


def test_a_path_is_tcp_or_udp_as_the_evidence_says() -> None:
    # no _UDP_PROBES list: the probe's evidence knows its transport, and a stun run over
    # TCP says so in its record
    assert Observation("svc", "g", "quic", A, 443, ok=True).l4 == "udp"  # no evidence given
    assert Observation("svc", "g", "tls", A, 443, ok=True).l4 == "tcp"
    record = {"service": "svc", "endpoint": "g", "probe": "stun", "address": A, "port": 3478}
    assert from_record({**record, "ok": True}).l4 == "udp"
    assert from_record({**record, "ok": True, "details": {"transport": "tcp"}}).l4 == "tcp"
    assert from_result(stun_silence()).l4 == "udp"


# --- contracts ------------------------------------------------------------------------


def test_verdicts_fit_the_result_store_and_its_default_vocabulary() -> None:
    assert set(VERDICTS) == {str(v) for v in Verdict}
    results, control = _dcs(blocked=2)
    store = ResultStore()
    store.set_verdicts(judge_round(results, control))  # raises on a value outside VERDICTS
    assert len(store.snapshot().verdicts) == 6
    assert set(Verdict) > BLOCKING


def test_judge_endpoint_refuses_mixed_or_empty_input() -> None:
    other = endpoint("192.0.2.99", probes=("tcp",), ports=(443,), service="svc", name="other")
    with pytest.raises(ValueError, match="one endpoint"):
        judge_endpoint([run("tcp"), run("tcp", ep=other)])
    with pytest.raises(ValueError, match="at least one"):
        judge_endpoint([])
    with pytest.raises(ValueError, match="at least one"):
        judge_service([])


def test_verdicts_are_frozen_and_keep_every_evidence_line_once() -> None:
    many = [
        run("tcp", f"192.0.2.{i}", failure="generic_timeout_error", op=CONN) for i in range(1, 40)
    ]
    v = judge_endpoint(many + many[:5], [run("tcp", f"192.0.2.{i}") for i in range(1, 40)])
    assert v.verdict == Verdict.IP_BLOCKING
    assert len(v.evidence) > 39  # every address, none cut off for display
    assert len(set(v.evidence)) == len(v.evidence)  # repeats dropped
    assert not any(e.startswith("… and ") for e in v.evidence)
    with pytest.raises(AttributeError):
        v.verdict = Verdict.OK  # type: ignore[misc]


def test_docs_describe_every_verdict() -> None:
    doc = (Path(__file__).resolve().parent.parent / "docs" / "verdicts.md").read_text()
    for value in Verdict:
        assert f"| `{value}` |" in doc, value


# --- review: inputs that used to mislead the engine -----------------------------------


def test_a_failed_control_without_its_operation_does_not_confirm_an_ip_block() -> None:
    # a control record that lost ``failed_operation`` (hand-made or older JSON) says
    # nothing about whether it connected: it must not count as "the control connects"
    control = {
        "service": "svc",
        "endpoint": "g",
        "probe": "tcp",
        "address": A,
        "port": 443,
        "ok": False,
        "failure": "generic_timeout_error",
    }
    v = judge_endpoint([run("tcp", failure="generic_timeout_error", op=CONN)], [control])
    assert v.verdict not in BLOCKING, v.evidence


def test_attempts_failing_in_different_ways_accuse_no_one() -> None:
    first = run("tls", failure="connection_reset", op=HS)
    repeat = run("tls", failure="generic_timeout_error", op=CONN, variant="repeat")
    control = [run("tls")]
    v = judge_endpoint([first, repeat], control)
    assert not any("the same way" in e for e in v.evidence), v.evidence
    assert any("2 of 2 attempts failed, in different ways" in e for e in v.evidence)
    assert v.verdict not in BLOCKING  # the repeat does not reproduce the failure class


def test_one_blocked_endpoint_among_unknown_ones_claims_only_its_share() -> None:
    # 1 of 5 endpoints blocked, the others down or inconclusive: the service verdict may
    # name the block, but not with the confidence of a service-wide block
    eps = [EndpointVerdict("svc", "e0", Verdict.IP_BLOCKING, 0.85)] + [
        EndpointVerdict("svc", f"e{i}", v, 0.85)
        for i, v in enumerate([Verdict.ENDPOINT_DOWN] * 2 + [Verdict.INCONCLUSIVE] * 2, 1)
    ]
    service = judge_service(eps)
    assert service.verdict == Verdict.IP_BLOCKING
    assert service.confidence == round(0.85 / 5, 2)
    every = judge_service(
        [EndpointVerdict("svc", f"e{i}", Verdict.IP_BLOCKING, 0.85) for i in range(5)]
    )
    assert every.confidence == 0.85


@pytest.mark.parametrize("failure", ["host_unreachable", "network_unreachable"])
def test_icmp_unreachable_on_udp_is_udp_blocking_not_a_content_filter(failure: str) -> None:
    stun = judge_endpoint(
        [run("stun", A, 3478, failure=failure, op=READ, mode="binding", transport="udp")],
        [run("stun", A, 3478, mode="binding", transport="udp")],
    )
    assert stun.verdict == Verdict.UDP_BLOCKING, stun.evidence
    assert not any("not a STUN reply" in e for e in stun.evidence)
    quic = judge_endpoint([run("quic", failure=failure, op=QHS)], [run("quic")])
    assert quic.verdict == Verdict.UDP_BLOCKING, quic.evidence


@pytest.mark.parametrize(
    "details",
    [
        {"handshake": "awaiting_server_hello"},
        {"control": True},
        {"stalled_at_bytes": 16384},
        {"answers": {"A": "192.0.2.10"}},
        {"certificate": "aa"},
    ],
    ids=["handshake_str", "control_bool", "stalled_int", "answers_str", "certificate_str"],
)
def test_unexpected_details_shapes_never_crash_the_engine(details: dict[str, Any]) -> None:
    # archived or hand-made records are judged too; a crash in the daemon's judge loop
    # would leave every exported verdict stale
    results = [
        run("tls", failure="connection_reset", op=HS, **details),
        run("stun", A, 3478, failure="udp_no_response", op=READ, **details),
        run("transfer", failure="stall_after_bytes", op=READ, **details),
        run("dns", None, resolver=SYSTEM, failure="dns_bogon_error", op=RES, **details),
        run("quic", failure="ssl_unknown_authority", op=QHS, **details),
    ]
    v = judge_endpoint(results, [run("tls", **details), run("quic", **details)])
    assert v.verdict in set(Verdict)
    assert not any(",0 …" in e or ".,1" in e for e in v.evidence), v.evidence


def test_system_resolver_evidence_names_the_system_resolver() -> None:
    v = judge_endpoint([run("dns", None, failure="dns_nxdomain_error", op=RES), dns(DOH, A)])
    assert v.verdict == Verdict.DNS_TAMPERING
    assert "dns system dns_nxdomain_error (resolve)" in v.evidence


# --- docs/verdicts.md rule table rows that no case above pinned -----------------------

DOC_ROWS = [
    Case(
        "bogon_alone_is_fair",
        [dns(SYSTEM, "127.0.0.1", failure="dns_bogon_error")],
        Verdict.DNS_TAMPERING,
        min_conf=0.6,
        max_conf=0.6,
    ),
    Case(
        "mismatch_disjoint_from_clean_in_prefix_answers_is_fair",
        [dns(SYSTEM, "198.51.100.7", flags=["dns_doh_mismatch"]), dns(DOH, A)],
        Verdict.DNS_TAMPERING,
        min_conf=0.6,
        max_conf=0.6,
        evidence=("inconsistent with the clean resolvers",),
    ),
    Case(
        "held_tcp_reset_after_handshake_with_control",
        [run("tcp", failure="connection_reset", op=READ, hold_s=5.0)],
        Verdict.IP_BLOCKING,
        control=[run("tcp")],
        min_conf=0.7,
        max_conf=0.7,
        evidence=("killed after the TCP handshake",),
    ),
    Case(
        "same_certificate_as_the_control_is_our_trust_store",
        [run("tls", failure="ssl_unknown_authority", op=HS, certificate=cert("aa" * 32))],
        Verdict.INCONCLUSIVE,
        control=[run("tls", certificate=cert("aa" * 32))],
        min_conf=0.45,
        max_conf=0.45,
        evidence=("trust store differs",),
    ),
    Case(
        "certificate_errors_at_both_ends_with_different_certificates",
        [run("tls", failure="ssl_unknown_authority", op=HS, certificate=cert("aa" * 32))],
        Verdict.TLS_MITM,
        control=[run("tls", failure="ssl_invalid_hostname", op=HS, certificate=cert("bb" * 32))],
        min_conf=0.7,
        max_conf=0.7,
    ),
    Case(
        "hostname_mismatch_without_control_is_inconclusive",
        [run("tls", failure="ssl_invalid_hostname", op=HS, certificate=cert("aa" * 32))],
        Verdict.INCONCLUSIVE,
    ),
    Case(
        "quic_certificate_differing_from_the_controls_is_mitm",
        [run("quic", failure="ssl_invalid_hostname", op=QHS, certificate=cert("aa" * 32))],
        Verdict.TLS_MITM,
        control=[run("quic", certificate=cert("bb" * 32))],
        min_conf=0.95,
        max_conf=0.95,
        evidence=("differs from the control's",),
    ),
    Case(
        "quic_vn_alone_silent_while_tcp_connects_is_udp_blocking",
        [run("quic_vn", failure="udp_no_response", op=READ), run("tcp")],
        Verdict.UDP_BLOCKING,
        min_conf=0.7,
        max_conf=0.7,
        evidence=("UDP silent while TCP to the same address works",),
    ),
    Case(
        "quic_silent_but_the_server_offers_no_v1",
        [
            run("quic", failure="generic_timeout_error", op=QHS),
            run("quic_vn", variant="swap", offers_quic_v1=False),
        ],
        Verdict.INCONCLUSIVE,
        evidence=("does not offer QUIC v1",),
    ),
    Case(
        "quic_silent_vn_offering_unknown_is_fair",
        [run("quic", failure="generic_timeout_error", op=QHS), run("quic_vn", variant="swap")],
        Verdict.QUIC_FILTERING,
        min_conf=0.6,
        max_conf=0.6,
    ),
    Case(
        "quic_silent_no_vn_with_control",
        [run("quic", failure="generic_timeout_error", op=QHS)],
        Verdict.QUIC_FILTERING,
        control=[run("quic")],
        min_conf=0.6,
        max_conf=0.6,
        evidence=("no version-negotiation probe",),
    ),
    Case(
        "stun_answered_on_the_follow_up_is_transient",
        [
            run("stun", A, 3478, failure="udp_no_response", op=READ),
            run("stun", A, 3478, variant="random_udp", control={"sent": 3, "replied": False}),
        ],
        Verdict.INCONCLUSIVE,
        evidence=("STUN answered on the follow-up",),
    ),
    Case(
        "stun_bad_response_with_control",
        [run("stun", A, 3478, failure="bad_response", op=READ)],
        Verdict.PROTOCOL_FILTERING,
        control=[run("stun", A, 3478)],
        min_conf=0.6,
        max_conf=0.6,
    ),
    Case(
        "transfer_read_timeout_without_control_is_weak_b5",
        [run("transfer", failure="generic_timeout_error", op=READ)],
        Verdict.STALL_AFTER_BYTES,
        min_conf=0.45,
        max_conf=0.45,
        evidence=("B5 stall",),
    ),
    Case(
        "transfer_reset_in_read_with_control",
        [run("transfer", failure="connection_reset", op=READ)],
        Verdict.PROTOCOL_FILTERING,
        control=[run("transfer")],
        min_conf=0.7,
        max_conf=0.7,
    ),
    Case(
        "transfer_reset_in_read_without_control",
        [run("transfer", failure="connection_reset", op=READ)],
        Verdict.INCONCLUSIVE,
    ),
]


@pytest.mark.parametrize("case", DOC_ROWS, ids=[c.id for c in DOC_ROWS])
def test_doc_rule_rows(case: Case) -> None:
    test_endpoint_verdicts(case)


def test_the_control_picked_does_not_depend_on_its_order() -> None:
    # the control failed twice (two rounds, or a first run and a repeat): the run that
    # failed our way is the one compared, whichever came first
    ours = [run("tcp", failure="generic_timeout_error", op=CONN)]
    timeout = run("tcp", failure="generic_timeout_error", op=CONN)
    refused = run("tcp", failure="connection_refused", op=CONN)
    first = judge_endpoint(ours, [timeout, refused])
    second = judge_endpoint(ours, [refused, timeout])
    assert first == second
    assert first.verdict == Verdict.ENDPOINT_DOWN and first.confidence == 0.85


def test_a_lone_flag_string_in_a_control_record_is_one_flag() -> None:
    record = {
        "service": "s",
        "endpoint": "e",
        "probe": "dns",
        "address": None,
        "port": None,
        "ok": True,
        "failure": None,
        "flags": "dns_injection_suspected",
    }
    assert from_record(record).flags == ("dns_injection_suspected",)
    assert from_record({**record, "flags": ["a", "b"]}).flags == ("a", "b")


def test_one_address_blocked_while_another_of_the_same_endpoint_works_is_partial() -> None:
    """No control and no other endpoint: the working sibling address still shows the
    vantage is alive, so the dead one is not hidden behind "ok" (OONI's any-works rule)."""
    results = [
        run("tcp", A),
        run("tcp", B, failure="generic_timeout_error", op=CONN),
        run("tcp", B, failure="generic_timeout_error", op=CONN, variant="repeat"),
    ]
    v = judge_endpoint(results)
    assert v.verdict == Verdict.PARTIAL
    assert v.blocked_fraction == 0.5
    assert any("another address of this endpoint connects" in e for e in v.evidence)
    # a single address that fails with nothing else alive proves nothing
    lone = judge_endpoint([run("tcp", B, failure="generic_timeout_error", op=CONN)])
    assert lone.verdict == Verdict.INCONCLUSIVE


def test_an_app_handshake_that_got_part_of_its_reply_is_not_protocol_filtering() -> None:
    def verdict(received: int) -> Verdict:
        failed = run("mtproto", failure="generic_timeout_error", op=READ, bytes_received=received)
        return judge_endpoint([run("tcp"), failed], [run("mtproto")]).verdict

    assert verdict(0) == Verdict.PROTOCOL_FILTERING
    assert verdict(40) not in BLOCKING


def test_api_verdicts_carry_the_blocked_fraction() -> None:
    """/api/results shows the same verdict fields as `probe once --format json`."""
    results = [run("tcp", "192.0.2.1", failure="generic_timeout_error", op=CONN), run("tcp")]
    store = ResultStore()
    store.record_many(results)
    store.set_verdicts(judge_round(results))
    verdicts = results_json(store.snapshot())["verdicts"]
    assert verdicts and all("blocked_fraction" in v for v in verdicts)
    assert any(v["blocked_fraction"] not in (None, 0) for v in verdicts)


def test_one_handshake_failure_nothing_reproduced_is_no_sni_filter() -> None:
    # 15 % loss: the transfer's handshake got no server byte, the neutral SNI got through
    # by luck, and the tls probe's handshake with the same name completed
    swap = run("tls", failure="ssl_invalid_hostname", op=HS, variant="neutral_sni")
    lone = run("transfer", failure="generic_timeout_error", op=HS, handshake=SILENT)
    v = judge_endpoint([run("tls"), lone, swap], [run("transfer"), run("tls")])
    assert v.verdict not in BLOCKING, v.evidence
    assert any("handshake completes on this address" in e for e in v.evidence)
    alone = judge_endpoint([lone, swap], [run("transfer")])
    assert alone.verdict not in BLOCKING, alone.evidence
    assert any("nothing reproduced it" in e for e in alone.evidence)
