"""Attack 3, one client: a single address opening many HTTP connections.

Before: the only bound was the global cap (a quarter of the descriptors, at most 128),
so one client could hold every slot and lock out the Prometheus that scrapes the agent.
Now each client address (IPv4 address, IPv6 /64) holds at most
``web.max_connections_per_client`` (default 16); loopback is bounded by the global cap
only.  Real sockets: an in-process aiohttp server on loopback with the limit applied to
loopback too, and a real agent in an empty network namespace whose client has an address
that is not loopback.  Every refusal is counted (``probe_http_connections_refused_total``)
and logged, at most `REFUSAL_LOG_BURST` lines a minute per reason.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
from aiohttp import web

from probe.daemon import capped
from probe.weblimits import REFUSAL_LOG_BURST, Refusals, client_key, per_client
from tests.agentproc import needs_unshare, run_driver, sample

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
async def server(
    limit: int, refusals: Refusals | None = None, global_cap: int = 0
) -> AsyncIterator[int]:
    """aiohttp's low-level server on 127.0.0.1 behind the per-client limit (loopback not
    exempt, so that loopback addresses stand for clients), and behind the agent's global
    cap when ``global_cap`` is set; yields the port."""

    async def ok(_: web.BaseRequest) -> web.Response:
        return web.Response(text="ok\n")

    http = web.Server(ok)
    inner = capped(http, global_cap, refusals) if global_cap else http
    listener = await asyncio.get_running_loop().create_server(
        per_client(http, inner, limit, exempt_loopback=False, refusals=refusals), "127.0.0.1", 0
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


def refusal_lines(caplog: pytest.LogCaptureFixture) -> list[logging.LogRecord]:
    return [r for r in caplog.records if r.name == "probe.weblimits"]


async def test_refusals_are_counted_and_logged_at_most_a_burst_a_minute(
    caplog: pytest.LogCaptureFixture,
) -> None:
    refusals = Refusals()
    caplog.set_level(logging.WARNING, logger="probe.weblimits")
    async with server(limit=2, refusals=refusals) as port:
        conns = [await served(port, "127.0.0.1") for _ in range(2 + REFUSAL_LOG_BURST + 3)]
        assert [ok for _, ok in conns] == [True] * 2 + [False] * (REFUSAL_LOG_BURST + 3)
        for w, _ in conns:
            w.close()
    assert refusals.counts() == (("per_client", REFUSAL_LOG_BURST + 3), ("global", 0))
    lines = refusal_lines(caplog)
    assert len(lines) == REFUSAL_LOG_BURST + 1  # then one notice, then nothing
    first = lines[0].__dict__
    assert (first["reason"], first["client"], first["limit"]) == ("per_client", "127.0.0.1", 2)
    assert "dropping the rest" in lines[-1].getMessage()


async def test_refusals_by_the_global_cap_are_counted_apart(
    caplog: pytest.LogCaptureFixture,
) -> None:
    refusals = Refusals()
    caplog.set_level(logging.WARNING, logger="probe.weblimits")
    async with server(limit=10, refusals=refusals, global_cap=2) as port:
        conns = [await served(port, f"127.0.0.{i}") for i in range(1, 5)]
        assert [ok for _, ok in conns] == [True, True, False, False]
        for w, _ in conns:
            w.close()
    assert refusals.counts() == (("per_client", 0), ("global", 2))
    assert [r.__dict__["reason"] for r in refusal_lines(caplog)] == ["global", "global"]


ONE_CLIENT_DRIVER = r"""
import json, socket, subprocess, sys, time
def sh(*a): subprocess.run(a, check=True)
sh("ip", "link", "set", "lo", "up")
for address in ("10.9.0.1/32", "10.9.0.2/32"):  # client addresses that are not loopback
    sh("ip", "addr", "add", address, "dev", "lo")
config, opened, log = sys.argv[1], int(sys.argv[2]), open(sys.argv[3], "wb")
agent = subprocess.Popen([sys.executable, "-m", "probe", "run", "-c", config], stderr=log)
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
    time.sleep(1.2)  # the agent publishes its own counters once a second
    s = connect("127.0.0.1")
    s.sendall(b"GET /metrics HTTP/1.1\r\nHost: 10.9.0.1:9464\r\nConnection: close\r\n\r\n")
    chunks = []
    for _ in range(1000):  # bounded: the exposition is a few kB
        chunk = s.recv(65536)
        if not chunk:
            break
        chunks.append(chunk)
    s.close()
    out["metrics"] = b"".join(chunks).partition(b"\r\n\r\n")[2].decode()
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
    log = tmp_path / "agent.log"
    out = run_driver(
        ONE_CLIENT_DRIVER,
        "-n",
        str(config),
        "40",
        str(log),
        workdir=tmp_path,
        cwd=tmp_path,
        timeout_s=60,
    )
    metrics = out.pop("metrics")
    assert out == {"one_client": limit, "other_client": True, "loopback": True}
    # every refusal counted; the log says so a burst's worth of times, then once more
    refused = 40 - limit
    assert sample(metrics, "probe_http_connections_refused_total", reason="per_client") == refused
    assert sample(metrics, "probe_http_connections_refused_total", reason="global") == 0
    events = [json.loads(line) for line in log.read_text().splitlines() if line.startswith("{")]
    lines = [e for e in events if e["logger"] == "probe.weblimits"]
    assert len(lines) == REFUSAL_LOG_BURST + 1
    assert {(e["reason"], e["client"], e["limit"]) for e in lines} == {
        ("per_client", "10.9.0.1", limit)
    }
