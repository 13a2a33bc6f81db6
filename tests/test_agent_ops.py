"""Operating `probe run`: reload storms, spacing across reloads, a broken sink, a full disk,
event-loop stalls from scrapes, verdicts and basic auth, a taken port.

In-process tests drive the real `Agent` and `Scheduler` against real loopback TCP servers;
the full-disk and port tests run `probe run` as a process.  Nothing leaves loopback.
"""

from __future__ import annotations

import asyncio
import base64
import json
import random
import subprocess
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import bcrypt
import pytest
from aiohttp import web
from prometheus_client import generate_latest

from probe import daemon as daemon_module
from probe.agent_config import load_config
from probe.config.settings import AgentConfig, Schedule, Timeouts
from probe.daemon import Agent, build_app
from probe.evidence import CertificateEvidence, TlsEvidence, TlsOffer
from probe.lab.servers.dns import AnswerTable, DNSServer
from probe.lab.servers.tcp import TCPMode, TCPServer
from probe.model import Operation, ProbeResult, Service
from probe.probes.base import Recorder
from probe.scheduler import Scheduler
from probe.verdict.aggregate import judge_round
from tests.agentproc import (
    REPO,
    free_port,
    needs_unshare,
    run_driver,
    run_probe,
    sample,
    start_agent,
)
from tests.helpers import endpoint, refusing_port, target


def write_config(
    path: Path,
    up_port: int,
    down_port: int,
    *,
    schedule: str = "{interval_s: 1, jitter_s: 0, min_spacing_s: 0.8}",
    endpoints: Sequence[str] = ("up", "down"),
    extra: str = "",
) -> Path:
    ports = {"up": up_port, "down": down_port}
    lines = "\n".join(
        f"      - {{name: {name}, host: 127.0.0.1, ports: [{ports[name]}], role: signalling,"
        " probes: [tcp], source: t, confidence: C}"
        for name in endpoints
    )
    path.write_text(
        f"""
schedule: {schedule}
timeouts: {{connect_s: 1}}
resolvers: {{system: false, udp: ["127.0.0.1:9"]}}
seeds: []
archive: {{path: null}}
services:
  - service: controls
    source: t
    endpoints:
      - {{name: ctl, host: 127.0.0.1, ports: [{up_port}], role: control, probes: [tcp],
          source: t, confidence: C}}
  - service: lab
    source: t
    endpoints:
{lines}
{extra}
"""
    )
    return path


class RecordingAgent(Agent):
    """The real agent, remembering when each endpoint round started (wall clock)."""

    def __init__(self, config: AgentConfig, path: str | None) -> None:
        super().__init__(config, path)
        self.rounds: list[tuple[str, float]] = []

    def on_results(self, results: Sequence[ProbeResult]) -> None:
        self.rounds.append((results[0].target.endpoint.name, min(r.t.timestamp() for r in results)))
        super().on_results(results)


def endpoint_loops() -> list[asyncio.Task[Any]]:
    return [t for t in asyncio.all_tasks() if t.get_name().startswith("endpoint ") and not t.done()]


async def wait_for(check: Any, what: str, limit_s: float = 10.0) -> None:
    deadline = time.monotonic() + limit_s
    while not check():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        await asyncio.sleep(0.02)


# How long a wrapped call waits for the loop to show it is free (`OffLoop`): a bound for a
# worker on a loaded machine, never reached when the call runs where it should.
LOOP_FREE_WAIT_S = 10.0


class OffLoop:
    """Wraps blocking calls to note, for each call, whether it ran off the event loop's
    thread and whether the loop ran a callback of its own while the call was still going.

    Checked by thread and by order, not by timing the loop (loop-gap comparisons failed on
    a loaded 2-core machine though the work ran in a worker).  On the loop, the call
    notes so at once and does not wait: the callback could only run after it returned.
    """

    def __init__(self) -> None:
        self.loop = asyncio.get_running_loop()
        self.loop_thread = threading.get_ident()
        self.calls: list[tuple[str, bool, bool]] = []  # (name, off the loop, loop ran meanwhile)

    def wrap(self, name: str, fn: Callable[..., Any]) -> Callable[..., Any]:
        def noting(*args: Any) -> Any:
            off_loop = threading.get_ident() != self.loop_thread
            loop_ran = threading.Event()
            self.loop.call_soon_threadsafe(loop_ran.set)
            self.calls.append((name, off_loop, off_loop and loop_ran.wait(LOOP_FREE_WAIT_S)))
            return fn(*args)

        return noting

    def check(self, *names: str) -> None:
        assert sorted({name for name, _, _ in self.calls}) == sorted(names), self.calls
        assert all(off and ran for _, off, ran in self.calls), self.calls


async def serve_app(agent: Agent) -> tuple[web.AppRunner, int]:
    """The agent's web app on an ephemeral loopback port; the caller cleans the runner up."""
    runner = web.AppRunner(build_app(agent))
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    return runner, runner.addresses[0][1]


# -- reload -------------------------------------------------------------------------------


async def test_a_reload_storm_leaves_one_schedule_and_stop_ends_it(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """Twenty reloads at once (a SIGHUP storm): one loop per endpoint afterwards, none after
    stop, and the requests that queued up together share one reload."""
    async with TCPServer("127.0.0.1", mode=TCPMode.CLOSE) as server:
        with refusing_port() as dead:
            path = write_config(tmp_path / "agent.yaml", server.port, dead)
            agent = RecordingAgent(load_config(path), str(path))
            agent.start()
            try:
                with caplog.at_level("INFO", logger="probe.daemon"):
                    storm = await asyncio.gather(*(agent.reload() for _ in range(20)))
                assert storm == [None] * 20
                reloads = [
                    r for r in caplog.records if r.getMessage().startswith("config reloaded")
                ]
                assert 1 <= len(reloads) <= 2, len(reloads)
                assert len(endpoint_loops()) == 3  # ctl, up, down: exactly one loop each
                late = [asyncio.ensure_future(agent.reload()) for _ in range(3)]
                await asyncio.sleep(0)  # SIGTERM arrives while those reloads are pending
            finally:
                await agent.stop()
            await asyncio.gather(*late)
            assert endpoint_loops() == []  # no reload started a schedule after the stop
            recorded = len(agent.rounds)
            await asyncio.sleep(1.2)  # longer than an interval: a leaked loop would record
            assert len(agent.rounds) == recorded


async def test_min_spacing_holds_across_a_reload(tmp_path: Path) -> None:
    """A reload right after a round must not re-test the endpoint sooner than min_spacing_s."""
    async with TCPServer("127.0.0.1", mode=TCPMode.CLOSE) as server:
        with refusing_port() as dead:
            path = write_config(tmp_path / "agent.yaml", server.port, dead)
            agent = RecordingAgent(load_config(path), str(path))
            agent.start()
            try:
                await wait_for(lambda: {"up", "down"} <= {n for n, _ in agent.rounds}, "rounds")
                assert await agent.reload() is None
                await wait_for(
                    lambda: all(sum(n == e for n, _ in agent.rounds) >= 2 for e in ("up", "down")),
                    "second rounds",
                )
            finally:
                await agent.stop()
    for name in ("up", "down"):
        starts = sorted(t for n, t in agent.rounds if n == name)
        assert starts[1] - starts[0] >= 0.8 - 0.02, (name, starts)


async def test_reload_drops_removed_endpoints_and_their_verdicts(tmp_path: Path) -> None:
    async with TCPServer("127.0.0.1", mode=TCPMode.CLOSE) as server:
        with refusing_port() as dead:
            slow = "{interval_s: 60, jitter_s: 0, min_spacing_s: 30}"
            path = write_config(tmp_path / "agent.yaml", server.port, dead, schedule=slow)
            agent = Agent(load_config(path), str(path))
            agent.start()
            try:

                def judged() -> bool:
                    scrape = generate_latest(agent.registry).decode()
                    return sample(scrape, "probe_verdict", endpoint="down") is not None

                await wait_for(judged, "a verdict on the down endpoint")
                write_config(path, server.port, dead, schedule=slow, endpoints=("up",))
                assert await agent.reload() is None
                # Nothing is due for a minute: the reload itself must drop every series.
                await wait_for(
                    lambda: 'endpoint="down"' not in generate_latest(agent.registry).decode(),
                    "the removed endpoint's series to vanish",
                    limit_s=3,
                )
                assert sample(
                    generate_latest(agent.registry).decode(), "probe_success", endpoint="up"
                )
            finally:
                await agent.stop()


async def test_reload_drops_series_of_removed_ports_probes_and_resolvers(tmp_path: Path) -> None:
    """Not only whole endpoints: a port, a probe or a resolver taken out of a kept endpoint
    must vanish at the reload, not at the endpoint's next round minutes later."""
    table = AnswerTable().host("kept.lab.example", "127.0.0.1")
    async with (
        TCPServer("127.0.0.1", mode=TCPMode.CLOSE) as server,
        DNSServer(table, "127.0.0.1") as dns_a,
        DNSServer(table, "127.0.0.1") as dns_b,
    ):
        with refusing_port() as dead:

            def text(ports: str, probes: str, resolvers: str) -> str:
                return f"""
schedule: {{interval_s: 60, jitter_s: 0, min_spacing_s: 30}}
timeouts: {{connect_s: 1, dns_s: 1}}
resolvers: {{system: false, udp: [{resolvers}], reply_window_s: 0}}
seeds: []
archive: {{path: null}}
services:
  - service: controls
    source: t
    endpoints:
      - {{name: ctl, host: 127.0.0.1, ports: [{server.port}], role: control, probes: [tcp],
          source: t, confidence: C}}
  - service: lab
    source: t
    prefixes: [{{cidr: 127.0.0.0/8, source: t, confidence: C}}]
    endpoints:
      - {{host: kept.lab.example, ports: [{ports}], role: signalling, probes: [{probes}],
          source: t, confidence: C}}
"""

            both = f'"127.0.0.1:{dns_a.port}", "127.0.0.1:{dns_b.port}"'
            path = tmp_path / "agent.yaml"
            path.write_text(text(f"{server.port}, {dead}", "dns, tcp, mtproto", both))
            agent = Agent(load_config(path), str(path))
            agent.start()
            try:

                def keys() -> set[tuple[str, ...]]:
                    return {k[2:] for k in agent.store.snapshot().results if k[0] == "lab"}

                await wait_for(lambda: len(keys()) >= 6, "the first round")
                assert ("tcp", "127.0.0.1", str(dead)) in keys()
                path.write_text(text(str(server.port), "dns, tcp", f'"127.0.0.1:{dns_a.port}"'))
                assert await agent.reload() is None
                kept = keys()
                assert ("tcp", "127.0.0.1", str(server.port)) in kept
                assert ("dns", f"udp:127.0.0.1:{dns_a.port}", "") in kept
                assert not [k for k in kept if k[0].startswith("mtproto")]  # probe removed
                assert not [k for k in kept if k[2] == str(dead)]  # port removed
                assert not [k for k in kept if k[1] == f"udp:127.0.0.1:{dns_b.port}"]
            finally:
                await agent.stop()


async def test_reload_moves_the_archive_and_rejects_one_it_cannot_create(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    async with TCPServer("127.0.0.1", mode=TCPMode.CLOSE) as server:
        with refusing_port() as dead:
            path = write_config(tmp_path / "agent.yaml", server.port, dead)
            agent = RecordingAgent(load_config(path), str(path))
            agent.start()
            try:
                blocker = tmp_path / "file"
                blocker.write_text("a file where a directory should be")
                text = path.read_text()
                path.write_text(text.replace("{path: null}", f"{{path: {blocker / 'a'}}}"))
                assert await agent.reload() is not None  # rejected, old config kept
                assert agent.store.snapshot().config_reload_ok is False
                assert agent.archive is None

                moved = tmp_path / "moved"
                path.write_text(
                    text.replace("{path: null}", f"{{path: {moved}}}") + "listen: 127.0.0.1:1\n"
                )
                with caplog.at_level("WARNING", logger="probe.daemon"):
                    assert await agent.reload() is None
                assert any(getattr(r, "settings", "") == "listen" for r in caplog.records), (
                    caplog.records
                )  # applies only after a restart, and says so
                await wait_for(
                    lambda: (
                        (moved / "measurements.jsonl").exists()
                        and (moved / "measurements.jsonl").read_text().count("\n") >= 2
                    ),
                    "measurements in the new archive",
                )
            finally:
                await agent.stop()


async def test_an_offline_blip_keeps_blocked_since_of_a_hostname_endpoint(tmp_path: Path) -> None:
    """A hostname endpoint's addresses come from DNS.  While the vantage is offline nothing
    is resolved: its round is all skips.  That round must not erase the endpoint's history:
    "failing since" (probe_state_change_timestamp_seconds) has to survive an uplink blip."""
    table = AnswerTable().host("blocked.lab.example", "127.0.0.1")
    async with DNSServer(table, "127.0.0.1") as dns_server:
        control = TCPServer("127.0.0.1", mode=TCPMode.CLOSE)
        await control.start()
        ctl_port = control.port
        with refusing_port() as dead:
            path = tmp_path / "agent.yaml"
            path.write_text(f"""
schedule: {{interval_s: 0.3, jitter_s: 0, min_spacing_s: 0.2}}
timeouts: {{connect_s: 0.5, dns_s: 0.5}}
resolvers: {{system: false, udp: ["127.0.0.1:{dns_server.port}"], reply_window_s: 0}}
seeds: []
archive: {{path: null}}
services:
  - service: controls
    source: t
    endpoints:
      - {{name: ctl, host: 127.0.0.1, ports: [{ctl_port}], role: control, probes: [tcp],
          source: t, confidence: C}}
  - service: lab
    source: t
    prefixes: [{{cidr: 127.0.0.0/8, source: t, confidence: C}}]
    endpoints:
      - {{host: blocked.lab.example, ports: [{dead}], role: signalling, probes: [tcp],
          source: t, confidence: C}}
""")
            agent = Agent(load_config(path), str(path))
            key = ("lab", "blocked.lab.example", "tcp", "127.0.0.1", str(dead))
            snapshot = agent.store.snapshot
            agent.start()
            try:
                await wait_for(lambda: key in snapshot().changed_at, "the endpoint to fail")
                since = snapshot().changed_at[key]
                await control.close()  # the uplink goes: the gate finds no control
                await wait_for(
                    lambda: (
                        snapshot().vantage_state is not None
                        and not snapshot().vantage_state.online
                        and any(r.skipped for r in snapshot().results.values())
                    ),
                    "an offline round",
                )
                control = TCPServer("127.0.0.1", ctl_port, mode=TCPMode.CLOSE)
                await control.start()  # and comes back
                await wait_for(
                    lambda: key in snapshot().results and not snapshot().results[key].skipped,
                    "the endpoint measured again",
                )
                assert snapshot().changed_at[key] == since  # still the same failure
                scrape = generate_latest(agent.registry).decode()
                changed = sample(
                    scrape,
                    "probe_state_change_timestamp_seconds",
                    endpoint="blocked.lab.example",
                    probe="tcp",
                )
                assert changed == since.timestamp()
            finally:
                await agent.stop()
                await control.close()


async def test_a_reload_parses_the_config_off_the_event_loop(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A big config takes a while to parse and validate; a reload must not stall probing.

    Checked by where the parse runs, not by timing the loop (a loop-gap comparison failed
    on a loaded 2-core machine though the parse ran in a worker): the daemon's
    ``load_config`` is wrapped to note the thread it runs on.
    """
    path = write_config(tmp_path / "agent.yaml", 9, 9, schedule="{interval_s: 60, jitter_s: 30}")
    agent = Agent(load_config(path), str(path))
    loop_thread = threading.get_ident()
    threads: list[int] = []

    def noting_thread(config_path: str | Path) -> AgentConfig:
        threads.append(threading.get_ident())
        return load_config(config_path)

    monkeypatch.setattr(daemon_module, "load_config", noting_thread)
    path.write_text(path.read_text().replace("interval_s: 60", "interval_s: 61"))
    try:
        await agent.reload()
        assert threads and loop_thread not in threads, (threads, loop_thread)
        assert agent.config.schedule.interval_s == 61  # the reload took effect
    finally:
        await agent.stop()


async def test_a_reload_with_an_alias_bomb_is_rejected_and_the_agent_runs_on(
    tmp_path: Path,
) -> None:
    async with TCPServer("127.0.0.1", mode=TCPMode.CLOSE) as server:
        with refusing_port() as dead:
            path = write_config(tmp_path / "agent.yaml", server.port, dead)
            agent = RecordingAgent(load_config(path), str(path))
            agent.start()
            try:
                anchors = ", ".join(
                    ["a0: &a0 [x, x]"]
                    + [f"a{i}: &a{i} [*a{i - 1}, *a{i - 1}]" for i in range(1, 26)]
                )
                path.write_text(path.read_text().replace("{path: null}", f"{{{anchors}}}"))
                error = await asyncio.wait_for(agent.reload(), timeout=10)
                assert error is not None and "aliases expand" in error
                rounds = len(agent.rounds)
                await wait_for(lambda: len(agent.rounds) > rounds, "rounds on the old config")
            finally:
                await agent.stop()


# -- a sink that raises ----------------------------------------------------------------------


async def test_an_exception_while_publishing_results_does_not_stop_the_endpoint() -> None:
    """A failing sink (archive, store, verdicts) must not silently end an endpoint's loop."""
    async with TCPServer("127.0.0.1", mode=TCPMode.CLOSE) as server:
        ep = endpoint("127.0.0.1", name="ep", probes=("tcp",), ports=(server.port,))
        ctl = endpoint(
            "127.0.0.1", name="ctl", ports=(server.port,), role="control", service="controls"
        )
        config = AgentConfig(
            schedule=Schedule(interval_s=0.2, jitter_s=0, min_spacing_s=0.1),
            timeouts=Timeouts(connect_s=0.5),
            services=(Service("lab", "lab", (ep,)), Service("controls", "controls", (ctl,))),
        )
        calls: list[str] = []

        def sink(results: Sequence[ProbeResult]) -> None:
            name = results[0].target.endpoint.name
            calls.append(name)
            if calls.count(name) == 1:
                raise ValueError("archive writer is closed")  # what a dead archive raised

        scheduler = Scheduler(config, sink, lambda _: None, rng=random.Random(3))
        scheduler.start()
        try:
            await wait_for(lambda: calls.count("ep") >= 3, "the endpoint to keep going")
        finally:
            await scheduler.stop()


# -- the event loop stays free ---------------------------------------------------------------


def big_store(agent: Agent, endpoints: int = 1000) -> list[ProbeResult]:
    """Fill the store as a config with thousands of targets would (no traffic sent)."""
    results = []
    for i in range(endpoints):
        for port in (443, 80):
            for probe in ("tcp", "mtproto"):
                address = f"10.{i // 65536}.{(i // 256) % 256}.{i % 256}"
                rec = Recorder(target(probe, address, port, name=f"ep{i}"))
                with rec.phase("connect"):
                    pass
                results.append(
                    rec.ok() if i % 3 else rec.fail_exc(ConnectionResetError(), Operation.CONNECT)
                )
    agent.store.record_many(results)
    agent.store.set_verdicts(judge_round(results))
    return results


async def test_a_slow_scrape_does_not_stall_the_event_loop(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """With thousands of targets a scrape, the status page or /api/results renders for a
    second or more.  Probes time their phases on the loop: rendered there, that is a fake
    RTT or a fake timeout.  Each render must run in a worker while the loop keeps going."""
    path = write_config(tmp_path / "agent.yaml", 9, 9)
    agent = Agent(load_config(path), str(path))
    big_store(agent, endpoints=50)
    renders = OffLoop()
    monkeypatch.setattr(
        agent.exposition, "render", renders.wrap("metrics", agent.exposition.render)
    )
    monkeypatch.setattr(daemon_module, "_api_text", renders.wrap("api", daemon_module._api_text))
    page = renders.wrap("page", daemon_module.render_status_page)
    monkeypatch.setattr(daemon_module, "render_status_page", page)
    runner, port = await serve_app(agent)
    try:
        for path_ in ("/metrics", "/", "/api/results"):

            def get(p: str = path_) -> int:
                with urllib.request.urlopen(f"http://127.0.0.1:{port}{p}", timeout=30) as r:
                    r.read()
                    return int(r.status)

            assert await asyncio.to_thread(get) == 200, path_
        renders.check("metrics", "page", "api")
    finally:
        await runner.cleanup()


async def test_verdicts_are_judged_off_the_event_loop(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Judging every result after every round blocked the loop for the whole judgement:
    a round's end must hand the judging to a worker while the loop keeps going."""
    path = write_config(tmp_path / "agent.yaml", 9, 9)
    agent = Agent(load_config(path), str(path))
    results = big_store(agent, endpoints=50)
    agent.store.set_verdicts(())
    judges = OffLoop()
    monkeypatch.setattr(agent, "_judge", judges.wrap("judge", agent._judge))
    try:
        agent.on_results(results[:4])  # one endpoint's round finishing
        await wait_for(lambda: agent.store.snapshot().verdicts, "the verdicts to be judged")
        judges.check("judge")
    finally:
        await agent.stop()


async def test_basic_auth_checks_do_not_stall_the_event_loop(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """bcrypt at cost 12 takes ~0.3 s: in the loop, every wrong password would freeze probing.
    Each check must run in a worker while the loop keeps going (cost 4 here: what is
    checked is where the check runs, not how long it takes)."""
    hashed = bcrypt.hashpw(b"s3cret", bcrypt.gensalt(rounds=4))
    web_cfg = f'web: {{basic_auth_users: {{admin: "{hashed.decode()}"}}}}'
    path = write_config(tmp_path / "agent.yaml", 9, 9, extra=web_cfg)
    agent = Agent(load_config(path), str(path))
    checks = OffLoop()
    password_ok = daemon_module.BasicAuth.password_ok
    monkeypatch.setattr(daemon_module.BasicAuth, "password_ok", checks.wrap("bcrypt", password_ok))
    runner, port = await serve_app(agent)

    def get(password: str) -> int:
        request = urllib.request.Request(f"http://127.0.0.1:{port}/healthz")
        token = base64.b64encode(f"admin:{password}".encode()).decode()
        request.add_header("Authorization", f"Basic {token}")
        try:
            with urllib.request.urlopen(request, timeout=30) as r:
                return int(r.status)
        except urllib.error.HTTPError as err:
            return err.code

    try:
        wrong = await asyncio.gather(*(asyncio.to_thread(get, "wrong") for _ in range(3)))
        assert wrong == [401, 401, 401]
        assert await asyncio.to_thread(get, "s3cret") == 200
        assert len(checks.calls) == 4  # every request was checked: none answered from a cache
        checks.check("bcrypt")
    finally:
        await runner.cleanup()


# -- the schedule's randomness ----------------------------------------------------------------


def test_jitter_spreads_rounds_both_ways_and_never_below_min_spacing() -> None:
    """docs/configuration.md: interval_s plus or minus up to jitter_s, at least min_spacing_s;
    the first round of a fresh start within 0..jitter_s."""
    ep = endpoint("127.0.0.1", name="ep", ports=(9,))
    config = AgentConfig(
        schedule=Schedule(interval_s=300, jitter_s=30, min_spacing_s=280),
        services=(Service("lab", "lab", (ep,)),),
    )
    scheduler = Scheduler(config, lambda _: None, lambda _: None, rng=random.Random(5))
    spacings = [scheduler._spacing() for _ in range(2000)]
    assert min(spacings) == 280  # interval - jitter would be 270: min_spacing wins
    assert max(spacings) <= 330 and max(spacings) > 325
    assert sum(s < 300 for s in spacings) > 500 and sum(s > 300 for s in spacings) > 500
    now = time.monotonic()
    firsts = [scheduler._first_due(("lab", "ep")) - now for _ in range(200)]
    assert all(-0.01 <= f <= 30.01 for f in firsts) and max(firsts) - min(firsts) > 20


# -- the status page ---------------------------------------------------------------------------


async def test_hostile_evidence_never_reaches_the_status_page_as_markup(tmp_path: Path) -> None:
    """A censor controls DNS answers, certificates and the bytes behind an unknown_failure.
    None of it may become markup on the page; the page also forbids scripts outright."""
    path = write_config(tmp_path / "agent.yaml", 9, 9)
    agent = Agent(load_config(path), str(path))
    rec = Recorder(target("tls", "192.0.2.1", 443, name="up", service="lab"), TlsEvidence())
    rec.evidence = TlsEvidence(
        certificate=CertificateEvidence(subject="CN=<script>alert(1)</script>"),
        offer=TlsOffer(sni="<img src=x onerror=alert(1)>"),
    )
    agent.store.record_many([rec.fail("unknown_failure <svg onload=alert(1)>", Operation.READ)])
    agent.store.set_verdicts(judge_round(agent.store.snapshot().results.values()))
    runner, port = await serve_app(agent)

    def get(p: str) -> tuple[str, Any]:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}{p}", timeout=30) as r:
            return r.read().decode(), r.headers

    try:
        page, headers = await asyncio.to_thread(get, "/")
        for markup in ("<script", "<img", "<svg", "onerror=", "onload="):
            assert markup not in page
        assert "unknown_failure" in page  # the failure is shown, as its bounded kind
        csp = headers["Content-Security-Policy"]
        assert "default-src 'none'" in csp and "script-src" not in csp
        api, api_headers = await asyncio.to_thread(get, "/api/results")
        assert "<svg onload" in api  # the evidence itself is kept, as JSON data
        assert api_headers["Content-Type"].startswith("application/json")
        assert api_headers["X-Content-Type-Options"] == "nosniff"
    finally:
        await runner.cleanup()


# -- as a process ---------------------------------------------------------------------------


def test_a_taken_listen_port_is_a_one_line_error(tmp_path: Path) -> None:
    import socket

    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        path = write_config(tmp_path / "agent.yaml", 9, 9, extra=f"listen: 127.0.0.1:{port}")
        done = run_probe("run", "-c", str(path))
    assert done.returncode != 0
    assert "Traceback" not in done.stderr, done.stderr
    events = [json.loads(line) for line in done.stderr.splitlines() if line.strip()]
    assert any("address already in use" in json.dumps(e) for e in events), done.stderr


def test_listen_on_the_ipv6_wildcard_takes_ipv4_too(tmp_path: Path) -> None:
    """docs/configuration.md: `[::]:PORT` listens on all addresses.  asyncio sets IPV6_V6ONLY
    on an IPv6 listener, so Prometheus scraping over IPv4 was refused."""
    port = free_port()
    path = write_config(tmp_path / "agent.yaml", 9, 9, extra=f'listen: "[::]:{port}"')
    agent = start_agent(path, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    try:
        answers = {}
        for host in ("[::1]", "127.0.0.1"):
            deadline = time.monotonic() + 20
            while host not in answers and time.monotonic() < deadline:
                try:
                    with urllib.request.urlopen(f"http://{host}:{port}/healthz", timeout=2) as r:
                        answers[host] = r.status
                except OSError:
                    if agent.poll() is not None:
                        break
                    time.sleep(0.2)
        assert answers == {"[::1]": 200, "127.0.0.1": 200}, answers
    finally:
        agent.terminate()
        agent.wait(timeout=10)


FULL_DISK_DRIVER = r"""
import json, signal, subprocess, sys, time, urllib.request
mnt, config, port = sys.argv[1], sys.argv[2], int(sys.argv[3])
subprocess.run(["mount", "-t", "tmpfs", "-o", "size=64k", "tmpfs", mnt], check=True)
log = open(mnt + ".log", "wb")
agent = subprocess.Popen([sys.executable, "-m", "probe", "run", "-c", config], stderr=log)
def metric(name):
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as r:
            text = r.read().decode()
    except OSError:
        return None
    values = [float(l.split()[-1]) for l in text.splitlines() if l.startswith(name)]
    return sum(values) if values else None
out = {}
for _ in range(300):
    errors = metric("probe_archive_write_errors_total")
    if errors:
        break
    time.sleep(0.1)
out["errors"] = errors
attempts = metric("probe_attempts_total")
time.sleep(1.5)
out["attempts_grew"] = (metric("probe_attempts_total") or 0) > (attempts or 0)
agent.send_signal(signal.SIGTERM)
out["rc"] = agent.wait(timeout=20)
print(json.dumps(out))
"""


@needs_unshare("to mount a tiny tmpfs in a private mount namespace")
def test_a_full_disk_loses_lines_not_the_agent(tmp_path: Path) -> None:
    mnt = tmp_path / "disk"
    mnt.mkdir()
    port = free_port()
    config = write_config(
        tmp_path / "agent.yaml",
        port,
        9,
        schedule="{interval_s: 0.1, jitter_s: 0, min_spacing_s: 0}",
        extra=f"listen: 127.0.0.1:{port}\nlog_format: json\n",
    )
    text = config.read_text().replace(
        "archive: {path: null}", f"archive: {{path: {mnt / 'a'}, max_bytes: 4096, keep: 50}}"
    )
    config.write_text(text)
    out = run_driver(
        FULL_DISK_DRIVER,
        "-m",
        str(mnt),
        str(config),
        str(port),
        workdir=tmp_path,
        cwd=REPO,
        timeout_s=120,
    )
    log = (tmp_path / "disk.log").read_text()
    assert out["errors"], log[-3000:]  # the operator can see (and alert on) lost lines
    assert out["attempts_grew"]  # and the agent keeps measuring
    assert out["rc"] == 0, log[-3000:]  # SIGTERM still stops it cleanly
    assert "Traceback" not in log
    failures = [json.loads(line) for line in log.splitlines() if "archive" in line]
    # One line when writes start failing, not one per lost measurement (a log flood on a
    # full disk makes it fuller).
    assert sum(e["msg"].startswith("archive write failed") for e in failures) <= 2, failures
