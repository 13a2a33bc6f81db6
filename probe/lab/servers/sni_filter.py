"""An SNI-filtering TCP relay: a userspace stand-in for a censor's SNI rule (FIELD.md B3).

`SNIFilterRelay` listens on its own port and relays every connection to an upstream
(typically a `probe.lab.servers.tls.TLSServer` in ``serve`` mode), except those whose
first TLS record -- the ClientHello -- names a blocked server.  Those it resets
(``action="reset"``, the RST variant) or accepts and never answers (``action="hang"``,
the silent drop).  Same address, same port, only the SNI differs: exactly what the
neutral-SNI swap test has to tell apart, without root, namespaces or firewall rules,
so unit tests can exercise swaps end to end.  The namespace lab does the same with
kernel rules (`probe.lab.censor`).

Matching is a case-insensitive substring search for the name in the ClientHello
record, as ``iptables -m string`` rules and crude DPI boxes do; no parser, so nothing
a hostile client sends can crash it.  ``blocked_hellos`` and ``relayed`` count what it
did, and `wait_for` lets a test wait for them instead of sleeping.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Sequence
from typing import Literal

from .tcp import READ_CHUNK, StreamServer, abort_with_rst, drain_until_eof
from .tls import read_client_hello


async def _pipe(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    """Copy until EOF, then pass the EOF on (half-close), so either side can finish."""
    with contextlib.suppress(ConnectionError):
        while data := await reader.read(READ_CHUNK):
            writer.write(data)
            await writer.drain()  # back-pressure: a slow side stalls only its own flow
        if writer.can_write_eof():
            writer.write_eof()


class SNIFilterRelay(StreamServer):
    """Relay to ``upstream`` unless the ClientHello names one of ``blocked``."""

    def __init__(
        self,
        host: str,
        port: int = 0,
        *,
        upstream: tuple[str, int],
        blocked: Sequence[str],
        action: Literal["reset", "hang"] = "reset",
    ) -> None:
        super().__init__(host, port)
        if action not in ("reset", "hang"):
            raise ValueError(f"action must be reset or hang, not {action!r}")
        self.upstream = upstream
        self.blocked = tuple(name.lower().encode("ascii") for name in blocked)
        self.action = action
        self.blocked_hellos = 0
        self.relayed = 0

    async def handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        hello = await read_client_hello(reader)
        if any(name in hello.lower() for name in self.blocked):
            self.blocked_hellos += 1
            self.changed()
            if self.action == "reset":
                abort_with_rst(writer)
            else:
                await drain_until_eof(reader)
            return
        self.relayed += 1
        self.changed()
        up_reader, up_writer = await asyncio.open_connection(*self.upstream, limit=READ_CHUNK)
        try:
            up_writer.write(hello)
            await asyncio.gather(_pipe(reader, up_writer), _pipe(up_reader, writer))
        finally:
            up_writer.close()
            with contextlib.suppress(ConnectionError):
                await up_writer.wait_closed()
