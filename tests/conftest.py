"""Shared fixtures.  Servers live in probe.lab.servers (shared with the lab); tests bind them
to loopback on ephemeral ports."""

from __future__ import annotations

from pathlib import Path

import pytest

from probe.lab.certs import CertificateAuthority


@pytest.fixture(scope="session")
def ca() -> CertificateAuthority:
    return CertificateAuthority()


@pytest.fixture
def ca_file(ca: CertificateAuthority, tmp_path: Path) -> str:
    return str(ca.write_ca(tmp_path / "ca.pem"))
