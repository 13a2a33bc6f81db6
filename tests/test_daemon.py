"""`probe run` as a real process: HTTP endpoints, a real Prometheus, reload, signals, crashes.

The agent measures only loopback: its own HTTP port (a TCP target that is up) and a
closed port (a target that fails).  Nothing leaves the machine.
"""

from __future__ import annotations

import json
import signal
import subprocess
import tempfile
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.agentproc import (
    REPO,
    free_port,
    needs_unshare,
    required_tool,
    run_driver,
    run_probe,
    sample,
    samples,
    start_agent,
)


def config_text(port: int, archive: Path, dead_port: int, extra: str = "") -> str:
    return f"""
vantage: {{name: daemon-test, country: ZZ, asn: AS64500, role: test}}
schedule: {{interval_s: 2, jitter_s: 0.5, min_spacing_s: 1}}
timeouts: {{connect_s: 1}}
resolvers: {{system: false, udp: ["127.0.0.1:9"]}}
seeds: []
listen: 127.0.0.1:{port}
log_format: json
archive: {{path: {archive}, max_bytes: 1000000, keep: 2}}
services:
  - service: controls
    source: test
    endpoints:
      - {{name: self, host: 127.0.0.1, ports: [{port}], role: control, probes: [tcp],
          source: test, confidence: C}}
  - service: lab
    source: test
    endpoints:
      - {{name: up, host: 127.0.0.1, ports: [{port}], role: signalling, probes: [tcp],
          source: test, confidence: C}}
      - {{name: down, host: 127.0.0.1, ports: [{dead_port}], role: signalling, probes: [tcp],
          source: test, confidence: C}}
{extra}
"""


def http(
    url: str, *, method: str = "GET", timeout: float = 5, headers: dict[str, str] | None = None
) -> tuple[int, str]:
    request = urllib.request.Request(url, method=method, headers=headers or {})
    try:
        with urllib.request.urlopen(request, timeout=timeout) as response:
            return response.status, response.read().decode()
    except urllib.error.HTTPError as err:
        return err.code, err.read().decode()


def wait_until(check: Callable[[], Any], what: str, limit_s: float = 20) -> Any:
    """Poll a condition a bounded number of times (the agent works on its own clock)."""
    deadline = time.monotonic() + limit_s
    while time.monotonic() < deadline:
        try:
            value = check()
        except (OSError, urllib.error.URLError):
            value = None
        if value:
            return value
        time.sleep(0.2)
    raise AssertionError(f"timed out waiting for {what}")


class AgentProcess:
    def __init__(self, workdir: Path) -> None:
        self.workdir = workdir
        self.port = free_port()
        self.dead_port = free_port()  # bound then released: nothing listens there
        self.archive = workdir / "archive"
        self.config = workdir / "agent.yaml"
        self.write_config()
        self.proc: subprocess.Popen[bytes] | None = None
        self.log = workdir / "agent.log"

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def write_config(self, extra: str = "", text: str | None = None) -> None:
        body = (
            text
            if text is not None
            else config_text(self.port, self.archive, self.dead_port, extra)
        )
        self.config.write_text(body)

    def spawn(self) -> None:
        """Start ``probe run`` without waiting for it (its log goes to ``self.log``)."""
        log = self.log.open("ab")
        self.proc = start_agent(self.config, stdout=log, stderr=log)

    def start(self) -> None:
        self.spawn()
        wait_until(lambda: http(self.url + "/-/ready")[0] == 200, "agent ready")

    def metrics(self) -> str:
        return http(self.url + "/metrics")[1]

    def stop(self) -> int:
        assert self.proc is not None
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                return self.proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
                raise
        return self.proc.returncode


@pytest.fixture
def agent(tmp_path: Path) -> Iterator[AgentProcess]:
    a = AgentProcess(tmp_path)
    a.start()
    yield a
    if a.proc is not None and a.proc.poll() is None:
        a.proc.kill()
        a.proc.wait()


def test_metrics_report_success_failure_and_vantage(agent: AgentProcess) -> None:
    def both_measured() -> str | None:
        m = agent.metrics()
        measured = [sample(m, "probe_success", endpoint=e) for e in ("up", "down")]
        # verdicts are judged in a worker thread shortly after the results they judge
        measured += [sample(m, "probe_verdict", endpoint=e) for e in ("up", "down")]
        return m if None not in measured else None

    text = wait_until(both_measured, "both lab endpoints measured")
    assert sample(text, "probe_success", service="lab", endpoint="up", probe="tcp") == 1
    assert sample(text, "probe_success", service="lab", endpoint="down", probe="tcp") == 0
    assert sample(text, "probe_failure_info", endpoint="down", failure="connection_refused") == 1
    assert sample(text, "probe_vantage_online") == 1
    assert sample(text, "probe_vantage_info", vantage="daemon-test", asn="AS64500") == 1
    assert sample(text, "probe_config_last_reload_successful") == 1
    verdicts = {
        dict(labels)["verdict"]: value
        for (name, labels), value in samples(text).items()
        if name == "probe_verdict" and dict(labels).get("endpoint") == "down"
    }
    # one series (the current verdict, value 1) by default, and it is not "ok"
    assert list(verdicts.values()) == [1] and "ok" not in verdicts
    assert sample(text, "probe_verdict", endpoint="up", verdict="ok") == 1


def test_promtool_accepts_the_exposition(agent: AgentProcess) -> None:
    promtool = required_tool("promtool", package="prometheus")
    wait_until(
        lambda: sample(agent.metrics(), "probe_success", endpoint="down") is not None,
        "a measurement",
    )
    check = subprocess.run(
        [promtool, "check", "metrics"],
        input=agent.metrics().encode(),
        capture_output=True,
        timeout=30,
    )
    assert check.returncode == 0, check.stdout + check.stderr


def test_api_results_and_health(agent: AgentProcess) -> None:
    assert http(agent.url + "/healthz") == (200, "ok\n")
    data = wait_until(
        lambda: (
            (d := json.loads(http(agent.url + "/api/results")[1])) and len(d["results"]) >= 3 and d
        ),
        "three results",
    )
    assert data["vantage"]["name"] == "daemon-test" and data["vantage"]["state"] == "online"
    down = [r for r in data["results"] if r["endpoint"] == "down"]
    assert down and down[0]["failure"] == "connection_refused"
    assert down[0]["failed_operation"] == "connect"


def test_no_endpoint_accepts_a_target(agent: AgentProcess) -> None:
    """The agent cannot be used as a scanner: query strings are ignored, no probe route."""
    status, _ = http(agent.url + "/probe?target=127.0.0.1:22&module=tcp")
    assert status == 404
    status, body = http(agent.url + "/api/results?target=127.0.0.2")
    assert status == 200 and "127.0.0.2" not in body


CHROMIUM_DRIVER = r"""
import json, signal, subprocess, sys, time, urllib.request
chromium, config, port, profile = sys.argv[1:5]
subprocess.run(["ip", "link", "set", "lo", "up"], check=True)
links = subprocess.run(["ip", "-o", "link"], capture_output=True, text=True).stdout
agent = subprocess.Popen([sys.executable, "-m", "probe", "run", "-c", config],
                         stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
url = f"http://127.0.0.1:{port}/"
page = ""
# bounded: 60 s for both states to show (a loaded CI machine).  The live endpoint is the
# agent's own port: a round that ran before it listened shows it refused until the next.
for _ in range(300):
    try:
        with urllib.request.urlopen(url, timeout=2) as r:
            page = r.read().decode()
        if "connection_refused" in page and "<td class=ok>" in page:  # as served
            break
    except OSError:
        pass
    time.sleep(0.2)
dom = subprocess.run(
    [chromium, "--headless", "--no-sandbox", "--disable-gpu", "--no-first-run",
     "--disable-background-networking", "--disable-component-update", "--disable-sync",
     "--disable-default-apps", "--disable-domain-reliability", "--no-pings",
     "--host-resolver-rules=MAP * ~NOTFOUND, EXCLUDE 127.0.0.1",
     f"--user-data-dir={profile}", "--dump-dom", url],
    capture_output=True, text=True, timeout=60)
agent.send_signal(signal.SIGTERM)
agent.wait(timeout=10)
print(json.dumps({"links": links, "rc": dom.returncode, "dom": dom.stdout,
                  "stderr": dom.stderr[-2000:]}))
"""


@needs_unshare("for an empty network namespace around the browser")
def test_status_page_in_headless_chromium(tmp_path: Path) -> None:
    """The status page as a browser renders it.  Chromium looks up Google hosts even with
    background networking off, so the browser and the agent share an empty network
    namespace (only loopback exists) and a resolver rule maps every other name to nothing:
    no query can leave the machine."""
    chromium = required_tool("chromium", package="chromium")
    agent = AgentProcess(tmp_path)  # ports are picked here but only used in the namespace
    out = run_driver(
        CHROMIUM_DRIVER,
        "-n",
        chromium,
        str(agent.config),
        str(agent.port),
        str(tmp_path / "chromium"),
        workdir=tmp_path,
        cwd=REPO,
        timeout_s=150,
    )
    assert [line.split(":")[1].strip() for line in out["links"].splitlines()] == ["lo"]
    assert out["rc"] == 0, out["stderr"]
    html = out["dom"]
    assert '<table id="matrix">' in html
    assert "daemon-test" in html
    assert 'class="failed"' in html and "connection_refused" in html  # the dead endpoint
    assert 'class="ok"' in html  # the live one


def test_real_prometheus_scrapes_the_agent(agent: AgentProcess, tmp_path: Path) -> None:
    prometheus = required_tool("prometheus", package="prometheus")
    prom_port = free_port()
    (tmp_path / "prometheus.yml").write_text(
        "global: {scrape_interval: 1s, evaluation_interval: 1s}\n"
        "scrape_configs:\n"
        f"  - job_name: probe\n    static_configs: [{{targets: ['127.0.0.1:{agent.port}']}}]\n"
    )
    prom = subprocess.Popen(
        [
            prometheus,
            f"--config.file={tmp_path / 'prometheus.yml'}",
            f"--storage.tsdb.path={tmp_path / 'tsdb'}",
            f"--web.listen-address=127.0.0.1:{prom_port}",
        ],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        query = urllib.parse.quote('probe_success{service="lab"}')

        def series() -> dict[str, float] | None:
            status, body = http(f"http://127.0.0.1:{prom_port}/api/v1/query?query={query}")
            result = json.loads(body)["data"]["result"] if status == 200 else []
            got = {r["metric"]["endpoint"]: float(r["value"][1]) for r in result}
            return got if len(got) == 2 else None

        assert wait_until(series, "prometheus to scrape the agent", limit_s=45) == {
            "up": 1.0,
            "down": 0.0,
        }
    finally:
        prom.terminate()
        prom.wait(timeout=10)


def test_reload_rejects_a_bad_config_and_applies_a_good_one(agent: AgentProcess) -> None:
    assert agent.proc is not None
    agent.write_config(text="vantage: {name: x, colour: blue}\n")
    agent.proc.send_signal(signal.SIGHUP)
    wait_until(
        lambda: sample(agent.metrics(), "probe_config_last_reload_successful") == 0,
        "the bad reload to be reported",
    )
    assert agent.proc.poll() is None  # still running on the old config
    assert sample(agent.metrics(), "probe_vantage_info", vantage="daemon-test") == 1

    extra = f"""      - {{name: added, host: 127.0.0.1, ports: [{agent.port}], role: web,
          probes: [tcp], source: test, confidence: C}}"""
    agent.write_config(extra)
    status, body = http(agent.url + "/-/reload", method="POST")
    assert status == 200, body
    wait_until(
        lambda: sample(agent.metrics(), "probe_success", endpoint="added") == 1,
        "the added endpoint to be measured",
    )
    assert sample(agent.metrics(), "probe_config_last_reload_successful") == 1

    agent.write_config(text="seeds: [nope]\n")
    status, body = http(agent.url + "/-/reload", method="POST")
    assert status == 400 and "agent.yaml" in body


def test_reload_from_another_origin_is_refused(agent: AgentProcess) -> None:
    """A page on another site in the operator's browser must not be able to POST a reload."""
    before = sample(agent.metrics(), "probe_config_last_reload_success_timestamp_seconds")
    status, body = http(
        agent.url + "/-/reload", method="POST", headers={"Origin": "https://evil.example"}
    )
    assert (status, body) == (403, "cross-origin reload refused\n")
    same = http(
        agent.url + "/-/reload", method="POST", headers={"Origin": f"http://127.0.0.1:{agent.port}"}
    )
    assert same[0] == 200
    after = sample(agent.metrics(), "probe_config_last_reload_success_timestamp_seconds")
    assert before is not None and after is not None and after > before  # only that one ran


def test_sigterm_stops_cleanly_within_five_seconds(agent: AgentProcess) -> None:
    assert agent.proc is not None
    wait_until(lambda: agent.archive.joinpath("measurements.jsonl").exists(), "archive")
    agent.proc.send_signal(signal.SIGTERM)
    assert agent.proc.wait(timeout=5) == 0
    events = [json.loads(line) for line in agent.log.read_text().splitlines() if line.strip()]
    assert [e["msg"] for e in events][-2:] == ["shutting down", "stopped"]


def test_kill_9_loses_no_completed_measurement(agent: AgentProcess) -> None:
    assert agent.proc is not None
    current = agent.archive / "measurements.jsonl"
    wait_until(
        lambda: current.exists() and current.read_text().count("\n") >= 6,
        "six archived measurements",
    )
    agent.proc.kill()
    agent.proc.wait()
    lines_at_kill = current.read_bytes().count(b"\n")

    read = run_probe("archive", "--dir", str(agent.archive))
    assert read.returncode == 0, read.stderr
    records = [json.loads(line) for line in read.stdout.splitlines()]
    assert len(records) == lines_at_kill  # every complete line is readable
    assert {r["probe_asn"] for r in records} == {"AS64500"}

    agent.start()  # a restart appends after whatever the crash left
    wait_until(lambda: current.read_bytes().count(b"\n") > lines_at_kill, "new measurements")
    again = run_probe("archive", "--dir", str(agent.archive), "--failed")
    failed = [json.loads(line) for line in again.stdout.splitlines()]
    assert failed and all(r["test_keys"]["probe_result"]["failure"] for r in failed)


if __name__ == "__main__":  # pragma: no cover - manual debugging aid
    with tempfile.TemporaryDirectory() as d:
        a = AgentProcess(Path(d))
        a.start()
        print(a.metrics())
        a.stop()


def test_web_tls_and_basic_auth(tmp_path: Path) -> None:
    """With `web:` set, every path needs the bcrypt-checked password, over verified TLS."""
    import base64
    import ssl

    import bcrypt

    from probe.lab.certs import CertificateAuthority

    ca = CertificateAuthority()
    cert, key = ca.issue("127.0.0.1").write(tmp_path, "web")
    hashed = bcrypt.hashpw(b"s3cret", bcrypt.gensalt(rounds=4)).decode()
    agent = AgentProcess(tmp_path)
    web = f"""web:
  tls_cert_file: {cert}
  tls_key_file: {key}
  basic_auth_users: {{admin: "{hashed}"}}
"""
    agent.write_config(text=config_text(agent.port, agent.archive, agent.dead_port) + web)
    context = ssl.create_default_context(cafile=str(ca.write_ca(tmp_path / "ca.pem")))
    url = f"https://127.0.0.1:{agent.port}/metrics"

    def get(auth: str | None) -> int:
        request = urllib.request.Request(url)
        if auth:
            request.add_header("Authorization", "Basic " + base64.b64encode(auth.encode()).decode())
        try:
            with urllib.request.urlopen(request, timeout=5, context=context) as response:
                return int(response.status)
        except urllib.error.HTTPError as err:
            return err.code

    agent.spawn()  # not start(): its readiness check speaks plain HTTP
    try:
        assert wait_until(lambda: get("admin:s3cret") == 200, "the TLS server to answer")
        assert get(None) == 401
        assert get("admin:wrong") == 401
        assert get("nobody:s3cret") == 401
        with pytest.raises((urllib.error.URLError, ConnectionError)):  # no plain HTTP
            urllib.request.urlopen(f"http://127.0.0.1:{agent.port}/healthz", timeout=5)
    finally:
        agent.stop()


DEFAULT_CONFIG_DRIVER = r"""
import json, signal, subprocess, sys, time, urllib.request
subprocess.run(["ip", "link", "set", "lo", "up"], check=True)
agent = subprocess.Popen([sys.executable, "-m", "probe", "run"], stderr=subprocess.DEVNULL)
def get(path):
    with urllib.request.urlopen("http://127.0.0.1:9464" + path, timeout=2) as r:
        return r.read().decode()
out = {}
for _ in range(100):
    try:
        out["ready"] = get("/-/ready")
        out["api"] = json.loads(get("/api/results"))
        if out["api"]["results"]:
            break
    except OSError:
        pass
    time.sleep(0.2)
out["metrics"] = get("/metrics")
out["page"] = get("/")
agent.send_signal(signal.SIGTERM)
out["rc"] = agent.wait(timeout=10)
print(json.dumps(out))
"""


@needs_unshare("for an empty network namespace")
def test_run_on_the_default_config_in_an_empty_namespace(tmp_path: Path) -> None:
    """The README's main job as a daemon, where nothing can leave: offline, but serving."""
    # cwd: the default config's relative archive path lands in tmp_path
    out = run_driver(DEFAULT_CONFIG_DRIVER, "-n", workdir=tmp_path, cwd=tmp_path, timeout_s=90)
    assert out["rc"] == 0
    assert out["api"]["vantage"]["state"] == "offline"
    assert {r["skipped"] for r in out["api"]["results"]} == {"vantage_offline"}
    assert sample(out["metrics"], "probe_vantage_online") == 0
    assert sample(out["metrics"], "probe_success") is None  # offline: nothing is "blocked"
    assert "OFFLINE" in out["page"]
    archived = (tmp_path / "archive" / "measurements.jsonl").read_text().splitlines()
    assert len(archived) >= len(out["api"]["results"]) > 0
