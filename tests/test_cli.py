"""The command line as a user runs it: real subprocesses against real local servers."""

from __future__ import annotations

import json
import re
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest

import probe
from probe.cli import main
from probe.lab.certs import CertificateAuthority
from probe.lab.servers.dns import AnswerTable, DNSServer
from probe.lab.servers.tcp import TCPMode, TCPServer
from probe.lab.servers.tls import TLSServer
from tests.agentproc import PROBE, REPO, needs_unshare, run_cli


async def test_version_and_help() -> None:
    rc, out, _ = await run_cli(*PROBE, "--version")
    assert rc == 0 and out.strip() == f"probe {probe.__version__}"
    rc, out, _ = await run_cli(*PROBE, "once", "--help")
    assert rc == 0
    assert "exit codes" in out and "--format" in out


async def test_check_config_accepts_the_shipped_default() -> None:
    rc, out, err = await run_cli(*PROBE, "check-config", "configs/agent.yaml")
    assert rc == 0, err
    assert out.startswith("configs/agent.yaml: ok (")


INVALID = sorted(p.name for p in (REPO / "tests/testdata").glob("invalid-*.yaml"))


@pytest.mark.parametrize("name", INVALID)
def test_check_config_rejects_broken_files_in_one_line(
    name: str, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(REPO)
    rc = main(["check-config", f"tests/testdata/{name}"])
    out, err = capsys.readouterr()
    assert rc == 2
    assert out == ""
    lines = err.strip().splitlines()
    assert len(lines) == 1, err
    # file:line: field: message -- the file may be a seed file the config refers to
    assert re.match(r"probe: config error: \S+\.ya?ml(:\d+)?: \S+: .+", lines[0]), lines[0]
    assert "None" not in lines[0]


async def test_check_config_error_as_a_process_has_no_traceback() -> None:
    rc, out, err = await run_cli(*PROBE, "check-config", "tests/testdata/invalid-asn.yaml")
    assert (rc, out) == (2, "")
    assert err == (
        "probe: config error: tests/testdata/invalid-asn.yaml:3: vantage.asn: "
        "'as12389' is not an AS number like AS12389\n"
    )


async def test_missing_config_file_is_a_clear_error() -> None:
    rc, _, err = await run_cli(*PROBE, "once", "-c", "no/such/file.yaml")
    assert rc == 2
    assert "no/such/file.yaml" in err and "Traceback" not in err


@needs_unshare("for an empty network namespace")
async def test_default_config_in_an_empty_namespace_is_offline_and_sends_nothing() -> None:
    """The README's main command, exactly as CI smoke-tests it: no route out, so the
    offline gate must stop everything and mark every result offline."""
    rc, out, err = await run_cli("unshare", "-n", *PROBE, "once", "--format", "json", timeout_s=30)
    assert rc == 3, err
    lines = [json.loads(line) for line in out.splitlines()]
    records = [r for r in lines if r["type"] == "result"]
    assert len(records) > 100  # the whole default target list is reported
    # nothing measured is nothing blocked: every verdict says so
    assert {r["verdict"] for r in lines if r["type"] == "verdict"} == {"vantage_offline"}
    assert {r["vantage_state"] for r in records} == {"offline"}
    assert {r["status"] for r in records} == {"skipped"}
    assert {r["skipped"] for r in records} == {"vantage_offline"}
    assert {r["service"] for r in records} >= {"whatsapp", "telegram", "controls"}


@pytest.fixture
async def lab(ca: CertificateAuthority, tmp_path: Path) -> AsyncIterator[dict[str, Any]]:
    """A DNS server, a TLS server and a control listener on loopback."""
    table = AnswerTable().host("chat.lab.test", "127.0.0.1")
    leaf = ca.issue("chat.lab.test")
    async with (
        DNSServer(table, "127.0.0.1") as dns,
        TLSServer("127.0.0.1", cert=leaf) as tls,
        TCPServer("127.0.0.1", mode=TCPMode.CLOSE) as control,
    ):
        yield {
            "dns": dns.port,
            "tls": tls.port,
            "control": control.port,
            "ca": str(ca.write_ca(tmp_path / "ca.pem")),
        }


def write_config(path: Path, lab: dict[str, Any], extra_endpoints: str = "") -> Path:
    path.write_text(
        f"""
vantage: {{name: test-box, country: ZZ, asn: AS0, role: test}}
resolvers:
  system: false
  udp: ["127.0.0.1:{lab["dns"]}"]
  reply_window_s: 0.2
timeouts: {{dns_s: 2, connect_s: 2, tls_s: 2}}
tls: {{ca_file: {lab["ca"]}}}
seeds: []
services:
  - service: lab
    source: test
    prefixes: [{{cidr: 127.0.0.0/8, source: test, confidence: C}}]
    endpoints:
      - {{host: chat.lab.test, ports: [{lab["tls"]}], role: signalling,
          probes: [dns, tcp, tls], source: test, confidence: C}}
{extra_endpoints}
  - service: controls
    source: test
    endpoints:
      - {{name: loopback, host: 127.0.0.1, ports: [{lab["control"]}], role: control,
          probes: [tcp], source: test, confidence: C}}
"""
    )
    return path


async def test_once_measures_local_targets_through_a_config(
    lab: dict[str, Any], tmp_path: Path
) -> None:
    cfg = write_config(tmp_path / "agent.yaml", lab)
    rc, out, err = await run_cli(*PROBE, "once", "-c", str(cfg), "--format", "json")
    assert rc == 0, err + out
    lines = [json.loads(line) for line in out.splitlines()]
    records = [r for r in lines if r["type"] == "result"]
    verdicts = {(v["service"], v["endpoint"]): v for v in lines if v["type"] == "verdict"}
    assert verdicts[("lab", None)]["verdict"] == "ok"
    by_probe = {(r["service"], r["probe"]): r for r in records}
    dns = by_probe[("lab", "dns")]
    assert dns["ok"] and dns["details"]["answers"]["A"] == ["127.0.0.1"]
    assert dns["resolver"] == f"udp:127.0.0.1:{lab['dns']}"
    tls = by_probe[("lab", "tls")]
    assert tls["ok"] and tls["address"] == "127.0.0.1" and tls["address_source"] == "resolver"
    for r in records:
        assert set(r) >= {
            "service",
            "endpoint",
            "address",
            "port",
            "probe",
            "ok",
            "failure",
            "failed_operation",
            "duration_s",
            "t",
            "vantage",
        }
        assert r["vantage"] == "test-box" and r["t"].endswith("Z")


async def test_once_reports_failures_with_exit_code_1_and_a_readable_table(
    lab: dict[str, Any], tmp_path: Path
) -> None:
    dead = """      - {host: 127.0.0.1, name: dead, ports: [1], role: signalling, probes: [tcp],
          source: test, confidence: C}"""
    cfg = write_config(tmp_path / "agent.yaml", lab, dead)
    archive = tmp_path / "archive"
    rc, out, _ = await run_cli(*PROBE, "once", "-c", str(cfg), "--archive", str(archive))
    assert rc == 1
    # --archive: the round's measurements, readable with `probe archive`
    rc_read, archived, err = await run_cli(*PROBE, "archive", "--dir", str(archive), "--failed")
    assert rc_read == 0, err
    failed = [json.loads(line)["test_keys"]["probe_result"] for line in archived.splitlines()]
    assert {(r["target"]["endpoint"], r["failure"]) for r in failed} == {
        ("dead", "connection_refused")
    }
    header = out.splitlines()[0].split()
    assert header == ["service", "endpoint", "address", "port", "probe", "result", "failure", "ms"]
    dead_rows = [line for line in out.splitlines() if " dead " in line and " tcp " in line]
    assert len(dead_rows) == 1
    assert "FAIL" in dead_rows[0] and "connection_refused (connect)" in dead_rows[0]
    # the failure was repeated on a fresh connection, and judged under the table
    assert any(" dead " in line and " tcp/repeat " in line for line in out.splitlines())
    assert "    tcp 127.0.0.1:1 connection_refused (connect)" in out.splitlines()
    assert out.splitlines()[-1].startswith("vantage test-box: online")


async def test_once_archive_into_an_unusable_directory_is_one_line_before_any_probe(
    lab: dict[str, Any], tmp_path: Path
) -> None:
    cfg = write_config(tmp_path / "agent.yaml", lab)
    (tmp_path / "file").write_text("")
    bad = tmp_path / "file" / "archive"  # a directory under a regular file
    rc, out, err = await run_cli(*PROBE, "once", "-c", str(cfg), "--archive", str(bad))
    assert rc == 2 and out == ""
    assert err.strip() == f"probe: --archive {bad}: Not a directory"


def test_archive_since_rejects_a_non_iso_time_in_one_usage_line(
    capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    with pytest.raises(SystemExit) as exit_info:
        main(["archive", "--dir", str(tmp_path), "--since", "yesterday"])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert "argument --since: 'yesterday' is not an ISO 8601 time" in err
    assert "Traceback" not in err


async def test_help_lists_the_values_archive_and_lab_accept() -> None:
    from probe.lab.scenarios import CATALOGUE
    from probe.probes import REGISTRY

    rc, out, _ = await run_cli(*PROBE, "archive", "--help")
    assert rc == 0
    assert all(name in out for name in REGISTRY)
    assert "whatsapp" in out and "telegram" in out
    rc, out, _ = await run_cli(*PROBE, "lab", "--help")
    assert rc == 0
    assert all(s.name in out for s in CATALOGUE)


async def test_archive_says_when_there_is_nothing_to_show(tmp_path: Path) -> None:
    rc, out, err = await run_cli(*PROBE, "archive", "--dir", str(tmp_path / "nowhere"))
    assert (rc, out) == (2, "")
    assert err == f"probe: archive: no archive directory at {tmp_path / 'nowhere'}\n"
    rc, out, err = await run_cli(*PROBE, "archive", "--dir", str(tmp_path))
    assert (rc, out) == (0, "")
    assert err == f"probe: archive: no measurement in {tmp_path} matches\n"


LAB_WITHOUT_NFQUEUE = (
    "import sys; sys.modules['netfilterqueue'] = None  # as if the lab extra were missing\n"
    "from probe.cli import main; sys.exit(main(['lab', 'demo']))"
)


async def test_lab_demo_without_its_extra_names_the_fix_before_starting() -> None:
    from probe.lab.topology import lab_available

    if lab_available() is not None:
        pytest.skip(f"the lab cannot run here anyway: {lab_available()}")
    rc, out, err = await run_cli(PROBE[0], "-c", LAB_WITHOUT_NFQUEUE)
    assert (rc, out) == (2, "")
    assert err.count("\n") == 1, err  # one line, before anything is built
    assert "pip install '.[lab]'" in err and "libnetfilter-queue-dev" in err


def test_run_tunes_glibc_malloc_where_there_is_one() -> None:
    """`probe run` caps malloc arenas and fixes the mmap threshold (bench/README.md: the
    RSS at 1,000 endpoints); elsewhere (musl, macOS) it says it did nothing."""
    import platform
    import subprocess
    import sys

    code = "from probe.cli import tune_malloc; print(tune_malloc())"
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True
    ).stdout
    assert out.strip() == str(platform.libc_ver()[0] == "glibc")
