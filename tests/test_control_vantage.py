"""`probe run` with a ``control:`` section: two (and three) real agents on loopback.

The control agent (``role: control``) and the test agent measure the same endpoint names
from different loopback addresses: ``blocked`` is a live server on 127.0.0.2 for the
control and the same port on 127.0.0.1 (nothing listens) for the test agent, so it fails
here and works at the control, like a block; ``dead`` refuses on both, like an outage.
The fetch bounds are checked against a real aiohttp server playing a hostile control.
"""

from __future__ import annotations

import asyncio
import base64
import gzip
import json
import signal
import ssl
import subprocess
import time
import urllib.request
from collections.abc import AsyncIterator, Iterator
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import aiohttp
import bcrypt
import pytest
from aiohttp import web

from probe.agent_config import load_config
from probe.config.settings import ControlSettings
from probe.config.strict_yaml import ConfigError
from probe.control import ControlError, ControlPoller, fetch, parse_document
from probe.lab.certs import CertificateAuthority
from probe.lab.servers.tcp import TCPMode, TCPServer
from tests.agentproc import free_port, sample
from tests.test_daemon import wait_until

CENSORSHIP = {
    "dns_tampering",
    "ip_blocking",
    "tls_sni_filtering",
    "tls_mitm",
    "protocol_filtering",
    "quic_filtering",
    "udp_blocking",
    "throttling",
    "stall_after_bytes",
    "partial",
}


def agent_config(
    *,
    name: str,
    role: str,
    port: int,
    blocked: str,
    blocked_port: int,
    dead_port: int,
    gate_port: int | None = None,
    extra: str = "",
) -> str:
    """``gate_port``: where the offline gate's control target is (default: the agent itself;
    a dead port makes the vantage offline)."""
    return f"""
vantage: {{name: {name}, country: ZZ, asn: AS64500, role: {role}}}
schedule: {{interval_s: 2, jitter_s: 0.5, min_spacing_s: 1}}
timeouts: {{connect_s: 1}}
resolvers: {{system: false, udp: ["127.0.0.1:9"]}}
seeds: []
listen: 127.0.0.1:{port}
archive: {{path: null}}
services:
  - service: controls
    source: test
    endpoints:
      - {{name: self, host: 127.0.0.1, ports: [{gate_port or port}], role: control,
          probes: [tcp], source: test, confidence: C}}
  - service: lab
    source: test
    endpoints:
      - {{name: blocked, host: {blocked}, ports: [{blocked_port}], role: signalling,
          probes: [tcp], source: test, confidence: C}}
      - {{name: dead, host: 127.0.0.1, ports: [{dead_port}], role: signalling, probes: [tcp],
          source: test, confidence: C}}
{extra}
"""


class Agent:
    """``probe run`` in the background; its log in the work directory."""

    def __init__(
        self, workdir: Path, name: str, text: str, port: int, tls: ssl.SSLContext | None = None
    ) -> None:
        self.url = f"{'https' if tls else 'http'}://127.0.0.1:{port}"
        self.tls = tls
        self.config = workdir / f"{name}.yaml"
        self.config.write_text(text)
        self.log = (workdir / f"{name}.log").open("ab")
        from tests.agentproc import start_agent

        self.proc = start_agent(self.config, stdout=self.log, stderr=self.log)

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self.log.close()

    def get(self, path: str, auth: tuple[str, str] | None = None) -> str:
        headers = {}
        if auth:
            token = base64.b64encode(f"{auth[0]}:{auth[1]}".encode()).decode()
            headers["Authorization"] = f"Basic {token}"
        request = urllib.request.Request(self.url + path, headers=headers)
        with urllib.request.urlopen(request, timeout=5, context=self.tls) as response:
            return str(response.read().decode())

    def api(self, auth: tuple[str, str] | None = None) -> dict[str, Any]:
        result: dict[str, Any] = json.loads(self.get("/api/results", auth))
        return result

    def verdicts(self, auth: tuple[str, str] | None = None) -> dict[str, dict[str, Any]]:
        api = self.api(auth)
        return {v["endpoint"]: v for v in api["verdicts"] if v["service"] == "lab"}


@pytest.fixture
def agents() -> Iterator[list[Agent]]:
    started: list[Agent] = []
    yield started
    for agent in started:
        agent.stop()


@pytest.fixture
async def live_on_127_0_0_2() -> AsyncIterator[int]:
    """A TCP server on 127.0.0.2 only: the same port on 127.0.0.1 refuses."""
    async with TCPServer("127.0.0.2", mode=TCPMode.CLOSE) as server:
        yield server.port


async def wait_for(check: Any, what: str, limit_s: float = 30) -> Any:
    return await asyncio.to_thread(wait_until, check, what, limit_s)


async def test_two_agents_block_vs_outage_through_a_tls_control_with_basic_auth(
    tmp_path: Path,
    agents: list[Agent],
    live_on_127_0_0_2: int,
    ca: CertificateAuthority,
    ca_file: str,
) -> None:
    dead, control_port, test_port = free_port(), free_port(), free_port()
    hashed = bcrypt.hashpw(b"s3cret", bcrypt.gensalt(4)).decode()
    cert, key = ca.issue("127.0.0.1").write(tmp_path, "control-web")
    control_text = agent_config(
        name="ctl-1",
        role="control",
        port=control_port,
        blocked="127.0.0.2",
        blocked_port=live_on_127_0_0_2,
        dead_port=dead,
        extra=f"web: {{tls_cert_file: {cert}, tls_key_file: {key}, "
        f'basic_auth_users: {{watcher: "{hashed}"}}}}',
    )
    auth_file = tmp_path / "control.auth"
    auth_file.write_text("watcher:s3cret\n")
    url = f"https://127.0.0.1:{control_port}/api/results"
    control_section = (
        f"control: {{urls: ['{url}'], ca_file: {ca_file}, basic_auth_file: control.auth, "
        "poll_interval_s: 1, max_age_s: 30, timeout_s: 2}"
    )
    test_text = agent_config(
        name="test-1",
        role="test",
        port=test_port,
        blocked="127.0.0.1",
        blocked_port=live_on_127_0_0_2,
        dead_port=dead,
        extra=control_section,
    )
    client_tls = ssl.create_default_context(cafile=ca_file)
    control = Agent(tmp_path, "control", control_text, control_port, tls=client_tls)
    agents.append(control)
    test = Agent(tmp_path, "test", test_text, test_port)
    agents.append(test)
    creds = ("watcher", "s3cret")
    # Each wait is for a state, bounded on its own: on a loaded machine starting two agents
    # took 10 s of the 30 s that the first judgement had to fit in with it.
    await wait_for(lambda: control.get("/-/ready", creds), "the control agent to start")
    await wait_for(lambda: test.get("/-/ready"), "the test agent to start")

    def judged_with_control() -> dict[str, dict[str, Any]] | None:
        # both endpoints judged next to the control's result for them: the control's
        # first round may reach one endpoint before the other
        verdicts = test.verdicts()

        def with_control(name: str) -> bool:
            evidence = verdicts.get(name, {}).get("evidence", ())
            return any(line.startswith("control tcp") for line in evidence)

        return verdicts if with_control("blocked") and with_control("dead") else None

    verdicts = await wait_for(judged_with_control, "the test agent to judge with the control")
    blocked, down = verdicts["blocked"], verdicts["dead"]
    assert blocked["verdict"] == "ip_blocking" and blocked["confidence"] >= 0.85, blocked
    assert f"control tcp 127.0.0.2:{live_on_127_0_0_2} ok" in blocked["evidence"]
    assert down["verdict"] == "endpoint_down", down  # fails at the control too: an outage
    assert not any("judged without" in line for line in blocked["evidence"])

    def shown_usable() -> tuple[str, dict[str, Any], str] | None:
        # The control as last polled, in all three views at once.  A poll that timed out
        # on a loaded machine (timeout_s: 2) rightly reads "not usable" until the next
        # one: what is checked is that a usable control is shown so, not that no poll fails.
        metrics, (status,), page = test.get("/metrics"), test.api()["controls"], test.get("/")
        up = sample(metrics, "probe_control_up", control=url) == 1 and status["up"]
        return (metrics, status, page) if up and f"Control: {url} usable" in page else None

    # up in /metrics, in /api/results and on the status page, in one reading
    metrics, status, _ = await wait_for(shown_usable, "the control shown usable")
    age = sample(metrics, "probe_control_age_seconds", control=url)
    assert age is not None and 0 <= age < 30
    assert (status["url"], status["error"]) == (url, None)
    assert status["newest"].endswith("Z")

    # The control itself: a dead server is down there, never a censorship verdict.  Its
    # own verdicts trail its results by up to a judging interval (1 s, measured 1.1 s):
    # the test agent can poll those results and judge with them before the control has.
    def judged_by_control() -> dict[str, dict[str, Any]] | None:
        mine = control.verdicts(creds)
        return mine if {"blocked", "dead"} <= mine.keys() else None

    mine = await wait_for(judged_by_control, "the control to judge both endpoints itself")
    assert mine["dead"]["verdict"] == "endpoint_down", mine["dead"]
    assert mine["blocked"]["verdict"] == "ok"
    assert not {v["verdict"] for v in control.api(creds)["verdicts"]} & CENSORSHIP
    assert sample(control.get("/metrics", creds), "probe_control_up") is None

    # Reload with the control moved to where nothing listens: the new control is polled
    # from scratch (the old one's results go with it), the old URL's series vanish.
    nowhere = f"http://127.0.0.1:{free_port()}/api/results"
    test.config.write_text(test_text.replace(control_section, f"control: {{urls: ['{nowhere}']}}"))
    test.proc.send_signal(signal.SIGHUP)

    def alone_after_reload() -> dict[str, dict[str, Any]] | None:
        verdicts = test.verdicts()
        lines = verdicts.get("blocked", {}).get("evidence", ())
        return verdicts if "judged without a control vantage: connection_refused" in lines else None

    verdicts = await wait_for(alone_after_reload, "verdicts judged alone after the reload")
    assert verdicts["dead"]["verdict"] != "endpoint_down"
    metrics = test.get("/metrics")
    assert sample(metrics, "probe_control_up", control=nowhere) == 0
    assert sample(metrics, "probe_control_up", control=url) is None


async def test_offline_and_unreachable_controls_are_never_used_and_it_says_so(
    tmp_path: Path, agents: list[Agent], live_on_127_0_0_2: int
) -> None:
    dead, offline_port, test_port, nobody = free_port(), free_port(), free_port(), free_port()
    # A control agent whose offline gate reaches nothing: every result it has is skipped
    # and its document says "offline".  And a control URL where nothing listens.
    offline_text = agent_config(
        name="ctl-off",
        role="control",
        port=offline_port,
        blocked="127.0.0.2",
        blocked_port=live_on_127_0_0_2,
        dead_port=dead,
        gate_port=dead,
    )
    offline_url = f"http://127.0.0.1:{offline_port}/api/results"
    nobody_url = f"http://127.0.0.1:{nobody}/api/results"
    test_text = agent_config(
        name="test-2",
        role="test",
        port=test_port,
        blocked="127.0.0.1",
        blocked_port=live_on_127_0_0_2,
        dead_port=dead,
        extra=f"control: {{urls: ['{offline_url}', '{nobody_url}'], "
        "poll_interval_s: 1, max_age_s: 30, timeout_s: 2}",
    )
    offline = Agent(tmp_path, "offline", offline_text, offline_port)
    agents.append(offline)
    test = Agent(tmp_path, "test", test_text, test_port)
    agents.append(test)

    def offline_reported() -> str | None:
        state = offline.api()["vantage"]["state"]
        metrics = test.get("/metrics")
        polled = sample(metrics, "probe_control_up", control=offline_url) is not None
        return metrics if state == "offline" and polled and "dead" in test.verdicts() else None

    await wait_for(offline_reported, "the offline control to be polled")

    def judged_alone() -> dict[str, dict[str, Any]] | None:
        verdicts = test.verdicts()
        dead_v = verdicts.get("dead", {})
        ok = any("not online" in line for line in dead_v.get("evidence", ()))
        return verdicts if ok and "blocked" in verdicts else None

    verdicts = await wait_for(judged_alone, "verdicts judged alone after the offline control")
    for name in ("dead", "blocked"):
        v = verdicts[name]
        assert v["verdict"] != "endpoint_down", v  # an unusable control proves no outage
        note = [line for line in v["evidence"] if line.startswith("judged without")]
        assert note == [
            "judged without a control vantage: the control vantage is not online by its "
            "own offline gate; connection_refused"
        ], v["evidence"]
        assert not any(line.startswith("control ") for line in v["evidence"])
    metrics = test.get("/metrics")
    assert sample(metrics, "probe_control_up", control=offline_url) == 0
    assert sample(metrics, "probe_control_up", control=nobody_url) == 0
    assert sample(metrics, "probe_control_age_seconds", control=nobody_url) is None
    page = test.get("/")
    assert f"{nobody_url} <span class=offline>not usable</span>: connection_refused" in page


# -- the fetch bounds, against a hostile control ------------------------------------------


def _results_document(t: str, ok: bool = True, state: str = "online") -> dict[str, Any]:
    record = {
        "type": "result",
        "t": t,
        "service": "lab",
        "endpoint": "x",
        "probe": "tcp",
        "address": "192.0.2.1",
        "port": 443,
        "ok": ok,
        "failure": None if ok else "connection_refused",
        "failed_operation": None if ok else "connect",
    }
    return {"vantage": {"name": "ctl", "state": state}, "results": [record]}


@pytest.fixture
async def hostile() -> AsyncIterator[str]:
    """A control that misbehaves in every way a fetch must survive; its base URL."""
    big = b"x" * 5000

    async def huge(_: web.Request) -> web.StreamResponse:
        response = web.StreamResponse()  # chunked: no Content-Length to refuse up front
        await response.prepare(_)
        for _i in range(100):
            await response.write(big)
        return response

    async def slow(_: web.Request) -> web.Response:
        await asyncio.sleep(1.5)  # past the 0.5 s timeout; short, the teardown waits for it
        return web.json_response({})

    async def gzipped(_: web.Request) -> web.Response:
        body = gzip.compress(b"{" + b" " * 100000 + b"}")
        return web.Response(body=body, headers={"Content-Encoding": "gzip"})

    async def good(_: web.Request) -> web.Response:
        return web.json_response(_results_document("2030-01-01T00:00:00Z"))

    async def redirect(request: web.Request) -> web.Response:
        raise web.HTTPFound(request.query["to"])

    async def loop(_: web.Request) -> web.Response:
        raise web.HTTPFound("/loop")  # same host, for ever

    async def locked(_: web.Request) -> web.Response:
        raise web.HTTPUnauthorized()

    app = web.Application()
    app.router.add_get("/huge", huge)
    app.router.add_get("/slow", slow)
    app.router.add_get("/gzip", gzipped)
    app.router.add_get("/good", good)
    app.router.add_get("/redirect", redirect)
    app.router.add_get("/loop", loop)
    app.router.add_get("/locked", locked)
    runner = web.AppRunner(app)
    await runner.setup()
    port = free_port()
    site = web.TCPSite(runner, "127.0.0.1", port)
    await site.start()
    yield f"http://127.0.0.1:{port}"
    await runner.cleanup()


@pytest.mark.parametrize(
    ("path", "error"),
    [
        ("/huge", "response larger than max_bytes (20000)"),
        ("/gzip", "compressed response refused"),
        ("/locked", "HTTP status 401"),
        ("/redirect?to=http://127.0.0.2:1/good", "redirect to another host refused"),
        ("/loop", "more than 3 redirects"),
    ],
)
async def test_a_hostile_control_is_refused_within_the_bounds(
    hostile: str, path: str, error: str
) -> None:
    settings = ControlSettings(urls=(hostile,), timeout_s=2, max_bytes=20000)
    async with aiohttp.ClientSession(auto_decompress=False) as session:
        with pytest.raises(ControlError) as caught:
            await fetch(session, hostile + path, settings)
    assert str(caught.value) == error


async def test_a_slow_control_times_out_and_a_same_host_redirect_is_followed(
    hostile: str,
) -> None:
    settings = ControlSettings(urls=(hostile,), timeout_s=0.5, max_bytes=20000)
    async with aiohttp.ClientSession(auto_decompress=False) as session:
        with pytest.raises(TimeoutError):
            await fetch(session, hostile + "/slow", settings)
        body = await fetch(session, hostile + "/redirect?to=/good", settings)
    assert parse_document(body).vantage == "ctl"


def test_only_usable_documents_count() -> None:
    now = "2030-01-01T00:00:00Z"
    with pytest.raises(ControlError, match="not online"):
        parse_document(json.dumps(_results_document(now, state="offline")).encode())
    with pytest.raises(ControlError, match="reached nothing"):
        parse_document(json.dumps(_results_document(now, ok=False)).encode())
    with pytest.raises(ControlError, match="not a /api/results document"):
        parse_document(b"[1, 2]")


async def test_results_older_than_max_age_are_not_judged_with(hostile: str) -> None:
    """The document is usable, but measured long ago: nothing fresh, and it says why."""
    old = json.dumps(_results_document("2020-01-01T00:00:00Z"))
    updated = asyncio.Event()
    settings = ControlSettings(urls=(hostile + "/good",), poll_interval_s=60, max_age_s=60)
    poller = ControlPoller(settings, updated.set)
    poller.start()
    try:
        await asyncio.wait_for(updated.wait(), 10)
    finally:
        await poller.stop()
    ((status),) = poller.statuses()
    assert status.up and status.error is None
    # /good is dated 2030, which counts as the moment it was received: fresh now and
    # until max_age_s later, never for years
    assert len(poller.fresh()) == 1
    assert poller.fresh(now=time.time() + 120) == []
    assert poller.why_alone() == "results older than max_age_s (60)"
    assert parse_document(old.encode()).newest.year == 2020


def test_a_control_clock_running_ahead_cannot_keep_its_results_fresh() -> None:
    """A future date (a fast clock, or a hostile control) is capped at the receive time,
    so a control that stops answering ages out after max_age_s like any other."""
    received = datetime(2026, 12, 6, 12, 0, tzinfo=UTC)
    future = json.dumps(_results_document("2099-01-01T00:00:00Z")).encode()
    assert parse_document(future, received).newest == received


HUGE_PORT = json.dumps(_results_document("2026-01-01T00:00:00Z")).replace("443", "1e400")


@pytest.mark.parametrize(
    ("body", "why"),
    [
        (b"[" * 100_000 + b"]" * 100_000, "RecursionError"),  # nested past the parser
        (HUGE_PORT.encode(), "OverflowError"),  # a port of 1e400 is inf, no integer
    ],
)
def test_odd_json_is_not_a_results_document(body: bytes, why: str) -> None:
    with pytest.raises(ControlError, match=rf"not a /api/results document \({why}\)"):
        parse_document(body)


def parse_time(text: str) -> float:
    from datetime import datetime

    return datetime.fromisoformat(text).timestamp()


# -- config ------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("section", "auth", "message"),
    [
        ("control: {urls: ['http://u:p@127.0.0.1:1/api/results']}", None, "credentials never go"),
        ("control: {urls: ['ftp://127.0.0.1/x']}", None, "is not a control agent URL"),
        ("control: {urls: []}", None, "must not be empty"),
        ("control: {urls: ['http://a.example/x'], basic_auth_file: nope}", None, "no such file"),
        (
            "control: {urls: ['http://a.example/x'], basic_auth_file: a}",
            "just-a-password\n",
            "the first line must be USER:PASSWORD",
        ),
        (
            "control: {urls: ['http://a.example/x'], poll_interval_s: 60, max_age_s: 30}",
            None,
            "max_age_s (30) must be at least poll_interval_s (60)",
        ),
    ],
)
def test_control_config_errors_name_file_line_and_field(
    tmp_path: Path, section: str, auth: str | None, message: str
) -> None:
    if auth is not None:
        (tmp_path / "a").write_text(auth)
    path = tmp_path / "agent.yaml"
    path.write_text(f"vantage: {{name: t}}\nseeds: [controls]\n{section}\n")
    with pytest.raises(ConfigError) as caught:
        load_config(path)
    text = str(caught.value)
    assert text.startswith(f"{path}:3: control") and message in text, text
    assert "just-a-password" not in text  # a credentials file is never quoted


def test_a_control_vantage_takes_no_control_and_credentials_stay_out_of_repr(
    tmp_path: Path,
) -> None:
    path = tmp_path / "agent.yaml"
    (tmp_path / "a").write_text("watcher:s3cret\n")
    body = "seeds: [controls]\ncontrol: {urls: ['https://c.example:9464/api/results'], "
    body += "basic_auth_file: a}\n"
    path.write_text("vantage: {name: t, role: control}\n" + body)
    with pytest.raises(ConfigError, match=r":3: control: a vantage with role: control takes no"):
        load_config(path)
    path.write_text("vantage: {name: t, role: test}\n" + body)
    config = load_config(path)
    assert config.control is not None and config.control.basic_auth == ("watcher", "s3cret")
    assert "s3cret" not in repr(config)
