"""The offline gate: is this vantage online at all, and does it have working IPv6?

Every round starts here.  A vantage that cannot reach any neutral control target
is *offline*: then nothing else is probed and nothing counts as blocked, because
a dead uplink would otherwise look like a country-wide block of every service.
The gate resolves control hostnames through the system resolver first (what
an ordinary app would do), then connects to the resolved addresses and to the
controls' IP literals.  A bogon answer is not connected to: with the uplink down,
home routers and captive portals answer every name with a private address of their
own and accept connections there, which would read as "online".  IPv6 counts as
working only if an IPv6 connect succeeds; without it IPv6 probes are reported as not
applicable, never as blocked.
"""

from __future__ import annotations

import asyncio
import contextlib
import ipaddress
import socket
from collections.abc import Sequence
from typing import Any

from .classify import AGENT_RESOURCES, classify
from .dnsjudge import suspect_bogon
from .model import Endpoint, Operation, VantageState, utcnow

_MAX_ADDRESSES = 4  # per control and family: enough to tell online from offline


async def _resolve(host: str, timeout_s: float) -> tuple[list[str], str | None]:
    loop = asyncio.get_running_loop()
    try:
        async with asyncio.timeout(timeout_s):
            infos = await loop.getaddrinfo(host, None, type=socket.SOCK_STREAM)
    except Exception as exc:  # classified below; the gate never raises
        return [], str(classify(exc, Operation.RESOLVE))
    addresses = list(dict.fromkeys(str(info[4][0]) for info in infos))
    return addresses, None


async def _connect(address: str, port: int, timeout_s: float) -> str | None:
    """None on success, else the failure string."""
    try:
        async with asyncio.timeout(timeout_s):
            _, writer = await asyncio.open_connection(address, port)
    except Exception as exc:
        return str(classify(exc, Operation.CONNECT))
    writer.close()
    with contextlib.suppress(Exception):
        await writer.wait_closed()
    return None


def dns_candidates(addresses: Sequence[str], control: Endpoint) -> list[str]:
    """The control's DNS answers worth connecting to: no bogon it does not declare itself."""
    return [a for a in addresses if not suspect_bogon(a, control.prefixes)]


def _pick(addresses: Sequence[str]) -> list[str]:
    v4 = [a for a in addresses if ipaddress.ip_address(a).version == 4][:_MAX_ADDRESSES]
    v6 = [a for a in addresses if ipaddress.ip_address(a).version == 6][:_MAX_ADDRESSES]
    return v4 + v6


async def _check_control(control: Endpoint, timeout_s: float) -> dict[str, Any]:
    port = control.ports[0] if control.ports else 443
    record: dict[str, Any] = {"control": control.name, "port": port}
    if control.domestic:
        record["domestic"] = True
    if control.is_ip_literal:
        addresses = [control.host]
    else:
        answers, failure = await _resolve(control.host, timeout_s)
        record["resolve"] = failure or "ok"
        addresses = dns_candidates(answers, control)
        if len(addresses) < len(answers):
            record["bogon_answers"] = len(answers) - len(addresses)  # how many, not which
    addresses = _pick(list(addresses) + list(control.addresses))
    results = await asyncio.gather(*(_connect(a, port, timeout_s) for a in addresses))
    record["connect"] = {a: (f or "ok") for a, f in zip(addresses, results, strict=True)}
    return record


async def check_vantage(controls: Sequence[Endpoint], timeout_s: float) -> VantageState:
    """Probe every control concurrently; online if any control accepts a TCP connection."""
    t = utcnow()
    if not controls:
        # Nothing to judge by: assume online so a control-less lab config still measures.
        return VantageState(online=True, ipv6=True, t=t, evidence={"controls": "none configured"})
    records = await asyncio.gather(*(_check_control(c, timeout_s) for c in controls))
    reached = [
        address
        for record in records
        for address, outcome in record["connect"].items()
        if outcome == "ok"
    ]
    online = bool(reached)
    ipv6 = any(ipaddress.ip_address(a).version == 6 for a in reached)
    dns_ok = any(r.get("resolve") == "ok" for r in records)
    evidence: dict[str, Any] = {
        "controls": records,
        "system_dns_ok": dns_ok,
        "reached": len(reached),
    }
    allowlist = _allowlist(records)
    if (not online or allowlist) and _agent_side(records):
        # Controls failed because this process is out of descriptors, not because the
        # uplink (or a foreign-traffic allowlist) stopped them: the caller keeps its
        # previous finding.
        evidence[AGENT_SIDE_EVIDENCE] = True
    if allowlist:
        evidence["regime"] = "allowlist: only domestic controls answer"
    return VantageState(online=online, ipv6=ipv6, t=t, evidence=evidence, allowlist=allowlist)


AGENT_SIDE_EVIDENCE = "agent_resources_exhausted"


def _agent_side(records: Sequence[dict[str, Any]]) -> bool:
    outcomes = [r.get("resolve") for r in records]
    outcomes += [o for r in records for o in r["connect"].values()]
    return AGENT_RESOURCES in outcomes


def inconclusive(state: VantageState) -> bool:
    """An offline or allowlist finding the agent's own resource exhaustion may have caused."""
    suspect = not state.online or state.allowlist
    return suspect and bool(state.evidence.get(AGENT_SIDE_EVIDENCE))


def _allowlist(records: Sequence[dict[str, Any]]) -> bool:
    """Domestic controls answer and every foreign one fails (FIELD.md B10).  Needs both
    kinds configured: without domestic controls an allowlist looks like an outage, and
    without foreign ones there is nothing to tell it by."""

    def reached(record: dict[str, Any]) -> bool:
        return any(outcome == "ok" for outcome in record["connect"].values())

    domestic = [r for r in records if r.get("domestic")]
    foreign = [r for r in records if not r.get("domestic")]
    return bool(foreign) and any(map(reached, domestic)) and not any(map(reached, foreign))
