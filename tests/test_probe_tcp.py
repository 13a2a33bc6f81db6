"""TCP connect probe against real loopback servers (IPv4 and IPv6), one test per outcome."""

from __future__ import annotations

import asyncio
import time

import pytest

from probe.lab.servers.tcp import FullBacklogListener, TCPMode, TCPServer, abort_with_rst
from probe.model import Operation
from probe.probes import REGISTRY, tcp
from tests.helpers import refusing_port, settings, target

HOSTS = pytest.mark.parametrize(("host", "family"), [("127.0.0.1", "ipv4"), ("::1", "ipv6")])


def test_registered() -> None:
    assert REGISTRY["tcp"].run is tcp.probe


@HOSTS
async def test_connect_ok_records_families_and_connect_time(host: str, family: str) -> None:
    async with TCPServer(host, mode=TCPMode.HOLD) as server:
        result = await tcp.probe(target("tcp", host, server.port), settings())
    assert result.ok, result.failure
    assert result.failure is None
    assert result.failed_operation is None
    assert result.details["local_family"] == family
    assert result.details["peer_family"] == family
    assert 0 <= result.details["connect_time_s"] == result.phases["connect"] < 2.0


@HOSTS
async def test_probe_closes_with_fin_not_rst(host: str, family: str) -> None:
    async with TCPServer(host, mode=TCPMode.HOLD) as server:
        result = await tcp.probe(target("tcp", host, server.port), settings())
        await server.wait_for(lambda s: s.accepted == 1 and s.open_connections == 0, 2)
        assert result.ok
        assert server.client_closed == 1


@HOSTS
async def test_refused_when_nothing_listens(host: str, family: str) -> None:
    with refusing_port(host) as port:
        result = await tcp.probe(target("tcp", host, port), settings())
    assert not result.ok
    assert result.failure == "connection_refused"
    assert result.failed_operation is Operation.CONNECT
    assert "connect" in result.phases


@HOSTS
async def test_timeout_when_syn_is_dropped(host: str, family: str) -> None:
    async with FullBacklogListener(host) as blackhole:
        start = time.monotonic()
        result = await tcp.probe(target("tcp", host, blackhole.port), settings(connect_s=0.3))
        took = time.monotonic() - start
    assert result.failure == "generic_timeout_error"
    assert result.failed_operation is Operation.CONNECT
    assert 0.3 <= took < 1.5


@HOSTS
async def test_reset_right_after_accept_is_connection_reset(host: str, family: str) -> None:
    async with TCPServer(host, mode=TCPMode.RESET) as server:
        result = await tcp.probe(
            target("tcp", host, server.port, params={"hold_s": 1.0}), settings()
        )
    assert result.failure == "connection_reset"
    # The RST can land before the connect completes in user space (then the connect's
    # socket error is ECONNRESET) or while we hold the connection: both are honest.
    assert result.failed_operation in (Operation.CONNECT, Operation.READ)
    assert result.duration_s < 1.0  # classified when the RST arrived, not at the end of hold


@HOSTS
async def test_fin_right_after_accept_is_eof_while_held(host: str, family: str) -> None:
    async with TCPServer(host, mode=TCPMode.CLOSE) as server:
        result = await tcp.probe(
            target("tcp", host, server.port, params={"hold_s": 1.0}), settings()
        )
    assert result.failure == "eof_error"
    assert result.failed_operation is Operation.READ
    assert result.duration_s < 1.0


@HOSTS
async def test_held_silent_connection_is_ok(host: str, family: str) -> None:
    async with TCPServer(host, mode=TCPMode.HOLD) as server:
        result = await tcp.probe(
            target("tcp", host, server.port, params={"hold_s": 0.2}), settings()
        )
    assert result.ok
    assert result.details["bytes_received"] == 0
    assert result.phases["hold"] >= 0.2


@HOSTS
async def test_volunteered_bytes_are_counted_not_judged(host: str, family: str) -> None:
    garbage = b"\x16\x03\x01garbage" * 3
    async with TCPServer(host, mode=TCPMode.GARBAGE, garbage=garbage) as server:
        result = await tcp.probe(
            target("tcp", host, server.port, params={"hold_s": 0.3}), settings()
        )
    assert result.ok
    assert result.details["bytes_received"] == len(garbage)
    assert result.details["first_bytes_hex"] == garbage[:16].hex()


async def test_hold_reads_are_bounded_against_a_flood() -> None:
    flood = b"x" * (256 * 1024)  # more than the probe reads while holding
    async with TCPServer("127.0.0.1", mode=TCPMode.GARBAGE, garbage=flood) as server:
        result = await tcp.probe(
            target("tcp", "127.0.0.1", server.port, params={"hold_s": 2.0}), settings()
        )
    assert result.ok
    assert 64 * 1024 <= result.details["bytes_received"] < len(flood)  # reads stopped ...
    assert result.phases["hold"] >= 2.0  # ... but the connection was held the whole window


@HOSTS
async def test_a_reset_after_a_flood_is_still_seen(host: str, family: str) -> None:
    # Past the read bound the probe stops reading but keeps holding: a peer (or a
    # middlebox) that floods and then kills the connection must not read as held.
    sent = asyncio.Event()

    async def flood_then_reset(_r: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        writer.write(b"x" * (256 * 1024))
        await asyncio.sleep(0.3)
        abort_with_rst(writer)
        sent.set()

    server = await asyncio.start_server(flood_then_reset, host, 0)
    try:
        port = server.sockets[0].getsockname()[1]
        result = await tcp.probe(target("tcp", host, port, params={"hold_s": 1.0}), settings())
    finally:
        server.close()
    assert sent.is_set()
    assert result.failure == "connection_reset"
    assert result.failed_operation is Operation.READ
    assert 64 * 1024 <= result.details["bytes_received"] < 256 * 1024


@HOSTS
async def test_echo_server_echoes(host: str, family: str) -> None:
    async with TCPServer(host, mode=TCPMode.ECHO) as server:
        reader, writer = await asyncio.open_connection(host, server.port)
        writer.write(b"ping")
        await writer.drain()
        assert await asyncio.wait_for(reader.readexactly(4), 2) == b"ping"
        writer.close()
        await writer.wait_closed()


async def test_server_close_ends_held_connections() -> None:
    server = await TCPServer("127.0.0.1", mode=TCPMode.HOLD).start()
    reader, writer = await asyncio.open_connection("127.0.0.1", server.port)
    await asyncio.wait_for(server.close(), 2)
    # the server aborted our connection: we see its end instead of hanging
    with pytest.raises((ConnectionResetError, asyncio.IncompleteReadError)):
        await asyncio.wait_for(reader.readexactly(1), 2)
    writer.close()


async def test_address_must_be_an_ip_literal() -> None:
    # A hostname in `address` is a config bug; the probe must not resolve it itself.
    with pytest.raises(ValueError, match="does not appear to be an IPv4 or IPv6"):
        await tcp.probe(target("tcp", "localhost", 80), settings())
