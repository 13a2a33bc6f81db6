"""The lab's scenario catalogue: one censor behaviour each, and the verdicts it must earn.

Shared by the scenario tests (``tests/test_lab_scenarios.py``) and ``probe lab demo``.
Each `Scenario` names a FIELD.md behaviour (B1..B9, or ``clean`` / ``server_down``), the
kernel mechanism that reproduces it (`probe.lab.censor` objects built on lab addresses),
and what the agent must conclude: the exact verdict of every endpoint and service, and
the exact failure string of the probes that show it.

`ScenarioLab` runs them the way an operator runs the agent: one lab, one set of servers
(started once), and per scenario: apply the censor rules, run ``probe once`` with a
config file from the *control* namespace (the uncensored vantage), then the same config
from the *client* namespace with ``--control-results`` pointing at the control's JSON
Lines, read the client's verdict records, remove the rules.  The system resolver inside
each namespace is the lab DNS (the control has a resolver of its own, as a real control
vantage would), so nothing is special-cased for the lab in the agent.

Lab services (all IPv4; see the module constants): a "telegram" with five DCs speaking
MTProto on 443, a "whatsapp" with a chat endpoint (Noise hello on 5222), a web endpoint
(DNS, TCP, TLS, QUIC v1, version negotiation and an HTTPS bulk object on 443) and a call
relay (STUN over UDP 3478), and a "controls" service whose endpoint (role control) is
never censored: the offline gate needs it, and it shows that the censor is targeted.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import math
import os
import subprocess
import sys
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from types import TracebackType
from typing import Any, Self

import yaml

from ..archive import iter_archive, result_fields
from . import censor as c
from .topology import ADDR, Lab, LabError, ServeHandle

__all__ = [
    "CATALOGUE",
    "Expect",
    "Outcome",
    "RoundOutcome",
    "Scenario",
    "ScenarioLab",
    "by_name",
    "check",
]

# --- the lab's services ---------------------------------------------------------------------

DCS: dict[str, str] = {f"dc{i}": ADDR.service(i) for i in range(1, 6)}  # MTProto :443
CHAT = ADDR.service(6)  # g.whatsapp.net: WhatsApp Noise :5222
WEB = ADDR.service(7)  # web.whatsapp.com: HTTPS bulk (TCP 443), QUIC (UDP 443)
RELAY = ADDR.service(8)  # call relay: STUN :3478 (UDP)
CALL = ADDR.service(9)  # a call peer: STUN echo :3479 (UDP), probed with a call-like flow
MEDIA = ADDR.service(12)  # mmg.whatsapp.net, dual-stack: TLS :443 on IPv4 ...
MEDIA6 = ADDR.service6(12)  # ... and on IPv6
CONTROL6 = ADDR.service6(10)  # the control's IPv6 address: the gate learns IPv6 works
CONTROL = ADDR.service(10)  # the control endpoint: TLS :443, SNI control.example
DOMESTIC = ADDR.service(11)  # a domestic control (domestic: true): TLS :443
CONTROL_RESOLVER = ADDR.service(16)  # the control vantage's own (honest) resolver

CHAT_NAME = "g.whatsapp.net"
WEB_NAME = "web.whatsapp.com"
CONTROL_NAME = "control.example"
MEDIA_NAME = "mmg.whatsapp.net"
DOH_URL = f"https://{ADDR.resolver4}/dns-query"  # the client's DoH resolver (truthful)
CALL_PORT = 3479
# A call-like flow: 3 STUN requests, then RTP-sized packets at 50/s (docs/probes/stun.md).
CALL_FLOW: dict[str, Any] = {"mode": "flow", "duration_s": 1.0, "rate_pps": 50}
DOMESTIC_NAME = "domestic.example"
BULK_PATH = "/static/bulk.bin"
BULK_BYTES = 64 * 1024
FORGED = "10.10.34.35"  # an ISP-stub-like answer: a bogon, so the agent never dials it
FORGED2 = "10.10.34.36"  # a second injector's answer (racing injection)

# Short on purpose: the whole catalogue must run in well under 5 minutes on 2 cores.
# Short timeouts are exactly what congestion scenarios need to show: the agent does not
# depend on generous ones (transfers run alone, a stall is confirmed for twice stall_s
# more, a handshake still receiving gets more time; docs/verdicts.md, "Congestion").
TIMEOUTS: dict[str, float] = {
    "dns_s": 1.5,
    "connect_s": 1.5,
    "tls_s": 3.0,
    "quic_s": 2.0,
    "udp_s": 1.5,
    "app_s": 2.0,
    "transfer_s": 8.0,
    "stall_s": 1.5,
}
TRANSFER: dict[str, Any] = {
    "path": BULK_PATH,
    "connections": 2,
    "max_bytes": 48 * 1024,  # 2.6 s at 150 kbit/s; well past the B7 window
    "throttle_kbps": 300,
    "throttle_min_bytes": 32 * 1024,
}
PREFIXES = [ADDR.services4, ADDR.services6]  # lab answers are "inside the service"

# The answer table every scenario starts from (both resolvers).
BASE_DNS: list[dict[str, Any]] = [
    {"name": CHAT_NAME, "host": [CHAT]},
    {"name": WEB_NAME, "host": [WEB]},
    {"name": CONTROL_NAME, "host": [CONTROL]},
    {"name": MEDIA_NAME, "host": [MEDIA, MEDIA6]},
]


def _prefixes() -> list[dict[str, str]]:
    return [{"cidr": p, "source": "probe lab", "confidence": "C"} for p in PREFIXES]


def _endpoint(**fields: Any) -> dict[str, Any]:
    return {**fields, "source": "probe lab", "confidence": "C"}


def services() -> list[dict[str, Any]]:
    """The lab services in the seed-file schema (docs/configuration.md)."""
    telegram = [
        _endpoint(
            name=name, host=address, ports=[443], role="signalling", probes=["tcp", "mtproto"]
        )
        for name, address in DCS.items()
    ]
    whatsapp = [
        _endpoint(
            name="chat",
            host=CHAT_NAME,
            ports=[5222],
            role="signalling",
            probes=["dns", "tcp", "whatsapp"],
        ),
        _endpoint(
            name="web",
            host=WEB_NAME,
            ports=[443],
            role="web",
            probes=["dns", "tcp", "tls", "quic", "quic_vn", {"transfer": TRANSFER}],
        ),
        _endpoint(
            name="relay",
            host=RELAY,
            ports=[3478],
            transport="udp",
            role="call-relay",
            probes=["stun"],
        ),
        _endpoint(
            name="call",
            host=CALL,
            ports=[CALL_PORT],
            transport="udp",
            role="call-relay",
            probes=[{"stun": CALL_FLOW}],
        ),
        _endpoint(
            name="media",
            host=MEDIA_NAME,
            ports=[443],
            role="media",
            probes=["dns", "tcp", "tls"],
        ),
    ]
    control = [
        _endpoint(
            name="control",
            host=CONTROL,
            addresses=[CONTROL6],  # the gate also tries it: IPv6 works on the lab path
            ports=[443],
            role="control",
            sni=CONTROL_NAME,
            probes=["tcp", "tls"],
        ),
        _endpoint(
            name="domestic",
            host=DOMESTIC,
            ports=[443],
            role="control",
            sni=DOMESTIC_NAME,
            domestic=True,  # answers under B10: tells the regime from an outage
            probes=["tcp", "tls"],
        ),
    ]
    return [
        {
            "service": "telegram",
            "source": "probe lab",
            "prefixes": _prefixes(),
            "endpoints": telegram,
        },
        {
            "service": "whatsapp",
            "source": "probe lab",
            "prefixes": _prefixes(),
            "endpoints": whatsapp,
        },
        {
            "service": "controls",
            "source": "probe lab",
            "prefixes": _prefixes(),
            "endpoints": control,
        },
    ]


def agent_config(vantage: str, ca_file: str) -> str:
    """The YAML an operator would write for the lab (``vantage``: client or control)."""
    resolver = f"{ADDR.resolver4}:53"
    config = {
        "vantage": {
            "name": f"lab-{vantage}",
            "role": "control" if vantage == "control" else "test",
        },
        "schedule": {"concurrency": 32, "per_destination": 4},
        "timeouts": TIMEOUTS,
        "resolvers": {
            "system": True,
            "udp": [resolver],
            "tcp": [resolver],
            "doh": DOH_URL,
            "reply_window_s": 0.3,
        },
        "tls": {"ca_file": ca_file},
        "seeds": [],
        "services": services(),
        "archive": {"path": None},
    }
    return yaml.safe_dump(config, sort_keys=False)


def server_specs(cert: str) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """The servers: (everything but DC5, DC5 alone).  DC5 runs in a process of its own so
    that ``server_down`` can take it down without touching the rest."""
    bulk = {"body_bytes": BULK_BYTES, "path": BULK_PATH}
    main: list[dict[str, Any]] = [
        {"kind": "mtproto", "name": name, "host": address, "port": 443}
        for name, address in DCS.items()
        if name != "dc5"
    ]
    main += [
        {"kind": "noise", "name": "chat", "host": CHAT, "port": 5222},
        {
            "kind": "https_bulk",
            "name": "web",
            "host": WEB,
            "port": 443,
            "cert": cert,
            "behaviour": bulk,
        },
        {"kind": "quic", "name": "web-quic", "host": WEB, "port": 443, "cert": cert},
        {"kind": "stun", "name": "relay", "host": RELAY, "port": 3478},
        {"kind": "stun", "name": "call", "host": CALL, "port": CALL_PORT, "behavior": "echo"},
        {"kind": "tls", "name": "control", "host": CONTROL, "port": 443, "cert": cert},
        {"kind": "tls", "name": "control6", "host": CONTROL6, "port": 443, "cert": cert},
        {"kind": "tls", "name": "media", "host": MEDIA, "port": 443, "cert": cert},
        {"kind": "tls", "name": "media6", "host": MEDIA6, "port": 443, "cert": cert},
        {"kind": "tls", "name": "domestic", "host": DOMESTIC, "port": 443, "cert": cert},
        {"kind": "dns", "name": "dns", "host": ADDR.resolver4, "port": 53, "rules": BASE_DNS},
        {
            "kind": "doh",
            "name": "doh",
            "host": ADDR.resolver4,
            "port": 443,
            "cert": cert,
            "rules": BASE_DNS,
        },
        {
            "kind": "dns",
            "name": "dns-control",
            "host": CONTROL_RESOLVER,
            "port": 53,
            "rules": BASE_DNS,
        },
    ]
    dc5 = [{"kind": "mtproto", "name": "dc5", "host": DCS["dc5"], "port": 443}]
    return main, dc5


# --- the catalogue ------------------------------------------------------------------------


@dataclass(frozen=True)
class Expect:
    """An expected verdict; ``blocked_fraction`` only for ``partial``.  ``alternatives``:
    other verdicts that are right too (congestion: ``throttling`` or ``ok``)."""

    verdict: str
    blocked_fraction: float | None = None
    alternatives: tuple[str, ...] = ()

    def __str__(self) -> str:
        text = "|".join((self.verdict, *self.alternatives))
        if self.blocked_fraction is None:
            return text
        return f"{text} {self.blocked_fraction:.2f}"


OK = Expect("ok")
# Every endpoint and service of the lab, as ``service/endpoint`` and ``service``.
ENDPOINTS: tuple[str, ...] = (
    *(f"telegram/{n}" for n in DCS),
    "whatsapp/chat",
    "whatsapp/web",
    "whatsapp/relay",
    "whatsapp/call",
    "whatsapp/media",
    "controls/control",
    "controls/domestic",
)
SERVICES: tuple[str, ...] = ("telegram", "whatsapp", "controls")
ONE_OF_FIVE = Expect("partial", 0.2)  # one whatsapp endpoint of five blocked


@dataclass(frozen=True)
class Scenario:
    """One behaviour on the lab and what the agent must make of it.

    ``verdicts``: ``service/endpoint`` or ``service`` -> `Expect`; everything not listed
    must be ``ok`` (no collateral damage, no false positive).  ``failures``:
    ``service/endpoint/probe-label`` -> the failure string every such result must carry
    (None: must succeed).  ``censor`` builds fresh behaviour objects (they hold state
    while applied).  ``dns_rules`` re-script the client's resolver (the control's is
    never touched); ``stop``: server groups taken down (``dc5``).
    """

    name: str
    behaviour: str
    description: str
    mechanism: str
    censor: Callable[[], Sequence[c.Behaviour]] = tuple
    dns_rules: tuple[Mapping[str, Any], ...] = ()
    stop: tuple[str, ...] = ()
    verdicts: Mapping[str, Expect] = field(default_factory=dict)
    failures: Mapping[str, str | None] = field(default_factory=dict)
    rounds: int = 1
    cpu_hog_s: float = 0.0  # a busy loop on every core beside the agent, at most this long
    all_results_ok: bool = False  # clean: not one failed probe, not only ok verdicts
    note: str = ""  # what the engine cannot tell apart here, said where it shows

    def expected(self, key: str) -> Expect:
        return self.verdicts.get(key, OK)


def _each(keys: Sequence[str], probes: Sequence[str], failure: str | None) -> dict[str, str | None]:
    return {f"{k}/{p}": failure for k in keys for p in probes}


_ALL_DCS = [f"telegram/{n}" for n in DCS]

CATALOGUE: tuple[Scenario, ...] = (
    Scenario(
        name="clean",
        behaviour="clean",
        description="no censor rule: every probe must succeed, every verdict ok, twice",
        mechanism="empty ruleset in the censor namespace",
        rounds=2,
        all_results_ok=True,
    ),
    Scenario(
        name="B1_dns_injection",
        behaviour="B1",
        description="an on-path injector answers A queries for g.whatsapp.net with a stub "
        "address before the real resolver does",
        mechanism="iptables -p udp --dport 53 -j NFQUEUE; handler forges the reply from the "
        "resolver's address (IP_TRANSPARENT), the real answer follows",
        censor=lambda: (
            c.DNSInjection(
                [
                    {
                        "name": CHAT_NAME,
                        "type": "A",
                        "answer": {"kind": "answer", "addresses": [FORGED]},
                    }
                ],
                resolvers=[ADDR.resolver4],
            ),
        ),
        verdicts={"whatsapp/chat": Expect("dns_tampering"), "whatsapp": ONE_OF_FIVE},
        failures={
            # the forged answer wins the race for the system resolver; the UDP probe
            # keeps listening and sees both (flag dns_injection_suspected)
            "whatsapp/chat/dns@system": "dns_bogon_error",
            "whatsapp/chat/dns@udp": "dns_bogon_error",
            "whatsapp/chat/dns@tcp": None,
            "whatsapp/chat/tcp": None,
            "whatsapp/chat/whatsapp": None,
        },
    ),
    Scenario(
        name="B1_resolver_lie",
        behaviour="B1",
        description="the client's resolver answers NXDOMAIN for g.whatsapp.net over UDP "
        "(what the system resolver uses) and the truth over TCP",
        mechanism="the lab DNS server's answer table (transport udp -> nxdomain); the "
        "control vantage uses a resolver of its own",
        dns_rules=(
            {
                "name": CHAT_NAME,
                "type": "both",
                "transport": "udp",
                "answer": {"kind": "nxdomain"},
            },
        ),
        verdicts={"whatsapp/chat": Expect("dns_tampering"), "whatsapp": ONE_OF_FIVE},
        failures={
            "whatsapp/chat/dns@system": "dns_nxdomain_error",
            "whatsapp/chat/dns@udp": "dns_nxdomain_error",
            "whatsapp/chat/dns@tcp": None,
            "whatsapp/chat/tcp": None,
            "whatsapp/chat/whatsapp": None,
        },
    ),
    Scenario(
        name="B1_injection_race",
        behaviour="B1",
        description="two on-path injectors race the resolver: two different forged A answers "
        "for g.whatsapp.net arrive before the real one",
        mechanism="iptables -p udp --dport 53 -j NFQUEUE; the handler sends two forged replies "
        "(a race rule of two answers) from the resolver's address, the real answer follows",
        censor=lambda: (
            c.DNSInjection(
                [
                    {
                        "name": CHAT_NAME,
                        "type": "A",
                        "answer": {
                            "kind": "race",
                            "injected": {"kind": "answer", "addresses": [FORGED]},
                            "real": {"kind": "answer", "addresses": [FORGED2]},
                            "delay_s": 0.0,  # both forged replies before the real one
                        },
                    }
                ],
                resolvers=[ADDR.resolver4],
            ),
        ),
        verdicts={"whatsapp/chat": Expect("dns_tampering"), "whatsapp": ONE_OF_FIVE},
        failures={
            "whatsapp/chat/dns@system": "dns_bogon_error",
            "whatsapp/chat/dns@udp": "dns_bogon_error",
            "whatsapp/chat/dns@tcp": None,
            "whatsapp/chat/dns@doh": None,
            "whatsapp/chat/tcp": None,
        },
    ),
    Scenario(
        name="B1_doh_truth",
        behaviour="B1",
        description="the client's resolver lies for g.whatsapp.net over UDP *and* TCP; only "
        "DNS over HTTPS tells the truth",
        mechanism="the lab DNS server's answer table (transports udp and tcp -> A 10.10.34.35); "
        "the DoH server on the same address answers truthfully",
        dns_rules=tuple(
            {
                "name": CHAT_NAME,
                "type": "A",
                "transport": transport,
                "answer": {"kind": "answer", "addresses": [FORGED]},
            }
            for transport in ("udp", "tcp")
        ),
        verdicts={"whatsapp/chat": Expect("dns_tampering"), "whatsapp": ONE_OF_FIVE},
        failures={
            "whatsapp/chat/dns@system": "dns_bogon_error",
            "whatsapp/chat/dns@udp": "dns_bogon_error",
            "whatsapp/chat/dns@tcp": "dns_bogon_error",
            "whatsapp/chat/dns@doh": None,
            # the agent connects to the address DoH gave, and it works
            "whatsapp/chat/tcp": None,
            "whatsapp/chat/whatsapp": None,
        },
    ),
    Scenario(
        name="B2_ip_block",
        behaviour="B2",
        description="every Telegram DC address is blackholed: SYNs vanish",
        mechanism="nft: ip daddr { DC1..DC5 } drop",
        censor=lambda: (c.IPBlock(list(DCS.values()), action="drop"),),
        verdicts={
            **{k: Expect("ip_blocking") for k in _ALL_DCS},
            "telegram": Expect("ip_blocking"),
        },
        failures=_each(
            _ALL_DCS, ["tcp", "tcp/repeat", "mtproto", "mtproto/repeat"], "generic_timeout_error"
        ),
    ),
    Scenario(
        name="partial_dc_block",
        behaviour="B2",
        description="2 of the 5 Telegram DCs are blocked by a forged RST; the other 3 work",
        mechanism="nft: ip daddr { DC1, DC2 } tcp: reject with tcp reset",
        censor=lambda: (c.IPBlock([DCS["dc1"], DCS["dc2"]], action="reset"),),
        verdicts={
            "telegram/dc1": Expect("ip_blocking"),
            "telegram/dc2": Expect("ip_blocking"),
            "telegram": Expect("partial", 0.4),
        },
        failures={
            **_each(["telegram/dc1", "telegram/dc2"], ["tcp", "mtproto"], "connection_refused"),
            **_each(["telegram/dc3", "telegram/dc4", "telegram/dc5"], ["tcp", "mtproto"], None),
        },
    ),
    Scenario(
        name="ipv6_only_block",
        behaviour="B2",
        description="mmg.whatsapp.net's IPv6 address is blackholed; its IPv4 address works",
        mechanism="nft: ip6 daddr MEDIA6 drop",
        censor=lambda: (c.IPBlock([MEDIA6], action="drop"),),
        verdicts={"whatsapp/media": Expect("partial", 0.5), "whatsapp": Expect("partial", 0.1)},
        failures={"whatsapp/media/dns@system": None, "whatsapp/media/dns@doh": None},
        note="the endpoint is partial (one path of two per probe kind), and its evidence "
        "names the family: only IPv6 is blocked, IPv4 works",
    ),
    Scenario(
        name="B3_sni_filter",
        behaviour="B3",
        description="a ClientHello naming web.whatsapp.com is answered with a RST",
        mechanism='iptables -m string --algo bm --string "web.whatsapp.com" '
        "-j REJECT --reject-with tcp-reset",
        censor=lambda: (c.SNIFilter([WEB_NAME], action="reset"),),
        verdicts={"whatsapp/web": Expect("tls_sni_filtering"), "whatsapp": ONE_OF_FIVE},
        failures={
            "whatsapp/web/tcp": None,
            "whatsapp/web/tls": "connection_reset",
            "whatsapp/web/tls/repeat": "connection_reset",
            # the neutral SNI reaches the server, which answers with its own certificate
            "whatsapp/web/tls/neutral_sni": "ssl_invalid_hostname",
            # the string match is per packet: the name in another ClientHello is still
            # reset, the same ClientHello cut inside the name in two segments passes
            "whatsapp/web/tls/other_shape": "connection_reset",
            "whatsapp/web/tls/split_hello": None,
            "whatsapp/web/transfer": "connection_reset",
            "whatsapp/web/quic": None,
        },
        note="the ClientHello swaps say the filter keys on the SNI (another shape is reset) "
        "and does not reassemble (a split ClientHello passes)",
    ),
    Scenario(
        name="B4_tls_fingerprint",
        behaviour="B4",
        description="ClientHellos with the agent's cipher-suite vector (its JA3 shape) to the "
        "web address are reset, whatever the SNI",
        mechanism="iptables -m string --hex-string |cipher-suite vector| -d WEB "
        "-j REJECT --reject-with tcp-reset",
        censor=lambda: (c.TLSFingerprintFilter(addresses=[WEB]),),
        verdicts={"whatsapp/web": Expect("protocol_filtering"), "whatsapp": ONE_OF_FIVE},
        failures={
            "whatsapp/web/tcp": None,
            "whatsapp/web/tls": "connection_reset",
            "whatsapp/web/tls/neutral_sni": "connection_reset",
            # another cipher-suite vector passes with the blocked name: the shape is the
            # trigger; the split ClientHello keeps the vector in its first segment
            "whatsapp/web/tls/other_shape": None,
            "whatsapp/web/tls/split_hello": "connection_reset",
            "whatsapp/web/transfer": "connection_reset",
            "whatsapp/web/quic": None,
        },
        note="B4 reads protocol_filtering (the verdict for 'the first bytes, not the name'); "
        "the evidence names the ClientHello fingerprint, isolated by the other-shape swap",
    ),
    Scenario(
        name="B5_post_handshake_stall",
        behaviour="B5",
        description="TLS to web.whatsapp.com completes, then every server packet is dropped",
        mechanism="iptables CONNMARK on the SNI, u32 on the first 0x17 client record, "
        "then DROP of server->client packets",
        censor=lambda: (c.PostHandshakeStall(names=[WEB_NAME]),),
        verdicts={"whatsapp/web": Expect("stall_after_bytes"), "whatsapp": ONE_OF_FIVE},
        failures={
            "whatsapp/web/tcp": None,
            "whatsapp/web/tls": None,
            "whatsapp/web/transfer": "stall_after_bytes",
            "whatsapp/web/quic": None,
        },
        note="B5 and B7 share the verdict stall_after_bytes; the transfer details tell "
        "them apart (B5: stalled at the response head with no body byte)",
    ),
    Scenario(
        name="B6_throttle",
        behaviour="B6",
        description="traffic to and from the web address is shaped to 150 kbit/s, "
        "excess packets tail-dropped",
        mechanism="tc htb rate 150kbit + pfifo limit 10 on both censor veths, u32 on WEB",
        censor=lambda: (c.Throttle([WEB], rate_kbit=150),),
        verdicts={"whatsapp/web": Expect("throttling"), "whatsapp": ONE_OF_FIVE},
        failures={
            "whatsapp/web/tcp": None,
            "whatsapp/web/tls": None,
            "whatsapp/web/transfer": "throttled",
        },
    ),
    Scenario(
        name="B7_byte_freeze",
        behaviour="B7",
        description="after 16 KiB server->client in one connection to the web address, "
        "the server's packets stop: no FIN, no RST",
        mechanism="nft: ct mark on the SYN, then ct reply bytes >= 16384 drop",
        censor=lambda: (c.ByteFreeze([WEB], after_bytes=16384),),
        verdicts={"whatsapp/web": Expect("stall_after_bytes"), "whatsapp": ONE_OF_FIVE},
        failures={
            "whatsapp/web/tcp": None,
            "whatsapp/web/tls": None,
            "whatsapp/web/transfer": "stall_after_bytes",
            "whatsapp/web/quic": None,
        },
        note="B5 and B7 share the verdict stall_after_bytes; B7 stalls at 12-16 KiB",
    ),
    Scenario(
        name="B8_quic_filter",
        behaviour="B8",
        description="UDP datagrams to web:443 of >= 1001 bytes carrying QUIC version 1 "
        "are dropped; other versions pass",
        mechanism="nft: udp length >= 1009 @th,72,32 0x00000001 drop",
        censor=lambda: (c.QUICFilter([WEB]),),
        verdicts={"whatsapp/web": Expect("quic_filtering"), "whatsapp": ONE_OF_FIVE},
        failures={
            "whatsapp/web/quic": "generic_timeout_error",
            "whatsapp/web/quic_vn": None,
            "whatsapp/web/tls": None,
            "whatsapp/web/transfer": None,
        },
    ),
    Scenario(
        name="B9_udp_block",
        behaviour="B9",
        description="every UDP packet to the call relay is dropped; TCP would pass",
        mechanism="nft: ip daddr RELAY meta l4proto udp drop",
        censor=lambda: (c.UDPBlock([RELAY]),),
        verdicts={"whatsapp/relay": Expect("udp_blocking"), "whatsapp": ONE_OF_FIVE},
        failures={
            "whatsapp/relay/stun": "udp_no_response",
            "whatsapp/relay/stun/random_udp": "udp_no_response",
        },
    ),
    Scenario(
        name="B9_call_loss",
        behaviour="B9",
        description="40% of the UDP packets to and from the call peer are dropped at random; "
        "the call-like flow still gets answers, the control's flow loses none",
        mechanism="nft: ip daddr CALL meta l4proto udp numgen random mod 100 < 40 drop "
        "(both directions)",
        censor=lambda: (c.RandomLoss(40, addresses=[CALL], protocol="udp", direction="both"),),
        verdicts={"whatsapp/call": Expect("udp_blocking"), "whatsapp": ONE_OF_FIVE},
        note="sustained loss reads udp_blocking only next to a control that sees none "
        "(verdict threshold: docs/verdicts.md); the loss figure is in the evidence",
    ),
    Scenario(
        name="B9_stun_blackhole",
        behaviour="B9",
        description="the first STUN-shaped datagram to the relay blackholes (client, relay, "
        "port) for minutes, both ways",
        mechanism="nft: @th,96,32 0x2112a442 adds the flow to a timeout set; set members "
        "dropped both ways",
        censor=lambda: (c.StunBlackhole([RELAY], ports=[3478], hold_s=120),),
        verdicts={"whatsapp/relay": Expect("udp_blocking"), "whatsapp": ONE_OF_FIVE},
        failures={
            "whatsapp/relay/stun": "udp_no_response",
            "whatsapp/relay/stun/random_udp": "udp_no_response",
        },
        note="reads like B9_udp_block: the relay (like a real one) ignores random UDP, so "
        "the random-payload swap cannot show that only STUN is classified",
    ),
    Scenario(
        name="B9_udp_icmp_reject",
        behaviour="B9",
        description="UDP to the call relay and to web:443 (QUIC) is rejected by the censor "
        "with ICMP host unreachable instead of dropped; TCP passes",
        mechanism="nft: ip daddr { RELAY, WEB } meta l4proto udp reject with icmp type "
        "host-unreachable (the probes' sockets set IP_RECVERR: without it Linux drops this "
        "error and the reject reads as silence)",
        censor=lambda: (c.UDPReject([RELAY, WEB]),),
        verdicts={
            "whatsapp/relay": Expect("udp_blocking"),
            "whatsapp/web": Expect("udp_blocking"),
            "whatsapp": Expect("partial", 0.4),
        },
        failures={
            "whatsapp/relay/stun": "host_unreachable",
            "whatsapp/web/quic": "host_unreachable",
            "whatsapp/web/quic_vn": "host_unreachable",
            "whatsapp/web/tls": None,
            "whatsapp/web/transfer": None,
        },
    ),
    Scenario(
        name="B9_udp_icmp_prohibited",
        behaviour="B9",
        description="as B9_udp_icmp_reject with ICMP communication administratively "
        "prohibited, the error Linux reported before IP_RECVERR too",
        mechanism="nft: ip daddr { RELAY, WEB } meta l4proto udp reject with icmp type "
        "admin-prohibited",
        censor=lambda: (c.UDPReject([RELAY, WEB], icmp="admin-prohibited"),),
        verdicts={
            "whatsapp/relay": Expect("udp_blocking"),
            "whatsapp/web": Expect("udp_blocking"),
            "whatsapp": Expect("partial", 0.4),
        },
        failures={
            "whatsapp/relay/stun": "host_unreachable",
            "whatsapp/web/quic": "host_unreachable",
            "whatsapp/web/quic_vn": "host_unreachable",
            "whatsapp/web/tls": None,
        },
    ),
    Scenario(
        name="B10_allowlist",
        behaviour="B10",
        description="a regional shutdown: only the domestic control and the ISP's resolver "
        "answer, every other destination is dropped",
        mechanism="nft: iifname cli0 ip daddr != { DOMESTIC, RESOLVER } drop; ip6: drop",
        censor=lambda: (c.Allowlist([DOMESTIC, ADDR.resolver4]),),
        verdicts={
            **{
                k: Expect("allowlist_regime")
                for k in (*ENDPOINTS, *SERVICES)
                if k != "controls/domestic"
            },
        },
        failures={
            **_each(_ALL_DCS, ["tcp", "mtproto"], "generic_timeout_error"),
            "whatsapp/chat/dns@system": None,  # the domestic resolver answers
            "whatsapp/chat/tcp": "generic_timeout_error",
            "whatsapp/relay/stun": "udp_no_response",
            "controls/domestic/tcp": None,
            "controls/domestic/tls": None,
        },
        note="the gate's domestic control answers while the foreign one fails: vantage "
        "state 'allowlist'; every failure is the regime's, not a block of its service",
    ),
    Scenario(
        name="tls_mitm",
        behaviour="mitm",
        description="a censor-side TLS interceptor with its own CA answers ClientHellos "
        "naming web.whatsapp.com with a forged chain; the control sees the real certificate",
        mechanism="nft nat prerouting: ip daddr WEB tcp dport 443 redirect to :8443 (conntrack "
        "flushed); probe.lab.intercept forges leaf + 'Lab Interceptor CA' for the SNI",
        censor=lambda: (c.TLSIntercept([WEB_NAME], addresses=[WEB]),),
        verdicts={"whatsapp/web": Expect("tls_mitm"), "whatsapp": ONE_OF_FIVE},
        failures={
            "whatsapp/web/tcp": None,
            "whatsapp/web/tls": "ssl_unknown_authority",
            "whatsapp/web/tls/repeat": "ssl_unknown_authority",
            "whatsapp/web/transfer": "ssl_unknown_authority",
            "whatsapp/web/quic": None,
        },
    ),
    Scenario(
        name="server_down",
        behaviour="server_down",
        description="the DC5 server is stopped: the control fails the same way, so it is an "
        "outage, not censorship",
        mechanism="no censor rule; DC5's server process is stopped (the kernel answers RST)",
        stop=("dc5",),
        verdicts={"telegram/dc5": Expect("endpoint_down")},
        failures=_each(["telegram/dc5"], ["tcp", "mtproto"], "connection_refused"),
    ),
)


# --- congestion without censorship, and censorship on a congested path ---------------------
#
# None of these may yield a censorship verdict the path does not earn: a slow, lossy or
# busy path reads as ``throttling`` or ``ok``, never as tls_sni_filtering,
# stall_after_bytes, ip_blocking or quic_filtering (docs/verdicts.md, "Congestion").

_SLOW_OR_OK = Expect("throttling", alternatives=("ok",))
_SERVICE_SLOW_OR_OK = Expect("partial", 0.2, alternatives=("ok",))
_LOSSY = [*DCS.values(), CHAT, WEB, MEDIA]  # every TCP service address but the controls


def _policed(base: Scenario, addresses: Sequence[str], rate_kbit: int = 200) -> Scenario:
    """``base`` with a policer (htb + short tail-drop queue) on the same path: the
    censorship verdict must survive congestion as well."""
    censor = base.censor

    def both() -> Sequence[c.Behaviour]:
        return (*censor(), c.Throttle(list(addresses), rate_kbit=rate_kbit, queue_packets=5))

    return dataclasses.replace(
        base,
        name=f"{base.name}_policed",
        description=f"{base.description}; and a {rate_kbit} kbit/s policer on the same path",
        mechanism=f"{base.mechanism}; tc htb {rate_kbit}kbit + pfifo limit 5",
        censor=both,
        # the handshakes still complete (slowly): only the verdicts and the blocking
        # failures are asserted, not every success
        failures={k: v for k, v in base.failures.items() if v is not None},
    )


CONGESTION: tuple[Scenario, ...] = (
    Scenario(
        name="congestion_policer",
        behaviour="congestion",
        description="a 100 kbit/s policer with a 5-packet tail-drop queue on the web address "
        "(TLS, QUIC and transfer probes share it): slow, not censored",
        mechanism="tc htb rate 100kbit + pfifo limit 5 both ways, u32 on WEB",
        censor=lambda: (c.Throttle([WEB], rate_kbit=100, queue_packets=5),),
        verdicts={"whatsapp/web": _SLOW_OR_OK, "whatsapp": _SERVICE_SLOW_OR_OK},
    ),
    Scenario(
        name="congestion_loss",
        behaviour="congestion",
        description="15 % of TCP packets to and from every service address dropped at "
        "random: lossy, not censored",
        mechanism="nft: numgen random mod 100 < 15 drop, TCP, both ways",
        censor=lambda: (c.RandomLoss(percent=15, addresses=_LOSSY, protocol="tcp"),),
        verdicts={"whatsapp/web": _SLOW_OR_OK, "whatsapp": _SERVICE_SLOW_OR_OK},
    ),
    Scenario(
        name="congestion_cpu",
        behaviour="congestion",
        description="a busy loop on every core beside the agent (bounded): a loaded host, "
        "not censorship",
        mechanism="one python busy loop per core for the scenario's duration (at most 60 s)",
        cpu_hog_s=60.0,
        verdicts={"whatsapp/web": _SLOW_OR_OK, "whatsapp": _SERVICE_SLOW_OR_OK},
    ),
)


def _named(name: str) -> Scenario:
    return next(s for s in CATALOGUE if s.name == name)


CATALOGUE += (
    *CONGESTION,
    _policed(_named("B2_ip_block"), list(DCS.values())),
    _policed(_named("B3_sni_filter"), [WEB]),
    dataclasses.replace(
        _policed(_named("B7_byte_freeze"), [WEB]),
        name="B7_byte_freeze_28k_policed",
        description="after 28 KiB server->client in one connection to the web address, the "
        "server's packets stop; and a 200 kbit/s policer on the same path",
        mechanism="nft: ct reply bytes >= 28672 drop; tc htb 200kbit + pfifo limit 5",
        note="stalls just under 28 KiB of IP bytes; the stall is confirmed (no byte for "
        "stall_s and twice that again) before it counts",
        censor=lambda: (
            c.ByteFreeze([WEB], after_bytes=28 * 1024),
            c.Throttle([WEB], rate_kbit=200, queue_packets=5),
        ),
    ),
)


def by_name(name: str) -> Scenario:
    for scenario in CATALOGUE:
        if scenario.name == name:
            return scenario
    known = ", ".join(s.name for s in CATALOGUE)
    raise KeyError(f"no scenario {name!r}; known: {known}")


# --- outcomes and the comparison -------------------------------------------------------------


@dataclass(frozen=True)
class RoundOutcome:
    """One client round: its result records and verdict records (with the control's
    results fed to the verdict engine), as ``probe once --format json`` printed them."""

    results: tuple[dict[str, Any], ...]
    verdicts: Mapping[str, dict[str, Any]]  # "service/endpoint" or "service" -> record
    exit_code: int
    control_exit_code: int
    archive: tuple[dict[str, Any], ...] = ()  # the client's archived measurements
    control: tuple[dict[str, Any], ...] = ()  # the control vantage's result records

    def archived(self, key: str) -> list[dict[str, Any]]:
        """Archive envelopes of ``service/endpoint/probe-label`` (OONI-style records)."""
        wanted = tuple(key.split("/", 2))
        return [a for a in self.archive if _archived_key(a) == wanted]

    def observed(self, key: str) -> Expect | None:
        record = self.verdicts.get(key)
        if record is None:
            return None
        return Expect(record["verdict"], record.get("blocked_fraction"))

    def runs(self, key: str) -> list[dict[str, Any]]:
        """Result records of ``service/endpoint/probe-label``; a DNS label may name the
        resolver kind: ``.../dns@system``, ``dns@udp``, ``dns@tcp``."""
        service, endpoint, label = key.split("/", 2)
        label, _, resolver = label.partition("@")
        return [
            r
            for r in self.results
            if (r["service"], r["endpoint"], r["probe"]) == (service, endpoint, label)
            and (not resolver or (r["resolver"] or "system").split(":", 1)[0] == resolver)
        ]


@dataclass(frozen=True)
class Outcome:
    scenario: Scenario
    rounds: tuple[RoundOutcome, ...]
    duration_s: float

    def dump(self) -> str:
        """Every non-ok result and verdict, for a failing test's message."""
        lines = [f"--- {self.scenario.name} ({self.duration_s:.1f} s)"]
        for i, rnd in enumerate(self.rounds, 1):
            for r in rnd.results:
                if not r["ok"]:
                    lines.append(
                        f"round {i} result {r['service']}/{r['endpoint']}/{r['probe']} "
                        f"{r['address']}:{r['port']} {r['failure']} ({r['failed_operation']})"
                    )
            for key, v in rnd.verdicts.items():
                if v["verdict"] != "ok":
                    lines.append(f"round {i} verdict {key} {v['verdict']} {v['confidence']}")
                    lines += [f"    {e}" for e in v["evidence"]]
        return "\n".join(lines)


def _same(expected: Expect, observed: Expect) -> bool:
    if observed.verdict in expected.alternatives:
        return observed.blocked_fraction is None or observed.verdict == "partial"
    if expected.verdict != observed.verdict:
        return False
    if expected.blocked_fraction is None:
        return observed.blocked_fraction is None
    return observed.blocked_fraction is not None and math.isclose(
        expected.blocked_fraction, observed.blocked_fraction, abs_tol=0.01
    )


def check(scenario: Scenario, outcome: Outcome) -> list[str]:
    """Every way the outcome differs from the scenario's expectations (empty: a pass)."""
    problems: list[str] = []
    for i, rnd in enumerate(outcome.rounds, 1):
        where = f"round {i}: "
        if rnd.control_exit_code not in (0, 1):
            problems.append(f"{where}control run exited {rnd.control_exit_code}")
        for key in (*ENDPOINTS, *SERVICES):
            expected, observed = scenario.expected(key), rnd.observed(key)
            if observed is None:
                problems.append(f"{where}{key}: no verdict")
            elif not _same(expected, observed):
                problems.append(f"{where}{key}: expected {expected}, observed {observed}")
        unexpected = sorted(set(rnd.verdicts) - {*ENDPOINTS, *SERVICES})
        if unexpected:
            problems.append(f"{where}verdicts for unknown endpoints {unexpected}")
        for key, failure in scenario.failures.items():
            runs = rnd.runs(key)
            if not runs:
                problems.append(f"{where}{key}: no result")
            for r in runs:
                if r["failure"] != failure:
                    problems.append(
                        f"{where}{key} {r['address']}:{r['port']}: expected failure "
                        f"{failure}, observed {r['failure']} ({r['failed_operation']})"
                    )
        if scenario.all_results_ok:
            for r in rnd.results:
                if not r["ok"]:
                    problems.append(
                        f"{where}{r['service']}/{r['endpoint']}/{r['probe']} failed: "
                        f"{r['failure']} ({r['failed_operation']})"
                    )
    return problems


# --- running scenarios on one lab -------------------------------------------------------------


def _archived_key(envelope: Mapping[str, Any]) -> tuple[str, str, str]:
    fields = result_fields(envelope)
    return fields.service, fields.endpoint, fields.probe


def _key(record: Mapping[str, Any]) -> str:
    endpoint = record.get("endpoint")
    return record["service"] if endpoint is None else f"{record['service']}/{endpoint}"


def _cpu_hogs(seconds: float) -> list[subprocess.Popen[bytes]]:
    """One busy loop per core (bounded by ``seconds``, and killed when the scenario ends):
    the host is loaded, the network is not touched."""
    if seconds <= 0:
        return []
    loop = f"import time\nend = time.monotonic() + {seconds}\nwhile time.monotonic() < end: pass"
    cores = len(os.sched_getaffinity(0))
    return [subprocess.Popen([sys.executable, "-c", loop]) for _ in range(cores)]


class ScenarioLab:
    """One lab with the scenario servers, running scenarios one after the other.

    ``with ScenarioLab() as runner: outcome = runner.run(by_name("B3_sni_filter"))``.
    Whatever a scenario changed (censor rules, DNS table, stopped servers) is undone
    after it, also when it fails.
    """

    def __init__(self, lab: Lab | None = None) -> None:
        self._own = lab is None
        self.lab = lab if lab is not None else Lab(control_resolver=CONTROL_RESOLVER)
        self.servers: ServeHandle | None = None
        self.groups: dict[str, ServeHandle] = {}
        self._round = 0
        # The control namespace never crosses the censor, so its round is the same under
        # every censor rule: one run serves every scenario that changes nothing else
        # (stopped servers and re-scripted DNS do reach it).  Halves the catalogue's time.
        self._clean_control: tuple[int, str] | None = None

    def __enter__(self) -> Self:
        return self.start()

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()

    def start(self) -> Self:
        if self._own:
            self.lab.start()
        try:
            cert = self.lab.issue(
                CHAT_NAME, WEB_NAME, CONTROL_NAME, DOMESTIC_NAME, MEDIA_NAME, ADDR.resolver4
            )
            main, dc5 = server_specs(cert)
            self.servers = self.lab.serve(main)
            self._dc5_specs = dc5
            self.groups["dc5"] = self.lab.serve(dc5)
            for vantage in ("client", "control"):
                self.config(vantage).write_text(agent_config(vantage, self.lab.ca_file))
        except BaseException:
            self.close()
            raise
        return self

    def close(self) -> None:
        with contextlib.suppress(LabError):
            self.lab.censor.clear()
        for handle in [self.servers, *self.groups.values()]:
            if handle is not None:
                handle.stop()
        self.groups.clear()
        self.servers = None
        if self._own:
            self.lab.close()

    def config(self, vantage: str) -> Path:
        return self.lab.workdir / f"agent-{vantage}.yaml"

    @contextlib.contextmanager
    def applied(self, scenario: Scenario) -> Iterator[None]:
        """The scenario's changes for the duration of a with block."""
        assert self.servers is not None
        hogs: list[subprocess.Popen[bytes]] = []
        try:
            hogs = _cpu_hogs(scenario.cpu_hog_s)
            for group in scenario.stop:
                self.groups.pop(group).stop()
            if scenario.dns_rules:
                self.servers.dns("dns", scenario.dns_rules)
            self.lab.censor.apply(*scenario.censor())
            yield
        finally:
            for hog in hogs:
                hog.kill()
                hog.wait()
            self.lab.censor.clear()
            if scenario.dns_rules:
                self.servers.dns("dns", BASE_DNS, reset=True)
            if "dc5" not in self.groups:
                self.groups["dc5"] = self.lab.serve(self._dc5_specs)

    def run(self, scenario: Scenario, rounds: int | None = None) -> Outcome:
        started = time.monotonic()
        reuse = not scenario.stop and not scenario.dns_rules
        with self.applied(scenario):
            done = tuple(self._one_round(reuse) for _ in range(rounds or scenario.rounds))
        return Outcome(scenario, done, time.monotonic() - started)

    def _once(self, vantage: str, *extra: str) -> tuple[int, str]:
        argv = [sys.executable, "-m", "probe", "once", "-c", str(self.config(vantage))]
        done = self.lab.exec(
            "control" if vantage == "control" else "client",
            [*argv, "--format", "json", *extra],
            timeout_s=90.0,
        )
        if done.returncode not in (0, 1):  # 2: config error, 3: offline -- a lab fault
            raise LabError(
                f"probe once ({vantage}) exited {done.returncode}: {done.stderr[-2000:]}"
            )
        return done.returncode, done.stdout

    def _control_round(self, reuse: bool) -> tuple[int, str]:
        if not reuse:
            return self._once("control")
        if self._clean_control is None:
            self._clean_control = self._once("control")
        return self._clean_control

    def _one_round(self, reuse_control: bool = False) -> RoundOutcome:
        self._round += 1
        control_rc, control_out = self._control_round(reuse_control)
        control_file = self.lab.workdir / f"control-{self._round}.jsonl"
        control_file.write_text(control_out)
        archive = self.lab.workdir / f"archive-{self._round}"
        rc, out = self._once(
            "client", "--control-results", str(control_file), "--archive", str(archive)
        )
        records = [json.loads(line) for line in out.splitlines() if line.strip()]
        results = tuple(r for r in records if r.get("type") == "result")
        verdicts = {_key(r): r for r in records if r.get("type") == "verdict"}
        control = tuple(
            r
            for r in (json.loads(line) for line in control_out.splitlines() if line.strip())
            if r.get("type") == "result"
        )
        return RoundOutcome(
            results, verdicts, rc, control_rc, tuple(iter_archive(archive)), control
        )
