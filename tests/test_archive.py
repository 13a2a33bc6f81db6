"""The measurement archive: OONI envelope, crash-safe appends, rotation, retention, reader."""

from __future__ import annotations

import base64
import gzip
import ipaddress
import json
import os
import platform
import re
import select
import shutil
import signal
import ssl
import subprocess
import sys
import textwrap
from collections.abc import Iterator
from dataclasses import replace
from datetime import UTC, datetime, timedelta, timezone
from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, given
from hypothesis import settings as fuzz_settings
from hypothesis import strategies as st

from probe.archive import (
    CURRENT_NAME,
    ArchiveWriter,
    ReadStats,
    envelope,
    iter_archive,
    result_fields,
    to_jsonable,
)
from probe.config.settings import AgentConfig, ArchiveSettings, Resolvers
from probe.evidence import (
    DnsEvidence,
    Evidence,
    IcmpReport,
    QuicEvidence,
    StunEvidence,
    TlsEvidence,
    TlsNegotiated,
    TransferConnection,
    TransferEvidence,
    TransferSummary,
    evidence_from_json,
)
from probe.lab.certs import CertificateAuthority
from probe.lab.servers.dns import AnswerTable, DNSServer
from probe.lab.servers.tls import TLSServer
from probe.model import Operation, ProbeResult, SkipReason, Target, Vantage, freeze
from probe.probes.dns import probe as dns_probe
from probe.probes.stun import probe as stun_probe
from probe.probes.tls import probe as tls_probe
from probe.records import read_result_record, result_record
from probe.verdict.aggregate import judge_round
from probe.verdict.observations import from_fields
from tests.helpers import RawEvidence, settings, target, unbound_udp_port

T0 = datetime(2025, 3, 1, 12, 0, 5, 250000, tzinfo=UTC)
VANTAGE = Vantage("msk-1", "RU", "AS12389", "test")
REPO = Path(__file__).resolve().parent.parent

# Data only: nothing in this file opens a network socket.
DC1 = target("mtproto", "192.0.2.10", 443, service="telegram", name="dc1")
G_TLS = target("tls", "192.0.2.21", 443, host="g.whatsapp.example", service="whatsapp", name="g")
STUN = target(
    "stun",
    "2001:db8::7",
    3478,
    service="whatsapp",
    name="relay",
    transport="udp",
    role="call-relay",
)
DNS = target(
    "dns", None, None, host="web.whatsapp.example", resolver="udp:127.0.0.1:53", service="whatsapp"
)


def result(
    t: Target,
    *,
    at: datetime = T0,
    failure: str | None = None,
    op: Operation | None = None,
    phases: dict[str, float] | None = None,
    **details: Any,
) -> ProbeResult:
    return ProbeResult(
        t,
        failure is None,
        at,
        sum((phases or {}).values()) or 0.01,
        failure=failure,
        failed_operation=op,
        phases=freeze(phases or {}),
        evidence=_evidence(t.probe, details),
    )


def _evidence(probe: str, details: dict[str, Any]) -> Evidence:
    """The probe's typed evidence read from ``details`` (keys it does not know are dropped),
    except for the rotation tests' records, tagged with keys of their own (seq, pad)."""
    if {"seq", "pad"} & details.keys():
        return RawEvidence(raw=details)
    return evidence_from_json(probe, details)


def records(directory: Path, **kw: Any) -> list[dict[str, Any]]:
    return list(iter_archive(directory, **kw))


def seqs(directory: Path, stats: ReadStats | None = None) -> list[int]:
    return [
        r["test_keys"]["probe_result"]["details"]["seq"]
        for r in iter_archive(directory, stats=stats)
    ]


# -- the envelope --------------------------------------------------------------------


def test_envelope_has_the_ooni_base_fields() -> None:
    env = envelope(result(DC1, phases={"connect": 0.03, "app": 0.05}), VANTAGE)
    assert env["measurement_start_time"] == "2025-03-01 12:00:05"
    assert re.fullmatch(r"\d{4}-\d\d-\d\d \d\d:\d\d:\d\d", env["test_start_time"])
    assert (env["probe_cc"], env["probe_asn"]) == ("RU", "AS12389")
    assert env["test_name"] == "messenger_reachability"
    assert env["software_name"] == "messenger-reachability-probe"
    assert env["data_format_version"] == "0.2.0"
    assert env["input"] == "mtproto://192.0.2.10:443"
    assert env["test_runtime"] == pytest.approx(0.08)
    assert env["annotations"]["vantage"] == "msk-1"
    assert env["annotations"]["vantage_role"] == "test"
    assert env["annotations"]["service"] == "telegram"
    assert env["annotations"]["probe"] == "mtproto"
    assert all(isinstance(v, str) for v in env["annotations"].values())  # map[string]string
    assert env["test_keys"]["probe_result"]["t"] == "2025-03-01T12:00:05.250000+00:00"


def test_envelope_has_the_required_ooni_keys_of_df_000() -> None:
    """ooni/spec df-000: report_id and test_helpers are not optional (OONI readers expect
    them); annotations SHOULD carry the architecture."""
    env = envelope(result(DC1), VANTAGE)
    assert env["report_id"] == ""  # never submitted to an OONI collector
    assert env["test_helpers"] == {}
    expected = {"x86_64": "amd64", "amd64": "amd64", "aarch64": "arm64", "arm64": "arm64"}
    arch = env["annotations"]["architecture"]
    assert arch == expected.get(platform.machine().lower(), arch) and arch
    assert env["input"] is not None and "probe_result" in env["test_keys"]


def test_a_variant_is_annotated_by_its_label() -> None:
    neutral = replace(G_TLS, variant="neutral_sni", overrides=freeze({"sni": "example.org"}))
    env = envelope(result(neutral, phases={"connect": 0.01, "tls": 0.02}), VANTAGE)
    assert env["annotations"]["probe"] == "tls/neutral_sni"
    assert env["input"] == "tls://g.whatsapp.example:443"
    assert env["test_keys"]["probe_result"]["target"]["variant"] == "neutral_sni"
    assert env["test_keys"]["probe_result"]["target"]["overrides"] == {"sni": "example.org"}


def test_measurement_start_time_is_utc_whatever_the_offset() -> None:
    local = datetime(2025, 3, 1, 15, 0, 5, tzinfo=UTC).astimezone(timezone(timedelta(hours=3)))
    assert local.hour == 18
    env = envelope(result(DC1, at=local), VANTAGE)
    assert env["measurement_start_time"] == "2025-03-01 15:00:05"


def test_connect_failure_maps_to_tcp_connect_and_network_events() -> None:
    r = result(DC1, failure="generic_timeout_error", op=Operation.CONNECT, phases={"connect": 10.0})
    keys = envelope(r, VANTAGE)["test_keys"]
    assert keys["tcp_connect"] == [
        {
            "ip": "192.0.2.10",
            "port": 443,
            "status": {"failure": "generic_timeout_error", "success": False},
            "t0": 0.0,
            "t": 10.0,
            "tags": [],
        }
    ]
    [event] = keys["network_events"]
    assert event["operation"] == "connect"
    assert event["proto"] == "tcp"
    assert event["failure"] == "generic_timeout_error"
    assert event["address"] == "192.0.2.10:443"
    assert keys["tls_handshakes"] == []
    assert keys["queries"] == []


def test_tls_failure_maps_to_a_df006_handshake_with_the_certificate() -> None:
    der = bytes(range(40))
    r = result(
        G_TLS,
        failure="ssl_unknown_authority",
        op=Operation.TLS_HANDSHAKE,
        phases={"connect": 0.02, "tls": 0.05},
        **TlsEvidence(
            peer_certificates=(der,),
            certificate_source="handshake",
            negotiated=TlsNegotiated(
                tls_version="TLSv1.3", alpn="h2", cipher="TLS_AES_128_GCM_SHA256"
            ),
        ).to_json(),
    )
    keys = envelope(r, VANTAGE)["test_keys"]
    assert keys["tcp_connect"][0]["status"] == {"failure": None, "success": True}
    [hs] = keys["tls_handshakes"]
    assert hs["failure"] == "ssl_unknown_authority"
    assert hs["network"] == "tcp"
    assert hs["address"] == "192.0.2.21:443"
    assert hs["server_name"] == "g.whatsapp.example"
    assert hs["tls_version"] == "TLSv1.3"
    assert hs["cipher_suite"] == "TLS_AES_128_GCM_SHA256"
    assert hs["negotiated_protocol"] == "h2"
    assert hs["t0"] == pytest.approx(0.02)
    assert hs["t"] == pytest.approx(0.07)
    assert hs["peer_certificates"] == [{"data": base64.b64encode(der).decode(), "format": "base64"}]
    assert hs["no_tls_verify"] is False


def test_the_evidence_only_unverified_handshake_carries_the_chain_it_read() -> None:
    """Without the verifying handshake's chain, the tls probe reads it on a second handshake
    with verification off: archived as that handshake (no_tls_verify), not the measured one."""
    der = bytes(range(40))
    evidence = TlsEvidence(
        peer_certificates=(der,), certificate_source="unverified_second_handshake"
    )
    r = result(
        G_TLS,
        failure="ssl_unknown_authority",
        op=Operation.TLS_HANDSHAKE,
        phases={"connect": 0.02, "tls": 0.05, "certificate_evidence": 0.07},
        **evidence.to_json(),
    )
    measured, second = envelope(r, VANTAGE)["test_keys"]["tls_handshakes"]
    assert (measured["failure"], measured["no_tls_verify"]) == ("ssl_unknown_authority", False)
    assert measured["peer_certificates"] == []  # its own chain was not readable
    assert (second["failure"], second["no_tls_verify"]) == (None, True)
    assert second["peer_certificates"] == [{"data": base64.b64encode(der).decode(),
                                            "format": "base64"}]  # fmt: skip
    assert (second["t0"], second["t"]) == (pytest.approx(0.07), pytest.approx(0.14))
    # the second handshake failed too: its failure, no chain
    failed = result(
        G_TLS,
        failure="ssl_unknown_authority",
        op=Operation.TLS_HANDSHAKE,
        phases={"connect": 0.02, "tls": 0.05, "certificate_evidence": 0.07},
        **TlsEvidence(certificate_error="connection_reset").to_json(),
    )
    _, second = envelope(failed, VANTAGE)["test_keys"]["tls_handshakes"]
    assert (second["failure"], second["peer_certificates"]) == ("connection_reset", [])


def test_dns_result_maps_to_one_df002_query_per_type() -> None:
    # The shape the DNS probe records: answers and rcodes by query type.
    r = result(
        DNS,
        phases={"resolve": 0.004},
        resolver="udp:127.0.0.1:53",
        answers={"A": ["192.0.2.1"], "AAAA": []},
        rcodes={"A": "NOERROR", "AAAA": "NOERROR"},
    )
    a, aaaa = envelope(r, VANTAGE)["test_keys"]["queries"]
    assert a["engine"] == "udp"
    assert a["resolver_address"] == "127.0.0.1:53"
    assert a["hostname"] == "web.whatsapp.example"
    assert a["query_type"] == "A"
    assert a["failure"] is None
    assert a["rcode"] == 0
    assert a["answers"] == [{"answer_type": "A", "ipv4": "192.0.2.1", "ttl": None}]
    assert aaaa["query_type"] == "AAAA"
    assert aaaa["failure"] == "dns_no_answer"  # OONI's per-query word for an empty family
    assert envelope(r, VANTAGE)["input"] == "dns://web.whatsapp.example"


def test_a_resolver_that_never_answered_is_one_failed_query() -> None:
    r = result(DNS, failure="generic_timeout_error", op=Operation.RESOLVE, phases={"resolve": 2})
    [q] = envelope(r, VANTAGE)["test_keys"]["queries"]
    assert (q["query_type"], q["answers"], q["failure"]) == ("A", [], "generic_timeout_error")
    assert "rcode" not in q


def test_dns_failure_is_reported_on_the_query() -> None:
    r = result(
        DNS,
        failure="dns_nxdomain_error",
        op=Operation.RESOLVE,
        phases={"resolve": 0.01},
        answers={"A": [], "AAAA": []},
        rcodes={"A": "NXDOMAIN", "AAAA": "NXDOMAIN"},
    )
    queries = envelope(r, VANTAGE)["test_keys"]["queries"]
    assert [(q["failure"], q["rcode"]) for q in queries] == [("dns_nxdomain_error", 3)] * 2


def test_a_bogon_failure_marks_the_query_that_returned_it() -> None:
    r = result(
        DNS,
        failure="dns_bogon_error",
        op=Operation.RESOLVE,
        phases={"resolve": 0.01},
        answers={"A": ["10.10.34.35"], "AAAA": ["2001:db8::1"]},
        bogons=["10.10.34.35"],
    )
    a, aaaa = envelope(r, VANTAGE)["test_keys"]["queries"]
    assert a["failure"] == "dns_bogon_error"
    assert aaaa["failure"] is None


async def test_real_dns_probe_results_map_to_queries() -> None:
    table = AnswerTable()
    table.host("g.lab.example", "127.0.0.7", "::1", ttl=42)
    loopback = (ipaddress.ip_network("127.0.0.0/8"), ipaddress.ip_network("::1/128"))
    fast = settings(resolvers=Resolvers(system=False, reply_window_s=0.05))
    async with DNSServer(table, "127.0.0.1") as server:
        found = await dns_probe(
            target(
                "dns",
                None,
                host="g.lab.example",
                resolver=server.udp_resolver,
                prefixes=loopback,  # lab answers are loopback: not bogons here
            ),
            fast,
        )
        missing = await dns_probe(
            target("dns", None, host="nope.lab.example", resolver=server.udp_resolver), fast
        )
    assert found.ok, found.failure
    a, aaaa = envelope(found, VANTAGE)["test_keys"]["queries"]
    assert (a["query_type"], a["answers"][0]["ipv4"], a["rcode"]) == ("A", "127.0.0.7", 0)
    assert (aaaa["query_type"], aaaa["answers"][0]["ipv6"]) == ("AAAA", "::1")
    assert a["resolver_address"] == server.udp_resolver.partition(":")[2]
    assert not missing.ok
    for q in envelope(missing, VANTAGE)["test_keys"]["queries"]:
        assert q["failure"] == missing.failure == "dns_nxdomain_error"
        assert q["rcode"] == 3


async def test_real_tls_probe_failure_archives_the_peer_chain(tmp_path: Path) -> None:
    stranger = CertificateAuthority("not the lab CA")  # a MITM-like CA nobody trusts
    leaf = stranger.issue("chat.lab.example", chain=True)  # the server sends leaf + CA
    async with TLSServer("127.0.0.1", cert=leaf) as server:
        r = await tls_probe(
            target("tls", "127.0.0.1", server.port, host="chat.lab.example"), settings()
        )
    assert r.failure == "ssl_unknown_authority"
    keys = envelope(r, VANTAGE)["test_keys"]
    assert keys["tcp_connect"][0]["status"] == {"failure": None, "success": True}
    [hs] = keys["tls_handshakes"]
    assert hs["failure"] == "ssl_unknown_authority"
    assert hs["server_name"] == "chat.lab.example"
    assert hs["address"] == f"127.0.0.1:{server.port}"
    assert hs["no_tls_verify"] is False  # the measured handshake verified
    assert keys["probe_result"]["details"]["certificate"]["sha256"]
    # OONI's peer_certificates: the whole chain as sent, leaf first, base64 DER
    sent = [
        ssl.PEM_cert_to_DER_cert(p + "-----END CERTIFICATE-----\n")
        for p in leaf.cert_pem.decode().split("-----END CERTIFICATE-----\n")[:-1]
    ]
    assert [c["format"] for c in hs["peer_certificates"]] == ["base64", "base64"]
    assert [base64.b64decode(c["data"]) for c in hs["peer_certificates"]] == sent


def test_udp_silence_maps_to_read_from_with_byte_counts() -> None:
    r = result(
        STUN, failure="udp_no_response", op=Operation.READ, phases={"exchange": 2.0}, bytes_sent=20
    )
    keys = envelope(r, VANTAGE)["test_keys"]
    assert keys["tcp_connect"] == []
    assert keys["tls_handshakes"] == []
    [event] = keys["network_events"]
    assert event["operation"] == "read_from"
    assert event["proto"] == "udp"
    assert event["address"] == "[2001:db8::7]:3478"
    assert event["failure"] == "udp_no_response"


# What the udperr work records: a censor's router rejecting with ICMP admin prohibited,
# then a later host unreachable (icmp_evidence keeps at most 8, in arrival order).
PROHIBITED = IcmpReport(icmp="icmp", type=3, code=13, errno="EHOSTUNREACH", reporter="10.0.0.1")
HOST_UNREACH = IcmpReport(icmp="icmp", type=3, code=1, errno="EHOSTUNREACH", reporter="10.0.0.1")
NO_ROUTE6 = IcmpReport(icmp="icmpv6", type=1, code=0, errno="ENETUNREACH", reporter="2001:db8::1")
PORT_UNREACH = IcmpReport(icmp="icmp", type=3, code=3, errno="ECONNREFUSED", reporter="127.0.0.1")


def _icmp_reads(events: list[dict[str, Any]]) -> list[tuple[str | None, str | None]]:
    return [(e.get("address"), e["failure"]) for e in events if e["operation"] == "read_from"]


def test_icmp_errors_are_failed_read_from_events_as_ooni_reports_them() -> None:
    """df-008 has no ICMP event: OONI's engine reports an ICMP error on a UDP socket as the
    read_from that returned it, failed with the df-007 string.  One per recorded error;
    the read that failed the probe is the first of them, not a second event."""
    evidence = StunEvidence(icmp_errors=(PROHIBITED, NO_ROUTE6), icmp_stray=3)
    r = result(
        STUN,
        failure="host_unreachable",
        op=Operation.READ,
        phases={"exchange": 0.05},
        **evidence.to_json(),
    )
    keys = envelope(r, VANTAGE)["test_keys"]
    address = "[2001:db8::7]:3478"
    assert keys["network_events"] == [
        {"address": address, "failure": "host_unreachable", "operation": "read_from",
         "proto": "udp", "t0": 0.0, "t": 0.05, "tags": []},
        {"address": address, "failure": "network_unreachable", "operation": "read_from",
         "proto": "udp", "t0": 0.0, "t": 0.05, "tags": []},
    ]  # fmt: skip
    # type, code, errno and the reporting router: in our own result, as before
    details = keys["probe_result"]["details"]
    assert details["icmp_errors"][0] == PROHIBITED.to_json()
    assert details["icmp_errors"][0]["reporter"] == "10.0.0.1"
    assert details["icmp_stray"] == 3


def test_icmp_errors_beside_a_handshake_or_lookup_failure_are_read_from_events() -> None:
    quic = replace(STUN, probe="quic", port=443)
    r = result(
        quic,
        failure="host_unreachable",
        op=Operation.QUIC_HANDSHAKE,
        phases={"quic_handshake": 0.03},
        **QuicEvidence(icmp_errors=(HOST_UNREACH,)).to_json(),
    )
    keys = envelope(r, VANTAGE)["test_keys"]
    assert keys["quic_handshakes"][0]["failure"] == "host_unreachable"
    assert _icmp_reads(keys["network_events"]) == [("[2001:db8::7]:443", "host_unreachable")]
    # a dns probe's datagrams went to its resolver: the events name it
    dns = result(
        DNS,
        failure="connection_refused",
        op=Operation.RESOLVE,
        phases={"resolve": 0.01},
        **DnsEvidence(resolver="udp:127.0.0.1:53", icmp_errors=(PORT_UNREACH,)).to_json(),
    )
    events = envelope(dns, VANTAGE)["test_keys"]["network_events"]
    assert _icmp_reads(events) == [("127.0.0.1:53", "connection_refused")]


async def test_a_real_icmp_port_unreachable_reaches_the_archive_as_read_from() -> None:
    """Loopback answers a datagram to an unbound port with ICMP port unreachable: the
    stun probe records it and the archive line says so in OONI's and in our terms."""
    port = unbound_udp_port("127.0.0.1")
    r = await stun_probe(target("stun", "127.0.0.1", port, params={}), settings(udp_s=2.0))
    keys = envelope(r, VANTAGE)["test_keys"]
    assert (r.failure, r.failed_operation) == ("connection_refused", Operation.READ)
    assert _icmp_reads(keys["network_events"])[0] == (f"127.0.0.1:{port}", "connection_refused")
    [report, *_] = keys["probe_result"]["details"]["icmp_errors"]
    assert (report["type"], report["code"], report["errno"]) == (3, 3, "ECONNREFUSED")


def test_one_icmp_error_that_failed_the_read_archives_as_before() -> None:
    """The line of a probe failed by one ICMP error is the line written before ICMP
    errors were archived: that read_from was already there."""
    r = result(
        STUN,
        failure="host_unreachable",
        op=Operation.READ,
        phases={"exchange": 0.05},
        **StunEvidence(icmp_errors=(PROHIBITED,)).to_json(),
    )
    [event] = envelope(r, VANTAGE)["test_keys"]["network_events"]
    assert event == {"address": "[2001:db8::7]:3478", "failure": "host_unreachable",
                     "operation": "read_from", "proto": "udp", "t0": 0.0, "t": 0.05,
                     "tags": []}  # fmt: skip


def test_a_stalled_transfer_records_the_byte_count() -> None:
    """Where the first stalled connection froze (server->client TCP payload) is the 16-20 KB
    freeze's signature (FIELD.md B7): the read event and the cumulative count carry it."""
    transfer = replace(G_TLS, probe="transfer")
    connections = (
        TransferConnection(index=0, outcome="complete", wire_bytes=250_000),
        TransferConnection(index=1, outcome="stalled", wire_bytes=16384,
                           stalled_at_bytes=12000, stalled_at_wire_bytes=16384),
    )  # fmt: skip
    evidence = TransferEvidence(summary=TransferSummary(connections=connections))
    r = result(
        transfer,
        failure="stall_after_bytes",
        op=Operation.READ,
        phases={"connect": 0.02, "tls": 0.04, "transfer": 5.0},
        **evidence.to_json(),
    )
    events = envelope(r, VANTAGE)["test_keys"]["network_events"]
    read = next(e for e in events if e["operation"] == "read")
    assert read["failure"] == "stall_after_bytes"
    assert read["num_bytes"] == 16384
    cumulative = next(e for e in events if e["operation"] == "bytes_received_cumulative")
    assert cumulative["num_bytes"] == 16384


def test_the_transport_is_the_one_the_probe_used() -> None:
    """The evidence says TCP or UDP: a tcp probe of a UDP endpoint connected over TCP, and
    a stun probe run over TCP did too."""
    tcp_to_relay = replace(STUN, probe="tcp")
    stun_over_tcp = result(
        STUN,
        failure="connection_reset",
        op=Operation.READ,
        phases={"connect": 0.01, "exchange": 0.02},
        **StunEvidence(stun_transport="tcp", mode="binding").to_json(),
    )
    for r in (result(tcp_to_relay, phases={"connect": 0.01}), stun_over_tcp):
        keys = envelope(r, VANTAGE)["test_keys"]
        assert keys["tcp_connect"][0]["ip"] == "2001:db8::7"
        assert keys["network_events"][0]["proto"] == "tcp"
    events = envelope(stun_over_tcp, VANTAGE)["test_keys"]["network_events"]
    [read] = [e for e in events if e["operation"] != "connect"]
    assert read["operation"] == "read"  # over UDP it would be read_from


def test_a_skipped_result_reports_no_observation() -> None:
    r = ProbeResult(G_TLS, False, T0, 0.0, skipped=SkipReason.VANTAGE_OFFLINE)
    env = envelope(r, VANTAGE)
    keys = env["test_keys"]
    assert keys["tcp_connect"] == keys["tls_handshakes"] == keys["network_events"] == []
    assert keys["probe_result"]["skipped"] == "vantage_offline"
    assert env["annotations"]["status"] == "skipped"


detail_values = st.recursive(
    st.none()
    | st.booleans()
    | st.integers()
    | st.floats()
    | st.text()
    | st.binary(max_size=64)
    | st.sampled_from([Operation.READ, SkipReason.IPV6_UNAVAILABLE]),
    lambda children: (
        st.lists(children, max_size=4)
        | st.tuples(children, children)
        | st.dictionaries(st.text(max_size=8) | st.integers(), children, max_size=4)
        | st.frozensets(st.integers() | st.text(max_size=4), max_size=4)
    ),
    max_leaves=20,
)


@pytest.fixture(scope="module")
def fuzz_writer(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ArchiveWriter]:
    # One writer for every example: hypothesis runs many, and a writer per example
    # (thread pool, file) would dominate the run time.
    with ArchiveWriter(tmp_path_factory.mktemp("fuzz"), VANTAGE, compress=False) as writer:
        yield writer


@fuzz_settings(max_examples=100, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(details=st.dictionaries(st.text(max_size=12), detail_values, max_size=5))
def test_any_detail_value_serialises_to_one_json_line(
    fuzz_writer: ArchiveWriter, details: dict[str, Any]
) -> None:
    before = fuzz_writer.current.stat().st_size
    assert fuzz_writer.write(ProbeResult(G_TLS, True, T0, 0.01, evidence=RawEvidence(raw=details)))
    with fuzz_writer.current.open("rb") as f:
        f.seek(before)
        raw = f.read()
    assert raw.count(b"\n") == 1
    assert raw.endswith(b"\n")
    raw.decode("ascii")
    record = json.loads(raw)
    expected = json.loads(json.dumps(to_jsonable(details), allow_nan=False))
    assert record["test_keys"]["probe_result"]["details"] == expected


# -- writer and reader ------------------------------------------------------------


def test_round_trip_and_filters(tmp_path: Path) -> None:
    rows = [
        result(DC1, at=T0, phases={"connect": 0.03}),
        result(DC1, at=T0 + timedelta(minutes=1), failure="connection_reset", op=Operation.READ),
        result(G_TLS, at=T0 + timedelta(minutes=2), phases={"connect": 0.02, "tls": 0.03}),
        ProbeResult(
            G_TLS, False, T0 + timedelta(minutes=3), 0.0, skipped=SkipReason.VANTAGE_OFFLINE
        ),
        result(
            DNS, at=T0 + timedelta(minutes=4), failure="dns_refused_error", op=Operation.RESOLVE
        ),
    ]
    with ArchiveWriter(tmp_path, VANTAGE) as writer:
        for r in rows:
            assert writer.write(r)
    everything = records(tmp_path)
    assert [r["test_keys"]["probe_result"]["t"] for r in everything] == [
        r.t.isoformat() for r in rows
    ]
    assert len(records(tmp_path, service="telegram")) == 2
    assert len(records(tmp_path, probe="tls")) == 2
    failed = records(tmp_path, failed_only=True)
    assert [r["test_keys"]["probe_result"]["failure"] for r in failed] == [
        "connection_reset",
        "dns_refused_error",
    ]
    since = records(tmp_path, since=T0 + timedelta(minutes=2))
    assert len(since) == 3
    naive = records(tmp_path, since=(T0 + timedelta(minutes=2)).replace(tzinfo=None))
    assert len(naive) == 3
    assert records(tmp_path, service="whatsapp", probe="dns", failed_only=True)[0]["input"] == (
        "dns://web.whatsapp.example"
    )


def test_an_archived_result_reads_back_as_the_fields_of_its_flat_record(
    tmp_path: Path,
) -> None:
    """What a verdict is judged from comes back out of the archive unchanged."""
    neutral = replace(G_TLS, variant="neutral_sni", overrides=freeze({"sni": "example.org"}))
    rows = [
        result(neutral, failure="connection_reset", op=Operation.TLS_HANDSHAKE, cert=b"\x30"),
        result(STUN, failure="udp_no_response", op=Operation.READ, bytes_sent=20),
        result(
            STUN,
            failure="host_unreachable",
            op=Operation.READ,
            **StunEvidence(icmp_errors=(PROHIBITED, HOST_UNREACH), icmp_stray=1).to_json(),
        ),
        replace(result(DNS, answers={"A": ["192.0.2.1"]}), flags=("dns_injection_suspected",)),
        ProbeResult(DC1, False, T0, 0.0, skipped=SkipReason.IPV6_UNAVAILABLE),
    ]
    with ArchiveWriter(tmp_path, VANTAGE) as writer:
        for r in rows:
            assert writer.write(r)
    archived = [result_fields(r) for r in iter_archive(tmp_path)]
    flat = [read_result_record(result_record(r, "msk-1", "online")) for r in rows]
    assert [replace(a, t=None) for a in archived] == [
        replace(f, t=None, vantage_state=None, details=a.details)
        for a, f in zip(archived, flat, strict=True)
    ]
    assert [dict(a.details) for a in archived] == [dict(f.details) for f in flat]
    assert {a.measured_at() for a in archived} == {T0}
    assert archived[0].probe == "tls/neutral_sni"
    with pytest.raises(KeyError):
        result_fields({"test_keys": {}})


def test_verdicts_judged_again_from_the_archive_are_the_rounds(tmp_path: Path) -> None:
    dc2 = replace(DC1, address="192.0.2.11")
    rows = [
        result(DC1, phases={"connect": 0.03}),
        result(dc2, failure="generic_timeout_error", op=Operation.CONNECT),
        result(G_TLS, phases={"connect": 0.02}, failure="connection_reset",
               op=Operation.TLS_HANDSHAKE),
        result(STUN, failure="udp_no_response", op=Operation.READ, bytes_sent=20),
    ]  # fmt: skip
    with ArchiveWriter(tmp_path, VANTAGE) as writer:
        for r in rows:
            assert writer.write(r)
    archived = [from_fields(result_fields(m)) for m in iter_archive(tmp_path)]
    verdicts = judge_round(rows)
    assert {str(v.verdict) for v in verdicts} - {"ok"}  # something to get right
    assert judge_round(archived) == verdicts


def test_reader_of_a_missing_directory_yields_nothing(tmp_path: Path) -> None:
    assert records(tmp_path / "nope") == []


def write_seq(writer: ArchiveWriter, start: int, count: int, pad: int = 200) -> None:
    for i in range(start, start + count):
        at = T0 + timedelta(seconds=i)
        assert writer.write(result(DC1, at=at, phases={"connect": 0.01}, seq=i, pad="x" * pad))


def rotated(directory: Path) -> list[str]:
    return sorted(p.name for p in directory.iterdir() if p.name != CURRENT_NAME)


def test_rotation_by_size_and_retention_by_count(tmp_path: Path) -> None:
    with ArchiveWriter(tmp_path, VANTAGE, max_bytes=8192, keep=2, compress=False) as writer:
        write_seq(writer, 0, 60)
    names = rotated(tmp_path)
    assert len(names) == 2
    assert all(re.fullmatch(r"measurements-\d{8}T\d{12}Z(-\d+)?\.jsonl", n) for n in names)
    for path in tmp_path.iterdir():
        assert path.stat().st_size <= 8192
    got = seqs(tmp_path)
    # The oldest files were pruned; what remains is the newest lines, in order, no gaps.
    assert got == list(range(got[0], 60))
    assert got[0] > 0


def test_rotated_files_are_gzipped(tmp_path: Path) -> None:
    with ArchiveWriter(tmp_path, VANTAGE, max_bytes=8192, keep=100, compress=True) as writer:
        write_seq(writer, 0, 40)
    names = rotated(tmp_path)
    assert names
    assert all(n.endswith(".jsonl.gz") for n in names)
    with gzip.open(tmp_path / names[0], "rb") as f:
        assert json.loads(f.readline())["test_keys"]["probe_result"]["details"]["seq"] == 0
    assert seqs(tmp_path) == list(range(40))


def test_since_skips_files_rotated_before_it(tmp_path: Path) -> None:
    with ArchiveWriter(tmp_path, VANTAGE, max_bytes=4096, keep=100, compress=False) as writer:
        write_seq(writer, 0, 20)
    stats = ReadStats()
    future = datetime.now(UTC) + timedelta(days=1)
    assert list(iter_archive(tmp_path, since=future, stats=stats)) == []
    assert stats.records == 0


def test_a_file_caught_mid_compression_is_read_once(tmp_path: Path) -> None:
    with ArchiveWriter(tmp_path, VANTAGE, max_bytes=4096, keep=100, compress=False) as writer:
        write_seq(writer, 0, 20)
    first = tmp_path / rotated(tmp_path)[0]
    # The compressor has renamed the .gz into place but not yet removed the original.
    with first.open("rb") as src, gzip.open(first.with_name(first.name + ".gz"), "wb") as dst:
        dst.write(src.read())
    assert seqs(tmp_path) == list(range(20))


def test_torn_final_line_is_skipped_counted_and_isolated(tmp_path: Path) -> None:
    with ArchiveWriter(tmp_path, VANTAGE, compress=False) as writer:
        write_seq(writer, 0, 3)
    current = tmp_path / CURRENT_NAME
    whole = current.read_bytes()
    last_start = whole.rstrip(b"\n").rfind(b"\n") + 1
    current.write_bytes(whole[: last_start + 40])  # the third line died half-written
    stats = ReadStats()
    assert seqs(tmp_path, stats) == [0, 1]
    assert (stats.torn, stats.corrupt) == (1, 0)
    # The next writer must not glue its first line onto the fragment.
    with ArchiveWriter(tmp_path, VANTAGE, compress=False) as writer:
        write_seq(writer, 3, 1)
    stats = ReadStats()
    assert seqs(tmp_path, stats) == [0, 1, 3]
    assert (stats.torn, stats.corrupt) == (0, 1)


def test_restart_finishes_interrupted_compression(tmp_path: Path) -> None:
    with ArchiveWriter(tmp_path, VANTAGE, max_bytes=4096, keep=100, compress=False) as writer:
        write_seq(writer, 0, 20)
    leftover = tmp_path / rotated(tmp_path)[0]
    (tmp_path / (leftover.name + ".gz.tmp")).write_bytes(b"\x1f\x8b half")  # killed mid-gzip
    with ArchiveWriter(tmp_path, VANTAGE, max_bytes=4096, keep=100, compress=True):
        pass
    names = rotated(tmp_path)
    assert not any(n.endswith(".tmp") for n in names)
    assert all(n.endswith(".gz") for n in names)
    assert seqs(tmp_path) == list(range(20))


def test_a_full_disk_loses_the_line_not_the_agent(tmp_path: Path) -> None:
    if not os.path.exists("/dev/full"):
        pytest.skip("no /dev/full on this system")
    (tmp_path / CURRENT_NAME).symlink_to("/dev/full")
    with ArchiveWriter(tmp_path, VANTAGE, compress=False) as writer:
        assert writer.write(result(DC1)) is False
        assert writer.write(result(DC1)) is False
        assert writer.write_errors == 2


def test_a_lost_directory_is_recreated_and_writing_goes_on(tmp_path: Path) -> None:
    """The directory vanishes (an operator's rm -rf, a remount): a rotation cannot reopen the
    file.  That write fails, but the writer must not turn into a closed one for good (it
    raised on every later write, which ended the agent's endpoint loops)."""
    directory = tmp_path / "a"
    with ArchiveWriter(directory, VANTAGE, max_bytes=4096, compress=False) as writer:
        for i in range(3):
            assert writer.write(result(DC1, seq=i))
        shutil.rmtree(directory)
        outcomes = [writer.write(result(DC1, seq=i)) for i in range(3, 40)]  # rotates
        assert outcomes[-1] is True
    assert seqs(directory)[-1] == 39


def test_a_deleted_current_file_is_recreated(tmp_path: Path) -> None:
    """Deleting measurements.jsonl to free space must free it: no writing on into the
    unlinked file, where lines are lost and the space stays taken."""
    with ArchiveWriter(tmp_path, VANTAGE, compress=False) as writer:
        writer.write(result(DC1, seq=0))
        (tmp_path / CURRENT_NAME).unlink()
        assert writer.write(result(DC1, seq=1))
    assert seqs(tmp_path) == [1]


def test_failing_writes_are_logged_once_then_counted(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    directory = tmp_path / "a"
    with ArchiveWriter(directory, VANTAGE, max_bytes=4096, compress=False) as writer:
        writer.write(result(DC1, seq=0))
        shutil.rmtree(directory)
        directory.write_text("not a directory")  # nothing can be created there now
        with caplog.at_level("WARNING", logger="probe.archive"):
            lost = [writer.write(result(DC1, seq=i)) for i in range(1, 60)]
            assert not any(lost) and writer.write_errors == len(lost)
            directory.unlink()
            assert writer.write(result(DC1, seq=60))
    messages = [r.getMessage() for r in caplog.records]
    assert sum(m.startswith("archive write failed") for m in messages) == 1, messages
    assert any("work again" in m for m in messages), messages
    assert seqs(directory) == [60]


def test_closed_writer_refuses_writes(tmp_path: Path) -> None:
    writer = ArchiveWriter(tmp_path, VANTAGE)
    writer.close()
    with pytest.raises(ValueError, match="closed"):
        writer.write(result(DC1))


def test_settings_defaults_and_disabling() -> None:
    assert AgentConfig().archive == ArchiveSettings()
    assert ArchiveWriter.from_settings(ArchiveSettings(path=None), VANTAGE) is None
    with pytest.raises(ValueError, match="max_bytes"):
        ArchiveWriter("/nonexistent-never-created", VANTAGE, max_bytes=0)


def test_from_settings_writes_where_configured(tmp_path: Path) -> None:
    configured = ArchiveSettings(path=str(tmp_path / "a"), max_bytes=4096, keep=1, compress=False)
    writer = ArchiveWriter.from_settings(configured, VANTAGE)
    assert writer is not None
    with writer:
        write_seq(writer, 0, 30)
    assert len(rotated(tmp_path / "a")) == 1


CHILD = textwrap.dedent(
    """
    import sys
    from datetime import UTC, datetime, timedelta
    from probe.archive import ArchiveWriter
    from probe.model import ProbeResult, Vantage, freeze
    from tests.helpers import RawEvidence, target

    t = target("mtproto", "192.0.2.10", 443, service="telegram", name="dc1")
    start = datetime(2025, 3, 1, tzinfo=UTC)
    writer = ArchiveWriter(sys.argv[1], Vantage(), max_bytes=32768, keep=100000, compress=True)
    for i in range(200000):  # bounded; the parent kills us long before
        at = start + timedelta(seconds=i)
        details = RawEvidence(raw={"seq": i, "pad": "x" * 2000})
        writer.write(ProbeResult(t, True, at, 0.01, evidence=details))
        if i == 400:
            print("ready", flush=True)
    """
)


def _wait_ready(proc: subprocess.Popen[bytes], timeout: float) -> None:
    assert proc.stdout is not None
    readable, _, _ = select.select([proc.stdout], [], [], timeout)
    assert readable, "writer child did not start in time"
    assert proc.stdout.readline() == b"ready\n"


def test_sigkill_mid_append_loses_at_most_the_line_being_written(tmp_path: Path) -> None:
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    proc = subprocess.Popen(
        [sys.executable, "-c", CHILD, str(tmp_path)],
        stdout=subprocess.PIPE,
        cwd=REPO,
        env=env,
    )
    try:
        _wait_ready(proc, timeout=20)
        os.kill(proc.pid, signal.SIGKILL)  # mid-loop: writes, rotations and gzip in flight
    finally:
        proc.kill()
        proc.wait(timeout=10)
    assert proc.returncode == -signal.SIGKILL
    stats = ReadStats()
    got = seqs(tmp_path, stats)
    assert len(got) > 400
    assert got == list(range(len(got)))  # every complete line, once, in order
    assert stats.torn <= 1
    assert stats.corrupt == 0
    # A restarted writer tidies up (temp files, uncompressed rotations) and appends cleanly.
    with ArchiveWriter(tmp_path, VANTAGE, max_bytes=32768, keep=100000, compress=True) as writer:
        write_seq(writer, len(got), 1)
    assert not any(p.name.endswith(".tmp") for p in tmp_path.iterdir())
    assert seqs(tmp_path) == list(range(len(got) + 1))


def test_the_documented_example_line_is_what_the_archive_writes() -> None:
    """docs/archive.md's example is the format: a change to either shows here."""
    doc = (REPO / "docs" / "archive.md").read_text()
    example = json.loads(doc.split("## Example line", 1)[1].split("```json", 1)[1].split("```")[0])
    web = replace(
        target("tls", "157.240.0.53", 443, host="web.whatsapp.com", service="whatsapp",
               name="web.whatsapp.com", role="web"),
        address_source="system",
    )  # fmt: skip
    details = {
        "sni": "web.whatsapp.com",
        "alpn_offered": ["h2", "http/1.1"],
        "connect_time_s": 0.0408,
        "handshake": {"bytes_sent": 517, "bytes_received": 0},
    }
    r = ProbeResult(
        web,
        False,
        datetime(2025, 8, 14, 9, 30, 12, 481213, tzinfo=UTC),
        10.0412,
        failure="generic_timeout_error",
        failed_operation=Operation.TLS_HANDSHAKE,
        phases=freeze({"connect": 0.0408, "tls": 10.0003}),
        evidence=RawEvidence(raw=details),
    )
    written = json.loads(
        json.dumps(envelope(r, Vantage("msk-1", "RU", "AS12389", "test"), software_version="0.1.0"))
    )
    # the only values that vary: a fresh UUID per line, and the machine that wrote it
    for key in ("id",):
        written[key] = example[key]
    for key in ("architecture", "platform"):
        written["annotations"][key] = example["annotations"][key]
    [hs] = written["test_keys"]["tls_handshakes"]
    hs["t"] = round(hs["t"], 6)  # 0.0408 + 10.0003 in binary floating point
    assert written == example
    assert json.dumps(written) == json.dumps(example)  # and every key in the documented order
