"""A per-client limit on the agent's HTTP connections (docs/security.md, item 3).

The HTTP server caps its open connections globally (`probe.daemon.capped`: a quarter of
the descriptors, at most 128).  On its own, that cap lets one client fill it and lock
everyone else out, the Prometheus that scrapes the agent included.  Here each client
address may hold at most ``limit`` of them; a connection over that is closed as soon as
it is accepted, like one over the global cap.

A client is an IPv4 address or an IPv6 /64 (one host usually owns a whole /64).
Loopback clients are not limited per address: any local user can send from any of
127.0.0.0/8, so a per-address limit would not bind them, and the local Prometheus and
the offline gate's self-check share loopback with them.  The global cap still bounds
loopback.

The check runs when a connection is made: a small gate protocol looks at the peer,
then hands the transport to aiohttp's own protocol (or closes it).  Open connections
are counted from the aiohttp server's own list, so nothing has to be forgotten when one
closes.

Every connection refused (here, or by the global cap) is counted in `Refusals`, which
the agent exports as ``probe_http_connections_refused_total{reason}``, and logged at
most `REFUSAL_LOG_BURST` times a minute per reason (the log-flood limiter,
`probe.logs.FloodCap`): a client hammering the agent decides how often it is refused,
not how big the log grows.
"""

from __future__ import annotations

import asyncio
import ipaddress
import logging
from collections.abc import Callable
from typing import Literal

from aiohttp import web

from .logs import FloodCap

__all__ = ["REFUSAL_REASONS", "Refusals", "client_key", "per_client"]

Factory = Callable[[], asyncio.BaseProtocol]
Reason = Literal["per_client", "global"]
REFUSAL_REASONS: tuple[Reason, ...] = ("per_client", "global")
REFUSAL_LOG_BURST = 5  # log lines per reason per window; then one notice, then none
REFUSAL_LOG_WINDOW_S = 60.0

log = logging.getLogger(__name__)


class Refusals:
    """Connections the HTTP server closed as soon as they were accepted, by reason.

    Counted on the HTTP thread's loop; the agent reads `counts` from its own (an int read
    needs no lock under the GIL).  One per agent, so the counts survive a restart of the
    listener; nothing module-wide."""

    def __init__(self) -> None:
        self._counts: dict[Reason, int] = dict.fromkeys(REFUSAL_REASONS, 0)
        self._log_cap = FloodCap(REFUSAL_LOG_BURST, REFUSAL_LOG_WINDOW_S)

    def counts(self) -> tuple[tuple[str, int], ...]:
        """(reason, connections refused since the agent started), every reason."""
        return tuple((reason, self._counts[reason]) for reason in REFUSAL_REASONS)

    def refused(self, reason: Reason, peername: object, limit: int) -> None:
        self._counts[reason] += 1
        admitted = self._log_cap.admit(reason)
        if not admitted.emit:
            return
        fields: dict[str, object] = {
            "reason": reason,
            "client": client_key(peername, exempt_loopback=False),
            "limit": limit,
            "refused_total": self._counts[reason],
        }
        if admitted.suppressed is not None:
            fields["suppressed"] = admitted.suppressed
        message = f"HTTP connection refused: {_WHY[reason]}"
        if admitted.notice:
            message += f"; more refusals for this reason: {self._log_cap.notice()}"
        log.warning(message, extra=fields)


_WHY: dict[Reason, str] = {
    "per_client": "this client holds web.max_connections_per_client connections already",
    "global": "the agent holds as many HTTP connections as it allows",
}


def client_key(peername: object, *, exempt_loopback: bool = True) -> str | None:
    """The client a peer address counts against, or None for one never limited per
    address (loopback, a Unix socket, anything that does not parse)."""
    if not isinstance(peername, tuple) or not peername or not isinstance(peername[0], str):
        return None
    try:
        address = ipaddress.ip_address(peername[0].partition("%")[0])  # no IPv6 zone
    except ValueError:
        return None
    if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped is not None:
        address = address.ipv4_mapped
    if exempt_loopback and address.is_loopback:
        return None
    if isinstance(address, ipaddress.IPv6Address):
        return str(ipaddress.IPv6Network((address, 64), strict=False))
    return str(address)


class _Gate(asyncio.Protocol):
    """Stands in until the connection is made: then admits it (hands the transport to the
    server's protocol) or closes it at once, freeing its descriptor."""

    def __init__(self, admit: Callable[[asyncio.BaseTransport], asyncio.BaseProtocol | None]):
        self._admit = admit

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        protocol = self._admit(transport)
        if protocol is None:
            if isinstance(transport, asyncio.Transport):
                transport.abort()
            else:
                transport.close()
            return
        transport.set_protocol(protocol)
        protocol.connection_made(transport)


class _PerClient:
    def __init__(
        self,
        server: web.Server,
        inner: Factory,
        limit: int,
        exempt_loopback: bool,
        refusals: Refusals | None,
    ) -> None:
        self._server = server
        self._inner = inner
        self._limit = limit
        self._exempt_loopback = exempt_loopback
        self._refusals = refusals
        # The client of each admitted connection, by aiohttp's protocol object (it has
        # __slots__: no attribute or weak reference can be hung on it).  Pruned to the
        # server's own list on every admission, so it never outgrows the global cap.
        self._clients: dict[object, str] = {}

    def factory(self) -> asyncio.BaseProtocol:
        return _Gate(self._admit)

    def _admit(self, transport: asyncio.BaseTransport) -> asyncio.BaseProtocol | None:
        peername = transport.get_extra_info("peername")
        key = client_key(peername, exempt_loopback=self._exempt_loopback)
        if key is not None and self.open_connections(key) >= self._limit:
            if self._refusals is not None:
                self._refusals.refused("per_client", peername, self._limit)
            return None
        protocol = self._inner()
        if key is not None:
            self._clients[protocol] = key
        return protocol

    def open_connections(self, key: str) -> int:
        """Connections of this client that are open now (at most the global cap's worth
        of dictionary lookups per accepted connection)."""
        live = [h for h in self._server.connections if h in self._clients]
        self._clients = {h: self._clients[h] for h in live}
        return sum(1 for h in live if self._clients[h] == key and h.transport is not None)


def per_client(
    server: web.Server,
    inner: Factory,
    limit: int,
    *,
    exempt_loopback: bool = True,
    refusals: Refusals | None = None,
) -> Factory:
    """A protocol factory for ``loop.create_server``: ``inner`` (aiohttp's factory, or one
    wrapping it such as the global cap) for at most ``limit`` open connections per client
    address; ``limit`` 0 turns the per-client limit off.  Refusals are counted and
    logged in ``refusals`` when given."""
    if limit <= 0:
        return inner
    return _PerClient(server, inner, limit, exempt_loopback, refusals).factory
