"""`probe trace` without a lab: the TTL walk against real loopback servers, the reading of
hop sequences, and the command line's errors.  The lab test (censor at a known hop) is in
tests/test_lab_mechanisms.py."""

from __future__ import annotations

import asyncio
import json
import socket
import struct
import sys
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

from probe.lab.certs import CertificateAuthority
from probe.lab.servers.tls import TLSServer
from probe.trace import (
    AsnMap,
    Hop,
    TraceError,
    _conclude,
    _queued_hop,
    client_hello,
    stun_trigger,
    trace_tcp,
    trace_udp,
    with_asn,
)
from tests.agentproc import PROBE, run_cli

FAST = {"max_hops": 4, "timeout_s": 0.5, "interval_s": 0.02}


@pytest.fixture
def udp_echo() -> Iterator[int]:
    sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    sock.bind(("127.0.0.1", 0))
    sock.settimeout(0.2)

    def serve() -> None:
        for _ in range(50):  # bounded: a few datagrams per test
            try:
                data, peer = sock.recvfrom(2048)
            except TimeoutError:
                continue
            except OSError:
                return
            sock.sendto(data, peer)

    with ThreadPoolExecutor(1) as pool:
        pool.submit(serve)
        yield sock.getsockname()[1]
        sock.close()


def test_client_hello_is_a_tls_handshake_record_naming_the_sni() -> None:
    hello = client_hello("blocked.example")
    assert hello[0] == 0x16 and hello[5] == 0x01  # handshake record, ClientHello
    assert b"blocked.example" in hello


def test_udp_trigger_on_loopback_reaches_the_server_at_ttl_1(udp_echo: int) -> None:
    t = trace_udp("127.0.0.1", udp_echo, stun_trigger(), "stun", **FAST)
    assert t.reached_ttl == 1 and t.blocked_at_ttl is None
    assert t.hops[0].outcome == "reply" and t.hops[0].responder == "127.0.0.1"
    assert t.conclusion.startswith("reached the server at TTL 1")


async def test_tls_trigger_on_loopback_reaches_the_server() -> None:
    ca = CertificateAuthority()
    async with TLSServer("127.0.0.1", cert=ca.issue("chat.lab.example")) as server:
        t = await asyncio.to_thread(
            trace_tcp, "127.0.0.1", server.port, client_hello("chat.lab.example"), "tls", **FAST
        )
    assert t.reached_ttl == 1, t
    assert t.protocol == "tcp" and "UDP walk" in t.notes[0]


def test_hop_limits_are_bounded() -> None:
    with pytest.raises(TraceError, match=r"max_hops must be in 1\.\.32"):
        trace_udp("127.0.0.1", 9, b"x", "x", max_hops=33)


def _te(ttl: int, who: str | None) -> Hop:
    return Hop(ttl, "time_exceeded", who)


def test_a_rate_limited_silent_router_before_the_reset_is_not_the_block() -> None:
    # TTL 1's time-exceeded was rate-limited; the UDP walk named the router there
    hops = [Hop(1, "silence"), Hop(2, "reset")]
    t = _conclude("192.0.2.1", 443, "tcp", "tls", hops, [_te(1, "10.0.0.1"), _te(2, "10.0.1.1")])
    assert t.blocked_at_ttl == 2
    assert t.censor_hop == Hop(1, "time_exceeded", "10.0.0.1")
    assert "at hop 1 (10.0.0.1)" in t.conclusion


def test_a_drop_starts_where_the_silence_never_ends() -> None:
    hops = [_te(1, "10.0.0.1"), Hop(2, "silence"), _te(3, "10.0.2.1"), *map(_silent, (4, 5, 6))]
    t = _conclude("192.0.2.1", 3478, "udp", "stun", hops, [])
    assert t.blocked_at_ttl == 4 and t.censor_hop == Hop(3, "time_exceeded", "10.0.2.1")
    # the trigger's own TTL 4 was silent, but the UDP walk met a router there: passed it
    t = _conclude("192.0.2.1", 3478, "udp", "stun", hops, [_te(4, "10.0.3.1")])
    assert t.blocked_at_ttl == 5 and t.censor_hop == Hop(4, "time_exceeded", "10.0.3.1")


def _silent(ttl: int) -> Hop:
    return Hop(ttl, "silence")


def test_an_answer_in_the_servers_name_from_too_close_is_injected() -> None:
    hops = [_te(1, "10.0.0.1"), Hop(2, "reply", "192.0.2.53")]
    path = [
        _te(1, "10.0.0.1"),
        _te(2, "10.0.1.1"),
        _te(3, "10.0.2.1"),
        Hop(4, "unreachable", "192.0.2.53"),
    ]
    t = _conclude("192.0.2.53", 53, "udp", "dns", hops, path)
    assert t.blocked_at_ttl == 2 and t.reached_ttl is None
    assert "injected" in t.conclusion and "at hop 1 (10.0.0.1)" in t.conclusion


async def test_cli_errors_are_one_line() -> None:
    rc, out, err = await run_cli(*PROBE, "trace", "127.0.0.1", "--probe", "dns")
    assert (rc, out) == (2, "")
    assert err.strip() == "probe: trace: --probe dns needs --name (the name to query)"
    rc, _, err = await run_cli(*PROBE, "trace", "nosuch/endpoint")
    assert rc == 2
    assert (
        err.strip()
        == "probe: trace: no endpoint 'nosuch/endpoint' in the config (service/endpoint)"
    )


async def test_cli_traces_a_loopback_address_as_json(udp_echo: int) -> None:
    rc, out, err = await run_cli(
        *PROBE, "trace", "127.0.0.1", "--probe", "stun", "--port", str(udp_echo),
        "--max-hops", "3", "--timeout", "0.5", "--format", "json",
    )  # fmt: skip
    assert rc == 0, err
    (record,) = [json.loads(line) for line in out.splitlines()]
    assert record["reached_ttl"] == 1 and record["trigger"] == "stun Binding request"


def test_asn_map_reads_both_formats_and_matches_the_longest_prefix(tmp_path: Path) -> None:
    table = tmp_path / "pfx2as.txt"
    table.write_text(
        "# prefix-to-AS\n10.0.0.0/8 AS64500\n10.1.0.0\t16\t64501\n2001:db8::/32 64502_64503\n"
    )
    asn = AsnMap.load(str(table))
    assert asn.lookup("10.1.2.3") == "AS64501"  # the /16 wins over the /8
    assert asn.lookup("10.2.0.1") == "AS64500"
    assert asn.lookup("2001:db8::1") == "AS64502"  # an AS set: its first member
    assert asn.lookup("192.0.2.1") is None


def test_a_bad_asn_map_line_is_named(tmp_path: Path) -> None:
    table = tmp_path / "bad.txt"
    table.write_text("10.0.0.0/8 AS64500\n10.0.0.0/8 cloudflare\n")
    with pytest.raises(TraceError, match=r"bad\.txt:2: 'cloudflare' is not an AS number"):
        AsnMap.load(str(table))


def test_the_censor_hop_is_placed_in_or_out_of_the_vantages_as(tmp_path: Path) -> None:
    hops = [_te(1, "10.0.0.1"), _te(2, "198.51.100.1"), Hop(3, "reset")]
    blocked = _conclude("192.0.2.1", 443, "tcp", "tls", hops, [])
    table = tmp_path / "asn.txt"
    table.write_text("10.0.0.0/8 AS64500\n198.51.100.0/24 AS64511\n")
    placed = with_asn(blocked, AsnMap.load(str(table)), "AS64511")
    assert (placed.censor_asn, placed.in_vantage_as) == ("AS64511", True)
    assert placed.conclusion.endswith("that hop is in AS64511 (the vantage's own AS)")
    elsewhere = with_asn(blocked, AsnMap.load(str(table)), "AS12389")
    assert elsewhere.in_vantage_as is False
    assert elsewhere.conclusion.endswith("(not the vantage's AS12389)")


def _queued(origin: int, icmp_type: int, offender: bytes) -> list[tuple[int, int, bytes]]:
    level, kind = (socket.IPPROTO_IPV6, 25) if origin == 3 else (socket.SOL_IP, 11)
    return [(level, kind, struct.pack("=IBBBBII", 113, origin, icmp_type, 0, 0, 0, 0) + offender)]


def _sin(address: str) -> bytes:
    return (
        socket.AF_INET.to_bytes(2, sys.byteorder) + b"\0\0" + socket.inet_aton(address) + bytes(8)
    )


def test_an_error_queue_report_becomes_the_hop_the_shared_parser_reads() -> None:
    # The UDP walk reads the error queue with the probes' parser (probe.wire.errqueue).
    assert _queued_hop(3, 0.01, _queued(2, 11, _sin("10.0.2.1"))) == Hop(
        3, "time_exceeded", "10.0.2.1", 0.01
    )
    assert _queued_hop(4, 0.02, _queued(2, 3, _sin("192.0.2.9"))) == Hop(
        4, "unreachable", "192.0.2.9", 0.02
    )
    v6 = socket.AF_INET6.to_bytes(2, sys.byteorder) + bytes(6)
    v6 += socket.inet_pton(socket.AF_INET6, "2001:db8::1") + bytes(4)
    assert _queued_hop(5, 0.03, _queued(3, 3, v6)) == Hop(5, "time_exceeded", "2001:db8::1", 0.03)
    # A local error (origin 1) names nobody; the walk stops on it as before.
    assert _queued_hop(6, 0.04, _queued(1, 0, b"")) == Hop(6, "unreachable", None, 0.04)


def test_an_unnamed_sender_is_no_router_not_0_0_0_0() -> None:
    """The kernel leaves the offender's family unspecified when it does not know the
    sender: trace's own parser used to name 0.0.0.0 as the router at that hop."""
    unspecified = bytes(16)
    assert _queued_hop(2, 0.01, _queued(2, 11, unspecified)).responder is None
