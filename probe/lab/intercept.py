"""``python -m probe.lab.intercept SPEC``: a censor-side TLS interceptor (a MITM box).

The censor (`probe.lab.censor.TLSIntercept`) starts it inside the censor namespace and
then redirects forwarded TCP connections to it with an nft ``redirect`` in the NAT
prerouting hook.  For each connection it peeks at the first TLS record (the ClientHello)
without consuming it:

- if the record names one of ``names`` (a case-insensitive substring match, as crude DPI
  does), it completes the handshake itself with a *forged* certificate chain for that
  name, signed by the interceptor's own CA (``cert``: file stem, STEM.crt holds leaf + CA),
  then opens TLS to the original destination (``SO_ORIGINAL_DST``) and relays the
  plaintext both ways: what a TLS-intercepting middlebox does (Kazakhstan 2019).
- otherwise it relays the untouched bytes to the original destination (pass-through).

SPEC: ``{"port": 8443, "names": ["web.whatsapp.com"], "cert": STEM, "upstream_ca": PATH}``
(``upstream_ca`` verifies the real server; null = no verification).  It listens on
0.0.0.0 and :: (two sockets, so the original destination of either family is read with
the matching ``getsockopt``).  Protocol as `probe.lab.serve`: one JSON ready line, then
``{"cmd": "stats"}`` answers ``{"intercepted": N, "passed": N, "upstream_errors": N}``;
EOF on stdin or SIGTERM exits.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import socket
import ssl
import struct
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from .certs import LeafCert
from .process import answer_commands, emit, stop_on_signals

__all__ = ["Interceptor", "main", "original_destination"]

_SO_ORIGINAL_DST = 80  # linux/netfilter_ipv4.h; IP6T_SO_ORIGINAL_DST has the same value
_PEEK_LIMIT = 16 * 1024  # a ClientHello is well under this
_PEEK_TIMEOUT_S = 5.0
_CHUNK = 16 * 1024
_MAX_COMMAND = 1 << 16


def original_destination(sock: socket.socket) -> tuple[str, int]:
    """Where the client was going before the nft redirect (conntrack's original tuple)."""
    if sock.family == socket.AF_INET6:
        raw = sock.getsockopt(socket.IPPROTO_IPV6, _SO_ORIGINAL_DST, 28)
        port = struct.unpack("!H", raw[2:4])[0]
        return socket.inet_ntop(socket.AF_INET6, raw[8:24]), port
    raw = sock.getsockopt(socket.SOL_IP, _SO_ORIGINAL_DST, 16)
    port = struct.unpack("!H", raw[2:4])[0]
    return socket.inet_ntop(socket.AF_INET, raw[4:8]), port


async def _peek_record(sock: socket.socket) -> bytes:
    """The first TLS record, peeked (left in the socket); shorter if the client stops."""
    loop = asyncio.get_running_loop()
    async with asyncio.timeout(_PEEK_TIMEOUT_S):
        while True:
            readable = loop.create_future()
            loop.add_reader(sock.fileno(), readable.set_result, None)
            try:
                await readable
            finally:
                loop.remove_reader(sock.fileno())
            data = sock.recv(_PEEK_LIMIT, socket.MSG_PEEK)
            whole = 5 + int.from_bytes(data[3:5], "big") if len(data) >= 5 else _PEEK_LIMIT
            if not data or len(data) >= min(whole, _PEEK_LIMIT):
                return data
            await asyncio.sleep(0.01)  # the rest of the record is in flight: do not spin


async def _pipe(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    with contextlib.suppress(ConnectionError, ssl.SSLError):
        while data := await reader.read(_CHUNK):
            writer.write(data)
            await writer.drain()
        if writer.can_write_eof():
            writer.write_eof()


class Interceptor:
    def __init__(self, names: Sequence[str], forged: ssl.SSLContext, upstream: ssl.SSLContext):
        self.names = [n.lower().encode() for n in names]
        self.forged = forged
        self.upstream = upstream
        self.counts = {"intercepted": 0, "passed": 0, "upstream_errors": 0}

    def matches(self, hello: bytes) -> str | None:
        low = hello.lower()
        return next((n.decode() for n in self.names if n in low), None)

    async def handle(self, sock: socket.socket) -> None:
        loop = asyncio.get_running_loop()
        writers: list[asyncio.StreamWriter] = []
        try:
            dest = original_destination(sock)
            name = self.matches(await _peek_record(sock))
            self.counts["intercepted" if name else "passed"] += 1
            reader = asyncio.StreamReader()
            protocol = asyncio.StreamReaderProtocol(reader)
            transport, _ = await loop.connect_accepted_socket(
                lambda: protocol,
                sock,
                ssl=self.forged if name else None,
                ssl_handshake_timeout=_PEEK_TIMEOUT_S if name else None,
            )
            client = asyncio.StreamWriter(transport, protocol, reader, loop)
            writers.append(client)
            try:
                up_reader, up_writer = await asyncio.wait_for(
                    asyncio.open_connection(
                        *dest,
                        ssl=self.upstream if name else None,
                        server_hostname=name,
                    ),
                    _PEEK_TIMEOUT_S,
                )
            except (OSError, TimeoutError):  # ssl.SSLError is an OSError
                self.counts["upstream_errors"] += 1
                return
            writers.append(up_writer)
            await asyncio.gather(_pipe(reader, up_writer), _pipe(up_reader, client))
        except (OSError, TimeoutError, EOFError) as exc:
            # a client that left, reset, or failed our forged handshake
            print(f"intercept: {type(exc).__name__}: {exc}", file=sys.stderr)
        finally:
            for w in writers:
                w.close()
            if not writers:
                sock.close()


def _listeners(port: int) -> list[socket.socket]:
    out = []
    for family, host in ((socket.AF_INET, "0.0.0.0"), (socket.AF_INET6, "::")):
        sock = socket.socket(family, socket.SOCK_STREAM)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        if family == socket.AF_INET6:
            sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
        sock.bind((host, port))
        sock.listen(128)
        sock.setblocking(False)
        out.append(sock)
    return out


async def _accept(sock: socket.socket, interceptor: Interceptor, tasks: set[Any]) -> None:
    loop = asyncio.get_running_loop()
    while True:
        conn, _ = await loop.sock_accept(sock)
        conn.setblocking(False)
        task = asyncio.create_task(interceptor.handle(conn))
        tasks.add(task)
        task.add_done_callback(tasks.discard)


def _contexts(spec: dict[str, Any]) -> tuple[ssl.SSLContext, ssl.SSLContext]:
    stem = Path(spec["cert"])
    leaf = LeafCert(stem.with_suffix(".crt").read_bytes(), stem.with_suffix(".key").read_bytes())
    forged = leaf.server_context(stem.parent, stem.name)  # rewrites the same files
    forged.set_alpn_protocols(["http/1.1"])
    upstream = ssl.create_default_context(cafile=spec.get("upstream_ca"))
    if spec.get("upstream_ca") is None:
        upstream.check_hostname = False
        upstream.verify_mode = ssl.CERT_NONE
    upstream.set_alpn_protocols(["http/1.1"])
    return forged, upstream


async def _run(spec: dict[str, Any]) -> int:
    forged, upstream = _contexts(spec)
    interceptor = Interceptor(list(spec["names"]), forged, upstream)
    listeners = _listeners(int(spec.get("port", 8443)))
    tasks: set[Any] = set()
    accepting = [asyncio.create_task(_accept(s, interceptor, tasks)) for s in listeners]
    stop = stop_on_signals()
    emit({"ready": True, "port": listeners[0].getsockname()[1]})
    try:
        await answer_commands(
            lambda cmd: _answer(interceptor, cmd), stop, errors=(ValueError,), limit=_MAX_COMMAND
        )
    finally:
        for task in [*accepting, *tasks]:
            task.cancel()
        for s in listeners:
            s.close()
    return 0


def _answer(interceptor: Interceptor, cmd: Any) -> dict[str, Any]:
    if not isinstance(cmd, dict) or cmd.get("cmd") != "stats":
        raise ValueError(f"unknown command {cmd!r}")
    return dict(interceptor.counts)


def main(argv: Sequence[str] | None = None) -> int:
    args = list(sys.argv[1:] if argv is None else argv)
    try:
        if len(args) != 1:
            raise ValueError("usage: python -m probe.lab.intercept SPEC_JSON")
        return asyncio.run(_run(json.loads(args[0])))
    except (ValueError, KeyError, TypeError, OSError) as exc:
        emit({"error": f"{type(exc).__name__}: {exc}"})
        return 1


if __name__ == "__main__":
    raise SystemExit(main())
