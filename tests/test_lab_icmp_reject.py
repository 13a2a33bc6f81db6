"""A censor that rejects UDP with ICMP instead of dropping it, on IPv4 and IPv6, end to end.

One lab for the module (the ``netns_lab`` fixture): STUN, QUIC and DNS servers on one
IPv4 and one IPv6 service address; the real stun, quic, quic_vn and dns probes run in the
client namespace (behind the censor) and the control namespace (around it) through
`probe.lab.runprobe`; the censor's nftables answers the client's UDP with ``reject with
icmp type host-unreachable`` / ``icmpv6 type addr-unreachable``, or ``admin-prohibited``.

Without ``IP_RECVERR`` on the probes' sockets Linux drops host and address unreachable
on a connected UDP socket, and these read as ``udp_no_response``: a silent drop.  Here
each reads as ``host_unreachable``, with the ICMP type and code and the censor's address
in the evidence, and the verdict engine (fed the control's results) says
``udp_blocking``.  A server whose own host rejects UDP is unreachable for the control
too: ``endpoint_down``.

All traffic stays inside the lab's namespaces (10.200.0.0/16, fd00:200::/32).
"""

from __future__ import annotations

import itertools
import os
from collections.abc import Iterator
from typing import Any

import pytest

from probe.lab import censor as c
from probe.lab.netns import ADDR
from probe.lab.topology import Lab, ServeHandle
from probe.verdict.aggregate import judge_endpoint
from probe.verdict.vocabulary import Verdict

pytestmark = pytest.mark.lab

INDEX = 13  # a service address of this module's own lab (the lab has 1..16)
NAME = "icmp.example"
FAST = {"quic_s": 1.5, "udp_s": 1.0, "dns_s": 1.0, "connect_s": 1.0}
UDP_PROBES = ("stun", "quic", "quic_vn")  # judged by the UDP verdict rules
FAMILIES = {
    4: (ADDR.service(INDEX), ADDR.censor_client4, "icmp", 3),
    6: (ADDR.service6(INDEX), ADDR.censor_client6, "icmpv6", 1),
}


def _jobs(address: str) -> list[dict[str, Any]]:
    host = f"[{address}]" if ":" in address else address
    common = {"service": "lab", "host": NAME, "timeouts": FAST}
    return [
        {**common, "probe": "stun", "address": address, "port": 3478, "transport": "udp"},
        {**common, "probe": "quic", "address": address, "port": 443},
        {**common, "probe": "quic_vn", "address": address, "port": 443},
        {**common, "probe": "dns", "resolver": f"udp:{host}:53", "prefixes": [ADDR.services4]},
    ]


@pytest.fixture(scope="module")
def servers(netns_lab: Lab) -> Iterator[ServeHandle]:
    cert = netns_lab.issue(NAME)
    specs: list[dict[str, Any]] = []
    for address, *_ in FAMILIES.values():
        specs += [
            {"kind": "stun", "host": address, "port": 3478},
            {"kind": "quic", "host": address, "port": 443, "cert": cert},
            {
                "kind": "dns",
                "host": address,
                "port": 53,
                "rules": [{"name": NAME, "host": [ADDR.service(INDEX)]}],
            },
        ]
    handle = netns_lab.serve(specs)
    yield handle
    handle.stop()


@pytest.fixture(scope="module")
def control(netns_lab: Lab, servers: ServeHandle) -> dict[int, list[dict[str, Any]]]:
    """The control vantage's runs (its path never crosses the censor): all succeed."""
    runs = {
        family: netns_lab.probe_many("control", _jobs(a)) for family, (a, *_) in FAMILIES.items()
    }
    for records in runs.values():
        assert all(r["ok"] for r in records), records
    return runs


@pytest.fixture(autouse=True)
def _clean_censor(netns_lab: Lab) -> Iterator[None]:
    yield
    netns_lab.censor.clear()


@pytest.mark.parametrize(
    ("family", "reject"),
    list(itertools.product(FAMILIES, ("unreachable", "admin-prohibited"))),
    ids=lambda v: f"ipv{v}" if isinstance(v, int) else v,
)
def test_an_icmp_reject_is_host_unreachable_from_the_censor_and_udp_blocking(
    netns_lab: Lab, control: dict[int, list[dict[str, Any]]], family: int, reject: str
) -> None:
    address, censor, icmp, icmp_type = FAMILIES[family]
    if reject == "unreachable":
        behaviour = c.UDPReject([address])  # host-unreachable / addr-unreachable
        code = 1 if family == 4 else 3
        errno = "EHOSTUNREACH"
    else:
        behaviour = c.UDPReject([address], icmp="admin-prohibited", icmpv6="admin-prohibited")
        code = 13 if family == 4 else 1
        errno = "EHOSTUNREACH" if family == 4 else "EACCES"  # the kernel's words differ
    netns_lab.censor.apply(behaviour)
    records = netns_lab.probe_many("client", _jobs(address))
    for record in records:
        assert record["failure"] == "host_unreachable", record
        first = record["details"]["icmp_errors"][0]
        assert first == {
            "icmp": icmp,
            "type": icmp_type,
            "code": code,
            "errno": errno,
            "reporter": censor,
        }, record["probe"]
    by_probe = {r["probe"]: r for r in records}
    theirs = {r["probe"]: r for r in control[family]}
    for probe in UDP_PROBES:
        verdict = judge_endpoint([by_probe[probe]], [theirs[probe]])
        assert verdict.verdict == Verdict.UDP_BLOCKING, (probe, verdict.evidence)
        assert any(line.endswith(f"code {code}) from {censor}") for line in verdict.evidence)


def test_a_server_whose_own_host_rejects_udp_is_down_for_the_control_too(
    netns_lab: Lab, servers: ServeHandle
) -> None:
    """The outage look-alike: the rejection comes from the server's host, so the control
    gets it too, and the verdict is endpoint_down, not censorship."""
    address = FAMILIES[6][0]
    table = f"icmpdown{os.getpid()}"
    rule = f"ip6 daddr {address} udp dport 3478 reject with icmpv6 type addr-unreachable"
    netns_lab.exec("servers", ["nft", "add", "table", "inet", table])
    try:
        chain = "{ type filter hook input priority 0; }"
        netns_lab.exec("servers", ["nft", "add", "chain", "inet", table, "inp", chain])
        done = netns_lab.exec(
            "servers", ["nft", "add", "rule", "inet", table, "inp", *rule.split()]
        )
        assert done.returncode == 0, done.stderr
        stun = [j for j in _jobs(address) if j["probe"] == "stun"]
        mine = netns_lab.probe_many("client", stun)
        theirs = netns_lab.probe_many("control", stun)
    finally:
        netns_lab.exec("servers", ["nft", "delete", "table", "inet", table])
    for record in (*mine, *theirs):
        assert record["failure"] == "host_unreachable", record
        assert record["details"]["icmp_errors"][0]["reporter"] == address
    verdict = judge_endpoint(mine, theirs)
    assert verdict.verdict == Verdict.ENDPOINT_DOWN, verdict.evidence
