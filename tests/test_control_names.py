"""A control vantage reached by a host name: the control agent answers only names in its
``web.allowed_hosts`` (DNS-rebinding defence), so a test vantage that polls it by another
name gets 403.  The poll error must say what to set, not just "HTTP status 403".

A real control agent runs on loopback; the test's own resolver maps the two names to
127.0.0.1 (what an /etc/hosts entry would do), and `probe.control.fetch` polls it.
"""

from __future__ import annotations

import socket
from collections.abc import Iterator
from pathlib import Path

import aiohttp
import pytest
from aiohttp.abc import AbstractResolver, ResolveResult

from probe.config.settings import ControlSettings
from probe.control import ControlError, fetch
from tests.test_daemon import AgentProcess

ALLOWED, OTHER = "ctl.test", "other.test"


class _Loopback(AbstractResolver):
    """Resolves exactly ALLOWED and OTHER, to 127.0.0.1."""

    async def resolve(
        self, host: str, port: int = 0, family: socket.AddressFamily = socket.AF_INET
    ) -> list[ResolveResult]:
        assert host in (ALLOWED, OTHER), host
        return [
            ResolveResult(
                hostname=host,
                host="127.0.0.1",
                port=port,
                family=socket.AF_INET,
                proto=0,
                flags=socket.AI_NUMERICHOST,
            )
        ]

    async def close(self) -> None:
        return None


@pytest.fixture
def control(tmp_path: Path) -> Iterator[AgentProcess]:
    agent = AgentProcess(tmp_path)
    agent.write_config(extra=f"web: {{allowed_hosts: [{ALLOWED}]}}")
    agent.start()
    yield agent
    agent.stop()


async def test_a_control_polled_by_a_name_it_does_not_answer_to_says_what_to_set(
    control: AgentProcess,
) -> None:
    settings = ControlSettings(urls=(), timeout_s=5)
    connector = aiohttp.TCPConnector(resolver=_Loopback())
    async with aiohttp.ClientSession(connector=connector, auto_decompress=False) as session:
        body = await fetch(session, f"http://{ALLOWED}:{control.port}/api/results", settings)
        assert b'"controls"' in body  # the listed name is served
        with pytest.raises(ControlError) as refused:
            await fetch(session, f"http://{OTHER}:{control.port}/api/results", settings)
    message = str(refused.value)
    assert message.startswith("HTTP status 403: ")
    assert "web.allowed_hosts" in message and "control's config" in message
    # it fits the poller's cap on a control error (status page, evidence lines)
    assert len(message) <= 120
