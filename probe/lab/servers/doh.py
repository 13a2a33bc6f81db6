"""A DNS-over-HTTPS server (RFC 8484: GET ?dns= and POST application/dns-message).

Answers from the same `AnswerTable` as `probe.lab.servers.dns` (transport "doh"),
so one table can drive the plain resolver a censor lies on and the DoH control
resolver it cannot touch.  Over HTTPS a reply is one HTTP response: a race sends
only its real answer (an on-path injector cannot forge TLS records), silence
holds the request open until the client gives up or the server closes.

    async with DoHServer(table, ssl_context, "127.0.0.1") as doh:
        doh.resolver  # "doh:https://127.0.0.1:PORT/dns-query"
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import contextlib
import socket
import ssl
from collections import Counter
from typing import Self

from aiohttp import web

from . import AsyncServer
from .dns import AnswerTable, decode_query, plan_replies, question_of
from .tcp import abort_with_rst

__all__ = ["CONTENT_TYPE", "DoHServer"]

CONTENT_TYPE = "application/dns-message"
_MAX_QUERY = 65535


class DoHServer(AsyncServer):
    """DoH over TLS on ``host:port`` (port 0 = ephemeral) at ``path``."""

    def __init__(
        self,
        table: AnswerTable | None,
        ssl_context: ssl.SSLContext,
        host: str = "127.0.0.1",
        port: int = 0,
        *,
        path: str = "/dns-query",
        hold_s: float = 60.0,
    ) -> None:
        self.table = table if table is not None else AnswerTable()
        self.ssl_context = ssl_context
        self.host = host
        self.path = path
        self.hold_s = hold_s  # silence: longest a request is held before the server gives up
        self.port = port
        self.queries: Counter[tuple[str, str, str]] = Counter()
        self._runner: web.AppRunner | None = None
        self._closing = asyncio.Event()

    async def start(self) -> Self:
        app = web.Application(client_max_size=_MAX_QUERY)
        app.router.add_get(self.path, self._get)
        app.router.add_post(self.path, self._post)
        self._runner = web.AppRunner(app, access_log=None, shutdown_timeout=1.0)
        await self._runner.setup()
        # Bind the socket ourselves so port 0 works and the bound port is known.
        sock = socket.socket(socket.AF_INET6 if ":" in self.host else socket.AF_INET)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind((self.host, self.port))
        self.port = sock.getsockname()[1]
        site = web.SockSite(self._runner, sock, ssl_context=self.ssl_context)
        await site.start()
        return self

    async def close(self) -> None:
        self._closing.set()  # release held (silent) requests first, or cleanup waits on them
        if self._runner is not None:
            await self._runner.cleanup()
            self._runner = None

    @property
    def url(self) -> str:
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"https://{host}:{self.port}{self.path}"

    @property
    def resolver(self) -> str:
        return f"doh:{self.url}"

    def count(self, qname: str | None = None, qtype: str | None = None) -> int:
        return sum(
            n
            for (_t, name, qt), n in self.queries.items()
            if (qname is None or name == qname.lower().rstrip("."))
            and (qtype is None or qt == qtype.upper())
        )

    # -- handlers

    async def _get(self, request: web.Request) -> web.StreamResponse:
        encoded = request.query.get("dns", "")
        try:
            # RFC 8484 uses base64url without padding; put the padding back.
            data = base64.urlsafe_b64decode(encoded + "=" * (-len(encoded) % 4))
        except (binascii.Error, ValueError):
            return web.Response(status=400, text="bad dns parameter")
        return await self._answer(request, data)

    async def _post(self, request: web.Request) -> web.StreamResponse:
        if request.content_type != CONTENT_TYPE:
            return web.Response(status=415, text=f"want {CONTENT_TYPE}")
        return await self._answer(request, await request.read())

    async def _answer(self, request: web.Request, data: bytes) -> web.StreamResponse:
        query = decode_query(data)
        if query is None:
            return web.Response(status=400, text="not a DNS query")
        qname, qtype = question_of(query)
        self.queries[("doh", qname, qtype)] += 1
        behaviour = self.table.lookup(qname, qtype, "doh")
        if behaviour.kind in ("close", "reset") and request.transport is not None:
            # A dropped HTTPS connection: the client sees the server disconnect (FIN) or an RST.
            if behaviour.kind == "reset":
                abort_with_rst(request.transport)
            else:
                request.transport.close()
            return web.Response(status=500)  # never sent: the connection is gone
        plan = plan_replies(query, behaviour)
        if not plan:
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(self.hold_s):
                    await self._closing.wait()
            return web.Response(status=503, text="held")
        delay, payload = plan[-1]  # one HTTP response: the last (real) reply of a race
        if delay > 0:
            await asyncio.sleep(delay)
        return web.Response(body=payload, content_type=CONTENT_TYPE)
