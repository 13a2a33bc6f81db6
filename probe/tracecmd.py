"""``probe trace TARGET``: where on the path is the censor (docs/trace.md).

TARGET is ``service/endpoint`` of the config (its first address of each family, its port
and SNI), or an IP address with ``--probe`` and ``--port``.  The trigger follows the
probe: ``tcp`` steps the SYN (an IP block), ``tls`` the ClientHello with the endpoint's
SNI (an SNI or fingerprint filter), ``quic`` a QUIC v1 Initial, ``stun`` a Binding
request, ``dns`` a query for ``--name`` to the resolver at TARGET.
"""

from __future__ import annotations

import argparse
import ipaddress
import json
import socket
import sys
from collections.abc import Sequence
from dataclasses import dataclass

from .model import Endpoint
from .trace import (
    MAX_HOPS,
    AsnMap,
    Trace,
    TraceError,
    client_hello,
    dns_trigger,
    quic_trigger,
    stun_trigger,
    trace_tcp,
    trace_udp,
    with_asn,
)

PROBES = ("tcp", "tls", "quic", "stun", "dns")
_DEFAULT_PORT = {"tcp": 443, "tls": 443, "quic": 443, "stun": 3478, "dns": 53}


@dataclass(frozen=True)
class Plan:
    address: str
    port: int
    probe: str
    sni: str | None = None
    name: str | None = None


def _is_ip(text: str) -> bool:
    try:
        ipaddress.ip_address(text)
    except ValueError:
        return False
    return True


def _addresses(host: str) -> list[str]:
    """The endpoint's first address of each family (system resolver for a hostname)."""
    if _is_ip(host):
        return [host]
    try:
        infos = socket.getaddrinfo(host, None, type=socket.SOCK_STREAM)
    except OSError as exc:
        raise TraceError(f"cannot resolve {host}: {exc.strerror or exc}") from exc
    found: dict[int, str] = {}
    for family, *_rest, sockaddr in infos:
        found.setdefault(int(family), str(sockaddr[0]))
    return list(found.values())


def _endpoint_probe(ep: Endpoint, wanted: str | None) -> str:
    if wanted is not None:
        return wanted
    names = {s.name for s in ep.probes}
    if "tls" in names or "transfer" in names:
        return "tls"
    if ep.transport == "udp" or "stun" in names:
        return "stun"
    return "tcp"


def plan(args: argparse.Namespace, endpoints: Sequence[Endpoint]) -> list[Plan]:
    """What to trace, from the command line (and the config's endpoints)."""
    if args.probe == "dns" and not args.name:
        raise TraceError("--probe dns needs --name (the name to query)")
    if _is_ip(args.target):
        probe = args.probe or "tcp"
        port = args.port or _DEFAULT_PORT[probe]
        return [Plan(args.target, port, probe, args.sni, args.name)]
    service, _, name = args.target.partition("/")
    ep = next((e for e in endpoints if (e.service, e.name) == (service, name)), None)
    if ep is None:
        raise TraceError(f"no endpoint {args.target!r} in the config (service/endpoint)")
    probe = _endpoint_probe(ep, args.probe)
    if probe == "dns":
        raise TraceError("--probe dns traces a resolver: give its IP address as TARGET")
    ports = ep.ports_for(probe) or ep.ports
    port = args.port or (ports[0] if ports else _DEFAULT_PORT[probe])
    sni = args.sni or ep.sni or (None if ep.is_ip_literal else ep.host)
    return [Plan(a, port, probe, sni) for a in _addresses(ep.host)]


def run(p: Plan, max_hops: int, timeout_s: float, interval_s: float) -> Trace:
    if p.probe in ("tcp", "tls"):
        hello = client_hello(p.sni) if p.probe == "tls" else None
        what = f"tls ClientHello, SNI {p.sni or '(none)'}" if hello else "tcp SYN"
        return trace_tcp(
            p.address, p.port, hello, what, max_hops=max_hops, timeout_s=timeout_s,
            interval_s=interval_s,
        )  # fmt: skip
    if p.probe == "stun":
        payload, what = stun_trigger(), "stun Binding request"
    elif p.probe == "quic":
        payload = quic_trigger(p.sni, p.address, p.port)
        what = f"quic v1 Initial ({len(payload)} bytes), SNI {p.sni or '(none)'}"
    else:
        assert p.name is not None  # plan() checked
        payload, what = dns_trigger(p.name), f"dns A {p.name}"
    return trace_udp(
        p.address, p.port, payload, what, max_hops=max_hops, timeout_s=timeout_s,
        interval_s=interval_s,
    )  # fmt: skip


def table(t: Trace) -> str:
    lines = [f"trace {t.address}:{t.port}/{t.protocol}  trigger: {t.trigger}"]
    for h in t.hops:
        rtt = f"{h.rtt_s * 1000:.1f} ms" if h.rtt_s is not None else "-"
        lines.append(
            f"  {h.ttl:>2}  {h.outcome:<13}  {h.responder or '*':<40}  {rtt:>9}"
            + (f"  {h.detail}" if h.detail else "")
        )
    lines.append(f"  => {t.conclusion}")
    lines += [f"  note: {n}" for n in t.notes]
    return "\n".join(lines) + "\n"


def main(
    args: argparse.Namespace, endpoints: Sequence[Endpoint], vantage_asn: str | None = None
) -> int:
    """Exit 0: every trace reached its server; 1: a block was located (or not reached)."""
    if not 1 <= args.max_hops <= MAX_HOPS:
        raise TraceError(f"--max-hops must be in 1..{MAX_HOPS}")
    if not 0.05 <= args.timeout <= 10 or not 0.02 <= args.interval <= 10:
        raise TraceError("--timeout must be in 0.05..10 s and --interval in 0.02..10 s")
    asn_map = AsnMap.load(args.asn_map) if args.asn_map else None  # before any packet
    try:
        traces = [run(p, args.max_hops, args.timeout, args.interval) for p in plan(args, endpoints)]
    except OSError as exc:  # no route, no such family on this host: say so, no traceback
        raise TraceError(f"{args.target}: {exc.strerror or exc}") from exc
    if asn_map is not None:
        traces = [with_asn(t, asn_map, vantage_asn) for t in traces]
    for t in traces:
        if args.format == "json":
            sys.stdout.write(json.dumps(t.to_json()) + "\n")
        else:
            sys.stdout.write(table(t))
    return 0 if all(t.reached_ttl is not None for t in traces) else 1
