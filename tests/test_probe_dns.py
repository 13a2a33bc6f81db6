"""DNS probe against real scriptable DNS servers (UDP, TCP, DoH) on 127.0.0.1 and ::1.

Query names are only ever sent to our own servers; the ``system`` resolver is only
given IP literals (no lookup leaves the machine).
"""

from __future__ import annotations

import base64
import ipaddress
import socket
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import aiohttp
import pytest

from probe.config.settings import ProbeSettings, Resolvers
from probe.dnsjudge import dns_consistency
from probe.evidence import DnsEvidence
from probe.lab.certs import CertificateAuthority
from probe.lab.servers.dns import AnswerTable, Behaviour, DNSServer, plan_replies
from probe.lab.servers.doh import CONTENT_TYPE, DoHServer
from probe.lab.servers.https_bulk import BulkBehaviour, HTTPSBulkServer
from probe.model import Failure, Operation, ProbeResult, SkipReason, Target
from probe.probes import REGISTRY
from probe.probes.dns import parse_resolver, probe
from probe.wire.dnsmsg import build_query, parse_message
from tests.helpers import json_details, refusing_port, settings, target

NET = ipaddress.ip_network
LAB_PREFIXES = (NET("127.0.0.0/8"), NET("::1/128"))  # lab services live on loopback
TG_A, TG_AAAA = "149.154.167.51", "2001:67c:4e8:f002::a"  # only data: never contacted
NAME = "g.whatsapp.net"


@dataclass
class Lab:
    """One DNS server (UDP+TCP) and one DoH server on a loopback address, sharing a table."""

    host: str
    table: AnswerTable
    dns: DNSServer
    doh: DoHServer
    ca_file: str

    def resolver(self, transport: str) -> str:
        if transport == "doh":
            return self.doh.resolver
        return self.dns.udp_resolver if transport == "udp" else self.dns.tcp_resolver

    def count(self, transport: str, qname: str = NAME) -> int:
        if transport == "doh":
            return self.doh.count(qname)
        return self.dns.count(transport, qname)  # type: ignore[arg-type]


@pytest.fixture(params=["127.0.0.1", "::1"], ids=["v4", "v6"])
async def lab(
    request: pytest.FixtureRequest, ca: CertificateAuthority, ca_file: str, tmp_path: Path
) -> AsyncIterator[Lab]:
    host: str = request.param
    table = AnswerTable()
    tls = ca.issue("127.0.0.1", "::1").server_context(tmp_path, "doh")
    async with DNSServer(table, host) as dns_server, DoHServer(table, tls, host) as doh:
        yield Lab(host, table, dns_server, doh, ca_file)


def fast(lab: Lab, *, window: float = 0.05, dns_s: float = 2.0) -> ProbeSettings:
    """Short reply window: only the race tests need to listen long after the first reply."""
    return settings(
        ca_file=lab.ca_file,
        resolvers=Resolvers(system=False, reply_window_s=window),
        dns_s=dns_s,
    )


def dns_target(resolver: str, name: str = NAME, prefixes: tuple[Any, ...] = LAB_PREFIXES) -> Target:
    return target("dns", None, host=name, resolver=resolver, prefixes=prefixes)


async def run(lab: Lab, transport: str, **kw: Any) -> ProbeResult:
    name = kw.pop("name", NAME)
    prefixes = kw.pop("prefixes", LAB_PREFIXES)
    return await probe(dns_target(lab.resolver(transport), name, prefixes), fast(lab, **kw))


TRANSPORTS = ["udp", "tcp", "doh"]


# --- answers ------------------------------------------------------------------------------


@pytest.mark.parametrize("transport", TRANSPORTS)
async def test_answers_a_and_aaaa(lab: Lab, transport: str) -> None:
    lab.table.host(NAME, "127.0.0.7", "::1", ttl=42)
    result = await run(lab, transport)
    assert result.ok, result.failure
    assert json_details(result)["resolver"] == lab.resolver(transport)
    assert json_details(result)["answers"] == {"A": ["127.0.0.7"], "AAAA": ["::1"]}
    assert json_details(result)["rcodes"] == {"A": "NOERROR", "AAAA": "NOERROR"}
    assert result.flags == ()
    assert "resolve" in result.phases
    assert lab.count(transport) == 2  # one A and one AAAA query, nothing else
    assert [r["qtype"] for r in json_details(result)["replies"]] == ["A", "AAAA"]


@pytest.mark.parametrize(
    ("behaviour", "failure", "rcode"),
    [
        (Behaviour.nxdomain(), Failure.DNS_NXDOMAIN, "NXDOMAIN"),
        (Behaviour.servfail(), Failure.DNS_SERVFAIL, "SERVFAIL"),
        (Behaviour.refused(), Failure.DNS_REFUSED, "REFUSED"),
        (Behaviour.nodata(), Failure.DNS_NO_ANSWER, "NOERROR"),
    ],
    ids=["nxdomain", "servfail", "refused", "nodata"],
)
@pytest.mark.parametrize("transport", TRANSPORTS)
async def test_rcode_failures(
    lab: Lab, transport: str, behaviour: Behaviour, failure: Failure, rcode: str
) -> None:
    lab.table.both(NAME, behaviour)
    result = await run(lab, transport)
    assert not result.ok
    assert result.failure == failure
    assert result.failed_operation == Operation.RESOLVE
    assert json_details(result)["rcodes"] == {"A": rcode, "AAAA": rcode}
    assert json_details(result)["answers"] == {"A": [], "AAAA": []}


async def test_unscripted_names_get_nxdomain(lab: Lab) -> None:
    result = await run(lab, "udp", name="nothing.example")
    assert result.failure == Failure.DNS_NXDOMAIN


@pytest.mark.parametrize("transport", TRANSPORTS)
async def test_answers_of_one_family_only_are_ok(lab: Lab, transport: str) -> None:
    lab.table.host(NAME, "127.0.0.7")  # AAAA: NOERROR without data
    result = await run(lab, transport)
    assert result.ok
    assert json_details(result)["answers"] == {"A": ["127.0.0.7"], "AAAA": []}


async def test_nxdomain_outranks_a_timeout(lab: Lab) -> None:
    lab.table.set(NAME, "A", Behaviour.nxdomain()).set(NAME, "AAAA", Behaviour.silence())
    result = await run(lab, "udp", dns_s=0.3)
    assert result.failure == Failure.DNS_NXDOMAIN
    assert json_details(result)["errors"] == {"AAAA": "generic_timeout_error"}


# --- bogons and prefixes --------------------------------------------------------------------


@pytest.mark.parametrize("transport", TRANSPORTS)
async def test_bogon_answer_is_a_failure(lab: Lab, transport: str) -> None:
    lab.table.host(NAME, "10.10.34.35")  # a private address, not the service's
    result = await run(lab, transport)
    assert result.failure == Failure.DNS_BOGON
    assert result.failed_operation == Operation.RESOLVE
    assert json_details(result)["bogons"] == ["10.10.34.35"]
    assert json_details(result)["answers"]["A"] == ["10.10.34.35"]  # kept as evidence
    assert "dns_answer_outside_prefixes" in result.flags


async def test_loopback_answer_is_a_bogon_without_declared_prefixes(lab: Lab) -> None:
    lab.table.host(NAME, "127.0.0.1")
    result = await run(lab, "tcp", prefixes=())
    assert result.failure == Failure.DNS_BOGON
    assert "dns_answer_outside_prefixes" not in result.flags  # nothing declared to be outside of


async def test_answer_outside_the_declared_prefixes_is_flagged_not_failed(lab: Lab) -> None:
    lab.table.host(NAME, TG_A, TG_AAAA)
    telegram = (NET("91.108.4.0/22"),)
    result = await run(lab, "tcp", prefixes=telegram)
    assert result.ok
    assert result.flags == ("dns_answer_outside_prefixes",)


async def test_public_answer_inside_the_declared_prefixes_is_clean(lab: Lab) -> None:
    lab.table.host(NAME, TG_A, TG_AAAA)
    telegram = (NET("149.154.160.0/20"), NET("2001:67c:4e8::/48"))
    result = await run(lab, "doh", prefixes=telegram)
    assert result.ok
    assert result.flags == ()


# --- hostile and broken resolvers -------------------------------------------------------------


@pytest.mark.parametrize("transport", TRANSPORTS)
async def test_garbage_reply_is_server_misbehaving(lab: Lab, transport: str) -> None:
    payload = bytes(range(40)) + b"not dns at all"
    lab.table.both(NAME, Behaviour.garbage(payload))
    result = await run(lab, transport)
    assert result.failure == Failure.DNS_SERVER_MISBEHAVING
    assert result.failed_operation == Operation.RESOLVE
    replies = json_details(result)["replies"]
    assert [r["garbage_hex"] for r in replies] == [payload[:32].hex()] * 2


@pytest.mark.parametrize("transport", TRANSPORTS)
async def test_wrong_transaction_id_is_not_an_answer(lab: Lab, transport: str) -> None:
    lab.table.both(NAME, Behaviour.wrong_id("127.0.0.9"))
    result = await run(lab, transport)
    assert result.failure == Failure.DNS_SERVER_MISBEHAVING
    assert json_details(result)["answers"] == {"A": [], "AAAA": []}
    first = json_details(result)["replies"][0]
    assert first["mismatch"] is True
    assert first["answers"] == ["127.0.0.9"]  # what the mismatched reply claimed, as evidence


@pytest.mark.parametrize("transport", TRANSPORTS)
async def test_silence_times_out_within_the_timeout(lab: Lab, transport: str) -> None:
    lab.table.both(NAME, Behaviour.silence())
    start = time.monotonic()
    result = await run(lab, transport, dns_s=0.4)
    elapsed = time.monotonic() - start
    assert result.failure == Failure.GENERIC_TIMEOUT
    assert result.failed_operation == Operation.RESOLVE
    assert 0.35 < elapsed < 1.4
    assert lab.count(transport) == 2  # the queries did arrive: silence, not loss


async def test_answer_later_than_the_timeout_is_a_timeout(lab: Lab) -> None:
    lab.table.host(NAME, "127.0.0.7")
    lab.table.both(NAME, Behaviour.answer("127.0.0.7", delay_s=0.6), transport="udp")
    result = await run(lab, "udp", dns_s=0.2)
    assert result.failure == Failure.GENERIC_TIMEOUT
    assert json_details(result)["replies"] == []


@pytest.mark.parametrize(
    ("behaviour", "failure"),
    [(Behaviour.reset(), Failure.CONNECTION_RESET), (Behaviour.close(), Failure.EOF)],
    ids=["reset", "close"],
)
@pytest.mark.parametrize("transport", ["tcp", "doh"])
async def test_stream_resolver_dropping_the_connection(
    lab: Lab, transport: str, behaviour: Behaviour, failure: Failure
) -> None:
    lab.table.both(NAME, behaviour)
    result = await run(lab, transport)
    assert result.failure == failure
    assert result.failed_operation == Operation.RESOLVE


@pytest.mark.parametrize("transport", ["udp", "tcp"])
async def test_resolver_down_is_connection_refused(lab: Lab, transport: str) -> None:
    hostport = f"[{lab.host}]" if ":" in lab.host else lab.host
    # TCP: bound, not listening (RST); UDP: nothing bound to that number (ICMP)
    with refusing_port(lab.host) as port:
        resolver = f"{transport}:{hostport}:{port}"
        start = time.monotonic()
        result = await probe(dns_target(resolver), fast(lab))
    assert result.failure == Failure.CONNECTION_REFUSED
    assert result.failed_operation == Operation.RESOLVE
    assert time.monotonic() - start < 1.5  # ICMP / RST, not the 2 s timeout


async def test_doh_resolver_down_is_connection_refused(lab: Lab) -> None:
    hostport = f"[{lab.host}]" if ":" in lab.host else lab.host
    with refusing_port(lab.host) as port:
        resolver = f"doh:https://{hostport}:{port}/dns-query"
        result = await probe(dns_target(resolver), fast(lab))
    assert result.failure == Failure.CONNECTION_REFUSED


# --- injection race (UDP) --------------------------------------------------------------------


async def test_racing_answers_keep_both_replies_and_flag_injection(lab: Lab) -> None:
    injected, real = Behaviour.answer("10.10.34.35"), Behaviour.answer(TG_A, TG_AAAA)
    lab.table.both(NAME, Behaviour.race(injected, real, delay_s=0.1))
    result = await run(lab, "udp", window=0.5)
    # the injector wins the race: its (bogon) answer is what a stub resolver would use
    assert result.failure == Failure.DNS_BOGON
    assert json_details(result)["answers"] == {"A": ["10.10.34.35"], "AAAA": []}
    assert "dns_injection_suspected" in result.flags
    a_replies = [r for r in json_details(result)["replies"] if r["qtype"] == "A"]
    assert [r["answers"] for r in a_replies] == [["10.10.34.35"], [TG_A]]
    assert a_replies[1]["delay_s"] - a_replies[0]["delay_s"] >= 0.09
    assert lab.count("udp") == 2  # two replies per query, but one query each


async def test_a_reply_after_the_window_is_not_collected(lab: Lab) -> None:
    injected, real = Behaviour.answer("10.10.34.35"), Behaviour.answer(TG_A)
    lab.table.both(NAME, Behaviour.race(injected, real, delay_s=1.0))
    result = await run(lab, "udp", window=0.1)
    assert len(json_details(result)["replies"]) == 2  # only the injected A and AAAA replies
    assert "dns_injection_suspected" not in result.flags


async def test_identical_duplicate_replies_are_not_injection(lab: Lab) -> None:
    same = Behaviour.answer("127.0.0.7")
    lab.table.both(NAME, Behaviour.race(same, same, delay_s=0.05))
    result = await run(lab, "udp", window=0.3)
    assert result.ok
    assert len(json_details(result)["replies"]) == 4
    assert result.flags == ()


@pytest.mark.parametrize(
    "injected",
    [Behaviour.garbage(), Behaviour.wrong_id("10.10.34.35")],
    ids=["garbage", "wrong_id"],
)
async def test_an_unusable_first_reply_leaves_the_real_answer(
    lab: Lab, injected: Behaviour
) -> None:
    lab.table.both(NAME, Behaviour.race(injected, Behaviour.answer("127.0.0.7"), delay_s=0.05))
    result = await run(lab, "udp", window=0.3)
    assert result.ok
    assert json_details(result)["answers"]["A"] == ["127.0.0.7"]
    assert len(json_details(result)["replies"]) == 4  # the unusable replies stay as evidence


async def test_doh_race_sends_only_the_real_answer(lab: Lab) -> None:
    injected, real = Behaviour.answer("10.10.34.35"), Behaviour.answer("127.0.0.7")
    lab.table.both(NAME, Behaviour.race(injected, real, delay_s=0.05))
    result = await run(lab, "doh")
    assert result.ok
    assert json_details(result)["answers"]["A"] == ["127.0.0.7"]


# --- B1: NXDOMAIN over UDP only, and consistency across resolvers ----------------------------


async def test_b1_udp_lie_shows_in_dns_consistency(lab: Lab) -> None:
    lab.table.host(NAME, "127.0.0.7", "::1")
    lab.table.both(NAME, Behaviour.nxdomain(), transport="udp")
    results = [await run(lab, t) for t in TRANSPORTS]
    udp, tcp, doh = results
    assert udp.failure == Failure.DNS_NXDOMAIN
    assert tcp.ok and doh.ok
    assert dns_consistency(results) == ("dns_udp_tcp_mismatch", "dns_doh_mismatch")
    assert dns_consistency([tcp, doh]) == ()


async def test_no_mismatch_when_all_resolvers_agree(lab: Lab) -> None:
    lab.table.host(NAME, "127.0.0.7", "::1")
    results = [await run(lab, t) for t in TRANSPORTS]
    assert all(r.ok for r in results)
    assert dns_consistency(results) == ()


async def test_system_resolver_with_an_ip_literal(lab: Lab) -> None:
    """Only an IP literal: getaddrinfo answers it locally (AI_NUMERICHOST), no query leaves."""
    result = await probe(dns_target("system", name=lab.host), fast(lab))
    assert result.ok, result.failure
    family = "AAAA" if ":" in lab.host else "A"
    assert json_details(result)["answers"][family] == [lab.host]
    assert "replies" not in json_details(result)


# --- DoH specifics -----------------------------------------------------------------------------


async def test_doh_unknown_authority(lab: Lab, tmp_path: Path) -> None:
    lab.table.host(NAME, "127.0.0.7")
    other_ca = CertificateAuthority("someone else")
    result = await probe(
        dns_target(lab.doh.resolver),
        settings(ca_file=str(other_ca.write_ca(tmp_path / "other.pem"))),
    )
    assert result.failure == Failure.SSL_UNKNOWN_AUTHORITY
    assert result.failed_operation == Operation.RESOLVE


@pytest.mark.parametrize(
    ("names", "expired", "failure"),
    [
        (("doh.example",), False, Failure.SSL_INVALID_HOSTNAME),
        (("127.0.0.1", "::1"), True, Failure.SSL_INVALID_CERTIFICATE),
    ],
    ids=["wrong-name", "expired"],
)
async def test_doh_bad_certificate(
    ca: CertificateAuthority,
    ca_file: str,
    tmp_path: Path,
    names: tuple[str, ...],
    expired: bool,
    failure: Failure,
) -> None:
    tls = ca.issue(*names, expired=expired).server_context(tmp_path, "bad")
    async with DoHServer(AnswerTable().host(NAME, "127.0.0.7"), tls) as doh:
        result = await probe(dns_target(doh.resolver), settings(ca_file=ca_file))
    assert result.failure == failure


async def test_doh_http_error_is_server_misbehaving(lab: Lab) -> None:
    lab.table.host(NAME, "127.0.0.7")
    resolver = lab.doh.resolver.replace("/dns-query", "/not-here")
    result = await probe(dns_target(resolver), fast(lab))
    assert result.failure == Failure.DNS_SERVER_MISBEHAVING
    assert [r["http_status"] for r in json_details(result)["replies"]] == [404, 404]


async def test_doh_giant_body_is_refused_unread(lab: Lab) -> None:
    lab.table.both(NAME, Behaviour.garbage(b"x" * 200_000))
    result = await run(lab, "doh")
    assert result.failure == Failure.DNS_SERVER_MISBEHAVING
    assert all(r["oversized"] for r in json_details(result)["replies"])


async def test_doh_server_answers_rfc8484_get(lab: Lab) -> None:
    lab.table.host(NAME, "127.0.0.7")
    query = build_query(NAME, "A", qid=0)
    encoded = base64.urlsafe_b64encode(query.to_wire()).rstrip(b"=").decode()
    connector = aiohttp.TCPConnector(ssl=_client_context(lab.ca_file))
    async with (
        aiohttp.ClientSession(connector=connector) as session,
        session.get(lab.doh.url, params={"dns": encoded}) as resp,
    ):
        assert resp.status == 200
        assert resp.content_type == CONTENT_TYPE
        reply = parse_message(await resp.read())
    assert reply.id == 0
    assert [rd.address for rd in reply.answer[0]] == ["127.0.0.7"]
    assert lab.doh.count(NAME, "A") == 1


async def test_doh_server_rejects_a_post_of_the_wrong_type(lab: Lab) -> None:
    connector = aiohttp.TCPConnector(ssl=_client_context(lab.ca_file))
    async with (
        aiohttp.ClientSession(connector=connector) as session,
        session.post(lab.doh.url, data=b"{}", headers={"Content-Type": "application/json"}) as r,
    ):
        assert r.status == 415
    assert lab.doh.count() == 0


def _client_context(ca_file: str) -> Any:
    import ssl

    return ssl.create_default_context(cafile=ca_file)


# --- the server itself ---------------------------------------------------------------------


async def test_udp_and_tcp_share_the_port(lab: Lab) -> None:
    assert lab.dns.udp_resolver.rsplit(":", 1)[1] == lab.dns.tcp_resolver.rsplit(":", 1)[1]
    assert lab.dns.port > 0


async def test_server_ignores_non_dns_datagrams_and_counts_queries(lab: Lab) -> None:
    lab.table.host(NAME, "127.0.0.7")
    family = socket.AF_INET6 if ":" in lab.host else socket.AF_INET
    with socket.socket(family, socket.SOCK_DGRAM) as sock:
        sock.sendto(b"\x00garbage", (lab.host, lab.dns.port))
    result = await run(lab, "udp")
    assert result.ok
    assert lab.dns.count() == 2
    assert lab.dns.count("udp", NAME, "A") == 1
    assert lab.dns.count("tcp") == 0


def test_transport_rule_beats_generic_rule_beats_default() -> None:
    table = AnswerTable(default=Behaviour.refused())
    table.host(NAME, "127.0.0.7").both(NAME, Behaviour.nxdomain(), transport="udp")
    assert table.lookup("G.WhatsApp.Net.", "a", "udp").kind == "nxdomain"
    assert table.lookup(NAME, "A", "tcp").kind == "answer"
    assert table.lookup("other.example", "A", "tcp").kind == "refused"


def test_plan_replies_race_orders_injected_first() -> None:
    query = build_query(NAME, "A")
    race = Behaviour.race(Behaviour.answer("10.0.0.1"), Behaviour.answer("127.0.0.7"), 0.25)
    (d1, first), (d2, second) = plan_replies(query, race)
    assert (d1, d2) == (0.0, 0.25)
    assert parse_message(first).answer[0][0].address == "10.0.0.1"
    assert parse_message(second).answer[0][0].address == "127.0.0.7"
    assert plan_replies(query, Behaviour.silence()) == []


def test_behaviour_rejects_a_bad_address() -> None:
    with pytest.raises(ValueError, match="does not appear"):
        Behaviour.answer("not-an-ip")


# --- resolver strings, registry, consistency rules -------------------------------------------


@pytest.mark.parametrize(
    ("spec", "kind", "host", "port", "url"),
    [
        ("system", "system", "", 0, ""),
        ("udp:127.0.0.1:53", "udp", "127.0.0.1", 53, ""),
        ("tcp:[::1]:5353", "tcp", "::1", 5353, ""),
        ("udp:dns.example:53", "udp", "dns.example", 53, ""),
        ("doh:https://[::1]:8443/dns-query", "doh", "", 0, "https://[::1]:8443/dns-query"),
    ],
)
def test_parse_resolver(spec: str, kind: str, host: str, port: int, url: str) -> None:
    parsed = parse_resolver(spec)
    assert (parsed.kind, parsed.host, parsed.port, parsed.url) == (kind, host, port, url)


@pytest.mark.parametrize(
    "spec",
    ["", "udp", "udp:127.0.0.1", "udp:127.0.0.1:0", "udp:127.0.0.1:70000", "tcp:::1:53",
     "tcp:[::1]53", "doh:http://x/dns-query", "dot:127.0.0.1:853", "udp::53"],
)  # fmt: skip
def test_parse_resolver_rejects(spec: str) -> None:
    with pytest.raises(ValueError, match="resolver"):
        parse_resolver(spec)


def test_dns_is_registered() -> None:
    assert REGISTRY["dns"].run is probe


def _result(
    resolver: str,
    *,
    answers: tuple[str, ...] = (),
    failure: str | None = None,
    host: str = NAME,
    prefixes: tuple[Any, ...] = (),
    skipped: SkipReason | None = None,
) -> ProbeResult:
    from probe.model import utcnow

    tgt = dns_target(resolver, host, prefixes)
    a = [x for x in answers if ":" not in x]
    aaaa = [x for x in answers if ":" in x]
    return ProbeResult(
        target=tgt,
        ok=failure is None and skipped is None,
        t=utcnow(),
        duration_s=0.01,
        failure=failure,
        evidence=DnsEvidence(answers={"A": tuple(a), "AAAA": tuple(aaaa)}),
        skipped=skipped,
    )


UDP, TCP, DOH, SYS = "udp:127.0.0.1:53", "tcp:127.0.0.1:53", "doh:https://127.0.0.1/q", "system"


def test_consistency_cdn_variation_inside_prefixes_is_fine() -> None:
    meta = (NET("157.240.0.0/17"),)
    results = [
        _result(UDP, answers=("157.240.1.1",), prefixes=meta),
        _result(DOH, answers=("157.240.9.9",), prefixes=meta),
    ]
    assert dns_consistency(results) == ()


def test_consistency_disjoint_sets_without_prefixes_are_flagged() -> None:
    results = [_result(SYS, answers=("157.240.1.1",)), _result(DOH, answers=("157.240.9.9",))]
    assert dns_consistency(results) == ("dns_doh_mismatch",)


def test_consistency_system_vs_plain_resolver_and_same_kind() -> None:
    results = [
        _result(SYS, failure=Failure.DNS_NXDOMAIN),
        _result(UDP, answers=("157.240.1.1",)),
        _result("udp:127.0.0.2:53", answers=("10.10.34.35",)),
    ]
    assert dns_consistency(results) == ("dns_system_mismatch", "dns_resolver_mismatch")


def test_consistency_ignores_failures_without_a_verdict() -> None:
    results = [
        _result(UDP, failure=Failure.GENERIC_TIMEOUT),
        _result(TCP, failure=Failure.DNS_SERVFAIL),
        _result(DOH, answers=("157.240.1.1",)),
        _result(SYS, skipped=SkipReason.VANTAGE_OFFLINE),
    ]
    assert dns_consistency(results) == ()


def test_consistency_compares_only_the_same_name() -> None:
    results = [
        _result(UDP, answers=("157.240.1.1",), host="a.example"),
        _result(TCP, answers=("157.240.9.9",), host="b.example"),
    ]
    assert dns_consistency(results) == ()


def test_consistency_bogon_failure_still_counts_as_an_answer() -> None:
    results = [
        _result(UDP, answers=("10.10.34.35",), failure=Failure.DNS_BOGON),
        _result(TCP, answers=("157.240.1.1",)),
    ]
    assert dns_consistency(results) == ("dns_udp_tcp_mismatch",)


@pytest.mark.parametrize(
    "injected",
    [Behaviour.garbage(), Behaviour.wrong_id("10.10.34.35")],
    ids=["garbage", "wrong_id"],
)
async def test_an_unusable_first_reply_does_not_end_the_wait(lab: Lab, injected: Behaviour) -> None:
    # A stub resolver ignores a datagram that is not an answer to its query and keeps
    # waiting: the real answer arriving after the reply window (but within dns_s) counts.
    real = Behaviour.answer("127.0.0.7")
    lab.table.both(NAME, Behaviour.race(injected, real, delay_s=0.4))
    result = await run(lab, "udp", window=0.05, dns_s=2.0)
    assert result.ok, result.failure
    assert json_details(result)["answers"]["A"] == ["127.0.0.7"]
    assert len(json_details(result)["replies"]) == 4  # the unusable replies stay as evidence


@pytest.mark.parametrize("host", ["127.0.0.1", "::1"])
async def test_doh_reply_that_is_not_http_is_server_misbehaving(
    ca: CertificateAuthority, ca_file: str, host: str
) -> None:
    # A DoH endpoint answering bytes that are not HTTP spoke, but never an answer; the
    # peer's bytes must not end up in the failure string.
    behaviour = BulkBehaviour(raw_response=b"garbage that is not http\r\n\r\n", path="/dns-query")
    async with HTTPSBulkServer(host, cert=ca.issue(host), behaviour=behaviour) as server:
        hostport = f"[{host}]" if ":" in host else host
        resolver = f"doh:https://{hostport}:{server.port}/dns-query"
        st = settings(ca_file=ca_file, resolvers=Resolvers(system=False))
        result = await probe(dns_target(resolver), st)
    assert result.failure == Failure.DNS_SERVER_MISBEHAVING
    assert result.failed_operation == Operation.RESOLVE
    assert json_details(result)["errors"] == {"A": "dns_server_misbehaving"} | {
        "AAAA": "dns_server_misbehaving"
    }
