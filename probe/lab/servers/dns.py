"""A scriptable DNS server over UDP and TCP (same port), for tests and the censorship lab.

The answer table says, per (name, type) and optionally per transport, how to
behave: answer addresses, NXDOMAIN, SERVFAIL, REFUSED, NOERROR without data,
stay silent, send garbage, answer with the wrong transaction ID, or race two
answers (an injected one at once, the real one later, as an on-path injector
does).  A per-transport rule emulates censor behaviour B1 (NXDOMAIN over UDP
while TCP answers).  `probe.lab.servers.doh` serves the same table over HTTPS.

    table = AnswerTable()
    table.host("g.whatsapp.net", "127.0.0.2", "::1")
    table.set("e1.whatsapp.net", "A", Behaviour.nxdomain(), transport="udp")
    async with DNSServer(table, "127.0.0.1") as server:
        server.udp_resolver  # "udp:127.0.0.1:PORT", a Target.resolver string
"""

from __future__ import annotations

import asyncio
import ipaddress
from collections import Counter
from dataclasses import dataclass, field
from typing import Literal, Self

import dns.flags
import dns.message
import dns.rcode
import dns.rdataclass
import dns.rdatatype
import dns.rrset

from ...wire import WireError
from ...wire.dnsmsg import parse_message
from . import AsyncServer
from .tcp import CallbackStreamServer, abort_with_rst

__all__ = [
    "AnswerTable",
    "Behaviour",
    "DNSServer",
    "Kind",
    "Transport",
    "plan_replies",
]

Transport = Literal["udp", "tcp", "doh"]
Kind = Literal[
    "answer",
    "nxdomain",
    "servfail",
    "refused",
    "nodata",
    "silence",
    "garbage",
    "wrong_id",
    "race",
    "close",
    "reset",
]

# Not DNS: starts like an HTTP reply, and its would-be header claims 0x2f31 questions
# in a 27-byte message, so no DNS parser can accept it.
DEFAULT_GARBAGE = b"HTTP/1.1 400 Bad Request\r\n\r\n"
_MAX_PENDING_SENDS = 1024  # delayed UDP replies in flight; beyond that new ones are dropped
_MAX_QUERIES_PER_CONNECTION = 1000


@dataclass(frozen=True)
class Behaviour:
    """How the server answers one (name, type).  Build with the class methods."""

    kind: Kind
    addresses: tuple[str, ...] = ()
    ttl: int = 300
    delay_s: float = 0.0  # wait this long before replying
    payload: bytes = b""  # garbage
    first: Behaviour | None = None  # race: sent at once
    then: Behaviour | None = None  # race: sent delay_s later

    @classmethod
    def answer(cls, *addresses: str, ttl: int = 300, delay_s: float = 0.0) -> Behaviour:
        """Answer the addresses of the queried family (A: IPv4, AAAA: IPv6); none = NODATA."""
        for a in addresses:
            ipaddress.ip_address(a)  # fail at scripting time, not when a query arrives
        return cls("answer", tuple(addresses), ttl, delay_s)

    @classmethod
    def nxdomain(cls, delay_s: float = 0.0) -> Behaviour:
        return cls("nxdomain", delay_s=delay_s)

    @classmethod
    def servfail(cls, delay_s: float = 0.0) -> Behaviour:
        return cls("servfail", delay_s=delay_s)

    @classmethod
    def refused(cls, delay_s: float = 0.0) -> Behaviour:
        return cls("refused", delay_s=delay_s)

    @classmethod
    def nodata(cls, delay_s: float = 0.0) -> Behaviour:
        """NOERROR with an empty answer section."""
        return cls("nodata", delay_s=delay_s)

    @classmethod
    def silence(cls) -> Behaviour:
        """Never reply (the query is still counted)."""
        return cls("silence")

    @classmethod
    def close(cls) -> Behaviour:
        """Stream transports (TCP, DoH): close the connection (FIN) instead of answering.
        Over UDP this is silence."""
        return cls("close")

    @classmethod
    def reset(cls) -> Behaviour:
        """Stream transports: abort the connection with an RST (how some censors answer
        DNS over TCP for a blocked name).  Over UDP this is silence."""
        return cls("reset")

    @classmethod
    def garbage(cls, payload: bytes = DEFAULT_GARBAGE, delay_s: float = 0.0) -> Behaviour:
        """Reply bytes that are not DNS (over TCP: framed with a correct length prefix)."""
        return cls("garbage", payload=payload, delay_s=delay_s)

    @classmethod
    def wrong_id(cls, *addresses: str, ttl: int = 300, delay_s: float = 0.0) -> Behaviour:
        """A well-formed answer whose transaction ID does not match the query."""
        for a in addresses:
            ipaddress.ip_address(a)
        return cls("wrong_id", tuple(addresses), ttl, delay_s)

    @classmethod
    def race(cls, injected: Behaviour, real: Behaviour, delay_s: float = 0.1) -> Behaviour:
        """Send ``injected`` at once and ``real`` ``delay_s`` later (on-path injection).

        Over DoH only ``real`` is sent: nothing on the path can inject into TLS.
        """
        return cls("race", delay_s=delay_s, first=injected, then=real)


def _key(qname: str) -> str:
    return qname.lower().rstrip(".")


@dataclass
class AnswerTable:
    """Per (name, type) behaviour, optionally per transport; anything unscripted gets
    ``default`` (NXDOMAIN unless set).  Mutable so a test or the lab can re-script it
    while a server runs; servers look it up on every query."""

    default: Behaviour = field(default_factory=Behaviour.nxdomain)
    _rules: dict[tuple[str, str, Transport | None], Behaviour] = field(default_factory=dict)

    def set(
        self,
        qname: str,
        qtype: str,
        behaviour: Behaviour,
        *,
        transport: Transport | None = None,
    ) -> AnswerTable:
        """Script one (name, type); ``transport`` limits the rule to udp, tcp or doh."""
        self._rules[(_key(qname), qtype.upper(), transport)] = behaviour
        return self

    def host(
        self,
        qname: str,
        *addresses: str,
        ttl: int = 300,
        transport: Transport | None = None,
    ) -> AnswerTable:
        """Answer A with the IPv4 and AAAA with the IPv6 addresses (a type with none: NODATA)."""
        for qtype in ("A", "AAAA"):
            self.set(qname, qtype, Behaviour.answer(*addresses, ttl=ttl), transport=transport)
        return self

    def both(
        self, qname: str, behaviour: Behaviour, *, transport: Transport | None = None
    ) -> AnswerTable:
        """The same behaviour for A and AAAA."""
        for qtype in ("A", "AAAA"):
            self.set(qname, qtype, behaviour, transport=transport)
        return self

    def lookup(self, qname: str, qtype: str, transport: Transport) -> Behaviour:
        """A transport-specific rule wins over a generic one, which wins over the default."""
        key, qt = _key(qname), qtype.upper()
        specific = self._rules.get((key, qt, transport))
        return specific or self._rules.get((key, qt, None)) or self.default


# --- building replies (pure) ---------------------------------------------------------------


def _response(query: dns.message.Message, behaviour: Behaviour) -> dns.message.Message:
    response = dns.message.make_response(query)
    rcodes = {
        "nxdomain": dns.rcode.NXDOMAIN,
        "servfail": dns.rcode.SERVFAIL,
        "refused": dns.rcode.REFUSED,
    }
    if behaviour.kind in rcodes:
        response.set_rcode(rcodes[behaviour.kind])
        return response
    if not query.question or behaviour.kind not in ("answer", "wrong_id"):
        return response
    question = query.question[0]
    version = {dns.rdatatype.A: 4, dns.rdatatype.AAAA: 6}.get(question.rdtype)
    matching = [a for a in behaviour.addresses if ipaddress.ip_address(a).version == version]
    if matching:
        rdtype = dns.rdatatype.to_text(question.rdtype)
        rrset = dns.rrset.from_text_list(question.name, behaviour.ttl, "IN", rdtype, matching)
        response.answer.append(rrset)
    if behaviour.kind == "wrong_id":
        response.id = (query.id + 1) & 0xFFFF
    return response


def plan_replies(query: dns.message.Message, behaviour: Behaviour) -> list[tuple[float, bytes]]:
    """What to send for ``query``: (seconds after the query, bytes) pairs, in send order.

    An empty list is silence (also for close and reset, which only stream transports
    act on).  Pure, so the UDP, TCP and DoH servers share it.
    """
    if behaviour.kind in ("silence", "close", "reset"):
        return []
    if behaviour.kind == "garbage":
        return [(behaviour.delay_s, behaviour.payload)]
    if behaviour.kind == "race":
        first = plan_replies(query, behaviour.first) if behaviour.first else []
        then = plan_replies(query, behaviour.then) if behaviour.then else []
        return first + [(d + behaviour.delay_s, p) for d, p in then]
    return [(behaviour.delay_s, _response(query, behaviour).to_wire())]


def decode_query(data: bytes) -> dns.message.Message | None:
    """A query we can answer, or None (unparsable bytes or a response) to be ignored."""
    try:
        message = parse_message(data)
    except WireError:
        return None
    if message.flags & dns.flags.QR:
        return None
    return message


def question_of(query: dns.message.Message) -> tuple[str, str]:
    if not query.question:
        return "", ""
    q = query.question[0]
    return _key(q.name.to_text()), dns.rdatatype.to_text(q.rdtype)


# --- the server ----------------------------------------------------------------------------


class _UDP(asyncio.DatagramProtocol):
    def __init__(self, server: DNSServer) -> None:
        self.server = server

    def datagram_received(self, data: bytes, addr: tuple[str, int]) -> None:
        self.server._on_udp(data, addr)


class DNSServer(AsyncServer):
    """UDP and TCP DNS on one host and port, answering from an `AnswerTable`.

    ``queries`` counts every parsed query as (transport, name, type); use `count()`.
    """

    def __init__(
        self,
        table: AnswerTable | None = None,
        host: str = "127.0.0.1",
        port: int = 0,
        *,
        idle_timeout_s: float = 30.0,
    ) -> None:
        self.table = table if table is not None else AnswerTable()
        self.host = host
        self._requested_port = port
        self.port = 0
        self.idle_timeout_s = idle_timeout_s
        self.queries: Counter[tuple[str, str, str]] = Counter()
        self._udp: asyncio.DatagramTransport | None = None
        self._tcp: CallbackStreamServer | None = None
        self._pending: set[asyncio.TimerHandle] = set()

    # -- lifecycle

    async def start(self) -> Self:
        loop = asyncio.get_running_loop()
        # With port 0 the kernel picks a free UDP port that may be taken for TCP:
        # try a bounded number of times to get the same number for both.
        attempts = 1 if self._requested_port else 20
        last: OSError | None = None
        for _ in range(attempts):
            udp, _proto = await loop.create_datagram_endpoint(
                lambda: _UDP(self), local_addr=(self.host, self._requested_port)
            )
            port = udp.get_extra_info("sockname")[1]
            try:
                self._tcp = await CallbackStreamServer(self.host, port, self._on_tcp).start()
            except OSError as exc:
                udp.close()
                last = exc
                continue
            self._udp, self.port = udp, port
            return self
        raise OSError(f"no port free for both UDP and TCP on {self.host}") from last

    async def close(self) -> None:
        for handle in self._pending:
            handle.cancel()
        self._pending.clear()
        if self._udp is not None:
            self._udp.close()
            self._udp = None
        if self._tcp is not None:
            await self._tcp.close()
            self._tcp = None

    # -- addressing

    @property
    def _hostport(self) -> str:
        return f"[{self.host}]:{self.port}" if ":" in self.host else f"{self.host}:{self.port}"

    @property
    def udp_resolver(self) -> str:
        return f"udp:{self._hostport}"

    @property
    def tcp_resolver(self) -> str:
        return f"tcp:{self._hostport}"

    def count(
        self, transport: Transport | None = None, qname: str | None = None, qtype: str | None = None
    ) -> int:
        """Queries received, optionally only those of a transport, name and/or type."""
        return sum(
            n
            for (t, name, qt), n in self.queries.items()
            if (transport is None or t == transport)
            and (qname is None or name == _key(qname))
            and (qtype is None or qt == qtype.upper())
        )

    def _behaviour(self, query: dns.message.Message, transport: Transport) -> Behaviour:
        qname, qtype = question_of(query)
        self.queries[(transport, qname, qtype)] += 1
        return self.table.lookup(qname, qtype, transport)

    # -- UDP

    def _on_udp(self, data: bytes, addr: tuple[str, int]) -> None:
        query = decode_query(data)
        if query is None:
            return
        for delay, payload in plan_replies(query, self._behaviour(query, "udp")):
            if delay <= 0:
                self._send_udp(payload, addr, None)
            elif len(self._pending) < _MAX_PENDING_SENDS:
                self._schedule_udp(delay, payload, addr)

    def _schedule_udp(self, delay: float, payload: bytes, addr: tuple[str, int]) -> None:
        loop = asyncio.get_running_loop()
        handle: asyncio.TimerHandle = loop.call_later(
            delay, lambda: self._send_udp(payload, addr, handle)
        )
        self._pending.add(handle)

    def _send_udp(
        self, payload: bytes, addr: tuple[str, int], handle: asyncio.TimerHandle | None
    ) -> None:
        if handle is not None:
            self._pending.discard(handle)
        if self._udp is not None:
            self._udp.sendto(payload, addr)

    # -- TCP (RFC 1035 4.2.2 / RFC 7766: 2-byte length prefix, several queries per connection)

    async def _on_tcp(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        # A client that leaves (IncompleteReadError), stalls past the idle timeout
        # (TimeoutError) or resets ends its connection quietly: `StreamServer` sees to it.
        for _ in range(_MAX_QUERIES_PER_CONNECTION):
            async with asyncio.timeout(self.idle_timeout_s):
                size = int.from_bytes(await reader.readexactly(2), "big")
                data = await reader.readexactly(size)
            query = decode_query(data)
            if query is None:
                return  # a TCP peer sending non-DNS gets the connection closed
            behaviour = self._behaviour(query, "tcp")
            if behaviour.kind == "reset":
                abort_with_rst(writer)
                return
            if behaviour.kind == "close":
                return  # the base closes with a FIN
            await self._answer_tcp(writer, plan_replies(query, behaviour))

    @staticmethod
    async def _answer_tcp(writer: asyncio.StreamWriter, plan: list[tuple[float, bytes]]) -> None:
        elapsed = 0.0
        for delay, payload in plan:
            if delay > elapsed:
                await asyncio.sleep(delay - elapsed)
                elapsed = delay
            payload = payload[:0xFFFF]
            writer.write(len(payload).to_bytes(2, "big") + payload)
            await writer.drain()
