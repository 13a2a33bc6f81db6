"""Attack 8 (the smaller ones): archive records that are not what the reader expects, a
missing archive directory, shutdown under HTTP load, and what an unauthenticated remote
client may read.

Before: ``probe archive`` crashed with a traceback on a record whose ``annotations`` is
not an object and exited 0 in silence on a missing ``--dir``; SIGTERM during scrapes
closed the worker pools first (16 RuntimeErrors); without auth, anyone who could reach the
agent read the config's path and a rejected reload's error text.
"""

from __future__ import annotations

import base64
import contextlib
import json
import signal
import threading
from html import escape
from pathlib import Path

import bcrypt

from probe.config.settings import AgentConfig, ControlSettings
from probe.control import ControlPoller, ControlStatus
from probe.results import ResultStore
from probe.statuspage import render_status_page
from tests.agentproc import needs_unshare, run_driver, run_probe
from tests.test_daemon import AgentProcess, http, wait_until


def test_probe_archive_reads_past_records_with_odd_annotations(tmp_path: Path) -> None:
    good = {"annotations": {"service": "lab", "status": "failed"}, "test_keys": {}}
    odd = [{"annotations": ["not", "an", "object"]}, {"annotations": "x"}, {"annotations": 7}]
    lines = [json.dumps(r) for r in [*odd, good]]
    (tmp_path / "measurements.jsonl").write_text("\n".join(lines) + "\n")
    for flags in (["--service", "lab"], ["--failed"], ["--probe", "tcp"], []):
        done = run_probe("archive", "--dir", str(tmp_path), *flags)
        assert done.returncode == 0 and "Traceback" not in done.stderr, done.stderr
    assert json.loads(run_probe("archive", "--dir", str(tmp_path), "--service", "lab").stdout)


def test_probe_archive_on_a_missing_directory_is_an_error(tmp_path: Path) -> None:
    done = run_probe("archive", "--dir", str(tmp_path / "nope"))
    assert done.returncode == 2
    assert done.stderr == f"probe: archive: no archive directory at {tmp_path / 'nope'}\n"


def test_sigterm_during_a_scrape_flood_logs_no_errors(tmp_path: Path) -> None:
    agent = AgentProcess(tmp_path)
    agent.start()
    stop = threading.Event()

    def scrape() -> None:
        while not stop.is_set():
            for path in ("/metrics", "/"):
                with contextlib.suppress(OSError):  # refused or reset: the agent is going
                    http(agent.url + path, timeout=5)

    scrapers = [threading.Thread(target=scrape) for _ in range(8)]
    try:
        for t in scrapers:
            t.start()
        http(agent.url + "/metrics")
        assert agent.proc is not None
        agent.proc.send_signal(signal.SIGTERM)
        assert agent.proc.wait(timeout=10) == 0
    finally:
        stop.set()
        for t in scrapers:
            t.join(timeout=10)
    events = [json.loads(line) for line in agent.log.read_text().splitlines() if line.strip()]
    errors = [e for e in events if e["level"] in ("error", "critical")]
    assert errors == [], errors[:3]
    assert [e["msg"] for e in events][-2:] == ["shutting down", "stopped"]


REMOTE_DRIVER = r"""
import http.client, json, subprocess, sys, time
def sh(*a): subprocess.run(a, check=True)
sh("ip", "link", "set", "lo", "up")
sh("ip", "addr", "add", "10.9.0.1/32", "dev", "lo")  # a client address that is not loopback
config = sys.argv[1]
agent = subprocess.Popen([sys.executable, "-m", "probe", "run", "-c", config],
                         stderr=subprocess.DEVNULL)
def ask(source, method, path):
    conn = http.client.HTTPConnection("10.9.0.1", 9464, timeout=5, source_address=(source, 0))
    conn.request(method, path, headers={"Host": "10.9.0.1:9464"})
    r = conn.getresponse()
    return r.status, r.read().decode()
out = {}
try:
    for _ in range(100):
        try:
            if ask("127.0.0.1", "GET", "/healthz")[0] == 200:
                break
        except OSError:
            time.sleep(0.1)
    open(config, "a").write("seeds: [nope]\n")  # a second seeds key: rejected
    for who, source in (("local", "127.0.0.1"), ("remote", "10.9.0.1")):
        out[who] = {"reload": ask(source, "POST", "/-/reload"), "page": ask(source, "GET", "/")}
finally:
    agent.terminate()
    agent.wait(timeout=10)
print(json.dumps(out))
"""


@needs_unshare("for a namespace with a non-loopback client address")
def test_an_unauthenticated_remote_client_sees_no_path_and_no_reload_error(
    tmp_path: Path,
) -> None:
    config = tmp_path / "agent.yaml"
    config.write_text(
        "listen: 0.0.0.0:9464\n"
        "web: {allowed_hosts: ['10.9.0.1']}\n"
        "archive: {path: null}\n"
        "resolvers: {system: false, udp: ['127.0.0.1:9']}\n"
        "services:\n  - service: lab\n    source: t\n    endpoints:\n"
        "      - {host: 127.0.0.1, ports: [9], role: signalling, probes: [tcp], source: t,"
        " confidence: C}\n"
    )
    out = run_driver(REMOTE_DRIVER, "-n", str(config), workdir=tmp_path, cwd=tmp_path, timeout_s=60)
    local, remote = out["local"], out["remote"]
    assert local["reload"][0] == 400 and str(config) in local["reload"][1]
    assert remote["reload"] == [400, "reload rejected: the reason is in the agent's log\n"]
    assert str(config) in local["page"][1]
    assert remote["page"][0] == 200 and str(config) not in remote["page"][1]
    assert "(path hidden)" in remote["page"][1]


CONTROLS_DRIVER = r"""
import http.client, json, subprocess, sys, time
def sh(*a): subprocess.run(a, check=True)
sh("ip", "link", "set", "lo", "up")
sh("ip", "addr", "add", "10.9.0.1/32", "dev", "lo")  # a client address that is not loopback
config = sys.argv[1]
agent = subprocess.Popen([sys.executable, "-m", "probe", "run", "-c", config],
                         stderr=subprocess.DEVNULL)
def ask(source, path):
    conn = http.client.HTTPConnection("10.9.0.1", 9464, timeout=5, source_address=(source, 0))
    conn.request("GET", path, headers={"Host": "10.9.0.1:9464"})
    r = conn.getresponse()
    return r.status, r.read().decode()
out = {}
try:
    for _ in range(100):  # until the first control poll has failed (a refused connect)
        try:
            controls = json.loads(ask("127.0.0.1", "/api/results")[1])["controls"]
            if controls and controls[0]["error"]:
                break
        except OSError:
            pass
        time.sleep(0.1)
    out["controls"] = controls
    out["local"] = ask("127.0.0.1", "/")
    out["remote"] = ask("10.9.0.1", "/")
    out["remote_api"] = json.loads(ask("10.9.0.1", "/api/results")[1])["controls"]
finally:
    agent.terminate()
    agent.wait(timeout=10)
print(json.dumps(out))
"""


@needs_unshare("for a namespace with a non-loopback client address")
def test_an_unauthenticated_remote_client_sees_no_control_url_or_error(tmp_path: Path) -> None:
    """A control URL names an internal host and port, and its poll error says what failed
    there: the status page and /api/results show both to loopback (and authenticated)
    clients only."""
    control = "http://10.9.0.1:9/api/results"  # refused: nothing listens on port 9
    config = tmp_path / "agent.yaml"
    config.write_text(
        "listen: 0.0.0.0:9464\n"
        "web: {allowed_hosts: ['10.9.0.1']}\n"
        "archive: {path: null}\n"
        f"control: {{urls: ['{control}'], poll_interval_s: 60}}\n"
        "resolvers: {system: false, udp: ['127.0.0.1:9']}\n"
        "services:\n  - service: lab\n    source: t\n    endpoints:\n"
        "      - {host: 127.0.0.1, ports: [9], role: signalling, probes: [tcp], source: t,"
        " confidence: C}\n"
    )
    out = run_driver(
        CONTROLS_DRIVER, "-n", str(config), workdir=tmp_path, cwd=tmp_path, timeout_s=60
    )
    (status,) = out["controls"]
    error = status["error"]
    assert status["url"] == control and error and not status["up"]
    local, remote = out["local"], out["remote"]
    assert local[0] == 200 and control in local[1] and escape(error) in local[1]
    assert remote[0] == 200 and "not usable" in remote[1]
    assert control not in remote[1] and "10.9.0.1" not in remote[1]
    assert escape(error) not in remote[1]
    # /api/results alike: the control's state, not where it is or what failed there
    assert out["remote_api"] == [{**status, "url": None, "error": None}]


def test_the_status_page_never_shows_a_url_s_credentials() -> None:
    """The loader refuses credentials in a control URL; the page would drop them anyway."""
    store = ResultStore()
    url = "https://watcher:hunter2@ctl.example:9464/api/results"
    store.set_controls([ControlStatus(url, False, error="HTTP status 401")])
    for trusted in (True, False):
        page = render_status_page(store.snapshot(), AgentConfig(), trusted)
        assert "hunter2" not in page and "watcher" not in page
    page = render_status_page(store.snapshot(), AgentConfig())
    assert "https://ctl.example:9464/api/results" in page
    # what /api/results, the metrics' `control` label and the log get from the poller
    (status,) = ControlPoller(ControlSettings(urls=(url,)), lambda: None).statuses()
    assert status.url == "https://ctl.example:9464/api/results"


def test_basic_auth_covers_the_status_page_like_every_other_path(tmp_path: Path) -> None:
    """There is no per-path auth: with ``web.basic_auth_users`` set, the status page (and
    its control URLs) is behind the same password as ``/api/results``."""
    hashed = bcrypt.hashpw(b"s3cret", bcrypt.gensalt(rounds=4)).decode()
    agent = AgentProcess(tmp_path)
    agent.write_config(extra=f'web: {{basic_auth_users: {{admin: "{hashed}"}}}}')
    token = {"Authorization": "Basic " + base64.b64encode(b"admin:s3cret").decode()}
    paths = ("/", "/api/results", "/metrics", "/healthz", "/-/ready")
    agent.spawn()  # not start(): its readiness check sends no password
    try:
        wait_until(lambda: http(agent.url + "/-/ready", headers=token)[0] == 200, "ready")
        for path in paths:
            assert http(agent.url + path)[0] == 401, path
            assert http(agent.url + path, headers=token)[0] == 200, path
    finally:
        agent.stop()
