"""Every probe type through `probe once` and a normal config, against real loopback servers.

One server of each protocol (DNS over UDP/TCP/HTTPS, TLS, QUIC, HTTPS bulk, STUN,
MTProto, WhatsApp Noise) is started from the same specs the lab uses
(`probe.lab.serve.build_server`), the agent is pointed at them through `services:`,
and every result and every verdict must come back `ok`: the clean-network baseline of
the whole pipeline (gate, DNS, fan-out, swaps, verdicts, output).
"""

from __future__ import annotations

import contextlib
import json
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest

from probe.lab.certs import CertificateAuthority
from probe.lab.serve import build_server
from tests.agentproc import PROBE, run_cli

NAMES = ("web.lab.test", "quic.lab.test", "bulk.lab.test")


@pytest.fixture
async def servers(ca: CertificateAuthority, tmp_path: Path) -> AsyncIterator[dict[str, Any]]:
    ca.issue(*NAMES, "127.0.0.1", "::1").write(tmp_path, "leaf")
    stem = str(tmp_path / "leaf")
    # IPv6-only and IPv4-only names: each family is exercised, every server bound once
    rules = [
        {"name": "web.lab.test", "host": ["::1"]},
        {"name": "quic.lab.test", "host": ["::1"]},
        {"name": "bulk.lab.test", "host": ["127.0.0.1"]},
    ]
    specs = {
        "dns": {"kind": "dns", "rules": rules},
        "doh": {"kind": "doh", "cert": stem, "rules": rules},
        "tls": {"kind": "tls", "cert": stem, "alpn": ["h2", "http/1.1"], "host": "::1"},
        "quic": {"kind": "quic", "cert": stem, "host": "::1"},
        "bulk": {
            "kind": "https_bulk",
            "cert": stem,
            "behaviour": {"body_bytes": 96 * 1024, "path": "/big.bin"},
        },
        "stun": {"kind": "stun"},
        "stun6": {"kind": "stun", "host": "::1"},
        "mtproto": {"kind": "mtproto"},
        "mtproto6": {"kind": "mtproto", "host": "::1"},
        "noise": {"kind": "noise"},
        "control": {"kind": "tcp", "mode": "close"},
        "control6": {"kind": "tcp", "mode": "close", "host": "::1"},
    }
    async with contextlib.AsyncExitStack() as stack:
        ports = {}
        for name, spec in specs.items():
            server = await stack.enter_async_context(build_server(spec))
            ports[name] = server.port
        ports["ca"] = str(ca.write_ca(tmp_path / "ca.pem"))
        yield ports


def config(p: dict[str, Any]) -> str:
    def ep(
        host: str,
        port: int,
        probes: str,
        transport: str = "tcp",
        role: str = "web",
        name: str | None = None,
    ) -> str:
        label = f"name: {name}, " if name else ""
        return (
            f"      - {{{label}host: '{host}', ports: [{port}], transport: {transport}, "
            f"role: {role}, probes: {probes}, source: test, confidence: C}}\n"
        )

    return (
        "vantage: {name: e2e, country: ZZ, asn: AS0}\n"
        "timeouts: {dns_s: 2, connect_s: 2, tls_s: 2, quic_s: 3, udp_s: 2, app_s: 2,"
        " transfer_s: 10, stall_s: 2}\n"
        f"resolvers: {{system: false, udp: ['127.0.0.1:{p['dns']}'],"
        f" tcp: ['127.0.0.1:{p['dns']}'], doh: 'https://127.0.0.1:{p['doh']}/dns-query',"
        " reply_window_s: 0.2}\n"
        f"tls: {{ca_file: {p['ca']}}}\n"
        "seeds: []\n"
        "services:\n"
        "  - service: lab\n    source: test\n"
        "    prefixes: [{cidr: 127.0.0.0/8, source: test, confidence: C},"
        " {cidr: '::1/128', source: test, confidence: C}]\n"
        "    endpoints:\n"
        + ep("web.lab.test", p["tls"], "[dns, tcp, tls]")
        + ep("quic.lab.test", p["quic"], "[quic, quic_vn]", "udp")
        + ep(
            "bulk.lab.test",
            p["bulk"],
            "[{transfer: {path: /big.bin, connections: 2, throttle_kbps: 1}}]",
        )
        + ep("127.0.0.1", p["stun"], "[stun]", "udp", "call-relay", "relay-v4")
        + ep("::1", p["stun6"], "[stun]", "udp", "call-relay", "relay-v6")
        + ep("127.0.0.1", p["mtproto"], "[tcp, mtproto]", role="signalling", name="dc-v4")
        + ep("::1", p["mtproto6"], "[mtproto]", role="signalling", name="dc-v6")
        + ep("127.0.0.1", p["noise"], "[whatsapp]", role="signalling", name="chat")
        + "  - service: controls\n    source: test\n    endpoints:\n"
        + ep("127.0.0.1", p["control"], "[tcp]", role="control", name="loopback")
        + ep("::1", p["control6"], "[tcp]", role="control", name="loopback6")
    )


async def test_every_probe_type_succeeds_through_probe_once(
    servers: dict[str, Any], tmp_path: Path
) -> None:
    cfg = tmp_path / "agent.yaml"
    cfg.write_text(config(servers))
    rc, out, err = await run_cli(*PROBE, "once", "-c", str(cfg), "--format", "json", timeout_s=120)
    records = [json.loads(line) for line in out.splitlines()]
    results = [r for r in records if r["type"] == "result"]
    verdicts = [r for r in records if r["type"] == "verdict"]
    failed = [
        (r["endpoint"], r["probe"], r["failure"] or r["skipped"]) for r in results if not r["ok"]
    ]
    assert rc == 0, (failed, err[-2000:])
    assert not failed
    probes = {r["probe"] for r in results}
    assert probes == {
        "dns",
        "tcp",
        "tls",
        "quic",
        "quic_vn",
        "transfer",
        "stun",
        "mtproto",
        "whatsapp",
    }
    resolvers = {r["resolver"] for r in results if r["probe"] == "dns"}
    assert {x.split(":", 1)[0] for x in resolvers} == {"udp", "tcp", "doh"}
    families = {(r["probe"], ":" in (r["address"] or "")) for r in results if r["address"]}
    assert {("tls", True), ("quic", True), ("transfer", False)} <= families
    assert verdicts and {v["verdict"] for v in verdicts} == {"ok"}
