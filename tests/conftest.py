"""Shared fixtures.  Servers live in probe.lab.servers (shared with the lab); tests bind them
to loopback on ephemeral ports."""

from __future__ import annotations

import os
from collections.abc import Generator, Iterator
from pathlib import Path

import pytest

from probe.lab.certs import CertificateAuthority
from probe.lab.topology import Lab, lab_available


@pytest.fixture(scope="session")
def ca() -> CertificateAuthority:
    return CertificateAuthority()


@pytest.fixture
def ca_file(ca: CertificateAuthority, tmp_path: Path) -> str:
    return str(ca.write_ca(tmp_path / "ca.pem"))


# --- censorship lab (probe.lab.topology) -----------------------------------------------------


def _ci() -> bool:
    return os.environ.get("CI") == "true"


@pytest.hookimpl(wrapper=True)
def pytest_runtest_makereport(
    item: pytest.Item, call: pytest.CallInfo[None]
) -> Generator[None, pytest.TestReport, pytest.TestReport]:
    """Under CI=true a skipped lab test is a failure: CI runs as root with the lab's
    packages installed, so a skip there means the lab silently stopped being tested."""
    report = yield
    if report.skipped and _ci() and item.get_closest_marker("lab") is not None:
        longrepr = report.longrepr
        reason = longrepr[2] if isinstance(longrepr, tuple) else str(longrepr)
        report.outcome = "failed"
        report.longrepr = f"lab test skipped under CI=true (must run there): {reason}"
    return report


@pytest.fixture(scope="module")
def netns_lab() -> Iterator[Lab]:
    """A censorship lab (four network namespaces) shared by a test module; torn down after
    it, also when tests fail.  Skips without root (a failure under CI=true)."""
    reason = lab_available()
    if reason is not None:
        pytest.skip(reason)
    with Lab() as running:
        yield running
