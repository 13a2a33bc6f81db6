"""The round runner's `Runner` against real loopback servers: its per-probe safety cap and
its per-destination bookkeeping."""

from __future__ import annotations

import pytest

from probe.lab.servers.stun import StunServer
from probe.lab.servers.tcp import TCPMode, TCPServer
from probe.model import Failure, ProbeResult, Target
from probe.round import Runner, probe_deadline
from probe.settings import ProbeSettings
from tests.helpers import settings, target

# Every timeout tiny, so the runner's generic safety cap is well under a second; a probe
# whose params ask for a longer run (a tcp hold, a stun flow, many transfer connections)
# must still get to finish.
TINY = {
    "dns_s": 0.05,
    "connect_s": 0.2,
    "tls_s": 0.05,
    "quic_s": 0.05,
    "udp_s": 0.05,
    "app_s": 0.05,
    "transfer_s": 0.05,
    "stall_s": 0.05,
}


def tiny() -> ProbeSettings:
    s = settings(**TINY)
    assert probe_deadline(s) < 1.2
    return s


@pytest.mark.parametrize("host", ["127.0.0.1", "::1"])
async def test_a_tcp_hold_longer_than_the_cap_is_not_cut(host: str) -> None:
    s = tiny()
    async with TCPServer(host, mode=TCPMode.HOLD) as server:
        tgt = target("tcp", host, server.port, params={"hold_s": 1.5})
        result = await Runner(s).one(tgt)
    assert result.ok, result.failure
    assert result.details["hold_s"] == 1.5
    assert result.phases["hold"] >= 1.4


async def test_a_stun_flow_longer_than_the_cap_is_not_cut() -> None:
    s = tiny()
    async with StunServer("127.0.0.1", behavior="echo") as server:
        params = {"mode": "flow", "duration_s": 1.5, "rate_pps": 20}
        result = await Runner(s).one(target("stun", "127.0.0.1", server.port, params=params))
    assert result.ok, result.failure
    assert result.details["loss"] == 0.0


def test_the_cap_covers_every_transfer_connection() -> None:
    s = tiny()
    t = s.timeouts
    down = target("transfer", params={"connections": 20})
    both = target("transfer", params={"connections": 20, "upload_bytes": 1024})
    assert probe_deadline(s, down) >= 20 * t.transfer_s + probe_deadline(s)
    assert probe_deadline(s, both) >= 40 * t.transfer_s + probe_deadline(s)


def test_bad_params_leave_the_generic_cap() -> None:
    # the probe itself rejects them (and run_guarded reports it); the cap must not crash
    s = tiny()
    assert probe_deadline(s, target("tcp", params={"hold_s": "long"})) == probe_deadline(s)


async def test_the_cap_still_ends_a_probe_that_overruns() -> None:
    s = tiny()
    async with TCPServer("127.0.0.1", mode=TCPMode.HOLD) as server:
        tgt = target("tcp", "127.0.0.1", server.port)

        async def stuck(_target: Target, _settings: ProbeSettings) -> ProbeResult:
            await server.wait_for(lambda _s: False, 60)  # never true: a hung probe
            raise AssertionError("unreachable")

        result = await Runner(s, probes={"tcp": stuck}).one(tgt)
    assert result.failure == Failure.GENERIC_TIMEOUT
    assert result.duration_s < probe_deadline(s) + 0.5
