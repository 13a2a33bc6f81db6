"""``python -m probe.lab.nfq SPEC``: NFQUEUE packet handlers for what no kernel rule can do.

The censor (`probe.lab.censor`) starts one of these inside the censor namespace, waits
for its ready line, and only then adds the ``-j NFQUEUE --queue-num N`` rule that feeds
it (removal in the opposite order), so no packet ever waits on a queue nobody reads.
Handlers (``mode`` in SPEC):

- ``delay``: hold every queued packet ``delay_ms`` milliseconds after the kernel received
  it, then accept it (this kernel has no netem).  Self-reporting: for every SYN-ACK it
  logs the connection (server and client address and port) and the delay it really
  added, from the kernel's receive timestamp to the verdict, so a benchmark can judge a
  prober against each connection's own delay rather than the nominal one.  Releases run
  off a timerfd (asyncio's timers wake to the millisecond) and, with ``realtime`` true,
  under SCHED_FIFO, so a busy machine does not make them late.
- ``dnsinject``: an on-path DNS injector (FIELD.md B1).  For a UDP query whose name the
  ``rules`` script (same rule format as `probe.lab.serve`, so any answer table
  behaviour: forged addresses, NXDOMAIN, garbage ...), it sends the scripted reply to the
  client *from the resolver's address* (an ``IP_TRANSPARENT`` socket in the censor), then
  lets the query go on to the real resolver (``drop_query`` false: the client gets the
  forged answer first and the real one after it, the race OONI looks for) or drops it.
  Queries for unscripted names pass untouched.

Protocol as `probe.lab.serve`: one JSON ready line, then ``{"cmd": "stats"}`` answers
``{"packets": N, "injected": N, ...}``; ``delay`` also answers ``{"cmd": "log"}`` with
the SYN-ACK records logged since the last ``log`` (and forgets them).  EOF on stdin or
SIGTERM exits.
"""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import heapq
import ipaddress
import json
import os
import socket
import struct
import sys
import time
from collections.abc import Mapping, Sequence
from typing import Any, Protocol

from .process import answer_commands, emit, stop_on_signals
from .serve import table_from_rules
from .servers.dns import Behaviour, decode_query, plan_replies, question_of

__all__ = ["main", "parse_tcp", "parse_udp"]

_IP_TRANSPARENT = 19
_IPV6_TRANSPARENT = 75
_MAX_COMMAND = 1 << 16  # a stdin command line ({"cmd": "stats"})
_MAX_QUEUE = 4096  # packets the kernel may hold for us; beyond that it drops (tail drop)
_MAX_SOCKETS = 64  # spoofing sockets kept, one per (resolver address, port)
_MAX_LOG = 4096  # SYN-ACK records kept between two "log" commands (one answer line < 1 MiB)
# Release a packet this early rather than sleep again for it: one more wake-up costs more.
_SLACK_NS = 20_000
_RT_PRIORITY = 10  # SCHED_FIFO priority of the delay handler (1..99; low: it never spins)
# A kernel receive stamp further back than this is not believed (the clocks disagree).
_MAX_STAMP_AGE_NS = 1_000_000_000
_SYN, _ACK = 0x02, 0x10
_SO_TIMESTAMP = 29  # Linux; the socket module does not export it


class Packet(Protocol):
    """The part of netfilterqueue's Packet we use."""

    def get_payload(self) -> bytes: ...
    def get_timestamp(self) -> float: ...
    def accept(self) -> None: ...
    def drop(self) -> None: ...


def _ip_header(packet: bytes) -> tuple[int, int, str, str, int] | None:
    """(IP version, protocol, source, destination, transport offset), or None if cut
    short.  IPv6 extension headers are not followed: lab traffic has none."""
    if len(packet) < 1:
        return None
    version = packet[0] >> 4
    if version == 4 and len(packet) >= 20:
        family, proto, offset = socket.AF_INET, packet[9], (packet[0] & 0x0F) * 4
        src, dst = packet[12:16], packet[16:20]
    elif version == 6 and len(packet) >= 40:
        family, proto, offset = socket.AF_INET6, packet[6], 40
        src, dst = packet[8:24], packet[24:40]
    else:
        return None
    return version, proto, socket.inet_ntop(family, src), socket.inet_ntop(family, dst), offset


def parse_udp(packet: bytes) -> tuple[int, str, int, str, int, bytes] | None:
    """(IP version, source, source port, destination, destination port, payload) of a UDP
    packet, or None if it is not UDP or is cut short."""
    header = _ip_header(packet)
    if header is None:
        return None
    version, proto, src, dst, offset = header
    if proto != socket.IPPROTO_UDP or len(packet) < offset + 8:
        return None
    sport, dport, length = struct.unpack("!HHH", packet[offset : offset + 6])
    payload = packet[offset + 8 : offset + max(length, 8)]
    return version, src, sport, dst, dport, payload


def parse_tcp(packet: bytes) -> tuple[str, int, str, int, int] | None:
    """(source, source port, destination, destination port, flags) of a TCP packet, or
    None if it is not TCP or is cut short."""
    header = _ip_header(packet)
    if header is None:
        return None
    _version, proto, src, dst, offset = header
    if proto != socket.IPPROTO_TCP or len(packet) < offset + 14:
        return None
    sport, dport = struct.unpack("!HH", packet[offset : offset + 4])
    return src, sport, dst, dport, packet[offset + 13]


class Handler:
    def __init__(self) -> None:
        self.packets = 0

    def on_packet(self, pkt: Packet) -> None:
        raise NotImplementedError

    def start(self, loop: asyncio.AbstractEventLoop) -> None:
        """Hook up to the running loop (after the queue is bound, before the ready line)."""

    def stats(self) -> dict[str, Any]:
        return {"packets": self.packets}

    def answer(self, cmd: Mapping[str, Any]) -> dict[str, Any]:
        """Answer a command line from the lab: ``stats`` here, more in a subclass."""
        if cmd.get("cmd") != "stats":
            raise ValueError(f"unknown command {cmd.get('cmd')!r}")
        return self.stats()

    def close(self) -> None:
        """Release what the handler holds (held packets are accepted)."""


_CLOCK_MONOTONIC = 1
_TFD_NONBLOCK = os.O_NONBLOCK
_TFD_CLOEXEC = os.O_CLOEXEC
_TFD_TIMER_ABSTIME = 1


class _Timespec(ctypes.Structure):
    _fields_ = [("tv_sec", ctypes.c_long), ("tv_nsec", ctypes.c_long)]


class _ITimerSpec(ctypes.Structure):
    _fields_ = [("it_interval", _Timespec), ("it_value", _Timespec)]


class TimerFd:
    """A CLOCK_MONOTONIC timerfd armed at absolute nanosecond deadlines.

    asyncio's own timers wake through epoll_wait, whose timeout is whole milliseconds
    (rounded up), so ``call_later`` fires up to ~1 ms late; a timerfd turns readable at
    its deadline to the kernel's timer resolution.  Python 3.11 has no
    ``os.timerfd_create`` (3.13 has), hence ctypes.
    """

    def __init__(self) -> None:
        self._libc = ctypes.CDLL(None, use_errno=True)
        fd = self._libc.timerfd_create(_CLOCK_MONOTONIC, _TFD_NONBLOCK | _TFD_CLOEXEC)
        if fd < 0:
            err = ctypes.get_errno()
            raise OSError(err, f"timerfd_create: {os.strerror(err)}")
        self.fd = int(fd)

    def arm(self, deadline_ns: int | None) -> None:
        """Fire at ``deadline_ns`` (on the time.monotonic_ns() clock); None disarms."""
        spec = _ITimerSpec()
        if deadline_ns is not None:
            # All zero disarms: a deadline already past must still fire, so never 0.
            sec, nsec = divmod(max(deadline_ns, 1), 1_000_000_000)
            spec.it_value.tv_sec, spec.it_value.tv_nsec = sec, nsec
        if self._libc.timerfd_settime(self.fd, _TFD_TIMER_ABSTIME, ctypes.byref(spec), None):
            err = ctypes.get_errno()
            raise OSError(err, f"timerfd_settime: {os.strerror(err)}")

    def consume(self) -> None:
        with contextlib.suppress(BlockingIOError):
            os.read(self.fd, 8)

    def close(self) -> None:
        os.close(self.fd)


def _arrival_ns(pkt: Packet, received_ns: int) -> tuple[int, bool]:
    """When the packet reached this namespace, on the monotonic clock, and whether that is
    the kernel's receive stamp (True) or, lacking one, the moment we read it (False).

    The kernel stamps on receive, before the packet waits in the queue for us, so the
    wait for a busy handler counts as delay the path really had."""
    stamp = pkt.get_timestamp()  # CLOCK_REALTIME seconds (µs resolution); 0 if none
    if stamp > 0:
        realtime_minus_monotonic = time.time_ns() - time.monotonic_ns()
        arrived = round(stamp * 1e9) - realtime_minus_monotonic
        if 0 <= received_ns - arrived <= _MAX_STAMP_AGE_NS:
            return arrived, True
    return received_ns, False


class Delay(Handler):
    """Accept every packet ``delay_ms`` after the kernel received it, and log for every
    SYN-ACK the delay really added (see the module docstring)."""

    def __init__(self, delay_ms: float) -> None:
        super().__init__()
        if not 0 <= delay_ms <= 10_000:
            raise ValueError("delay_ms must be in 0..10000")
        self.delay_ns = round(delay_ms * 1e6)
        # (due, sequence, arrived, packet, SYN-ACK record or None), earliest due first
        self._held: list[tuple[int, int, int, Packet, dict[str, Any] | None]] = []
        self._next = 0
        self._armed: int | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._log: list[dict[str, Any]] = []
        self.kernel_stamped = 0
        self.synacks = 0
        self.log_dropped = 0
        self.late_max_ns = 0
        self.timer = TimerFd()
        # The kernel stamps received packets only while some socket asks for stamps (a
        # global switch): this socket is that request, held as long as the handler.
        self._stamps = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        self._stamps.setsockopt(socket.SOL_SOCKET, _SO_TIMESTAMP, 1)

    def start(self, loop: asyncio.AbstractEventLoop) -> None:
        self._loop = loop
        loop.add_reader(self.timer.fd, self._on_timer)

    def on_packet(self, pkt: Packet) -> None:
        received = time.monotonic_ns()
        self.packets += 1
        arrived, kernel = _arrival_ns(pkt, received)
        self.kernel_stamped += kernel
        record = self._synack(pkt)
        if record is not None:
            record.update(kernel_stamp=kernel, wait_us=round((received - arrived) / 1e3, 1))
        due = arrived + self.delay_ns
        heapq.heappush(self._held, (due, self._next, arrived, pkt, record))
        self._next += 1
        if due <= time.monotonic_ns() + _SLACK_NS:
            self._release()
        elif self._armed is None or due < self._armed:
            self._arm(due)

    def _synack(self, pkt: Packet) -> dict[str, Any] | None:
        try:
            parsed = parse_tcp(pkt.get_payload()[:64])
        except Exception:  # an unreadable packet is still delayed, just not logged
            return None
        if parsed is None or parsed[4] & (_SYN | _ACK) != _SYN | _ACK:
            return None
        src, sport, dst, dport, _flags = parsed
        return {"server": src, "server_port": sport, "client": dst, "client_port": dport}

    def _on_timer(self) -> None:
        self.timer.consume()
        self._armed = None
        self._release()

    def _release(self) -> None:
        """Accept every packet due by now (give or take the slack), then re-arm."""
        while self._held and self._held[0][0] <= time.monotonic_ns() + _SLACK_NS:
            due, _, arrived, pkt, record = heapq.heappop(self._held)
            released = time.monotonic_ns()
            pkt.accept()
            # The verdict call forwards the packet, and the receiving namespace's kernel
            # takes it in (softirq) early in that call, before it answers it, sends the
            # next packet and returns: the moment of release is the call's start, and
            # verdict_us bounds how far after it the receiver saw the packet.
            verdict = time.monotonic_ns() - released
            self.late_max_ns = max(self.late_max_ns, released - due)
            if record is not None:
                self._note(record, released - arrived, released - due, verdict)
        if self._held:
            self._arm(self._held[0][0])

    def _note(self, record: dict[str, Any], held: int, late: int, verdict: int) -> None:
        self.synacks += 1
        if len(self._log) >= _MAX_LOG:
            self.log_dropped += 1
            return
        record.update(
            held_us=round(held / 1e3, 1),
            late_us=round(late / 1e3, 1),
            verdict_us=round(verdict / 1e3, 1),
        )
        self._log.append(record)

    def _arm(self, deadline: int) -> None:
        self.timer.arm(deadline)
        self._armed = deadline

    def answer(self, cmd: Mapping[str, Any]) -> dict[str, Any]:
        if cmd.get("cmd") == "log":
            log, self._log = self._log, []
            return {"synacks": log, "dropped": self.log_dropped}
        return super().answer(cmd)

    def stats(self) -> dict[str, Any]:
        return {
            "packets": self.packets,
            "held": len(self._held),
            "kernel_stamped": self.kernel_stamped,
            "synacks": self.synacks,
            "log_dropped": self.log_dropped,
            "late_max_us": round(self.late_max_ns / 1e3, 1),
        }

    def close(self) -> None:
        for _, _, _, pkt, _ in self._held:
            with contextlib.suppress(Exception):
                pkt.accept()
        self._held.clear()
        if self._loop is not None:
            self._loop.remove_reader(self.timer.fd)
        self.timer.close()
        self._stamps.close()


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


def _realtime() -> str:
    """Run this process under SCHED_FIFO (a held packet's release then waits for no
    ordinary process on a busy machine); the policy we got, "fifo" or "other"."""
    try:
        os.sched_setscheduler(0, os.SCHED_FIFO, os.sched_param(_RT_PRIORITY))
    except (OSError, AttributeError):  # no CAP_SYS_NICE, or RT time not granted here
        return "other"
    return "fifo"


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
    handler.start(loop)
    sched = _realtime() if spec.get("realtime") else "other"
    emit({"ready": True, "queue": queue_num, "mode": spec.get("mode"), "sched": sched})
    try:
        await answer_commands(
            handler.answer,
            stop,
            errors=(ValueError, AttributeError),
            limit=_MAX_COMMAND,
        )
    finally:
        loop.remove_reader(nfq.get_fd())
        handler.close()
        nfq.unbind()
    return 0


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
