"""Swap tests and repeats: which follow-ups a pass of results asks for, and one round
end to end against real loopback servers (an SNI-filtering relay in front of a TLS server)."""

from __future__ import annotations

import json
from typing import Any

import pytest

from probe.config.settings import AgentConfig, Timeouts, TLSOptions
from probe.lab.certs import CertificateAuthority
from probe.lab.servers.sni_filter import SNIFilterRelay
from probe.lab.servers.tls import TLSServer
from probe.model import (
    Endpoint,
    Operation,
    ProbeResult,
    ProbeSpec,
    Service,
    SkipReason,
    Target,
    freeze,
)
from probe.output import json_lines, table
from probe.probes import REGISTRY
from probe.probes.base import Recorder
from probe.probes.quic_vn import QuicVnParams
from probe.probes.stun import StunParams
from probe.probes.tls import TLSParams
from probe.round import run_round
from probe.swaps import DEFAULT_NEUTRAL_SNI, followups
from probe.verdict.vocabulary import Verdict
from tests.helpers import endpoint

A = "192.0.2.10"  # never contacted: followups() is pure
RESOLVERS = ["system", "udp:192.0.2.53:53", "tcp:192.0.2.53:53", "doh:https://dns.example/q"]
EP = endpoint(
    "g.example",
    probes={"tls": {"alpn": ["h2"]}, "tcp": {}, "quic": {}, "stun": {}, "mtproto": {}},
    ports=(443,),
    service="svc",
    name="g",
)


def failed(
    probe: str,
    failure: str,
    op: Operation,
    *,
    address: str | None = A,
    port: int | None = 443,
    resolver: str | None = None,
    variant: str = "",
    ep: Endpoint = EP,
    overrides: dict[str, Any] | None = None,
) -> ProbeResult:
    spec = ep.spec(probe)
    params = REGISTRY[probe].parse(overrides, spec.params if spec else None) if overrides else None
    target = Target(
        ep, probe, address, port, resolver, "system", variant, freeze(overrides or {}), params
    )
    return Recorder(target).fail(failure, op)


def ok(
    probe: str, *, address: str | None = A, resolver: str | None = None, flags: tuple[str, ...] = ()
) -> ProbeResult:
    rec = Recorder(Target(EP, probe, address, 443 if address else None, resolver))
    for flag in flags:
        rec.flag(flag)
    return rec.ok()


HELLO = ["tls/other_shape", "tls/split_hello"]  # the B4 ClientHello swaps


def labels(targets: list[Target]) -> list[str]:
    return sorted(t.label for t in targets)


# --- which follow-ups ---------------------------------------------------------------


def test_tls_reset_in_handshake_gets_a_neutral_sni_swap_and_a_repeat() -> None:
    out = followups([failed("tls", "connection_reset", Operation.TLS_HANDSHAKE)])
    assert labels(out) == sorted(["tls/neutral_sni", *HELLO, "tls/repeat"])
    swap = next(t for t in out if t.variant == "neutral_sni")
    assert (swap.address, swap.port, swap.address_source) == (A, 443, "system")
    # the override replaces only the SNI: the spec's other params stay
    assert swap.params == TLSParams(alpn=("h2",), sni=DEFAULT_NEUTRAL_SNI, sni_given=True)
    assert swap.overrides == {"sni": DEFAULT_NEUTRAL_SNI}  # for the record
    repeat = next(t for t in out if t.variant == "repeat")
    assert repeat.params == TLSParams(alpn=("h2",)) and repeat.key() != swap.key()
    shape = next(t for t in out if t.variant == "other_shape")
    assert shape.params == TLSParams(alpn=("h2",), shape="alt")


def test_every_handshake_interference_triggers_the_swap_but_certificates_do_not() -> None:
    for failure in ("generic_timeout_error", "eof_error", "ssl_failed_handshake"):
        out = followups([failed("tls", failure, Operation.TLS_HANDSHAKE)])
        assert "tls/neutral_sni" in labels(out), failure
    for failure in ("ssl_invalid_hostname", "ssl_unknown_authority", "ssl_invalid_certificate"):
        # the handshake got through: a neutral SNI adds nothing; a repeat still runs
        assert labels(followups([failed("tls", failure, Operation.TLS_HANDSHAKE)])) == [
            "tls/repeat"
        ]
    # a connect failure is not about the SNI
    assert labels(followups([failed("tls", "generic_timeout_error", Operation.CONNECT)])) == [
        "tls/repeat"
    ]


def test_neutral_name_is_configurable_and_never_swapped_for_itself() -> None:
    out = followups(
        [failed("tls", "connection_reset", Operation.TLS_HANDSHAKE)], neutral_sni="neutral.test"
    )
    swap = next(t for t in out if t.variant == "neutral_sni")
    assert TLSParams.of(swap).sni == "neutral.test"
    already = failed(
        "tls", "connection_reset", Operation.TLS_HANDSHAKE, overrides={"sni": "neutral.test"}
    )
    assert labels(followups([already], neutral_sni="neutral.test")) == sorted(
        [*HELLO, "tls/repeat"]
    )


def test_transfer_handshake_failure_gets_a_tls_swap_but_no_repeat() -> None:
    out = followups([failed("transfer", "connection_reset", Operation.TLS_HANDSHAKE)])
    assert labels(out) == ["tls/neutral_sni", *HELLO]
    assert followups([failed("transfer", "stall_after_bytes", Operation.READ)]) == []


def test_quic_failure_gets_a_version_negotiation_swap() -> None:
    out = followups([failed("quic", "generic_timeout_error", Operation.QUIC_HANDSHAKE)])
    # and a repeat: a QUIC filter must be reproduced before it is claimed
    assert sorted(labels(out)) == ["quic/repeat", "quic_vn/swap"]
    vn = next(t for t in out if t.probe == "quic_vn")
    assert (vn.probe, vn.address, vn.port) == ("quic_vn", A, 443)
    # the endpoint has no quic_vn spec: the target is made anyway, with default params
    assert EP.spec("quic_vn") is None and QuicVnParams.of(vn) == QuicVnParams()


def test_quic_swap_is_skipped_when_quic_vn_already_ran_or_the_handshake_got_through() -> None:
    first_pass = [
        failed("quic", "generic_timeout_error", Operation.QUIC_HANDSHAKE),
        ok("quic_vn"),
    ]
    assert labels(followups(first_pass)) == ["quic/repeat"]
    cert_error = [failed("quic", "ssl_unknown_authority", Operation.QUIC_HANDSHAKE)]
    assert labels(followups(cert_error)) == ["quic/repeat"]


def test_dns_failure_from_the_system_resolver_asks_tcp_and_doh() -> None:
    nx = failed(
        "dns", "dns_nxdomain_error", Operation.RESOLVE, address=None, port=None, resolver="system"
    )
    out = followups([nx], resolvers=RESOLVERS)
    assert labels(out) == ["dns/swap", "dns/swap"]
    assert sorted(t.resolver or "" for t in out) == [RESOLVERS[3], RESOLVERS[2]]
    # a resolver already asked in the first pass is not asked again
    doh_done = ok("dns", address=None, resolver=RESOLVERS[3])
    assert [t.resolver for t in followups([nx, doh_done], resolvers=RESOLVERS)] == [RESOLVERS[2]]
    # no TCP/DoH resolver configured: nothing to swap to
    assert followups([nx], resolvers=["system", "udp:192.0.2.53:53"]) == []


def test_dns_tamper_flags_on_a_success_trigger_the_swap_too() -> None:
    clean = ok("dns", address=None, resolver="system")
    outside = ok("dns", address=None, resolver="system", flags=("dns_answer_outside_prefixes",))
    assert followups([clean], resolvers=RESOLVERS) == []
    assert len(followups([outside], resolvers=RESOLVERS)) == 2
    # a failing DoH resolver is the control itself: nothing to swap to
    doh = failed(
        "dns",
        "generic_timeout_error",
        Operation.RESOLVE,
        address=None,
        port=None,
        resolver=RESOLVERS[3],
    )
    assert followups([doh], resolvers=RESOLVERS) == []


def test_stun_silence_gets_the_random_udp_control() -> None:
    silent = failed("stun", "udp_no_response", Operation.READ, port=3478)
    out = followups([silent])
    assert labels(out) == ["stun/random_udp"]
    assert out[0].params == StunParams(control=True) and out[0].port == 3478
    flow_ep = endpoint(
        "g.example", probes={"stun": {"mode": "flow"}}, ports=(3478,), service="svc", name="g"
    )
    assert (
        followups([failed("stun", "udp_no_response", Operation.READ, port=3478, ep=flow_ep)]) == []
    )
    with_control = failed(
        "stun", "udp_no_response", Operation.READ, port=3478, overrides={"control": True}
    )
    assert followups([with_control]) == []


def test_overrides_are_parsed_when_planned_and_never_dropped() -> None:
    # planned: over the endpoint's params, once; a hand-built target whose overrides were
    # never parsed would run without them, so it refuses to say what its params are
    out = followups([failed("stun", "udp_no_response", Operation.READ, port=3478)])
    assert out[0].variant_params == StunParams(control=True)
    hand_built = Target(EP, "stun", A, 3478, variant="random_udp", overrides={"control": True})
    with pytest.raises(ValueError, match="overrides without parsed variant_params"):
        StunParams.of(hand_built)


def test_app_failures_are_repeated_once() -> None:
    out = followups([failed("mtproto", "connection_reset", Operation.READ)])
    assert labels(out) == ["mtproto/repeat"]
    assert labels(followups([failed("tcp", "connection_refused", Operation.CONNECT)])) == [
        "tcp/repeat"
    ]


def test_bounded_never_a_follow_up_of_a_follow_up_and_one_of_each_kind() -> None:
    reset = failed("tls", "connection_reset", Operation.TLS_HANDSHAKE)
    first = followups([reset, reset])  # the same target twice (e.g. two rounds)
    assert labels(first) == sorted(["tls/neutral_sni", *HELLO, "tls/repeat"])
    # their own failures ask for nothing more
    second_pass = [
        failed("tls", "connection_reset", Operation.TLS_HANDSHAKE, variant=t.variant) for t in first
    ]
    assert followups(second_pass) == []
    # and a pass that already holds its follow-ups plans none again
    assert followups([reset, *second_pass]) == []


def test_successes_and_skips_need_no_follow_up() -> None:
    skipped = Recorder(Target(EP, "tls", A, 443)).skip(SkipReason.VANTAGE_OFFLINE)
    assert followups([ok("tls"), ok("tcp"), skipped]) == []


# --- end to end through run_round -------------------------------------------------------


@pytest.mark.parametrize("host", ["127.0.0.1", "::1"])
async def test_round_runs_the_swap_and_judges_sni_filtering(
    host: str, ca: CertificateAuthority, ca_file: str
) -> None:
    name = "blocked.example"
    async with (
        TLSServer(host, cert=ca.issue(name)) as upstream,
        SNIFilterRelay(host, upstream=(host, upstream.port), blocked=[name]) as censor,
    ):

        def ep(endpoint_name: str, port: int) -> Endpoint:
            return Endpoint(
                "lab",
                endpoint_name,
                host,
                (port,),
                "tcp",
                "signalling",
                (ProbeSpec("tls"),),
                sni=name,
                source="test",
            )

        config = AgentConfig(
            services=(
                Service("lab", "Lab", (ep("filtered", censor.port), ep("open", upstream.port))),
            ),
            timeouts=Timeouts(connect_s=2.0, tls_s=2.0),
            tls=TLSOptions(ca_file=ca_file),
        )
        report = await run_round(config)

    by_label = {(r.target.endpoint.name, r.target.label): r for r in report.results}
    assert set(by_label) == {
        ("filtered", "tls"),
        ("filtered", "tls/neutral_sni"),
        ("filtered", "tls/other_shape"),
        ("filtered", "tls/split_hello"),
        ("filtered", "tls/repeat"),
        ("open", "tls"),
    }
    assert by_label[("filtered", "tls")].failure == "connection_reset"
    # the swap ran through the censor with a neutral name, reached the server, and got its
    # certificate for the blocked name: a mismatch, which still proves the path carries TLS
    assert by_label[("filtered", "tls/neutral_sni")].failure == "ssl_invalid_hostname"
    assert by_label[("filtered", "tls/neutral_sni")].details["sni"] == DEFAULT_NEUTRAL_SNI
    # the relay reads the whole first record: another shape with the blocked name, and the
    # same ClientHello in two segments, are reset too (it reassembles)
    for label in HELLO:
        assert by_label[("filtered", label)].failure == "connection_reset"
    assert by_label[("filtered", "tls/split_hello")].details["client_hello_split_at"] > 0
    assert censor.blocked_hellos == 4 and censor.relayed >= 1
    assert by_label[("open", "tls")].ok

    verdicts = {(v.service, v.endpoint): v for v in report.verdicts}
    filtered = verdicts[("lab", "filtered")]
    assert filtered.verdict == Verdict.TLS_SNI_FILTERING and filtered.confidence >= 0.85
    assert any("tls/neutral_sni" in e and "ssl_invalid_hostname" in e for e in filtered.evidence)
    assert verdicts[("lab", "open")].verdict == Verdict.OK
    service = verdicts[("lab", None)]
    assert service.verdict == Verdict.PARTIAL and service.blocked_fraction == 0.5

    # and both renderings carry them
    text = table(report)
    assert "tls_sni_filtering" in text and text.splitlines()[-1].startswith("vantage ")
    records = [json.loads(line) for line in json_lines(report)]
    kinds = [r["type"] for r in records]
    assert kinds == ["result"] * 6 + ["verdict"] * 3
    assert records[-1] == {
        **records[-1],
        "level": "service",
        "endpoint": None,
        "verdict": "partial",
        "blocked_fraction": 0.5,
    }


async def test_silent_sni_drop_is_judged_the_same_way(
    ca: CertificateAuthority, ca_file: str
) -> None:
    name = "blocked.example"
    async with (
        TLSServer("127.0.0.1", cert=ca.issue(name)) as upstream,
        SNIFilterRelay(
            "127.0.0.1", upstream=("127.0.0.1", upstream.port), blocked=[name], action="hang"
        ) as censor,
    ):
        ep = Endpoint(
            "lab", "filtered", "127.0.0.1", (censor.port,), "tcp", "signalling",
            (ProbeSpec("tls"),), sni=name, source="test",
        )  # fmt: skip
        config = AgentConfig(
            services=(Service("lab", "Lab", (ep,)),),
            timeouts=Timeouts(connect_s=2.0, tls_s=0.5),
            tls=TLSOptions(ca_file=ca_file),
        )
        report = await run_round(config)
    first = next(r for r in report.results if r.target.label == "tls")
    assert first.failure == "generic_timeout_error"
    assert first.details["handshake"]["stage"] == "awaiting_server_hello"
    endpoint_verdict = report.verdicts[0]
    assert endpoint_verdict.verdict == Verdict.TLS_SNI_FILTERING
    assert any("awaiting_server_hello" in e for e in endpoint_verdict.evidence)


def test_relay_refuses_an_unknown_action() -> None:
    with pytest.raises(ValueError, match="reset or hang"):
        SNIFilterRelay("127.0.0.1", upstream=("127.0.0.1", 1), blocked=["x"], action="drop")  # type: ignore[arg-type]
