"""The CI gate of tests/conftest.py: a lab test may skip (no root) locally, never under CI=true.

Runs a throwaway test module in a child pytest with the repository's conftest loaded as a
plugin, once with CI unset and once with CI=true.  No root and no network needed.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

SKIPPING_LAB_TEST = """
import pytest


@pytest.mark.lab
def test_needs_the_lab():
    pytest.skip("pretend there is no root here")

def test_not_a_lab_test():
    pytest.skip("an ordinary skip stays a skip")
"""


def _run(tmp_path: Path, ci: str | None) -> subprocess.CompletedProcess[str]:
    (tmp_path / "test_gate_case.py").write_text(SKIPPING_LAB_TEST)
    env = {k: v for k, v in os.environ.items() if k != "CI"}
    if ci is not None:
        env["CI"] = ci
    env["PYTHONPATH"] = str(ROOT)
    return subprocess.run(
        [
            sys.executable,
            "-m",
            "pytest",
            "-p",
            "tests.conftest",
            "-p",
            "no:cacheprovider",
            "-q",
            "-rA",
            "-m",
            "lab or not lab",
            "-o",
            "markers=lab: lab",
            "-o",
            "asyncio_default_fixture_loop_scope=function",
            "--rootdir",
            str(tmp_path),
            str(tmp_path / "test_gate_case.py"),
        ],
        capture_output=True,
        text=True,
        timeout=60,
        env=env,
        cwd=tmp_path,
        check=False,
    )


def test_lab_skip_is_a_skip_outside_ci(tmp_path: Path) -> None:
    done = _run(tmp_path, None)
    assert done.returncode == 0, done.stdout + done.stderr
    assert "2 skipped" in done.stdout


def test_lab_skip_fails_under_ci(tmp_path: Path) -> None:
    done = _run(tmp_path, "true")
    assert done.returncode == 1, done.stdout + done.stderr
    assert "lab test skipped under CI=true" in done.stdout
    assert "pretend there is no root here" in done.stdout
    assert "1 failed, 1 skipped" in done.stdout  # the ordinary skip is left alone
