"""WhatsApp Noise-hello probe against the real chat stub on loopback (IPv4 and IPv6)."""

from __future__ import annotations

import pytest

from probe.lab.servers.noise import NoiseMode, NoiseServer
from probe.model import Failure, Operation, ProbeResult
from probe.probes import REGISTRY, whatsapp
from probe.wire import WireError
from tests.helpers import refusing_port, settings, target

pytestmark = pytest.mark.parametrize("host", ["127.0.0.1", "::1"])


async def _probe(
    host: str, mode: NoiseMode, params: dict[str, object] | None = None, **timeouts: float
) -> tuple[ProbeResult, NoiseServer]:
    async with NoiseServer(host, 0, mode) as server:
        t = target("whatsapp", host, server.port, params=params)
        result = await whatsapp.probe(t, settings(**timeouts))
    return result, server


async def test_well_formed_server_hello_is_success(host: str) -> None:
    result, server = await _probe(host, NoiseMode.OK)
    assert result.ok, result
    assert result.details["static_bytes"] == 48
    assert result.details["payload_bytes"] > 16
    assert result.details["rtt_ms"] >= 0
    assert {"connect", "first_byte", "handshake"} <= set(result.phases)
    ((version, ephemeral),) = server.hellos
    assert version == (6, 3)
    assert len(ephemeral) == 32


async def test_each_probe_sends_a_fresh_ephemeral_key(host: str) -> None:
    async with NoiseServer(host, 0) as server:
        for _ in range(2):
            result = await REGISTRY["whatsapp"].run(
                target("whatsapp", host, server.port), settings()
            )
            assert result.ok
    assert server.hellos[0][1] != server.hellos[1][1]


async def test_header_version_is_a_param(host: str) -> None:
    result, server = await _probe(host, NoiseMode.OK, params={"wa_version": [6, 5]})
    assert result.ok
    assert server.hellos[0][0] == (6, 5)


async def test_invalid_version_param_is_a_config_bug_raised_before_connecting(host: str) -> None:
    # parsed once, where the config loader parses it: a probe never sees a bad version
    async with NoiseServer(host, 0) as server:
        with pytest.raises(ValueError, match="wa_version") as info:
            target("whatsapp", host, server.port, params={"wa_version": [6, 999]})
    assert not isinstance(info.value, WireError)  # would be misread as the peer's bad_response
    assert server.accepted == 0


async def test_block_page_is_bad_response_with_evidence(host: str) -> None:
    result, _ = await _probe(host, NoiseMode.GARBAGE)
    assert (result.failure, result.failed_operation) == (Failure.BAD_RESPONSE, Operation.READ)
    assert result.details["reason"] == "malformed"
    assert bytes.fromhex(result.details["first_bytes_hex"]).startswith(b"HTT")
    assert result.details["bytes_received"] == 3  # the bogus length was refused before reading on


async def test_structurally_invalid_server_hello_is_bad_response(host: str) -> None:
    result, _ = await _probe(host, NoiseMode.MALFORMED)
    assert (result.failure, result.failed_operation) == (Failure.BAD_RESPONSE, Operation.READ)
    assert "ephemeral" in result.details["error"]


async def test_close_without_answer_is_eof(host: str) -> None:
    result, server = await _probe(host, NoiseMode.CLOSE)
    assert (result.failure, result.failed_operation) == (Failure.EOF, Operation.READ)
    assert len(server.hellos) == 1


async def test_reset_is_connection_reset(host: str) -> None:
    result, _ = await _probe(host, NoiseMode.RESET)
    assert (result.failure, result.failed_operation) == (Failure.CONNECTION_RESET, Operation.READ)


async def test_silence_is_a_read_timeout(host: str) -> None:
    result, _ = await _probe(host, NoiseMode.HANG, app_s=0.3)
    assert (result.failure, result.failed_operation) == (Failure.GENERIC_TIMEOUT, Operation.READ)
    assert result.details["bytes_received"] == 0
    assert result.duration_s < 2.0


async def test_closed_port_is_connection_refused(host: str) -> None:
    with refusing_port(host) as port:
        result = await whatsapp.probe(target("whatsapp", host, port), settings())
    assert (result.failure, result.failed_operation) == (
        Failure.CONNECTION_REFUSED,
        Operation.CONNECT,
    )
