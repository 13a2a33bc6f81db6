"""``python -m probe.lab.serve SPEC``: start servers from `probe.lab.servers` in this process.

The lab runs it inside a namespace (``ip netns exec NS python -m probe.lab.serve ...``,
see `probe.lab.topology.Lab.serve`); it works anywhere, e.g. on loopback.  SPEC is JSON::

    {"servers": [
      {"kind": "tls", "name": "wa", "host": "10.200.100.1", "port": 443,
       "cert": "/tmp/plab.../leaf1", "mode": "serve"},
      {"kind": "dns", "host": "10.200.100.53", "port": 53,
       "rules": [{"name": "g.whatsapp.net", "host": ["10.200.100.1", "fd00:200:100::1"]},
                 {"name": "e1.whatsapp.net", "type": "A", "transport": "udp",
                  "answer": {"kind": "nxdomain"}}]}
    ]}

Kinds and their options (besides ``name``, ``host``, ``port``; ``port`` 0 = ephemeral):

- ``tcp``: ``mode`` (`TCPMode`: hold, reset, garbage, close, echo)
- ``backlog``: a listener whose SYNs go unanswered (`FullBacklogListener`)
- ``tls``: ``cert`` (a file stem: STEM.crt, STEM.key), ``mode`` (`TLSMode`), ``alpn``
- ``https_bulk``: ``cert``, ``behaviour`` (fields of `BulkBehaviour`)
- ``stun``: ``transport``, ``behavior``, ``framing``, ``answer_first``, ``answer_for_s``
- ``quic``: ``cert``, ``alpn``, ``versions``
- ``quic_vn``: ``versions``, ``mode`` (`VNMode`), ``min_datagram``
- ``dns``: ``rules``, ``default`` (a behaviour; NXDOMAIN if absent)
- ``doh``: ``cert``, ``rules``, ``default``, ``path``
- ``mtproto``: ``mode``, ``error_code``;  ``noise``: ``mode``

DNS rules: ``{"name": N, "host": [addresses]}`` answers A with the IPv4 and AAAA with the
IPv6 ones; ``{"name": N, "type": "A"|"AAAA"|"both", "answer": BEHAVIOUR}`` scripts one
behaviour, optionally only for ``"transport": "udp"|"tcp"|"doh"``.  A BEHAVIOUR is
``{"kind": K, ...}`` with K one of answer (``addresses``, ``ttl``, ``delay_s``), nxdomain,
servfail, refused, nodata (``delay_s``), silence, close, reset, garbage (``payload_hex``),
wrong_id (``addresses``), race (``injected``, ``real``: behaviours; ``delay_s``).

Protocol: one JSON line on stdout once every server is bound::

    {"ready": true, "servers": [{"name": "wa", "kind": "tls", "host": "...", "port": 443}]}

(or ``{"error": "..."}`` and exit 1), then one JSON answer per JSON command line on stdin:
``{"cmd": "stats"}`` (counters per server), ``{"cmd": "dns", "server": NAME, "rules":
[...], "reset": false}`` (re-script a running DNS/DoH server), ``{"cmd": "stop"}``.
EOF on stdin or SIGTERM stops every server and exits 0.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import sys
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from .certs import LeafCert
from .process import answer_commands, emit, stop_on_signals
from .servers.dns import AnswerTable, Behaviour, DNSServer
from .servers.doh import DoHServer
from .servers.https_bulk import BulkBehaviour, HTTPSBulkServer
from .servers.mtproto import MTProtoServer
from .servers.noise import NoiseServer
from .servers.quic import QUICServer, VersionNegotiationServer
from .servers.stun import StunServer
from .servers.tcp import FullBacklogListener, TCPServer
from .servers.tls import TLSServer, server_context

__all__ = ["behaviour_from_json", "build_server", "main", "table_from_rules"]

_MAX_COMMAND = 1 << 20
# Counters worth reporting, wherever a server keeps them.
_COUNTERS = (
    "accepted",
    "client_closed",
    "open_connections",
    "connections",
    "client_hellos",
    "requests",
    "datagrams",
    "handshakes",
    "answered",
    "received",
)


class SpecError(ValueError):
    """The spec names an unknown kind, option or value."""


def behaviour_from_json(obj: Mapping[str, Any]) -> Behaviour:
    """A `Behaviour` of the DNS answer table from its JSON form (see module doc)."""
    kind = obj.get("kind")
    delay = float(obj.get("delay_s", 0.0))
    addresses = [str(a) for a in obj.get("addresses", ())]
    ttl = int(obj.get("ttl", 300))
    if kind == "answer":
        return Behaviour.answer(*addresses, ttl=ttl, delay_s=delay)
    if kind == "wrong_id":
        return Behaviour.wrong_id(*addresses, ttl=ttl, delay_s=delay)
    if kind in ("nxdomain", "servfail", "refused", "nodata"):
        rcode: Behaviour = getattr(Behaviour, kind)(delay_s=delay)
        return rcode
    if kind in ("silence", "close", "reset"):
        quiet: Behaviour = getattr(Behaviour, kind)()
        return quiet
    if kind == "garbage":
        if "payload_hex" in obj:
            return Behaviour.garbage(bytes.fromhex(obj["payload_hex"]), delay_s=delay)
        return Behaviour.garbage(delay_s=delay)
    if kind == "race":
        return Behaviour.race(
            behaviour_from_json(obj["injected"]), behaviour_from_json(obj["real"]), delay_s=delay
        )
    raise SpecError(f"unknown DNS behaviour kind {kind!r}")


def table_from_rules(
    rules: Sequence[Mapping[str, Any]],
    default: Mapping[str, Any] | None = None,
    table: AnswerTable | None = None,
) -> AnswerTable:
    """Apply rules to ``table`` (a new one if None); see the module doc for the format."""
    table = table if table is not None else AnswerTable()
    if default is not None:
        table.default = behaviour_from_json(default)
    for rule in rules:
        name = str(rule["name"])
        transport = rule.get("transport")
        if "host" in rule:
            table.host(name, *[str(a) for a in rule["host"]], transport=transport)
            continue
        behaviour = behaviour_from_json(rule["answer"])
        qtype = str(rule.get("type", "both")).upper()
        if qtype == "BOTH":
            table.both(name, behaviour, transport=transport)
        else:
            table.set(name, qtype, behaviour, transport=transport)
    return table


def _leaf(stem: str) -> LeafCert:
    return LeafCert(Path(stem + ".crt").read_bytes(), Path(stem + ".key").read_bytes())


def build_server(spec: Mapping[str, Any]) -> Any:
    """An unstarted server object for one spec entry."""
    s = dict(spec)
    kind = s.pop("kind", None)
    s.pop("name", None)
    host = str(s.pop("host", "127.0.0.1"))
    port = int(s.pop("port", 0))
    server: Any
    if kind == "tcp":
        server = TCPServer(host, port, s.pop("mode", "hold"))
    elif kind == "backlog":
        server = FullBacklogListener(host, port)
    elif kind == "tls":
        server = TLSServer(
            host,
            port,
            cert=_leaf(s.pop("cert")),
            mode=s.pop("mode", "serve"),
            alpn=s.pop("alpn", ()),
        )
    elif kind == "https_bulk":
        behaviour = BulkBehaviour(**s.pop("behaviour", {}))
        server = HTTPSBulkServer(host, port, cert=_leaf(s.pop("cert")), behaviour=behaviour)
    elif kind == "stun":
        server = StunServer(
            host,
            port,
            **_take(s, "transport", "behavior", "framing", "answer_first", "answer_for_s"),
        )
    elif kind == "quic":
        server = QUICServer(host, port, cert=_leaf(s.pop("cert")), **_take(s, "alpn", "versions"))
    elif kind == "quic_vn":
        server = VersionNegotiationServer(
            host, port, **_take(s, "versions", "mode", "min_datagram")
        )
    elif kind == "dns":
        server = DNSServer(table_from_rules(s.pop("rules", ()), s.pop("default", None)), host, port)
    elif kind == "doh":
        table = table_from_rules(s.pop("rules", ()), s.pop("default", None))
        ctx = server_context(_leaf(s.pop("cert")))
        server = DoHServer(table, ctx, host, port, **_take(s, "path"))
    elif kind == "mtproto":
        server = MTProtoServer(host, port, **_take(s, "mode", "error_code"))
    elif kind == "noise":
        server = NoiseServer(host, port, **_take(s, "mode"))
    else:
        raise SpecError(f"unknown server kind {kind!r}")
    if s:
        raise SpecError(f"{kind}: unknown options {sorted(s)}")
    return server


def _take(options: dict[str, Any], *names: str) -> dict[str, Any]:
    return {n: options.pop(n) for n in names if n in options}


def stats_of(server: Any) -> dict[str, Any]:
    """What a server counted so far (only the counters it has)."""
    out: dict[str, Any] = {}
    for name in _COUNTERS:
        value = getattr(server, name, None)
        if isinstance(value, int) and not isinstance(value, bool):
            out[name] = value
    if (sni := getattr(server, "sni_seen", None)) is not None:
        out["sni_seen"] = list(sni)
    if (cut := getattr(server, "cut", None)) is not None:
        out["cut"] = list(cut)
    if isinstance(server, DNSServer | DoHServer):
        out["queries"] = [[*key, n] for key, n in sorted(server.queries.items())]
    return out


class Serving:
    """The running servers of one spec and the command loop."""

    def __init__(self, specs: Sequence[Mapping[str, Any]]) -> None:
        self.entries: list[tuple[str, str, Any]] = []
        for i, spec in enumerate(specs):
            name = str(spec.get("name") or f"{spec.get('kind')}{i}")
            if any(name == n for n, _, _ in self.entries):
                raise SpecError(f"duplicate server name {name!r}")
            self.entries.append((name, str(spec.get("kind")), build_server(spec)))
        self.started: list[Any] = []

    async def start(self) -> list[dict[str, Any]]:
        bound = []
        for name, kind, server in self.entries:
            await server.start()
            self.started.append(server)
            bound.append({"name": name, "kind": kind, "host": server.host, "port": server.port})
        return bound

    async def close(self) -> None:
        for server in reversed(self.started):
            with contextlib.suppress(Exception):
                await server.close()
        self.started.clear()

    def command(self, cmd: Mapping[str, Any]) -> dict[str, Any]:
        what = cmd.get("cmd")
        if what == "stats":
            return {"stats": {name: stats_of(srv) for name, _, srv in self.entries}}
        if what == "dns":
            server = self._server(str(cmd.get("server")))
            if not isinstance(server, DNSServer | DoHServer):
                raise SpecError(f"{cmd.get('server')!r} is not a DNS or DoH server")
            if cmd.get("reset"):
                server.table = AnswerTable()
            table_from_rules(cmd.get("rules", ()), cmd.get("default"), server.table)
            return {"ok": True}
        raise SpecError(f"unknown command {what!r}")

    def _server(self, name: str) -> Any:
        for n, _, server in self.entries:
            if n == name:
                return server
        raise SpecError(f"no server named {name!r}")


async def _serve(specs: Sequence[Mapping[str, Any]]) -> int:
    try:
        serving = Serving(specs)
    except (SpecError, KeyError, TypeError, ValueError, OSError) as exc:
        emit({"error": f"{type(exc).__name__}: {exc}"})
        return 1
    stop = stop_on_signals()
    try:
        bound = await serving.start()
    except (OSError, RuntimeError) as exc:
        await serving.close()
        emit({"error": f"{type(exc).__name__}: {exc}"})
        return 1
    emit({"ready": True, "servers": bound})

    def answer(cmd: Any) -> dict[str, Any]:
        if cmd.get("cmd") == "stop":
            stop.set()
            return {"ok": True}
        return serving.command(cmd)

    try:
        await answer_commands(
            answer,
            stop,
            errors=(SpecError, KeyError, TypeError, ValueError, AttributeError),
            limit=_MAX_COMMAND,
        )
    finally:
        await serving.close()
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    args = list(sys.argv[1:] if argv is None else argv)
    if len(args) != 1:
        print("usage: python -m probe.lab.serve SPEC_JSON", file=sys.stderr)
        return 2
    try:
        spec = json.loads(args[0])
        specs = spec["servers"]
    except (ValueError, KeyError, TypeError) as exc:
        emit({"error": f"bad spec: {exc}"})
        return 2
    return asyncio.run(_serve(specs))


if __name__ == "__main__":
    raise SystemExit(main())
