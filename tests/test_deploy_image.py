"""The agent's container image, built from the Dockerfile on a local Debian base and run
with podman and runc the way docs/deploy.md says (read-only root, non-root, no
capabilities, one writable volume).  Harness: tests/containers.py.

Network: ``probe once`` runs with ``--network none`` (an empty namespace: the offline
gate must say so).  ``probe run`` joins the client namespace of a censorship lab (no
route anywhere but lab prefixes) and is reached from the lab's censor namespace across
the veth, i.e. from outside the container, as Prometheus would.  The image build has no
network either (``buildah bud --network none``): the Debian base and the locks' wheels
come from the cache that scripts/test's set-up fills; without them the test skips, and
under CI=true that skip is a failure (the ``lab`` marker).
"""

from __future__ import annotations

import json
import os
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from probe.lab.topology import ADDR, Lab, lab_available
from tests.agentproc import required_tool, sample
from tests.containers import RUN_FLAGS, TOOLS, Containers, NotPrepared, build_image, containers

pytestmark = [pytest.mark.slow, pytest.mark.lab]  # lab: a skip under CI=true fails

IMAGE_MAX_MB = 250  # measured 172 MB on the Debian bookworm base (docs/deploy.md)
UID = 10001  # the image's user (Dockerfile)


@pytest.fixture(scope="module")
def ctr() -> Iterator[tuple[Containers, str]]:
    for tool in TOOLS:
        required_tool(tool, package=tool)
    if os.geteuid() != 0:
        pytest.skip("building and running images here needs root (vfs store, runc)")
    with containers() as c:
        try:
            ref = build_image(c)
        except NotPrepared as missing:
            pytest.skip(f"no offline build inputs: {missing}")
        yield c, ref


def inspect(c: Containers, ref: str) -> dict[str, Any]:
    out: list[dict[str, Any]] = json.loads(c.podman("image", "inspect", ref).stdout)
    return out[0]


def test_image_is_small_non_root_and_checks_its_health(ctr: tuple[Containers, str]) -> None:
    c, ref = ctr
    image = inspect(c, ref)
    config = image["Config"]
    assert config["User"] == f"{UID}:{UID}"
    assert config["Entrypoint"] == ["probe"]
    assert config["Cmd"] == ["run", "-c", "/etc/probe/agent.yaml"]
    assert "9464/tcp" in config["ExposedPorts"]
    assert "/healthz" in " ".join(image["Healthcheck"]["Test"])
    assert image["Size"] < IMAGE_MAX_MB * 1e6, f"{image['Size'] / 1e6:.0f} MB"
    # no pip, no build backend in what ships
    listing = c.podman(
        "run",
        "--rm",
        "--network",
        "none",
        *RUN_FLAGS,
        "--no-healthcheck",
        "--entrypoint",
        "ls",
        ref,
        "/opt/probe/bin",
    ).stdout.split()
    assert "probe" in listing and not {"pip", "pip3"} & set(listing)


def test_once_without_a_network_reports_the_vantage_offline(ctr: tuple[Containers, str]) -> None:
    c, ref = ctr
    done = c.podman(
        "run", "--rm", "--network", "none", *RUN_FLAGS, "--no-healthcheck",
        ref, "once", "-c", "/etc/probe/agent.yaml", "--format", "json",
        check=False,
    )  # fmt: skip
    assert done.returncode == 3, done.stderr[-2000:]
    records = [json.loads(line) for line in done.stdout.splitlines() if line.strip()]
    results = [r for r in records if "skipped" in r]
    assert results and {r["skipped"] for r in results} == {"vantage_offline"}


@pytest.fixture
def lab() -> Iterator[Lab]:
    reason = lab_available()
    if reason is not None:
        pytest.skip(reason)
    with Lab() as running:
        yield running


def get(lab: Lab, path: str) -> tuple[int, str]:
    """GET from the lab's censor namespace: outside the container, across the veth."""

    def fetch() -> tuple[int, str]:
        url = f"http://{ADDR.client4}:9464{path}"
        with urllib.request.urlopen(url, timeout=3) as response:
            return response.status, response.read().decode()

    return lab.in_ns("censor", fetch)


def wait_for(lab: Lab, path: str, limit_s: float = 30) -> str:
    deadline = time.monotonic() + limit_s
    while True:
        try:
            status, body = get(lab, path)
            if status == 200:
                return body
        except OSError:
            pass
        if time.monotonic() > deadline:
            raise AssertionError(f"{path} did not answer within {limit_s} s")
        time.sleep(0.3)


def status_of(pid: int) -> dict[str, str]:
    lines = Path(f"/proc/{pid}/status").read_text().splitlines()
    return dict(line.split(":\t", 1) for line in lines if ":\t" in line)


def test_run_read_only_serves_metrics_outside_and_stops_on_sigterm(
    ctr: tuple[Containers, str], lab: Lab, tmp_path: Path
) -> None:
    c, ref = ctr
    archive = tmp_path / "archive"
    archive.mkdir()
    os.chown(archive, UID, UID)
    c.podman(
        "run", "--detach", "--name", "agent", *RUN_FLAGS,
        "--network", f"ns:/run/netns/{lab.ns('client')}",
        "--volume", f"{archive}:/var/lib/probe/archive",
        ref,
    )  # fmt: skip
    assert wait_for(lab, "/healthz").strip() == "ok"
    wait_for(lab, "/-/ready")  # after the first vantage check
    metrics = wait_for(lab, "/metrics")
    assert sample(metrics, "probe_vantage_online") == 0  # no route to any control
    pid = int(c.podman("inspect", "--format", "{{.State.Pid}}", "agent").stdout)
    status = status_of(pid)
    assert status["Uid"].split() == [str(UID)] * 4
    assert int(status["CapEff"], 16) == 0 and status["NoNewPrivs"] == "1"
    assert c.podman("healthcheck", "run", "agent", check=False).returncode == 0
    # what ships has no pip (nor a build backend) ...
    listing = c.podman("exec", "agent", "ls", "/opt/probe/bin").stdout.split()
    assert "probe" in listing and not {"pip", "pip3"} & set(listing)
    # ... and its root filesystem is read-only even for root inside the container, /tmp
    # included: compose's read_only: true mounts no tmpfs there (podman's --read-only
    # would: RUN_FLAGS turns that off), and the agent must not need one
    for path in ("/opt/probe/x", "/tmp/x"):
        write = c.podman("exec", "--user", "0", "agent", "touch", path, check=False)
        assert write.returncode != 0 and "Read-only file system" in write.stderr, path

    started = time.monotonic()
    c.podman("kill", "--signal", "TERM", "agent")
    code = int(c.podman("wait", "agent", timeout_s=15).stdout.strip())
    stopped_s = time.monotonic() - started
    assert code == 0 and stopped_s < 5, (code, stopped_s)
    logs = c.podman("logs", "agent").stdout + c.podman("logs", "agent").stderr
    assert '"msg": "stopped"' in logs
    archived = (archive / "measurements.jsonl").read_text().splitlines()
    assert archived and all("probe_result" in json.loads(line)["test_keys"] for line in archived)
