"""The offline gate against real local listeners (loopback only)."""

from __future__ import annotations

import asyncio
import ipaddress
import socket
from collections.abc import AsyncIterator
from dataclasses import replace

import pytest

from probe.gate import check_vantage, dns_candidates
from tests.helpers import endpoint


def _closed_port(host: str) -> int:
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with socket.socket(family) as s:
        s.bind((host, 0))
        return int(s.getsockname()[1])


@pytest.fixture
async def listener() -> AsyncIterator[dict[str, int]]:
    async def accept(_r: asyncio.StreamReader, w: asyncio.StreamWriter) -> None:
        w.close()

    v4 = await asyncio.start_server(accept, "127.0.0.1", 0)
    v6 = await asyncio.start_server(accept, "::1", 0)
    ports = {
        "127.0.0.1": v4.sockets[0].getsockname()[1],
        "::1": v6.sockets[0].getsockname()[1],
    }
    yield ports
    v4.close()
    v6.close()


def control(host: str, port: int):  # type: ignore[no-untyped-def]
    return endpoint(host, ports=(port,), role="control", service="controls")


async def test_online_when_a_control_accepts(listener: dict[str, int]) -> None:
    state = await check_vantage([control("127.0.0.1", listener["127.0.0.1"])], timeout_s=2)
    assert state.online
    assert not state.ipv6  # only an IPv4 control answered
    assert state.evidence["reached"] == 1


async def test_ipv6_counts_only_when_an_ipv6_connect_succeeds(listener: dict[str, int]) -> None:
    controls = [
        control("127.0.0.1", listener["127.0.0.1"]),
        control("::1", listener["::1"]),
    ]
    state = await check_vantage(controls, timeout_s=2)
    assert state.online and state.ipv6


async def test_offline_when_no_control_answers() -> None:
    controls = [
        control("127.0.0.1", _closed_port("127.0.0.1")),
        control("::1", _closed_port("::1")),
    ]
    state = await check_vantage(controls, timeout_s=2)
    assert not state.online
    assert state.state == "offline"
    outcomes = [o for rec in state.evidence["controls"] for o in rec["connect"].values()]
    assert outcomes == ["connection_refused", "connection_refused"]


async def test_partial_controls_still_online(listener: dict[str, int]) -> None:
    controls = [control("127.0.0.1", _closed_port("127.0.0.1")), control("::1", listener["::1"])]
    state = await check_vantage(controls, timeout_s=2)
    assert state.online and state.ipv6


def domestic(host: str, port: int):  # type: ignore[no-untyped-def]
    return replace(control(host, port), domestic=True, name=f"domestic-{host}")


async def test_only_domestic_controls_answering_is_an_allowlist_regime(
    listener: dict[str, int],
) -> None:
    controls = [
        control("127.0.0.1", _closed_port("127.0.0.1")),  # foreign: fails
        domestic("::1", listener["::1"]),  # domestic: answers
    ]
    state = await check_vantage(controls, timeout_s=2)
    assert state.online and state.allowlist
    assert state.state == "allowlist"
    assert state.evidence["regime"] == "allowlist: only domestic controls answer"
    assert [r.get("domestic", False) for r in state.evidence["controls"]] == [False, True]


@pytest.mark.parametrize("foreign_answers", [True, False])
async def test_no_allowlist_regime_without_the_contrast(
    listener: dict[str, int], foreign_answers: bool
) -> None:
    # a foreign control that answers: online; no foreign control at all: nothing to tell
    # the regime by, so plain online too
    controls = [domestic("::1", listener["::1"])]
    if foreign_answers:
        controls.append(control("127.0.0.1", listener["127.0.0.1"]))
    state = await check_vantage(controls, timeout_s=2)
    assert state.online and not state.allowlist and state.state == "online"


async def test_every_control_failing_is_offline_not_allowlist() -> None:
    controls = [
        control("127.0.0.1", _closed_port("127.0.0.1")),
        domestic("::1", _closed_port("::1")),
    ]
    state = await check_vantage(controls, timeout_s=2)
    assert state.state == "offline" and not state.allowlist


async def test_no_controls_means_unchecked_online() -> None:
    state = await check_vantage([], timeout_s=1)
    assert state.online
    assert state.evidence["controls"] == "none configured"


def test_a_bogon_dns_answer_is_no_way_to_the_internet() -> None:
    # With the uplink down, home routers and captive portals answer every name with their
    # own private address, and listen on 443: connecting there must not count as online.
    # (Pure: tests never ask the system resolver about a hostname.)
    ya = endpoint("ya.ru", ports=(443,), role="control", service="controls")
    answers = ["192.168.1.1", "127.0.0.1", "10.0.0.1", "fe80::1", "77.88.55.242", "2a02:6b8::2:242"]
    assert dns_candidates(answers, ya) == ["77.88.55.242", "2a02:6b8::2:242"]
    lab = endpoint(
        "ctl.lab", ports=(443,), role="control", prefixes=(ipaddress.ip_network("127.0.0.0/8"),)
    )
    assert dns_candidates(["127.0.0.1", "10.0.0.1"], lab) == ["127.0.0.1"]  # declared: usable
