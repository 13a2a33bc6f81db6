"""The compose stack's topology, run here from the same files with Debian's binaries
instead of images: the agent, ``prometheus`` with configs/prometheus.yml and
configs/alerts.yml, ``prometheus-alertmanager`` with configs/alertmanager.yml, and a
tiny webhook receiver standing in for the user's alert endpoint.  The test copies of the
configs differ only in waits the test would otherwise sit out: 1 s scrape and evaluation
intervals, a 1 s group_wait, ``for: 0s``.  Grafana is the only
piece missing (it cannot be installed here).

Everything runs in the client namespace of a censorship lab, where
``/etc/netns/NS/hosts`` gives the compose service names (agent, alertmanager,
alert-webhook) to 127.0.0.1, so the configs' targets resolve as on the compose network.
The agent measures the lab's WhatsApp/Telegram servers through the lab censor, which
resets connections to two Telegram DCs (behaviour B2, ``partial_dc_block``); the test
follows that block to a webhook call.  All traffic stays in the lab (10.200.0.0/16) and
on the namespace's loopback.
"""

from __future__ import annotations

import json
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.parse
import urllib.request
from collections.abc import Callable, Iterator
from http.server import BaseHTTPRequestHandler, HTTPServer
from pathlib import Path
from typing import Any, TypeVar

import pytest
import yaml

from probe.lab.netns import ETC_NETNS, lab_available, ns_argv
from probe.lab.scenarios import ScenarioLab, agent_config, by_name
from tests.agentproc import REPO, required_tool

pytestmark = [pytest.mark.lab, pytest.mark.slow]

CONFIGS = REPO / "configs"
SERVICE_NAMES = ("agent", "prometheus", "alertmanager", "alert-webhook")
WEBHOOK_PORT = 9095  # configs/alertmanager.yml: http://alert-webhook:9095/alerts
LIMIT_S = 90  # the alert arrives a few s after the first round (test copies: 1 s intervals)
T = TypeVar("T")


class Webhook:
    """Records Alertmanager's webhook POSTs (JSON bodies) on a socket made inside the
    lab's client namespace, served from a thread of this process."""

    def __init__(self, sock: socket.socket) -> None:
        self.received: list[dict[str, Any]] = []
        received = self.received

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                length = int(self.headers.get("Content-Length", "0"))
                received.append({"path": self.path, **json.loads(self.rfile.read(length))})
                self.send_response(200)
                self.end_headers()

            def log_message(self, *args: Any) -> None:  # quiet
                pass

        self.server = HTTPServer(("127.0.0.1", WEBHOOK_PORT), Handler, bind_and_activate=False)
        self.server.socket.close()
        self.server.socket = sock
        sock.bind(("127.0.0.1", WEBHOOK_PORT))
        sock.listen()
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self.thread.start()

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


@pytest.fixture(scope="module")
def stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, Any]]:
    prometheus = required_tool("prometheus", package="prometheus")
    alertmanager = required_tool("prometheus-alertmanager", package="prometheus-alertmanager")
    reason = lab_available()
    if reason is not None:
        pytest.skip(reason)  # a failure under CI=true (conftest hook)
    work = tmp_path_factory.mktemp("stack")
    with ScenarioLab() as runner:
        lab = runner.lab
        ns = lab.ns("client")
        (ETC_NETNS / ns / "hosts").write_text(
            "127.0.0.1 localhost " + " ".join(SERVICE_NAMES) + "\n::1 localhost\n"
        )
        prom_dir = work / "prometheus"
        prom_dir.mkdir()
        (prom_dir / "prometheus.yml").write_text(fast_prometheus())
        # The one change to the real files: EndpointBlocked waits `for: 10m` (two rounds
        # at the default schedule); a test cannot wait that long.
        alerts = (CONFIGS / "alerts.yml").read_text()
        assert alerts.count("for: 10m") >= 1
        (prom_dir / "alerts.yml").write_text(alerts.replace("for: 10m", "for: 0s"))
        (work / "agent.yaml").write_text(lab_agent_config(lab.ca_file, work / "archive"))

        lab.censor.apply(*by_name("partial_dc_block").censor())
        webhook = Webhook(lab.socket("client", socket.AF_INET, socket.SOCK_STREAM))
        procs = [
            spawn(ns, [sys.executable, "-m", "probe", "run", "-c", str(work / "agent.yaml")], work),
            spawn(
                ns,
                [
                    alertmanager,
                    f"--config.file={fast_alertmanager(work)}",
                    f"--storage.path={work / 'alertmanager'}",
                    "--web.listen-address=127.0.0.1:9093",
                    "--cluster.listen-address=",  # one instance: no gossip port
                ],
                work,
            ),
            spawn(
                ns,
                [
                    prometheus,
                    f"--config.file={prom_dir / 'prometheus.yml'}",
                    f"--storage.tsdb.path={work / 'tsdb'}",
                    "--web.listen-address=127.0.0.1:9090",
                ],
                work,
            ),
        ]
        started = time.monotonic()
        try:
            yield {"lab": lab, "webhook": webhook, "started": started, "work": work}
        finally:
            for proc in procs:
                proc.send_signal(signal.SIGTERM)
            for proc in procs:
                try:
                    proc.wait(timeout=10)
                except subprocess.TimeoutExpired:
                    proc.kill()
                    proc.wait()
            webhook.close()


def fast_prometheus() -> str:
    """TEST COPY of configs/prometheus.yml with the scrape and evaluation intervals
    shortened to 1 s (shipped: 15 s and 10 s, which the test would only wait out);
    targets, rule file and alerting are the shipped ones, unchanged."""
    config = yaml.safe_load((CONFIGS / "prometheus.yml").read_text())
    assert config["global"]["scrape_interval"] == "15s"  # the file this copy stands for
    config["global"].update(
        {"scrape_interval": "1s", "scrape_timeout": "1s", "evaluation_interval": "1s"}
    )
    return "# TEST COPY of configs/prometheus.yml: intervals 1s\n" + yaml.safe_dump(
        config, sort_keys=False
    )


def fast_alertmanager(work: Path) -> Path:
    """TEST COPY of configs/alertmanager.yml whose first notification of a group waits 1 s
    (shipped: group_wait 10s); routes, receivers and inhibitions are the shipped ones."""
    config = yaml.safe_load((CONFIGS / "alertmanager.yml").read_text())
    assert config["route"]["group_wait"] == "10s"  # the file this copy stands for
    config["route"]["group_wait"] = "1s"
    path = work / "alertmanager.yml"
    path.write_text(
        "# TEST COPY of configs/alertmanager.yml: group_wait 1s\n"
        + yaml.safe_dump(config, sort_keys=False)
    )
    return path


def lab_agent_config(ca_file: str, archive: Path) -> str:
    """The lab's agent config (its servers, resolver and CA) with the deployment's own
    `listen` and `web` (configs/agent-container.yaml) and a schedule fast enough for a test."""
    config = yaml.safe_load(agent_config("client", ca_file))
    deployed = yaml.safe_load((CONFIGS / "agent-container.yaml").read_text())
    config["listen"] = deployed["listen"]
    config["web"] = deployed["web"]  # allowed_hosts: Prometheus scrapes "agent:9464"
    config["schedule"].update({"interval_s": 20, "jitter_s": 1, "min_spacing_s": 5})
    config["archive"] = {"path": str(archive)}
    return yaml.safe_dump(config, sort_keys=False)


def spawn(ns: str, argv: list[str], work: Path) -> subprocess.Popen[bytes]:
    log = (work / f"{Path(argv[0]).name}-{len(list(work.glob('*.log')))}.log").open("wb")
    return subprocess.Popen(ns_argv(ns, argv), stdout=log, stderr=subprocess.STDOUT)


def api(stack: dict[str, Any], port: int, path: str) -> Any:
    """GET a JSON API inside the client namespace (Prometheus 9090, Alertmanager 9093)."""

    def fetch() -> Any:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}{path}", timeout=3) as r:
            return json.loads(r.read())

    return stack["lab"].in_ns("client", fetch)


def wait_for(stack: dict[str, Any], what: str, check: Callable[[], T | None]) -> T:
    deadline = stack["started"] + LIMIT_S
    while True:
        try:
            value = check()
        except OSError:
            value = None
        if value:
            return value
        if time.monotonic() > deadline:
            logs = "\n".join(p.read_text()[-1500:] for p in sorted(stack["work"].glob("*.log")))
            raise AssertionError(f"no {what} within {LIMIT_S} s of start\n{logs}")
        time.sleep(0.5)


def query(stack: dict[str, Any], promql: str) -> list[dict[str, Any]]:
    body = api(stack, 9090, "/api/v1/query?query=" + urllib.parse.quote(promql))
    result: list[dict[str, Any]] = body["data"]["result"]
    return result


def test_prometheus_scrapes_the_agent_by_its_service_name(stack: dict[str, Any]) -> None:
    up = wait_for(stack, "scrape of agent:9464", lambda: query(stack, 'up{job="probe"} == 1'))
    assert up[0]["metric"]["instance"] == "agent:9464"


def test_the_rule_files_load(stack: dict[str, Any]) -> None:
    groups = wait_for(stack, "rules", lambda: api(stack, 9090, "/api/v1/rules")["data"]["groups"])
    rules = {r["name"]: r for g in groups for r in g["rules"]}
    assert {"probe:censorship_verdict", "EndpointBlocked", "VantageOffline"} <= set(rules)
    assert all(r["health"] in ("ok", "unknown") for r in rules.values()), rules


def test_a_lab_block_reaches_the_webhook_as_an_alert(stack: dict[str, Any]) -> None:
    webhook: Webhook = stack["webhook"]

    def blocked() -> list[dict[str, Any]]:
        return [
            alert
            for post in list(webhook.received)
            for alert in post["alerts"]
            if alert["labels"]["alertname"] == "EndpointBlocked"
        ]

    alerts = wait_for(stack, "EndpointBlocked at the webhook", blocked)
    endpoints = {a["labels"]["endpoint"] for a in alerts}
    assert endpoints <= {"dc1", "dc2"} and endpoints, alerts
    assert {a["labels"]["service"] for a in alerts} == {"telegram"}
    assert {a["status"] for a in alerts} == {"firing"}
    assert {a["labels"]["verdict"] for a in alerts} == {"ip_blocking"}
    assert webhook.received[0]["path"] == "/alerts"
    assert webhook.received[0]["receiver"] == "webhook"
    # the unblocked DCs stay quiet
    assert not query(stack, 'probe:censorship_verdict{endpoint=~"dc[345]"}')
