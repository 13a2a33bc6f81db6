"""Attack 3, one client: a single address opening many HTTP connections.

Before: the only bound was the global cap (a quarter of the descriptors, at most 128),
so one client could hold every slot and lock out the Prometheus that scrapes the agent.
Now each client address (IPv4 address, IPv6 /64) holds at most
``web.max_connections_per_client`` (default 16); loopback is bounded by the global cap
only.  Real sockets: an in-process aiohttp server on loopback with the limit applied to
loopback too, and a real agent in an empty network namespace whose client has an address
that is not loopback.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
from aiohttp import web

from probe.weblimits import client_key, per_client
from tests.agentproc import needs_unshare, run_driver

REQUEST = b"GET /healthz HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n"


def test_a_client_is_an_ipv4_address_or_an_ipv6_64_and_loopback_is_exempt() -> None:
    assert client_key(("192.0.2.7", 5000)) == "192.0.2.7"
    assert client_key(("::ffff:192.0.2.7", 5000, 0, 0)) == "192.0.2.7"
    assert client_key(("2001:db8:1:2:aaaa::1", 1, 0, 0)) == "2001:db8:1:2::/64"
    assert client_key(("2001:db8:1:2:bbbb::9", 1, 0, 0)) == "2001:db8:1:2::/64"
    assert client_key(("fe80::1%eth0", 1, 0, 2)) == "fe80::/64"
    for loopback in ("127.0.0.1", "127.3.4.5", "::1", "::ffff:127.0.0.1"):
        assert client_key((loopback, 1)) is None
        assert client_key((loopback, 1), exempt_loopback=False) is not None
    assert client_key("/run/probe.sock") is None and client_key(None) is None


@contextlib.asynccontextmanager
async def server(limit: int) -> AsyncIterator[int]:
    """aiohttp's low-level server on 127.0.0.1 behind the per-client limit (loopback not
    exempt, so that loopback addresses stand for clients); yields the port."""

    async def ok(_: web.BaseRequest) -> web.Response:
        return web.Response(text="ok\n")

    http = web.Server(ok)
    listener = await asyncio.get_running_loop().create_server(
        per_client(http, http, limit, exempt_loopback=False), "127.0.0.1", 0
    )
    try:
        yield listener.sockets[0].getsockname()[1]
    finally:
        listener.close()
        await http.shutdown(1)


async def served(port: int, source: str) -> tuple[asyncio.StreamWriter, bool]:
    """Open a connection from ``source`` and ask one request on it: (writer, answered).
    An admitted connection stays open (keep-alive); a refused one is closed at once."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port, local_addr=(source, 0))
    writer.write(REQUEST)
    try:
        status = await asyncio.wait_for(reader.readline(), 5)
    except (ConnectionError, asyncio.IncompleteReadError):
        status = b""
    if status.startswith(b"HTTP/1.1 200"):
        # read the rest of the (small) response so the connection is idle again
        await asyncio.wait_for(reader.readuntil(b"ok\n"), 5)
        return writer, True
    return writer, False


async def test_one_address_gets_at_most_the_limit_and_another_address_still_gets_in() -> None:
    async with server(limit=3) as port:
        first = [await served(port, "127.0.0.1") for _ in range(6)]
        assert [ok for _, ok in first] == [True] * 3 + [False] * 3
        second = [await served(port, "127.0.0.2") for _ in range(3)]
        assert all(ok for _, ok in second)
        # a connection that closes gives its slot back
        first[0][0].close()
        await first[0][0].wait_closed()
        for _ in range(50):  # the server notices the close within a loop turn or two
            writer, ok = await served(port, "127.0.0.1")
            if ok:
                break
            writer.close()
            await asyncio.sleep(0.02)
        assert ok
        for w, _ in [*first, *second, (writer, ok)]:
            w.close()


async def test_limit_zero_turns_the_per_client_limit_off() -> None:
    async with server(limit=0) as port:
        conns = [await served(port, "127.0.0.1") for _ in range(8)]
        assert all(ok for _, ok in conns)
        for w, _ in conns:
            w.close()


ONE_CLIENT_DRIVER = r"""
import json, socket, subprocess, sys, time
def sh(*a): subprocess.run(a, check=True)
sh("ip", "link", "set", "lo", "up")
for address in ("10.9.0.1/32", "10.9.0.2/32"):  # client addresses that are not loopback
    sh("ip", "addr", "add", address, "dev", "lo")
config, opened = sys.argv[1], int(sys.argv[2])
agent = subprocess.Popen([sys.executable, "-m", "probe", "run", "-c", config],
                         stderr=subprocess.DEVNULL)
REQUEST = b"GET /healthz HTTP/1.1\r\nHost: 10.9.0.1:9464\r\n\r\n"
def connect(source):
    s = socket.create_connection(("10.9.0.1", 9464), timeout=3, source_address=(source, 0))
    return s
def answered(s):
    try:
        s.sendall(REQUEST)
        return s.recv(4096).startswith(b"HTTP/1.1 200")
    except OSError:
        return False
out = {}
try:
    for _ in range(100):
        try:
            s = connect("127.0.0.1")
            ok = answered(s)
            s.close()
            if ok:
                break
        except OSError:
            pass
        time.sleep(0.1)
    held = [connect("10.9.0.1") for _ in range(opened)]  # all accepted by the kernel
    time.sleep(0.5)  # the agent admits or closes each (well inside its 5 s idle timeout)
    out["one_client"] = sum(answered(s) for s in held)
    other, local = connect("10.9.0.2"), connect("127.0.0.1")
    out["other_client"], out["loopback"] = answered(other), answered(local)
    for s in [*held, other, local]:
        s.close()
finally:
    agent.terminate()
    agent.wait(timeout=10)
print(json.dumps(out))
"""


@needs_unshare("for a namespace with a client address that is not loopback")
@pytest.mark.parametrize(("setting", "limit"), [("", 16), (", max_connections_per_client: 5", 5)])
def test_one_remote_client_cannot_take_every_connection_of_a_real_agent(
    tmp_path: Path, setting: str, limit: int
) -> None:
    config = tmp_path / "agent.yaml"
    config.write_text(
        "listen: 0.0.0.0:9464\n"
        f"web: {{allowed_hosts: ['10.9.0.1']{setting}}}\n"
        "archive: {path: null}\n"
        "seeds: []\n"
        "resolvers: {system: false, udp: ['127.0.0.1:9']}\n"
        "services:\n  - service: lab\n    source: t\n    endpoints:\n"
        "      - {host: 127.0.0.1, ports: [9], role: signalling, probes: [tcp], source: t,"
        " confidence: C}\n"
    )
    out = run_driver(
        ONE_CLIENT_DRIVER, "-n", str(config), "40", workdir=tmp_path, cwd=tmp_path, timeout_s=60
    )
    assert out == {"one_client": limit, "other_client": True, "loopback": True}
