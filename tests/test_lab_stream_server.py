"""The shared TCP server base (`probe.lab.servers.tcp.StreamServer`) on loopback: what every
TCP lab server relies on when a client misbehaves or the server closes under it."""

from __future__ import annotations

import asyncio
import logging

import pytest

from probe.lab.servers.tcp import CallbackStreamServer, StreamServer, abort_with_rst
from probe.wire import WireError

pytestmark = pytest.mark.parametrize("host", ["127.0.0.1", "::1"])


class _Hanging(StreamServer):
    async def handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await reader.readexactly(1)
        await self.hang()


async def test_close_releases_hanging_handlers_at_once(host: str) -> None:
    async with _Hanging(host) as server:
        _, writer = await asyncio.open_connection(host, server.port)
        writer.write(b"x")
        await server.wait_for(lambda s: s.accepted == 1)
        loop = asyncio.get_running_loop()
        started = loop.time()
        await server.close()
        # Released by the closing event, not by the cancel after the 1 s grace period.
        assert loop.time() - started < 0.5
        assert server.open_connections == 0
        writer.close()


async def test_hang_ignores_the_client_leaving(host: str) -> None:
    async with _Hanging(host) as server:
        _, writer = await asyncio.open_connection(host, server.port)
        writer.write(b"x")
        writer.close()
        await writer.wait_closed()
        with pytest.raises(TimeoutError):
            await server.wait_for(lambda s: s.open_connections == 0, 0.2)


@pytest.mark.parametrize(
    "error", [WireError("garbage"), asyncio.IncompleteReadError(b"", 4), ConnectionResetError()]
)
async def test_client_faults_end_the_connection_quietly(
    host: str, error: Exception, caplog: pytest.LogCaptureFixture
) -> None:
    async def fail(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        raise error

    async with CallbackStreamServer(host, 0, fail) as server:
        reader, writer = await asyncio.open_connection(host, server.port)
        assert await reader.read(1) == b""  # a FIN: the server just closed
        await server.wait_for(lambda s: s.open_connections == 0)
        writer.close()
    assert not [r for r in caplog.records if r.levelno >= logging.ERROR]


async def test_a_handler_bug_is_logged(host: str, caplog: pytest.LogCaptureFixture) -> None:
    async def bug(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        raise KeyError("bug")

    async with CallbackStreamServer(host, 0, bug) as server:
        reader, writer = await asyncio.open_connection(host, server.port)
        assert await reader.read(1) == b""
        await server.wait_for(lambda s: s.open_connections == 0)
        writer.close()
    assert any("handler failed" in r.getMessage() for r in caplog.records)


@pytest.mark.parametrize("via", ["writer", "transport"])
async def test_abort_with_rst_resets_the_client(host: str, via: str) -> None:
    async def reset(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        abort_with_rst(writer if via == "writer" else writer.transport)

    async with CallbackStreamServer(host, 0, reset) as server:
        reader, writer = await asyncio.open_connection(host, server.port)
        with pytest.raises(ConnectionResetError):
            await reader.read(1)
        writer.close()


async def test_a_closed_server_can_start_again(host: str) -> None:
    server = _Hanging(host)
    async with server:
        pass
    async with server:
        _, writer = await asyncio.open_connection(host, server.port)
        writer.write(b"x")
        await server.wait_for(lambda s: s.open_connections == 1)
        writer.close()
