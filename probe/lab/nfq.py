"""``python -m probe.lab.nfq SPEC``: NFQUEUE packet handlers for what no kernel rule can do.

The censor (`probe.lab.censor`) starts one of these inside the censor namespace, waits
for its ready line, and only then adds the ``-j NFQUEUE --queue-num N`` rule that feeds
it (removal in the opposite order), so no packet ever waits on a queue nobody reads.
Handlers (``mode`` in SPEC):

- ``delay``: hold every queued packet ``delay_ms`` milliseconds, then accept it, in
  arrival order.  This kernel has no netem; the handler adds ~0.4 ms of its own.
- ``dnsinject``: an on-path DNS injector (FIELD.md B1).  For a UDP query whose name the
  ``rules`` script (same rule format as `probe.lab.serve`, so any answer table
  behaviour: forged addresses, NXDOMAIN, garbage ...), it sends the scripted reply to the
  client *from the resolver's address* (an ``IP_TRANSPARENT`` socket in the censor), then
  lets the query go on to the real resolver (``drop_query`` false: the client gets the
  forged answer first and the real one after it, the race OONI looks for) or drops it.
  Queries for unscripted names pass untouched.

Protocol as `probe.lab.serve`: one JSON ready line, then ``{"cmd": "stats"}`` answers
``{"packets": N, "injected": N, ...}``; EOF on stdin or SIGTERM exits.
"""

from __future__ import annotations

import asyncio
import contextlib
import ipaddress
import json
import socket
import struct
import sys
from collections.abc import Mapping, Sequence
from typing import Any, Protocol

from .process import answer_commands, emit, stop_on_signals
from .serve import table_from_rules
from .servers.dns import Behaviour, decode_query, plan_replies, question_of

__all__ = ["main", "parse_udp"]

_IP_TRANSPARENT = 19
_IPV6_TRANSPARENT = 75
_MAX_COMMAND = 1 << 16  # a stdin command line ({"cmd": "stats"})
_MAX_QUEUE = 4096  # packets the kernel may hold for us; beyond that it drops (tail drop)
_MAX_SOCKETS = 64  # spoofing sockets kept, one per (resolver address, port)


class Packet(Protocol):
    """The part of netfilterqueue's Packet we use."""

    def get_payload(self) -> bytes: ...
    def accept(self) -> None: ...
    def drop(self) -> None: ...


def parse_udp(packet: bytes) -> tuple[int, str, int, str, int, bytes] | None:
    """(IP version, source, source port, destination, destination port, payload) of a UDP
    packet, or None if it is not UDP or is cut short.  IPv6 extension headers are not
    followed: lab traffic has none."""
    if len(packet) < 1:
        return None
    version = packet[0] >> 4
    if version == 4 and len(packet) >= 20:
        ihl = (packet[0] & 0x0F) * 4
        if packet[9] != socket.IPPROTO_UDP or len(packet) < ihl + 8:
            return None
        src, dst = (
            socket.inet_ntop(socket.AF_INET, packet[12:16]),
            socket.inet_ntop(socket.AF_INET, packet[16:20]),
        )
        offset = ihl
    elif version == 6 and len(packet) >= 48:
        if packet[6] != socket.IPPROTO_UDP:
            return None
        src, dst = (
            socket.inet_ntop(socket.AF_INET6, packet[8:24]),
            socket.inet_ntop(socket.AF_INET6, packet[24:40]),
        )
        offset = 40
    else:
        return None
    sport, dport, length = struct.unpack("!HHH", packet[offset : offset + 6])
    payload = packet[offset + 8 : offset + max(length, 8)]
    return version, src, sport, dst, dport, payload


class Handler:
    def __init__(self) -> None:
        self.packets = 0

    def on_packet(self, pkt: Packet) -> None:
        raise NotImplementedError

    def stats(self) -> dict[str, Any]:
        return {"packets": self.packets}

    def close(self) -> None:
        """Release what the handler holds (held packets are accepted)."""


class Delay(Handler):
    """Accept every packet ``delay_ms`` after it was queued."""

    def __init__(self, delay_ms: float) -> None:
        super().__init__()
        if not 0 <= delay_ms <= 10_000:
            raise ValueError("delay_ms must be in 0..10000")
        self.delay_s = delay_ms / 1000
        self._held: dict[int, tuple[asyncio.TimerHandle, Packet]] = {}
        self._next = 0

    def on_packet(self, pkt: Packet) -> None:
        self.packets += 1
        key = self._next
        self._next += 1
        handle = asyncio.get_running_loop().call_later(self.delay_s, self._release, key)
        self._held[key] = (handle, pkt)

    def _release(self, key: int) -> None:
        _, pkt = self._held.pop(key)
        pkt.accept()

    def stats(self) -> dict[str, Any]:
        return {"packets": self.packets, "held": len(self._held)}

    def close(self) -> None:
        for handle, pkt in self._held.values():
            handle.cancel()
            with contextlib.suppress(Exception):
                pkt.accept()
        self._held.clear()


class DNSInject(Handler):
    """Forge replies to scripted UDP DNS queries from the resolver's own address."""

    def __init__(self, rules: Sequence[Mapping[str, Any]], drop_query: bool) -> None:
        super().__init__()
        # Unscripted names get silence, i.e. nothing injected.
        self.table = table_from_rules(rules, {"kind": "silence"})
        self.drop_query = drop_query
        self.injected = 0
        self.matched = 0
        self._sockets: dict[tuple[str, int], socket.socket] = {}
        self._timers: set[asyncio.TimerHandle] = set()

    def on_packet(self, pkt: Packet) -> None:
        self.packets += 1
        try:
            forged = self._forge(pkt.get_payload())
        except Exception:  # a packet we cannot read is passed on, never crashes the censor
            forged = False
        if forged and self.drop_query:
            pkt.drop()
        else:
            pkt.accept()

    def _forge(self, packet: bytes) -> bool:
        parsed = parse_udp(packet)
        if parsed is None:
            return False
        _version, client, cport, resolver, rport, payload = parsed
        query = decode_query(payload)
        if query is None:
            return False
        qname, qtype = question_of(query)
        behaviour: Behaviour = self.table.lookup(qname, qtype, "udp")
        replies = plan_replies(query, behaviour)
        if not replies:
            return False
        self.matched += 1
        sock = self._socket(resolver, rport)
        loop = asyncio.get_running_loop()
        for delay, data in replies:
            if delay <= 0:
                self._send(sock, data, client, cport)
            else:
                handle = loop.call_later(delay, self._send, sock, data, client, cport)
                self._timers.add(handle)
        return True

    def _send(self, sock: socket.socket, data: bytes, client: str, cport: int) -> None:
        with contextlib.suppress(OSError):
            sock.sendto(data, (client, cport))
            self.injected += 1

    def _socket(self, address: str, port: int) -> socket.socket:
        key = (address, port)
        if key in self._sockets:
            return self._sockets[key]
        if len(self._sockets) >= _MAX_SOCKETS:
            _, old = self._sockets.popitem()
            old.close()
        v6 = ipaddress.ip_address(address).version == 6
        sock = socket.socket(socket.AF_INET6 if v6 else socket.AF_INET, socket.SOCK_DGRAM)
        # Transparent: bind to (and send from) the resolver's address, which is not ours.
        if v6:
            sock.setsockopt(socket.IPPROTO_IPV6, _IPV6_TRANSPARENT, 1)
        else:
            sock.setsockopt(socket.SOL_IP, _IP_TRANSPARENT, 1)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind((address, port))
        sock.setblocking(False)
        self._sockets[key] = sock
        return sock

    def stats(self) -> dict[str, Any]:
        return {"packets": self.packets, "matched": self.matched, "injected": self.injected}

    def close(self) -> None:
        for handle in self._timers:
            handle.cancel()
        for sock in self._sockets.values():
            sock.close()
        self._sockets.clear()


def build_handler(spec: Mapping[str, Any]) -> Handler:
    mode = spec.get("mode")
    if mode == "delay":
        return Delay(float(spec["delay_ms"]))
    if mode == "dnsinject":
        return DNSInject(spec.get("rules", ()), bool(spec.get("drop_query", False)))
    raise ValueError(f"unknown nfq mode {mode!r}")


async def _run(spec: Mapping[str, Any]) -> int:
    from netfilterqueue import NetfilterQueue  # only the lab needs it (extra "lab")

    handler = build_handler(spec)
    queue_num = int(spec["queue"])
    nfq = NetfilterQueue()
    nfq.bind(queue_num, handler.on_packet, max_len=_MAX_QUEUE)
    loop = asyncio.get_running_loop()
    stop = stop_on_signals()
    # run(block=False) handles what is pending on the netlink socket and returns.
    loop.add_reader(nfq.get_fd(), nfq.run, False)
    emit({"ready": True, "queue": queue_num, "mode": spec.get("mode")})
    try:
        await answer_commands(
            lambda cmd: _answer(handler, cmd),
            stop,
            errors=(ValueError, AttributeError),
            limit=_MAX_COMMAND,
        )
    finally:
        loop.remove_reader(nfq.get_fd())
        handler.close()
        nfq.unbind()
    return 0


def _answer(handler: Handler, cmd: Any) -> dict[str, Any]:
    if cmd.get("cmd") != "stats":
        raise ValueError(f"unknown command {cmd.get('cmd')!r}")
    return handler.stats()


def main(argv: Sequence[str] | None = None) -> int:
    args = list(sys.argv[1:] if argv is None else argv)
    try:
        if len(args) != 1:
            raise ValueError("usage: python -m probe.lab.nfq SPEC_JSON")
        spec = json.loads(args[0])
        return asyncio.run(_run(spec))
    except (ValueError, KeyError, TypeError, OSError, ImportError) as exc:
        emit({"error": f"{type(exc).__name__}: {exc}"})
        return 1


if __name__ == "__main__":
    raise SystemExit(main())
