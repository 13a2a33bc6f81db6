"""A seconds-long smoke of every bench/ script, so none rots: each runs with ``--smoke``
and must print its figures as JSON lines.  The figures are not judged here (no timed
assertions in tests): bench/README.md holds the measured ones.

The scripts need root (a private network namespace, the lab); under CI=true a skip is a
failure (the ``lab`` marker, tests/conftest.py).
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys

import pytest

from probe.lab.topology import lab_available
from tests.agentproc import REPO

pytestmark = pytest.mark.lab

# script -> figures each of its lines must carry
SCRIPTS = {
    "daemon_footprint.py": (
        "cpu_pct_of_one_core",
        "rss_max_mib",
        "lag_p99_ms",
        "metrics_series",
        "batch_s",
    ),
    "probe_cost.py": (
        "agent_cpu_us_per_probe",
        "blackbox_cpu_us_per_probe",
        "blackbox_paced_cpu_us_per_probe",
        "bare_cpu_us_per_probe",
        "agent_unbatched_cpu_us_per_probe",
        "agent_once_cpu_us_per_probe",
    ),
    "timing_accuracy.py": (
        "agent_loop_connect_error_ms_p50",
        "agent_kernel_connect_rtt_error_ms_p99",
        "agent_kernel_connect_rtt_vs_injected_ms_p99",
        "injector_late_agent_run_ms_p99",
    ),
    "round_time.py": ("wall_s", "bound_s", "cpu_us_per_probe"),
}


@pytest.mark.parametrize("script", sorted(SCRIPTS))
def test_bench_script_smoke(script: str) -> None:
    reason = lab_available()
    if reason is not None:
        pytest.skip(reason)
    if shutil.which("prometheus-blackbox-exporter") is None:
        pytest.skip("prometheus-blackbox-exporter is not installed (Debian package)")
    done = subprocess.run(
        [sys.executable, str(REPO / "bench" / script), "--smoke"],
        capture_output=True,
        text=True,
        timeout=180,
        cwd=REPO,
        env={**os.environ, "PYTHONPATH": str(REPO)},
    )
    assert done.returncode == 0, done.stderr[-2000:]
    lines = [json.loads(line) for line in done.stdout.splitlines() if line.startswith("{")]
    assert lines, done.stdout
    for figures in lines:
        missing = [k for k in SCRIPTS[script] if k not in figures]
        assert not missing, (missing, figures)
        assert all(v == v for v in figures.values() if isinstance(v, float)), figures  # no NaN
