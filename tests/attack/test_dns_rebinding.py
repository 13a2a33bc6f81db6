"""Attack 2: DNS rebinding.  A page on evil.example, re-resolved to 127.0.0.1, makes the
operator's browser send ``Host: evil.example:PORT`` and the same ``Origin``.  Before, the
reload's check compared the two (equal: 200) and every GET was served to the page.  Now
every path checks Host against the loopback names, the listen host and web.allowed_hosts."""

from __future__ import annotations

import asyncio
import urllib.error
import urllib.request
from pathlib import Path

import pytest

from probe.agent_config import load_config
from probe.daemon import Agent
from tests.test_agent_ops import serve_app, write_config

PATHS = [("GET", "/metrics"), ("GET", "/api/results"), ("GET", "/"), ("POST", "/-/reload")]


def request(port: int, method: str, path: str, host: str, origin: bool) -> int:
    headers = {"Host": host}
    if origin:
        headers["Origin"] = f"http://{host}"
    req = urllib.request.Request(f"http://127.0.0.1:{port}{path}", method=method, headers=headers)
    try:
        with urllib.request.urlopen(req, timeout=10) as response:
            return int(response.status)
    except urllib.error.HTTPError as err:
        return err.code


@pytest.mark.parametrize(("method", "path"), PATHS)
async def test_a_rebinding_host_is_refused_on_every_path(
    tmp_path: Path, method: str, path: str
) -> None:
    config = write_config(tmp_path / "agent.yaml", 9, 9)
    agent = Agent(load_config(config), str(config))
    runner, port = await serve_app(agent)
    try:
        for host in (f"evil.example:{port}", "evil.example", f"localhost.evil.example:{port}"):
            status = await asyncio.to_thread(request, port, method, path, host, True)
            assert status == 403, (host, status)
        # IP addresses always pass: a rebinding page can only send its own *name* as Host.
        for host in (
            f"127.0.0.1:{port}",
            f"localhost:{port}",
            f"[::1]:{port}",
            "LOCALHOST",
            f"192.0.2.9:{port}",
        ):
            status = await asyncio.to_thread(request, port, method, path, host, method == "POST")
            assert status == 200, (host, status)
    finally:
        await runner.cleanup()
        await agent.stop()


async def test_allowed_hosts_admits_the_names_an_operator_configures(tmp_path: Path) -> None:
    extra = "web: {allowed_hosts: [probe.example.net, agent]}"
    config = write_config(tmp_path / "agent.yaml", 9, 9, extra=extra)
    agent = Agent(load_config(config), str(config))
    runner, port = await serve_app(agent)
    try:
        for host in ("probe.example.net:9464", "PROBE.example.net", "agent:9464"):
            assert await asyncio.to_thread(request, port, "GET", "/metrics", host, False) == 200
        assert await asyncio.to_thread(request, port, "GET", "/", "example.net", False) == 403
    finally:
        await runner.cleanup()
        await agent.stop()
