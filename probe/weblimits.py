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
"""

from __future__ import annotations

import asyncio
import ipaddress
from collections.abc import Callable

from aiohttp import web

__all__ = ["client_key", "per_client"]

Factory = Callable[[], asyncio.BaseProtocol]


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
        self, server: web.Server, inner: Factory, limit: int, exempt_loopback: bool
    ) -> None:
        self._server = server
        self._inner = inner
        self._limit = limit
        self._exempt_loopback = exempt_loopback
        # The client of each admitted connection, by aiohttp's protocol object (it has
        # __slots__: no attribute or weak reference can be hung on it).  Pruned to the
        # server's own list on every admission, so it never outgrows the global cap.
        self._clients: dict[object, str] = {}

    def factory(self) -> asyncio.BaseProtocol:
        return _Gate(self._admit)

    def _admit(self, transport: asyncio.BaseTransport) -> asyncio.BaseProtocol | None:
        key = client_key(
            transport.get_extra_info("peername"), exempt_loopback=self._exempt_loopback
        )
        if key is not None and self.open_connections(key) >= self._limit:
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
    server: web.Server, inner: Factory, limit: int, *, exempt_loopback: bool = True
) -> Factory:
    """A protocol factory for ``loop.create_server``: ``inner`` (aiohttp's factory, or one
    wrapping it such as the global cap) for at most ``limit`` open connections per client
    address; ``limit`` 0 turns the per-client limit off."""
    if limit <= 0:
        return inner
    return _PerClient(server, inner, limit, exempt_loopback).factory
