"""Two vantages, one view: the multi-vantage chain of docs/multi-vantage.md, end to end.

In the lab, the censored client namespace (a test vantage) and the uncensored control
namespace (a control vantage) each run ``probe run`` and a Prometheus in agent mode
(``--enable-feature=agent``, configured from the shipped ``configs/prometheus-agent.yml``)
that remote-writes to a central Prometheus in the servers namespace
(``--web.enable-remote-write-receiver``, from ``configs/prometheus-central.yml``).  The
central one evaluates ``configs/alerts.yml`` and sends to a real Alertmanager, whose
webhook is a tiny HTTP server of this test (a socket inside the servers namespace).
The test vantage also polls the control agent's ``/api/results`` (its ``control:`` section).

1. Clean network: both vantages read ``ok`` at the central Prometheus; nothing fires.
2. The censor resets connects to the chat server for the client only:
   ``BlockedHereFineAtControl`` reaches the webhook, naming the test vantage.
3. The censor is lifted and the server is stopped: a dead server, judged on both
   vantages: ``endpoint_down`` on the test vantage (its control fails too) and on the
   control vantage, which never reports a censorship verdict.

All traffic stays inside the lab's namespaces (10.200.0.0/16) and their loopbacks.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
import threading
import time
import urllib.parse
import urllib.request
from collections.abc import Callable, Iterator
from http.server import BaseHTTPRequestHandler, HTTPServer
from pathlib import Path
from typing import Any

import pytest
import yaml

from probe.lab import censor as c
from probe.lab.netns import ADDR, ns_argv
from probe.lab.topology import Lab
from tests.agentproc import REPO
from tests.test_daemon import required_tool

pytestmark = pytest.mark.lab

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
CHAT = ADDR.service(1)  # the endpoint the censor blocks, then the server that dies
GATE = ADDR.service(2)  # the offline gate's control target (never blocked)
CENTRAL = ADDR.service(3)  # the central Prometheus, reachable from both vantages
AGENT_PORT = 9464
VANTAGES = {"client": ("msk-test", "test"), "control": ("ams-control", "control")}


def probe_config(name: str, role: str, listen: str, control_url: str | None) -> str:
    control = ""
    if control_url:
        control = (
            f"control: {{urls: ['{control_url}'], poll_interval_s: 1, max_age_s: 6, timeout_s: 2}}"
        )
    return f"""
vantage: {{name: {name}, country: ZZ, asn: AS64500, role: {role}}}
schedule: {{interval_s: 1.5, jitter_s: 0.2, min_spacing_s: 1}}
timeouts: {{connect_s: 1}}
resolvers: {{system: false}}
seeds: []
listen: {listen}
archive: {{path: null}}
log_format: logfmt
services:
  - service: controls
    source: test
    endpoints:
      - {{name: gate, host: {GATE}, ports: [443], role: control, probes: [tcp],
          source: test, confidence: C}}
  - service: lab
    source: test
    endpoints:
      - {{name: chat, host: {CHAT}, ports: [443], role: signalling, probes: [tcp],
          source: test, confidence: C}}
{control}
"""


def agent_prometheus(vantage: str, scrape: str) -> str:
    """The shipped agent-mode config, pointed at the lab (fast intervals for the test)."""
    config = yaml.safe_load((REPO / "configs" / "prometheus-agent.yml").read_text())
    config["global"].update({"scrape_interval": "1s", "scrape_timeout": "1s"})
    config["global"]["external_labels"]["vantage"] = vantage
    config["scrape_configs"][0]["static_configs"] = [{"targets": [scrape]}]
    (remote,) = config["remote_write"]
    remote["url"] = f"http://{CENTRAL}:9090/api/v1/write"
    remote["queue_config"] = {"batch_send_deadline": "1s"}
    return yaml.safe_dump(config)


def central_prometheus(rules: Path, alertmanager: str) -> str:
    config = yaml.safe_load((REPO / "configs" / "prometheus-central.yml").read_text())
    config["global"]["evaluation_interval"] = "1s"
    config["rule_files"] = [str(rules)]
    config["alerting"]["alertmanagers"][0]["static_configs"] = [{"targets": [alertmanager]}]
    config["scrape_configs"] = []
    return yaml.safe_dump(config)


def fast_rules(path: Path) -> Path:
    """A copy of configs/alerts.yml whose ``for:`` durations are 1 s, so the test does not
    wait 10 minutes; the expressions are the shipped ones, unchanged."""
    rules = yaml.safe_load((REPO / "configs" / "alerts.yml").read_text())
    for group in rules["groups"]:
        for rule in group["rules"]:
            if "for" in rule:
                rule["for"] = "1s"  # shortened for the test (shipped: 10m)
    path.write_text(
        "# TEST COPY of configs/alerts.yml: every `for:` shortened to 1s\n" + yaml.safe_dump(rules)
    )
    return path


class Webhook:
    """Alertmanager's webhook receiver: a plain HTTP server on a socket made inside the
    servers namespace (127.0.0.1 there), served by a thread of this process."""

    def __init__(self, lab: Lab) -> None:
        import socket

        self.alerts: list[dict[str, Any]] = []
        received = self.alerts

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                length = int(self.headers.get("Content-Length", "0"))
                payload = json.loads(self.rfile.read(min(length, 1 << 20)))
                received.extend(payload.get("alerts", []))
                self.send_response(200)
                self.end_headers()

            def log_message(self, *_: Any) -> None:
                pass

        sock = lab.socket("servers", socket.AF_INET, socket.SOCK_STREAM)
        sock.bind(("127.0.0.1", 0))
        sock.listen(16)
        self.port = sock.getsockname()[1]
        self.server = HTTPServer(("127.0.0.1", self.port), Handler, bind_and_activate=False)
        self.server.socket.close()
        self.server.socket = sock
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self.thread.start()

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


class Processes:
    """Long-running processes inside lab namespaces, each in its own process group,
    stopped (SIGTERM, then SIGKILL) when the test ends, whatever happened."""

    def __init__(self, lab: Lab, logdir: Path) -> None:
        self.lab = lab
        self.logdir = logdir
        self.procs: list[tuple[str, subprocess.Popen[bytes]]] = []

    def start(self, role: str, name: str, argv: list[str]) -> None:
        log = (self.logdir / f"{name}.log").open("ab")
        env = {**os.environ, "PYTHONPATH": str(REPO), "PYTHONUNBUFFERED": "1"}
        proc = subprocess.Popen(
            ns_argv(self.lab.ns(role), argv),  # type: ignore[arg-type]
            stdout=log,
            stderr=log,
            env=env,
            cwd=self.logdir,
            start_new_session=True,
        )
        log.close()
        self.procs.append((name, proc))

    def check_alive(self) -> None:
        for name, proc in self.procs:
            if proc.poll() is not None:
                tail = (self.logdir / f"{name}.log").read_text()[-2000:]
                raise AssertionError(f"{name} exited with {proc.returncode}:\n{tail}")

    def stop(self) -> None:
        # Last started first: an agent-mode Prometheus flushes to the central one on
        # SIGTERM, and would wait for it (then be killed) if the central one went first.
        for _, proc in reversed(self.procs):
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGTERM)
            try:
                proc.wait(timeout=5)
            except subprocess.TimeoutExpired:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()


@pytest.fixture
def processes(netns_lab: Lab, tmp_path: Path) -> Iterator[Processes]:
    procs = Processes(netns_lab, tmp_path)
    yield procs
    procs.stop()


def get_json(lab: Lab, role: str, url: str) -> Any:
    """GET a JSON document from inside ``role``'s namespace."""

    def fetch() -> Any:
        with urllib.request.urlopen(url, timeout=3) as response:
            return json.loads(response.read())

    return lab.in_ns(role, fetch)  # type: ignore[arg-type]


def wait_for(what: str, check: Callable[[], Any], procs: Processes, limit_s: float) -> Any:
    deadline = time.monotonic() + limit_s
    while time.monotonic() < deadline:
        procs.check_alive()
        with contextlib.suppress(OSError, ValueError, KeyError):
            value = check()
            if value:
                return value
        time.sleep(0.5)
    raise AssertionError(f"timed out after {limit_s} s waiting for {what}")


def test_blocked_here_fine_at_control_reaches_alertmanager_and_a_dead_server_pages_nobody(
    netns_lab: Lab, processes: Processes, tmp_path: Path
) -> None:
    prometheus = required_tool("prometheus", package="prometheus")
    alertmanager = required_tool("prometheus-alertmanager", package="prometheus-alertmanager")
    lab = netns_lab
    # The test vantage fetches the control's /api/results across the censor: the lab has
    # no path between the two vantages by default, so give the censor a route to the
    # control's subnet and let the servers namespace forward between its two links.
    for argv in (
        ["ip", "route", "replace", "10.200.3.0/24", "via", ADDR.servers_censor4],
        ["sysctl", "-q", "-w", "net.ipv4.ip_forward=1"],
    ):
        role = "censor" if argv[0] == "ip" else "servers"
        subprocess.run(ns_argv(lab.ns(role), argv), check=True)  # type: ignore[arg-type]
    gate = lab.serve([{"kind": "tcp", "host": GATE, "port": 443, "mode": "close"}])
    chat = lab.serve([{"kind": "tcp", "host": CHAT, "port": 443, "mode": "close"}])
    hook = Webhook(lab)
    try:
        _run_chain(lab, processes, tmp_path, hook, prometheus, alertmanager, chat)
    finally:
        hook.close()
        gate.stop()


def _run_chain(
    lab: Lab,
    procs: Processes,
    tmp: Path,
    hook: Webhook,
    prometheus: str,
    alertmanager: str,
    chat: Any,
) -> None:
    central = f"http://{CENTRAL}:9090"
    (tmp / "am.yml").write_text(
        yaml.safe_dump(
            {
                "route": {
                    "receiver": "hook",
                    "group_by": ["alertname", "vantage"],
                    "group_wait": "1s",
                    "group_interval": "1s",
                    "repeat_interval": "1h",
                },
                "receivers": [
                    {
                        "name": "hook",
                        "webhook_configs": [{"url": f"http://127.0.0.1:{hook.port}/hook"}],
                    }
                ],
            }
        )
    )
    procs.start(
        "servers",
        "alertmanager",
        [
            alertmanager,
            f"--config.file={tmp / 'am.yml'}",
            f"--storage.path={tmp / 'am-data'}",
            "--web.listen-address=127.0.0.1:9093",
            "--cluster.listen-address=",
        ],
    )
    (tmp / "central.yml").write_text(
        central_prometheus(fast_rules(tmp / "alerts-fast.yml"), "127.0.0.1:9093")
    )
    procs.start(
        "servers",
        "central",
        [
            prometheus,
            f"--config.file={tmp / 'central.yml'}",
            f"--storage.tsdb.path={tmp / 'central-data'}",
            f"--web.listen-address={CENTRAL}:9090",
            "--web.enable-remote-write-receiver",
        ],
    )
    control_listen = f"{ADDR.control4}:{AGENT_PORT}"
    for role, (name, vrole) in VANTAGES.items():
        listen = control_listen if role == "control" else f"127.0.0.1:{AGENT_PORT}"
        url = f"http://{control_listen}/api/results" if vrole == "test" else None
        (tmp / f"{role}.yaml").write_text(probe_config(name, vrole, listen, url))
        procs.start(
            role,
            f"probe-{role}",
            [sys.executable, "-m", "probe", "run", "-c", str(tmp / f"{role}.yaml")],
        )
        (tmp / f"agent-{role}.yml").write_text(agent_prometheus(name, listen))
        procs.start(
            role,
            f"prometheus-{role}",
            [
                prometheus,
                "--enable-feature=agent",
                f"--config.file={tmp / f'agent-{role}.yml'}",
                f"--storage.agent.path={tmp / f'agent-data-{role}'}",
                "--web.listen-address=127.0.0.1:9091",
            ],
        )

    def query(expr: str) -> list[dict[str, Any]]:
        url = f"{central}/api/v1/query?query={urllib.parse.quote(expr)}"
        result: list[dict[str, Any]] = get_json(lab, "servers", url)["data"]["result"]
        return result

    def vantages_with(expr: str) -> set[str]:
        return {r["metric"].get("vantage", "") for r in query(expr)}

    # 1. Clean network: both vantages read ok centrally, the test vantage judged next to
    # its control; then several evaluation rounds later nothing has fired.
    ok = 'probe_verdict{service="lab",endpoint="chat",verdict="ok"} == 1'
    both = {"msk-test", "ams-control"}
    wait_for(
        "both vantages ok at the central Prometheus", lambda: vantages_with(ok) == both, procs, 45
    )
    wait_for(
        "the test vantage to use its control",
        lambda: query('probe_control_up{vantage="msk-test"} == 1'),
        procs,
        15,
    )
    time.sleep(4)  # >= 3 rule evaluations (1 s) with `for: 1s`
    assert query("ALERTS") == [], "an alert on the clean network"
    assert hook.alerts == []

    # 2. Censored: the client's connects to the chat server are reset; the control's are not.
    with lab.censor.active(c.IPBlock(addresses=[CHAT], action="reset")):
        fired = wait_for(
            "BlockedHereFineAtControl at the webhook",
            lambda: [
                a for a in hook.alerts if a["labels"]["alertname"] == "BlockedHereFineAtControl"
            ],
            procs,
            45,
        )
        labels = fired[0]["labels"]
        assert fired[0]["status"] == "firing"
        assert (labels["vantage"], labels["service"], labels["endpoint"]) == (
            "msk-test",
            "lab",
            "chat",
        )
        assert labels["verdict"] == "ip_blocking" and labels["severity"] == "critical"
        assert not [a for a in hook.alerts if a["labels"].get("vantage") == "ams-control"]

    # 3. A dead server, judged on both vantages: endpoint_down, never a censorship verdict.
    chat.stop()

    def endpoint_verdicts(role: str) -> dict[str, Any]:
        where = control_listen if role == "control" else f"127.0.0.1:{AGENT_PORT}"
        url = f"http://{where}/api/results"
        api = get_json(lab, role, url)
        return {v["endpoint"]: v for v in api["verdicts"] if v["service"] == "lab"}

    seen_at_control: set[str] = set()

    def both_down() -> bool:
        control = endpoint_verdicts("control")["chat"]
        seen_at_control.add(control["verdict"])
        test = endpoint_verdicts("client")["chat"]
        return control["verdict"] == "endpoint_down" and test["verdict"] == "endpoint_down"

    wait_for("endpoint_down on both vantages", both_down, procs, 30)
    test_chat = endpoint_verdicts("client")["chat"]
    assert any(line.startswith("control tcp") for line in test_chat["evidence"]), test_chat
    assert not seen_at_control & CENSORSHIP, seen_at_control
    assert not vantages_with('probe:censorship_verdict{vantage="ams-control"}')


@pytest.mark.parametrize(
    ("config", "agent"), [("prometheus-agent.yml", True), ("prometheus-central.yml", False)]
)
def test_shipped_prometheus_configs_are_valid(config: str, agent: bool) -> None:
    """promtool checks the shipped files as they are (the central one with its rules)."""
    promtool = required_tool("promtool", package="prometheus")
    argv = [promtool, "check", "config", str(REPO / "configs" / config)]
    done = subprocess.run([*argv, "--agent"] if agent else argv, capture_output=True, text=True)
    assert done.returncode == 0, done.stdout + done.stderr
    assert "SUCCESS" in done.stdout
