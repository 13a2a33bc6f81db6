"""Attack 4: a config that points at bad files passed check-config, then failed at run time.

Before: a `tls.ca_file` holding no certificate passed ``check-config`` and a reload, then
made every TLS probe fail as ``ssl_failed_handshake``, which reads as TLS blocking.  Now
`load_config` loads what the config points at (CA file, web certificate and key, listen
address, archive directory) and rejects it with ``file:line: field: message``.  No network.
"""

from __future__ import annotations

from pathlib import Path

import pytest
from cryptography.hazmat.primitives import serialization

from probe.agent_config import load_config
from probe.config.loader import ConfigError
from probe.daemon import Agent
from probe.lab.certs import CertificateAuthority
from tests.agentproc import run_probe
from tests.test_agent_ops import write_config


def config_error(path: Path) -> str:
    with pytest.raises(ConfigError) as info:
        load_config(path)
    return str(info.value)


def test_check_config_rejects_a_ca_file_without_certificates(tmp_path: Path) -> None:
    ca = tmp_path / "ca.pem"
    ca.write_text("-----BEGIN NOTHING-----\nnot a certificate\n-----END NOTHING-----\n")
    path = write_config(tmp_path / "agent.yaml", 9, 9, extra=f"tls: {{ca_file: {ca}}}")
    line = path.read_text().splitlines().index(f"tls: {{ca_file: {ca}}}") + 1
    done = run_probe("check-config", str(path))
    assert done.returncode == 2
    assert done.stderr == (
        f"probe: config error: {path}:{line}: tls.ca_file: {ca}: not a PEM CA certificate "
        "file (malformed PEM)\n"
    )


async def test_a_reload_rejects_a_bad_ca_file_and_keeps_running(tmp_path: Path) -> None:
    path = write_config(tmp_path / "agent.yaml", 9, 9)
    agent = Agent(load_config(path), str(path))
    agent.start()
    try:
        scheduler = agent.scheduler
        (tmp_path / "ca.pem").write_bytes(b"\x00garbage")
        write_config(path, 9, 9, extra="tls: {ca_file: ca.pem}")
        error = await agent.reload()
        assert error is not None and "tls.ca_file" in error and "not a PEM CA" in error
        assert agent.scheduler is scheduler
        assert agent.store.snapshot().config_reload_ok is False
    finally:
        await agent.stop()


def test_a_web_key_that_does_not_match_the_certificate_is_refused(tmp_path: Path) -> None:
    ca = CertificateAuthority()
    cert, _ = ca.issue("127.0.0.1").write(tmp_path, "web")
    _, other_key = ca.issue("127.0.0.1").write(tmp_path, "other")
    web = f"web: {{tls_cert_file: {cert}, tls_key_file: {other_key}}}"
    error = config_error(write_config(tmp_path / "agent.yaml", 9, 9, extra=web))
    assert error.endswith(f"web.tls_key_file: {other_key} is not the private key of {cert}")


def test_an_encrypted_web_key_is_refused_without_a_prompt(tmp_path: Path) -> None:
    leaf = CertificateAuthority().issue("127.0.0.1")
    cert, key = leaf.write(tmp_path, "web")
    private = serialization.load_pem_private_key(leaf.key_pem, None)
    key.write_bytes(
        private.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.BestAvailableEncryption(b"secret"),
        )
    )
    web = f"web: {{tls_cert_file: {cert}, tls_key_file: {key}}}"
    error = config_error(write_config(tmp_path / "agent.yaml", 9, 9, extra=web))
    assert error.endswith(f"web.tls_key_file: {key}: an encrypted private key is not supported")


def test_listen_on_an_address_of_another_machine_is_refused(tmp_path: Path) -> None:
    path = write_config(tmp_path / "agent.yaml", 9, 9, extra="listen: 192.0.2.1:9464")
    assert config_error(path).endswith(
        "listen: '192.0.2.1:9464': 192.0.2.1 is not an address of this machine"
    )


def test_an_archive_path_that_cannot_be_a_directory_is_refused(tmp_path: Path) -> None:
    (tmp_path / "afile").write_text("x")
    path = write_config(tmp_path / "agent.yaml", 9, 9)
    path.write_text(path.read_text().replace("{path: null}", "{path: afile/archive}"))
    assert config_error(path).endswith(
        f"archive.path: {tmp_path / 'afile' / 'archive'}: not a directory "
        f"(it would go under {tmp_path / 'afile'}, a file)"
    )
    path.write_text(path.read_text().replace("afile/archive", "new/deeper/archive"))
    assert load_config(path).archive.path == str(tmp_path / "new" / "deeper" / "archive")
