"""The censorship lab's mechanisms, shown end to end with real servers and real probes.

One lab per module (the ``netns_lab`` fixture in conftest): the servers of
`probe.lab.servers` run in the servers namespace (`probe.lab.serve`), the probes run
unmodified in the client and control namespaces (`probe.lab.runprobe`), and each test
applies one behaviour of `probe.lab.censor` for its duration.  Every test shows both
halves: the client behind the censor sees the behaviour, and the control vantage (whose
path bypasses the censor) or an unaffected address sees a working service.

All traffic stays inside the lab's namespaces (10.200.0.0/16, fd00:200::/32).
"""

from __future__ import annotations

import base64
import hashlib
import json
import os
import socket
import ssl
import struct
import sys
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import pytest

from probe.lab import censor as c
from probe.lab.netns import ADDR, ETC_NETNS, NETNS_RUN_DIR, ns_argv, run
from probe.lab.nfq import parse_tcp
from probe.lab.stale import RECORD_DIR, cleanup_stale
from probe.lab.topology import Lab, ServeHandle
from probe.wire import stun as stun_wire

pytestmark = pytest.mark.lab

# Service addresses, one role each so that no test's leftovers (conntrack entries, set
# elements) can reach another test's target.
TLS = 1  # TLS :443, QUIC :443, TCP echo :5222
BLOCKED = 2  # TLS :443 (IP blocks)
BULK = 3  # HTTPS bulk :443 (B5, B7)
SLOW = 4  # HTTPS bulk :443 (B6)
RELAY = 5  # STUN binding :3478, STUN echo :3479 and :3480 (B9)
DELAYED = 6  # TCP echo :7
OTHER = 9  # unaffected: TLS :443, HTTPS bulk :8443, STUN binding :3478

# Stability runs (docs/lab.md): PROBE_LAB_REPEAT=10 runs the throttle and freeze tests
# marked with it that many times in a row; CI runs each once.
REPEAT = int(os.environ.get("PROBE_LAB_REPEAT", "1"))
ROLES = ("client", "control")
NAMES = ("e1.whatsapp.net", "blocked.example", "neutral.example", "stall.example")
BODY = 256 * 1024
FAST = {
    "connect_s": 1.0,
    "tls_s": 2.0,
    "quic_s": 1.5,
    "udp_s": 1.5,
    "app_s": 1.5,
    "dns_s": 1.5,
    "stall_s": 0.6,
    "transfer_s": 15.0,
}


def v4(i: int) -> str:
    return ADDR.service(i)


def v6(i: int) -> str:
    return ADDR.service6(i)


LAB_PREFIXES = [ADDR.services4, ADDR.services6]  # the lab's "service prefixes": not bogons


def job(probe: str, address: str, port: int, host: str | None = None, **params: Any) -> dict:
    return {
        "probe": probe,
        "address": address,
        "port": port,
        "host": host or address,
        "params": params,
        "timeouts": FAST,
    }


def dns_job(name: str, resolver: str, **extra: Any) -> dict:
    return {
        "probe": "dns",
        "host": name,
        "resolver": resolver,
        "timeouts": FAST,
        "prefixes": LAB_PREFIXES,
        **extra,
    }


def _specs(lab: Lab) -> list[dict[str, Any]]:
    cert = lab.issue(*NAMES)
    bulk = {"body_bytes": BODY}
    specs: list[dict[str, Any]] = []
    for addr in (v4, v6):
        specs += [
            {"kind": "tls", "host": addr(TLS), "port": 443, "cert": cert},
            {"kind": "quic", "host": addr(TLS), "port": 443, "cert": cert},
            {"kind": "tls", "host": addr(BLOCKED), "port": 443, "cert": cert},
            {
                "kind": "https_bulk",
                "host": addr(BULK),
                "port": 443,
                "cert": cert,
                "behaviour": bulk,
            },
            {"kind": "tls", "host": addr(OTHER), "port": 443, "cert": cert},
        ]
    specs += [
        {"kind": "tcp", "host": v4(TLS), "port": 5222, "mode": "echo"},
        {"kind": "https_bulk", "host": v4(SLOW), "port": 443, "cert": cert, "behaviour": bulk},
        {"kind": "stun", "host": v4(RELAY), "port": 3478},
        {"kind": "stun", "host": v4(RELAY), "port": 3479, "behavior": "echo"},
        {"kind": "stun", "host": v4(RELAY), "port": 3480, "behavior": "echo"},
        {"kind": "tcp", "host": v4(DELAYED), "port": 7, "mode": "echo"},
        {"kind": "https_bulk", "host": v4(OTHER), "port": 8443, "cert": cert, "behaviour": bulk},
        {"kind": "stun", "host": v4(OTHER), "port": 3478},
        {"kind": "stun", "host": v6(RELAY), "port": 3478},
        {
            "kind": "dns",
            "name": "dns",
            "host": ADDR.resolver4,
            "port": 53,
            "rules": [
                {"name": "e1.whatsapp.net", "host": [v4(TLS), v6(TLS)]},
                {"name": "g.whatsapp.net", "host": [v4(TLS)]},
                {"name": "lie.example", "host": [v4(TLS)]},
                {
                    "name": "lie.example",
                    "type": "A",
                    "transport": "udp",
                    "answer": {"kind": "nxdomain"},
                },
            ],
        },
    ]
    return specs


@pytest.fixture(scope="module")
def lab(netns_lab: Lab) -> Lab:
    return netns_lab


@pytest.fixture(scope="module")
def servers(lab: Lab) -> Iterator[ServeHandle]:
    handle = lab.serve(_specs(lab))
    yield handle
    handle.stop()


@pytest.fixture(autouse=True)
def _clean_censor(lab: Lab) -> Iterator[None]:
    """Whatever a test applied is gone before the next one starts, even if it failed."""
    yield
    lab.censor.clear()


def _nfqueue_available() -> None:
    try:
        import netfilterqueue  # noqa: F401
    except ImportError:
        pytest.skip("netfilterqueue not installed (pip install -e '.[lab]')")


# --- the topology itself ------------------------------------------------------------------------


def test_lab_builds_and_tears_down_in_under_a_second() -> None:
    started = time.monotonic()
    with Lab() as lab:
        namespaces = lab.namespaces
        assert all((NETNS_RUN_DIR / ns).exists() for ns in namespaces)
        assert (ETC_NETNS / lab.ns("client") / "resolv.conf").read_text().count(ADDR.resolver4)
        lab.censor.apply(c.Throttle([v4(OTHER)]), c.IPBlock([v4(BLOCKED)]))
    elapsed = time.monotonic() - started
    assert elapsed < 1.0, f"create + rules + teardown took {elapsed:.2f} s"
    for ns in namespaces:
        assert not (NETNS_RUN_DIR / ns).exists()
        assert not (ETC_NETNS / ns).exists()
    assert not (RECORD_DIR / f"{lab.id}.json").exists()


def test_lab_has_no_route_out(lab: Lab) -> None:
    # Route lookups only (nothing is sent): the client's default route leads to the
    # censor, and the censor knows no way to any non-lab address.
    assert ADDR.censor_client4 in run(["ip", "-n", lab.ns("client"), "route", "get", "192.0.2.1"])
    for role in ("censor", "servers"):
        done = run(["ip", "-n", lab.ns(role), "route", "get", "192.0.2.1"], check=False)
        assert "192.0.2.1" not in done
        done6 = run(["ip", "-n", lab.ns(role), "-6", "route", "get", "2001:db8::1"], check=False)
        assert "2001:db8::1" not in done6


def test_teardown_runs_when_the_block_fails() -> None:
    lab = Lab()

    def fail_inside() -> None:
        with lab:
            lab.censor.apply(c.IPBlock([v4(BLOCKED)]))
            raise RuntimeError("test failure")

    with pytest.raises(RuntimeError, match="test failure"):
        fail_inside()
    assert not any((NETNS_RUN_DIR / ns).exists() for ns in lab.namespaces)


def test_cleanup_stale_removes_only_labs_whose_owner_is_gone(lab: Lab) -> None:
    # A lab "left by a crashed run": namespaces plus a record naming a dead process.
    stale = Lab()
    ns = stale.ns("client")
    run(["ip", "netns", "add", ns])
    (ETC_NETNS / ns).mkdir(parents=True, exist_ok=True)
    RECORD_DIR.mkdir(exist_ok=True)
    dead = {"pid": 2**22 + 1, "start": "0", "namespaces": [ns], "workdir": None}
    (RECORD_DIR / f"{stale.id}.json").write_text(json.dumps(dead))
    try:
        removed = cleanup_stale(stale.prefix)
        assert stale.id in removed
        assert lab.id not in removed  # the running lab's owner (this process) is alive
        assert not (NETNS_RUN_DIR / ns).exists() and not (ETC_NETNS / ns).exists()
        assert (NETNS_RUN_DIR / lab.ns("censor")).exists()
    finally:
        run(["ip", "netns", "del", ns], check=False)


def test_servers_reachable_from_both_vantages_and_system_resolver_is_the_lab(
    lab: Lab, servers: ServeHandle
) -> None:
    jobs = [job("tls", a, 443, "e1.whatsapp.net") for a in (v4(TLS), v6(TLS))]
    for role in ("client", "control"):
        assert [r["ok"] for r in lab.probe_many(role, jobs)] == [True, True], role
    resolved = lab.probe("client", dns_job("e1.whatsapp.net", "system"))
    assert resolved["ok"] and resolved["details"]["answers"]["A"] == [v4(TLS)]
    assert servers.stats()["dns"]["queries"], "the system resolver never asked the lab DNS"


# --- B1 ---------------------------------------------------------------------------------------


def test_b1_resolver_lies_over_udp_only(lab: Lab, servers: ServeHandle) -> None:
    # The lab DNS server's own answer table: NXDOMAIN over UDP, the truth over TCP.
    resolver = f"{ADDR.resolver4}:53"
    udp, tcp, other = lab.probe_many(
        "client",
        [
            dns_job("lie.example", f"udp:{resolver}"),
            dns_job("lie.example", f"tcp:{resolver}"),
            dns_job("e1.whatsapp.net", f"udp:{resolver}"),
        ],
    )
    assert udp["failure"] == "dns_nxdomain_error"
    assert tcp["ok"] and tcp["details"]["answers"]["A"] == [v4(TLS)]
    assert other["ok"], "a name the resolver does not lie about resolves over UDP"


def test_b1_on_path_injector_races_the_real_answer(lab: Lab, servers: ServeHandle) -> None:
    _nfqueue_available()
    forged = "10.10.34.35"
    injector = c.DNSInjection(
        [
            {
                "name": "g.whatsapp.net",
                "type": "A",
                "answer": {"kind": "answer", "addresses": [forged]},
            }
        ]
    )
    query = dns_job("g.whatsapp.net", f"udp:{ADDR.resolver4}:53", reply_window_s=0.5)
    with lab.censor.active(injector):
        client = lab.probe("client", query)
        control = lab.probe("control", query)
        stats = injector.stats()
    a_replies = [r for r in client["details"]["replies"] if r["qtype"] == "A"]
    assert [r["answers"] for r in a_replies] == [[forged], [v4(TLS)]]  # forged first
    assert "dns_injection_suspected" in client["flags"]
    assert stats["injected"] >= 1
    assert control["ok"] and control["details"]["answers"]["A"] == [v4(TLS)]
    assert "dns_injection_suspected" not in control["flags"]


# --- B2 ---------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("action", "failure"),
    [
        ("drop", "generic_timeout_error"),
        ("reset", "connection_refused"),
    ],
)
def test_b2_ip_block(lab: Lab, servers: ServeHandle, action: str, failure: str) -> None:
    blocked = [job("tcp", a, 443) for a in (v4(BLOCKED), v6(BLOCKED))]
    with lab.censor.active(c.IPBlock([v4(BLOCKED), v6(BLOCKED)], action=action)):  # type: ignore[arg-type]
        results = lab.probe_many("client", [*blocked, job("tcp", v4(OTHER), 443)])
        control = lab.probe_many("control", blocked)
    assert [(r["failure"], r["failed_operation"]) for r in results[:2]] == [
        (failure, "connect")
    ] * 2
    if action == "reset":  # the censor's RST comes back at once, not after the timeout
        assert all(r["duration_s"] < 0.5 for r in results[:2])
    assert results[2]["ok"], "an unblocked address must stay reachable"
    assert all(r["ok"] for r in control)
    assert lab.probe("client", blocked[0])["ok"], "removing the block must restore access"


# --- B3 / B4 ----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("action", "failure", "stage"),
    [
        ("reset", "connection_reset", "awaiting_server_hello"),
        ("drop", "generic_timeout_error", "awaiting_server_hello"),
    ],
)
def test_b3_sni_filter(
    lab: Lab, servers: ServeHandle, action: str, failure: str, stage: str
) -> None:
    hellos_before = servers.stats()["tls0"]["sni_seen"].count("blocked.example")
    sni = c.SNIFilter(["blocked.example"], action=action)  # type: ignore[arg-type]
    with lab.censor.active(sni):
        blocked, neutral, blocked6 = lab.probe_many(
            "client",
            [
                job("tls", v4(TLS), 443, "blocked.example"),
                job("tls", v4(TLS), 443, "neutral.example"),
                job("tls", v6(TLS), 443, "blocked.example"),
            ],
        )
        hellos_during = servers.stats()["tls0"]["sni_seen"].count("blocked.example")
        control = lab.probe("control", job("tls", v4(TLS), 443, "blocked.example"))
    for result in (blocked, blocked6):
        assert (result["failure"], result["failed_operation"]) == (failure, "tls_handshake")
        assert result["details"]["handshake"]["stage"] == stage
    assert hellos_during == hellos_before, "the blocked ClientHello must never reach the server"
    assert neutral["ok"], "same address, neutral SNI: must work"
    assert control["ok"]


def _handshake_with_ciphers(lab: Lab, ciphers: str | None) -> str:
    """A TLS handshake from the client namespace with a plain ssl socket; outcome text."""
    ctx = ssl.create_default_context(cafile=lab.ca_file)
    if ciphers is not None:
        ctx.set_ciphers(ciphers)  # another cipher-suite vector: another fingerprint
    sock = lab.socket("client", socket.AF_INET, socket.SOCK_STREAM)
    sock.settimeout(2.0)
    try:
        sock.connect((v4(TLS), 443))
        with ctx.wrap_socket(sock, server_hostname="e1.whatsapp.net") as tls:
            return f"ok {tls.version()}"
    except ConnectionResetError:
        return "reset"
    finally:
        sock.close()


def test_b4_clienthello_shape_filter(lab: Lab, servers: ServeHandle) -> None:
    shape = c.TLSFingerprintFilter()  # the cipher-suite vector of Python's default context
    with lab.censor.active(shape):
        probe = lab.probe("client", job("tls", v4(TLS), 443, "e1.whatsapp.net"))
        default_shape = _handshake_with_ciphers(lab, None)
        other_shape = _handshake_with_ciphers(lab, "ECDHE-ECDSA-AES128-GCM-SHA256")
        control = lab.probe("control", job("tls", v4(TLS), 443, "e1.whatsapp.net"))
    assert probe["failure"] == "connection_reset"
    assert default_shape == "reset"
    assert other_shape.startswith("ok"), "same SNI, same address, other ClientHello: passes"
    assert control["ok"]


# --- TLS interception (MITM) -------------------------------------------------------------------


def _der_chain(result: dict[str, Any]) -> list[bytes]:
    return [base64.b64decode(c) for c in result["details"]["peer_certificates"]]


def test_tls_interception_forges_one_sni_and_relays_the_rest(
    lab: Lab, servers: ServeHandle
) -> None:
    mitm = c.TLSIntercept(["e1.whatsapp.net"], addresses=[v4(BULK), v6(BULK)])
    bulk = {"connections": 1, "max_bytes": BODY}
    with lab.censor.active(mitm):
        forged4, forged6, neutral = lab.probe_many(
            "client",
            [
                job("tls", v4(BULK), 443, "e1.whatsapp.net"),
                job("tls", v6(BULK), 443, "e1.whatsapp.net"),
                job("tls", v4(BULK), 443, "neutral.example"),
            ],
        )
        # a client that trusts the interceptor's CA (as users were told to install it):
        # the interceptor relays the plaintext to the real server
        trusting = lab.probe(
            "client",
            {**job("transfer", v4(BULK), 443, "e1.whatsapp.net", **bulk), "ca_file": mitm.ca_file},
        )
        control = lab.probe("control", job("tls", v4(BULK), 443, "e1.whatsapp.net"))
        stats = mitm.stats()
    assert mitm.ca_file is not None
    interceptor_ca = ssl.PEM_cert_to_DER_cert(open(mitm.ca_file).read())  # noqa: SIM115
    for forged in (forged4, forged6):
        assert (forged["failure"], forged["failed_operation"]) == (
            "ssl_unknown_authority",
            "tls_handshake",
        )
        assert forged["details"]["certificate"]["issuer"] == "CN=Lab Interceptor CA"
        leaf, ca = _der_chain(forged)
        assert hashlib.sha256(leaf).hexdigest() == forged["details"]["certificate"]["sha256"]
        assert ca == interceptor_ca
    assert neutral["ok"], "another SNI to the same address passes through untouched"
    assert neutral["details"]["certificate"]["issuer"].startswith("CN=probe lab CA")
    assert trusting["ok"] and trusting["details"]["connections"][0]["body_bytes"] == BODY
    assert control["ok"] and control["details"]["certificate"]["issuer"].startswith(
        "CN=probe lab CA"
    )
    assert stats["intercepted"] == 3 and stats["passed"] == 1 and stats["upstream_errors"] == 0


# --- censor localisation (probe trace) ----------------------------------------------------------


def _quiet_icmp_limits(lab: Lab) -> None:
    # The censor is a Linux router: it rate-limits time-exceeded (a token bucket per
    # client).  The trace reads a rate-limited hop correctly (tests/test_trace.py), but
    # naming the censor's address needs one answer from it per walk, so the lab's
    # censor answers every expired packet, as a router without rate limiting does.
    run(
        ns_argv(
            lab.ns("censor"),
            ["sysctl", "-qw", "net.ipv4.icmp_ratelimit=0", "net.ipv6.icmp.ratelimit=0"],
        )
    )


def test_trace_names_the_censor_hop(lab: Lab, servers: ServeHandle) -> None:
    from probe import trace as tr

    _quiet_icmp_limits(lab)

    def factory(family: socket.AddressFamily, kind: socket.SocketKind) -> socket.socket:
        return lab.socket("client", family, kind)

    bounds = {"max_hops": 5, "timeout_s": 0.5, "interval_s": 0.02, "factory": factory}
    hello = tr.client_hello("blocked.example")
    with (
        lab.censor.active(
            c.SNIFilter(["blocked.example"]),
            c.UDPBlock([v4(RELAY)]),
            c.IPBlock([v4(BLOCKED)], action="drop"),
            c.QUICFilter([v4(TLS)]),
        ),
        ThreadPoolExecutor(6) as pool,
    ):
        # The six walks at once: each reads only its own sockets' error queues
        # (IP_RECVERR), so none sees another's ICMP; the walks mostly wait out silences.
        walks = [
            pool.submit(tr.trace_tcp, v4(TLS), 443, hello, "tls", **bounds),  # type: ignore[arg-type]
            pool.submit(tr.trace_tcp, v6(TLS), 443, hello, "tls", **bounds),  # type: ignore[arg-type]
            pool.submit(
                tr.trace_tcp,
                v4(TLS),
                443,
                tr.client_hello("neutral.example"),
                "tls",
                **bounds,  # type: ignore[arg-type]
            ),
            pool.submit(tr.trace_udp, v4(RELAY), 3478, tr.stun_trigger(), "stun", **bounds),  # type: ignore[arg-type]
            pool.submit(tr.trace_tcp, v4(BLOCKED), 443, None, "syn", **bounds),  # type: ignore[arg-type]
            pool.submit(
                tr.trace_udp,
                v4(TLS),
                443,
                tr.quic_trigger("e1.whatsapp.net", v4(TLS), 443),
                "quic",
                **bounds,  # type: ignore[arg-type]
            ),
        ]
        sni4, sni6, neutral, udp, syn, quic = (w.result(timeout=60) for w in walks)
    # the client is one router (the censor) away from the servers
    for trace, censor, outcome in (
        (sni4, ADDR.censor_client4, "reset"),
        (sni6, ADDR.censor_client6, "reset"),
        (udp, ADDR.censor_client4, "silence"),
        (syn, ADDR.censor_client4, "silence"),
        (quic, ADDR.censor_client4, "silence"),
    ):
        assert trace.blocked_at_ttl == 2, trace
        assert trace.censor_hop is not None and trace.censor_hop.responder == censor, trace
        assert trace.hops[trace.blocked_at_ttl - 1].outcome == outcome
        assert f"at hop 1 ({censor})" in trace.conclusion
    assert neutral.reached_ttl == 2 and neutral.blocked_at_ttl is None


def test_probe_trace_command_in_the_client_namespace(lab: Lab, servers: ServeHandle) -> None:
    _quiet_icmp_limits(lab)
    argv = ["-m", "probe", "trace", v4(TLS), "--probe", "tls", "--sni", "blocked.example"]
    argv += ["--max-hops", "4", "--timeout", "0.5", "--format", "json"]
    asn_map = lab.workdir / "asn.txt"
    asn_map.write_text("10.200.1.0/24 AS64500\n10.200.100.0/24 AS64511\n")
    argv += ["--asn-map", str(asn_map), "--vantage-asn", "AS64500"]
    with lab.censor.active(c.SNIFilter(["blocked.example"])):
        done = lab.exec("client", [sys.executable, *argv], timeout_s=60)
    assert done.returncode == 1, done.stderr  # a block was located
    (record,) = done.json_lines()
    assert record["blocked_at_ttl"] == 2
    assert record["censor_hop"]["responder"] == ADDR.censor_client4
    assert record["trigger"] == "tls ClientHello, SNI blocked.example"
    # the censor's hop is in the client's own (lab) AS: a domestic censor
    assert (record["censor_asn"], record["in_vantage_as"]) == ("AS64500", True)


# --- B5 ---------------------------------------------------------------------------------------


def test_b5_post_handshake_stall(lab: Lab, servers: ServeHandle) -> None:
    transfer = {"connections": 1, "max_bytes": 64 * 1024}
    with lab.censor.active(c.PostHandshakeStall(names=["stall.example"])):
        handshake, stalled, neutral = lab.probe_many(
            "client",
            [
                job("tls", v4(BULK), 443, "stall.example"),
                job("transfer", v4(BULK), 443, "stall.example", **transfer),
                job("transfer", v4(BULK), 443, "neutral.example", **transfer),
            ],
        )
        control = lab.probe("control", job("transfer", v4(BULK), 443, "stall.example", **transfer))
    assert handshake["ok"], "the handshake itself completes under B5"
    assert not stalled["ok"] and stalled["failed_operation"] == "read"
    (conn,) = stalled["details"]["connections"]
    assert conn["outcome"] == "stalled" and conn["stage"] == "head", conn
    # Nothing of the response arrived: at most the TLS 1.3 session tickets the server sent
    # right after the handshake, before the request that triggered the stall.
    assert conn["body_bytes"] == 0 and conn["response_wire_bytes"] < 1024, conn
    assert neutral["ok"] and control["ok"]


# --- B6 ---------------------------------------------------------------------------------------


def test_b6_throttle(lab: Lab, servers: ServeHandle) -> None:
    # Tail drop at the throttle costs retransmission timeouts: a stall clock shorter than
    # a backed-off RTO would call the throttled flow stalled.
    timeouts = {**FAST, "stall_s": 4.0}
    params = {
        "connections": 1,
        "max_bytes": 48 * 1024,
        "throttle_min_bytes": 32 * 1024,
        "throttle_kbps": 300,
    }
    slow_job = {**job("transfer", v4(SLOW), 443, "e1.whatsapp.net", **params), "timeouts": timeouts}
    other_job = job("transfer", v4(OTHER), 8443, "e1.whatsapp.net", **params)
    with lab.censor.active(c.Throttle([v4(SLOW)], rate_kbit=150)):
        slow, other = lab.probe_many("client", [slow_job, other_job])
        control = lab.probe("control", slow_job)
    assert slow["failure"] == "throttled"
    assert 60 < slow["details"]["median_kbps"] < 200, slow["details"]["median_kbps"]
    assert other["ok"] and other["details"]["median_kbps"] > 2000
    assert control["ok"] and control["details"]["median_kbps"] > 2000


@pytest.mark.parametrize("run", range(REPEAT), ids=lambda n: f"run{n + 1}")
@pytest.mark.parametrize("rate_kbit", [100, 250])
def test_b6_throttle_at_two_rates_both_families_is_never_a_stall(
    lab: Lab, servers: ServeHandle, rate_kbit: int, run: int
) -> None:
    # FAST's stall_s (0.6 s) is shorter than a backed-off retransmission gap can be under
    # tail drop: the confirm window, not a generous stall_s, keeps it from reading as B7.
    params = {
        "connections": 2,
        "max_bytes": 12 * 1024,
        "throttle_min_bytes": 6 * 1024,
        "throttle_kbps": 300,
    }
    runs = []
    for addr in (v4, v6):  # one after the other, as the agent's transfer lane runs them
        # a shaper of its own per family: one family's queued tail does not meet the other
        with lab.censor.active(c.Throttle([addr(BULK)], rate_kbit=rate_kbit)):
            runs.append(
                lab.probe("client", job("transfer", addr(BULK), 443, "e1.whatsapp.net", **params))
            )
    for rec in runs:
        details = rec["details"]
        assert rec["failure"] == "throttled", (rec["address"], rec["failure"], details)
        assert details["stalled_connections"] == 0
        assert details["median_kbps"] < rate_kbit * 1.3, details["median_kbps"]


# --- B7 ---------------------------------------------------------------------------------------


def test_b7_freeze_after_16_kib(lab: Lab, servers: ServeHandle) -> None:
    params = {"connections": 1, "max_bytes": BODY}
    with lab.censor.active(c.ByteFreeze([v4(BULK), v6(BULK)], after_bytes=16384)):
        frozen4, frozen6 = lab.probe_many(
            "client",
            [
                job("transfer", v4(BULK), 443, "e1.whatsapp.net", **params),
                job("transfer", v6(BULK), 443, "e1.whatsapp.net", **params),
            ],
        )
        control = lab.probe("control", job("transfer", v4(BULK), 443, "e1.whatsapp.net", **params))
    for frozen in (frozen4, frozen6):
        assert frozen["failure"] == "stall_after_bytes"
        (wire,) = frozen["details"]["stalled_at_wire_bytes"]
        # conntrack counts IP packets (headers included): the TCP payload stops a little
        # below 16384, never above it, and well past the handshake.
        assert 12 * 1024 < wire < 16384, wire
    assert control["ok"] and control["details"]["connections"][0]["body_bytes"] == BODY


@pytest.mark.parametrize("run", range(REPEAT), ids=lambda n: f"run{n + 1}")
@pytest.mark.parametrize("after_kib", [12, 24, 36])
def test_b7_freezes_across_the_reported_range_stall_at_their_byte_count(
    lab: Lab, servers: ServeHandle, after_kib: int, run: int
) -> None:
    after = after_kib * 1024
    params = {"connections": 1, "max_bytes": BODY}
    with lab.censor.active(c.ByteFreeze([v4(BULK), v6(BULK)], after_bytes=after)):
        frozen = lab.probe_many(
            "client",
            [job("transfer", addr(BULK), 443, "e1.whatsapp.net", **params) for addr in (v4, v6)],
        )
    for rec in frozen:
        assert rec["failure"] == "stall_after_bytes", (rec["address"], rec["details"])
        (wire,) = rec["details"]["stalled_at_wire_bytes"]
        assert after - 4 * 1024 < wire < after, wire  # just under the trigger (IP bytes)


def test_b7_freezes_only_a_fraction_of_connections(lab: Lab, servers: ServeHandle) -> None:
    # 12 connections as three transfers of 4 at once: the censor picks each connection at
    # its SYN, so the split changes no odds; a stalled one waits out stall_s and the
    # confirm window, which three transfers wait out side by side.
    params = {"connections": 4, "max_bytes": 32 * 1024}
    transfer = job("transfer", v4(BULK), 443, "e1.whatsapp.net", **params)
    with lab.censor.active(c.ByteFreeze([v4(BULK)], after_bytes=16384, fraction=0.5)):
        results = lab.probe_many("client", [transfer] * 3)
    outcomes = [conn["outcome"] for r in results for conn in r["details"]["connections"]]
    assert len(outcomes) == 12, outcomes
    # P(all 12 the same) = 2 * 0.5**12 < 0.05 %: both kinds of connection must show up.
    assert "stalled" in outcomes and "limit" in outcomes, outcomes


# --- B8 ---------------------------------------------------------------------------------------


def test_b8_quic_v1_dropped_version_negotiation_passes(lab: Lab, servers: ServeHandle) -> None:
    quic = [job("quic", a, 443, "e1.whatsapp.net") for a in (v4(TLS), v6(TLS))]
    vn = job("quic_vn", v4(TLS), 443, "e1.whatsapp.net")
    with lab.censor.active(c.QUICFilter([v4(TLS), v6(TLS)])):
        q4, q6, negotiated = lab.probe_many("client", [*quic, vn])
        control = lab.probe_many("control", quic)
    for q in (q4, q6):
        assert (q["failure"], q["failed_operation"]) == ("generic_timeout_error", "quic_handshake")
    assert negotiated["ok"], "a reserved-version datagram still reaches the server"
    assert all(r["ok"] for r in control)
    assert lab.probe("client", quic[0])["ok"]


# --- B9 ---------------------------------------------------------------------------------------


def test_b9_udp_to_relay_dropped_tcp_passes(lab: Lab, servers: ServeHandle) -> None:
    stun = [job("stun", v4(RELAY), 3478), job("stun", v6(RELAY), 3478)]
    with lab.censor.active(c.UDPBlock([v4(RELAY), v6(RELAY)])):
        s4, s6, tcp, other = lab.probe_many(
            "client",
            [
                *stun,
                job("tcp", v4(TLS), 5222),
                job("stun", v4(OTHER), 3478),
            ],
        )
        control = lab.probe_many("control", stun)
    assert s4["failure"] == s6["failure"] == "udp_no_response"
    assert tcp["ok"] and other["ok"]
    assert all(r["ok"] for r in control)


def _udp_exchange(sock: socket.socket, payload: bytes, tries: int = 3) -> bool:
    """Send ``payload`` up to ``tries`` times; True as soon as anything comes back."""
    for _ in range(tries):
        sock.send(payload)
        try:
            sock.recv(2048)
            return True
        except TimeoutError:
            continue
    return False


def _udp_socket(lab: Lab, role: str, port: int) -> socket.socket:
    sock = lab.socket(role, socket.AF_INET, socket.SOCK_DGRAM)  # type: ignore[arg-type]
    sock.settimeout(0.3)
    sock.connect((v4(RELAY), port))
    return sock


def test_b9_stun_classification_blackholes_the_flow(lab: Lab, servers: ServeHandle) -> None:
    request = stun_wire.encode(stun_wire.binding_request(), fingerprint=True)
    random_payload = os.urandom(len(request))
    with lab.censor.active(c.StunBlackhole([v4(RELAY)], ports=[3479], hold_s=60)):
        first = _udp_socket(lab, "client", 3479)
        random_before = _udp_exchange(first, random_payload)
        stun_answered = _udp_exchange(first, request)
        later = _udp_socket(lab, "client", 3479)  # a new flow (new port) to the same relay
        random_after = _udp_exchange(later, random_payload)
        control = _udp_socket(lab, "control", 3479)
        control_stun = _udp_exchange(control, request)
        for sock in (first, later, control):
            sock.close()
    assert random_before, "random UDP passes until something STUN-shaped is seen"
    assert not stun_answered
    assert not random_after, "after the STUN packet the relay is blackholed for this client"
    assert control_stun
    fresh = _udp_socket(lab, "client", 3479)
    try:
        assert _udp_exchange(fresh, request), "removing the behaviour ends the blackhole"
    finally:
        fresh.close()


def test_b9_stun_vs_random_payload_by_the_real_probe(lab: Lab, servers: ServeHandle) -> None:
    # The stun probe's own swap test (control: random datagrams first, from another
    # socket) tells STUN-shaped silence from an address block.
    with lab.censor.active(c.StunBlackhole([v4(RELAY)], ports=[3480], hold_s=60)):
        result = lab.probe("client", job("stun", v4(RELAY), 3480, control=True))
    assert result["failure"] == "udp_no_response"
    assert result["details"]["control"]["replied"], "random datagrams to the same port answered"


def test_b9_random_loss(lab: Lab, servers: ServeHandle) -> None:
    sent = 200
    with lab.censor.active(c.RandomLoss(50, [v4(RELAY)], direction="up")):
        sock = _udp_socket(lab, "client", 3479)
        sock.settimeout(0.5)
        for i in range(sent):
            sock.send(i.to_bytes(4, "big"))
        received = set()
        try:
            for _ in range(sent):
                received.add(int.from_bytes(sock.recv(64), "big"))
        except TimeoutError:
            pass
        sock.close()
    # Binomial(200, 0.5): sd ~7, so 60..140 is beyond 5 sd either way.
    assert 60 < len(received) < 140, len(received)


def test_b9_flow_cut_after_t_seconds(lab: Lab, servers: ServeHandle) -> None:
    flow = {"mode": "flow", "duration_s": 2.5, "rate_pps": 20, "stun_packets": 1}
    with lab.censor.active(c.FlowCutoff([v4(RELAY)], ports=[3480], after_s=1.0)):
        # client and control at the same time: one prober process each
        with ThreadPoolExecutor(2) as pool:
            runs = [pool.submit(lab.probe, r, job("stun", v4(RELAY), 3480, **flow)) for r in ROLES]
            cut, control = (f.result() for f in runs)
        fresh = _udp_socket(lab, "client", 3480)
        fresh_answered = _udp_exchange(fresh, b"new flow")
        fresh.close()
    assert cut["failure"] == "udp_no_response"
    assert 0.7 < cut["details"]["cutoff_s"] < 1.6, cut["details"]
    assert control["ok"]
    assert fresh_answered, "a new flow gets its own t seconds"


# --- plain network conditions -------------------------------------------------------------------


def test_delay_holds_packets(lab: Lab, servers: ServeHandle) -> None:
    _nfqueue_available()
    probe = job("tcp", v4(DELAYED), 7)
    delay = c.Delay(150, [v4(DELAYED)], direction="down")
    with lab.censor.active(delay):
        slow = lab.probe("client", probe)
        control = lab.probe("control", probe)
        synacks = delay.synacks()
        again = delay.synacks()
    assert slow["ok"] and 0.14 < slow["details"]["connect_time_s"] < 0.6
    assert control["ok"] and control["details"]["connect_time_s"] < 0.05
    # The handler says what it did: the client's SYN-ACK (the control path bypasses the
    # censor), held from the censor kernel's receive stamp; a reading forgets the log.
    [synack] = synacks
    assert (synack["server"], synack["server_port"]) == (v4(DELAYED), 7)
    assert synack["client"] == ADDR.client4 and synack["kernel_stamp"] is True
    assert synack["held_us"] >= 150_000 - 20  # never released before it is due (20 µs slack)
    # Causality, not speed: the client's kernel timed the handshake across the hold.
    assert 1e6 * slow["phases"]["connect_rtt"] + 1 >= synack["held_us"]
    assert again == []


def test_nfq_parse_tcp_reads_a_syn_ack() -> None:
    header = struct.pack("!HHIIBBHHH", 7, 40000, 1, 2, 5 << 4, 0x12, 65535, 0, 0)
    ip = struct.pack(
        "!BBHHHBBH4s4s", 0x45, 0, 20 + len(header), 0, 0, 64, socket.IPPROTO_TCP, 0,
        socket.inet_aton("10.0.0.1"), socket.inet_aton("10.0.0.2"),
    )  # fmt: skip
    assert parse_tcp(ip + header) == ("10.0.0.1", 7, "10.0.0.2", 40000, 0x12)
    assert parse_tcp(ip + header[:10]) is None  # cut short before the flags
    udp = ip[:9] + bytes([socket.IPPROTO_UDP]) + ip[10:]
    assert parse_tcp(udp + header) is None


def test_behaviours_compose_and_remove_cleanly(lab: Lab, servers: ServeHandle) -> None:
    before = lab.censor.ruleset()
    both = (c.SNIFilter(["blocked.example"]), c.IPBlock([v4(BLOCKED)], action="reset"))
    with lab.censor.active(*both):
        sni, ip = lab.probe_many(
            "client",
            [
                job("tls", v4(TLS), 443, "blocked.example"),
                job("tcp", v4(BLOCKED), 443),
            ],
        )
    assert (sni["failure"], ip["failure"]) == ("connection_reset", "connection_refused")
    assert lab.censor.ruleset() == before
