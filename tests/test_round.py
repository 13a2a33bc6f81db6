"""The round runner's `Runner` against real loopback servers: its per-probe safety cap and
its per-destination bookkeeping."""

from __future__ import annotations

import asyncio
import contextlib
import socket
from collections.abc import Iterator

import pytest

from probe.config.settings import ProbeSettings, SwapSettings
from probe.lab.servers.stun import StunServer
from probe.lab.servers.tcp import TCPMode, TCPServer
from probe.model import Failure, Operation, ProbeResult, Target, VantageState, freeze, utcnow
from probe.probes import REGISTRY
from probe.probes.base import Recorder
from probe.probes.params import ParamError
from probe.probes.tls import TLSParams
from probe.round import (
    MAX_ADDRESSES_PER_FAMILY,
    SLOW_PATH_FLAG,
    SLOW_PATH_STRETCH,
    Lane,
    Runner,
    collect_addresses,
    measure_endpoint,
    probe_deadline,
)
from probe.swaps import followups
from tests.helpers import endpoint, settings, target

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
    return settings(**TINY)


def test_each_probe_has_its_own_cap() -> None:
    # one cap for all would let a hung tcp connect sit as long as a 20-connection transfer
    s = tiny()
    caps = {name: probe_deadline(s, target(name)) for name in REGISTRY}
    assert all(cap < 4 for cap in caps.values()), caps
    assert caps["tcp"] < caps["tls"]  # a tls run may connect and handshake twice
    assert caps["transfer"] < probe_deadline(s, target("transfer", params={"connections": 20}))


@pytest.mark.parametrize("host", ["127.0.0.1", "::1"])
async def test_a_tcp_hold_longer_than_the_cap_is_not_cut(host: str) -> None:
    s = tiny()
    assert probe_deadline(s, target("tcp")) < 1.5  # without the hold
    async with TCPServer(host, mode=TCPMode.HOLD) as server:
        tgt = target("tcp", host, server.port, params={"hold_s": 1.5})
        result = await Runner(s).one(tgt)
    assert result.ok, result.failure
    assert result.details["hold_s"] == 1.5
    assert result.phases["hold"] >= 1.4


async def test_a_stun_flow_longer_than_the_cap_is_not_cut() -> None:
    s = tiny()
    assert probe_deadline(s, target("stun")) < 1.5  # a binding's cap
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
    assert probe_deadline(s, down) >= 20 * t.transfer_s + probe_deadline(s, target("tcp"))
    assert probe_deadline(s, both) >= 40 * t.transfer_s + probe_deadline(s, target("tcp"))


def test_the_cap_follows_a_follow_ups_params() -> None:
    # a stun/random_udp runs the control before the requests: its own udp_s on top
    s = tiny()
    first = target("stun", "192.0.2.1", 3478)
    failed = Recorder(first).fail(Failure.UDP_NO_RESPONSE, Operation.READ)
    (control,) = [t for t in followups([failed]) if t.variant == "random_udp"]
    assert probe_deadline(s, control) >= probe_deadline(s, first) + s.timeouts.udp_s


def test_bad_params_fail_when_the_target_is_built_never_at_run_time() -> None:
    # parsed once, as the config loader does: nothing unparsed reaches the runner
    with pytest.raises(ParamError, match="hold_s: must be a number"):
        target("tcp", params={"hold_s": "long"})


async def test_the_cap_still_ends_a_probe_that_overruns() -> None:
    s = tiny()
    async with TCPServer("127.0.0.1", mode=TCPMode.HOLD) as server:
        tgt = target("tcp", "127.0.0.1", server.port)

        async def stuck(_target: Target, _settings: ProbeSettings) -> ProbeResult:
            await server.wait_for(lambda _s: False, 60)  # never true: a hung probe
            raise AssertionError("unreachable")

        result = await Runner(s, probes={"tcp": stuck}).one(tgt)
    assert result.failure == Failure.GENERIC_TIMEOUT
    assert result.duration_s < probe_deadline(s, tgt) + 0.5


@contextlib.contextmanager
def _silent_udp() -> Iterator[int]:
    """A bound UDP port that reads nothing and answers nothing (no ICMP either)."""
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
        sock.bind(("127.0.0.1", 0))
        yield sock.getsockname()[1]


# Every probe against a peer that never answers: its own clocks end it, with its own
# phases and evidence; the runner's cap (a bare timeout, no phase) must not.
_SILENT_TCP = ("tls", "mtproto", "whatsapp", "transfer")
_SILENT_UDP = ("quic", "quic_vn", "stun", "dns")


@pytest.mark.parametrize("name", [*_SILENT_TCP, *_SILENT_UDP])
async def test_a_silent_peer_is_the_probes_own_timeout_not_the_cap(name: str) -> None:
    s = settings(**{**TINY, "tls_s": 0.2, "app_s": 0.2, "quic_s": 0.2, "udp_s": 0.2})
    runner = Runner(s)
    if name in _SILENT_TCP:
        async with TCPServer("127.0.0.1", mode=TCPMode.HOLD) as server:
            result = await runner.one(target(name, "127.0.0.1", server.port))
    else:
        with _silent_udp() as port:
            if name == "dns":
                tgt = target("dns", None, host="lab.example", resolver=f"udp:127.0.0.1:{port}")
            else:
                tgt = target(name, "127.0.0.1", port)
            result = await runner.one(tgt)
    assert not result.ok
    assert result.phases, (result.failure, result.duration_s)  # the cap's result has none
    assert result.duration_s < probe_deadline(s, result.target)


class _Counting:
    """A probe that touches no network: it records how many runs share an address, and
    holds every run until released."""

    def __init__(self, full_at: int) -> None:
        self.active: dict[str, int] = {}
        self.peak: dict[str, int] = {}
        self.full_at = full_at
        self.full = asyncio.Event()  # set once `full_at` runs are active at once
        self.release = asyncio.Event()

    async def probe(self, tgt: Target, _settings: ProbeSettings) -> ProbeResult:
        key = tgt.address or ""
        self.active[key] = self.active.get(key, 0) + 1
        self.peak[key] = max(self.peak.get(key, 0), self.active[key])
        if sum(self.active.values()) >= self.full_at:
            self.full.set()
        await self.release.wait()
        self.active[key] -= 1
        return Recorder(tgt).ok()


def _many_per_address(addresses: int, each: int) -> list[Target]:
    return [
        target("tcp", f"127.0.0.{i}", 443 + n) for i in range(1, addresses + 1) for n in range(each)
    ]


async def test_waiting_for_a_busy_destination_takes_no_global_slot() -> None:
    # 8 addresses x 5 targets, 2 at a time per address, 16 globally: all 16 global slots
    # can run.  Holding a global slot while queueing for a busy address would leave
    # only 2 per address x the few addresses that got slots running (one slow, blocked
    # address would stall the whole round).
    probe = _Counting(full_at=16)
    runner = Runner(tiny(), concurrency=16, per_destination=2, probes={"tcp": probe.probe})
    batch = asyncio.create_task(runner.many(_many_per_address(8, 5)))
    try:
        await asyncio.wait_for(probe.full.wait(), 5)
        assert runner.in_flight == 16
    finally:
        probe.release.set()
        results = await asyncio.wait_for(batch, 5)
    assert all(r.ok for r in results)
    assert max(probe.peak.values()) == 2  # never more than per_destination on one address


async def test_idle_destinations_are_forgotten() -> None:
    # The daemon keeps one Runner for its whole life while DNS answers (CDNs) keep
    # changing: a bound kept for every address ever seen would grow without end.
    probe = _Counting(full_at=1)
    probe.release.set()
    runner = Runner(tiny(), per_destination=2, probes={"tcp": probe.probe})
    results = await asyncio.wait_for(runner.many(_many_per_address(40, 3)), 5)
    assert all(r.ok for r in results)
    assert max(probe.peak.values()) <= 2
    assert runner._destinations == {}  # nothing kept once no probe waits on an address


@pytest.mark.parametrize(("probe_name", "operation"), [("dns", "resolve"), ("tcp", "read")])
async def test_a_probe_bug_is_a_result_with_the_probe_s_operation(
    probe_name: str, operation: str
) -> None:
    async def broken(_target: Target, _settings: ProbeSettings) -> ProbeResult:
        raise RuntimeError("bug at 192.0.2.7")

    tgt = target(probe_name, None if probe_name == "dns" else "127.0.0.1", 1, resolver="system")
    result = await Runner(tiny(), probes={probe_name: broken}).one(tgt)
    assert result.failure == "unknown_failure RuntimeError: bug at [scrubbed]"
    assert result.failed_operation == operation  # as when the runner's cap ends the probe
    assert result.details["internal_error"] == "RuntimeError"


# --- the exclusive transfer lane, the neutral SNI, address sources -------------------------


class _Overlap:
    """Fake probes that record which probes ran at the same time as which."""

    def __init__(self) -> None:
        self.running: list[Target] = []
        self.overlaps: list[tuple[str, str, str | None, str | None]] = []

    async def probe(self, t: Target, s: ProbeSettings) -> ProbeResult:
        for other in self.running:
            self.overlaps.append((t.probe, other.probe, t.address, other.address))
        self.running.append(t)
        try:
            await asyncio.sleep(0.02)
        finally:
            self.running.remove(t)
        return Recorder(t).ok()


async def test_transfers_run_alone_on_their_destination_and_one_at_a_time() -> None:
    fake = _Overlap()
    probes = {name: fake.probe for name in ("tcp", "tls", "quic", "transfer")}
    runner = Runner(settings(), probes=probes)
    targets = [
        target(name, address, 443)
        for address in ("192.0.2.1", "192.0.2.2")
        for name in ("tcp", "tls", "transfer", "quic", "transfer")
    ]
    results = await runner.many(targets)
    assert all(r.ok for r in results)
    assert fake.overlaps, "other probes do run side by side"
    for a, b, addr_a, addr_b in fake.overlaps:
        assert "transfer" not in (a, b) or addr_a != addr_b, (a, b, addr_a)
        assert (a, b) != ("transfer", "transfer"), "two transfers at once"


async def test_a_waiting_writer_holds_new_readers_back_and_goes_first() -> None:
    lane = Lane()
    order: list[str] = []
    r1_in = asyncio.Event()
    r1_go = asyncio.Event()

    async def first_reader() -> None:
        async with lane.shared():
            order.append("r1+")
            r1_in.set()
            await r1_go.wait()
            order.append("r1-")

    async def writer() -> None:
        async with lane.exclusive():
            order.append("w+")
            await asyncio.sleep(0)
            order.append("w-")

    async def late_reader() -> None:
        async with lane.shared():
            order.append("r2")

    r1 = asyncio.create_task(first_reader())
    await r1_in.wait()
    w = asyncio.create_task(writer())
    await asyncio.sleep(0)  # the writer is waiting for r1 now
    r2 = asyncio.create_task(late_reader())
    await asyncio.sleep(0)
    assert order == ["r1+"], "neither the writer nor a new reader runs beside r1"
    r1_go.set()
    await asyncio.gather(r1, w, r2)
    assert order == ["r1+", "r1-", "w+", "w-", "r2"]


async def test_the_neutral_sni_comes_from_the_config_per_service() -> None:
    seen: list[str | None] = []

    async def tls(t: Target, s: ProbeSettings) -> ProbeResult:
        seen.append(TLSParams.of(t).sni)
        if t.variant:
            return Recorder(t).ok()
        return Recorder(t).fail(Failure.CONNECTION_RESET, Operation.TLS_HANDSHAKE)

    ep = endpoint("192.0.2.7", probes=("tls",), ports=(443,), service="tg")
    swaps = SwapSettings(neutral_sni="default.example", per_service=freeze({"tg": "tg.example"}))
    runner = Runner(settings(), probes={"tls": tls}, swaps=swaps)
    online = VantageState(True, False, utcnow())
    results = await measure_endpoint(ep, runner, online)
    assert {"tls", "tls/neutral_sni", "tls/repeat"} <= {r.target.label for r in results}
    assert "tg.example" in seen and "default.example" not in seen


def test_address_sources_take_turns_so_doh_and_seeds_are_not_crowded_out() -> None:
    ep = endpoint("web.example", probes=("tcp",), ports=(443,), addresses=("157.240.2.9",))
    system = [f"31.13.72.{i}" for i in range(1, 7)]  # public: bogons are never dialled

    def answer(resolver: str, a: list[str]) -> ProbeResult:
        t = Target(ep, "dns", resolver=resolver)
        return Recorder(t).ok(answers={"A": a, "AAAA": []})

    found = collect_addresses(
        ep, [answer("system", system), answer("doh:https://d.example/q", ["157.240.1.5"])]
    )
    assert len(found) == MAX_ADDRESSES_PER_FAMILY
    assert found["157.240.1.5"] == "doh"
    assert found["157.240.2.9"] == "seed"
    assert sum(source == "system" for source in found.values()) == MAX_ADDRESSES_PER_FAMILY - 2


async def test_a_path_a_transfer_found_slow_gets_stretched_timeouts_after_it() -> None:
    seen: list[float] = []

    async def transfer(t: Target, s: ProbeSettings) -> ProbeResult:
        return Recorder(t).fail(Failure.THROTTLED, Operation.READ, connections=[])

    async def tcp(t: Target, s: ProbeSettings) -> ProbeResult:
        seen.append(s.timeouts.connect_s)
        return Recorder(t).ok()

    base = settings(connect_s=1.0)
    runner = Runner(base, probes={"transfer": transfer, "tcp": tcp})
    before = await runner.one(target("tcp", "192.0.2.5", 443))
    await runner.one(target("transfer", "192.0.2.5", 443))
    after = await runner.one(target("tcp", "192.0.2.5", 443))
    elsewhere = await runner.one(target("tcp", "192.0.2.6", 443))
    assert seen == [1.0, 1.0 * SLOW_PATH_STRETCH, 1.0]  # a floor, stretched on that path only
    assert SLOW_PATH_FLAG in after.flags  # said in the evidence
    assert SLOW_PATH_FLAG not in before.flags and SLOW_PATH_FLAG not in elsewhere.flags
