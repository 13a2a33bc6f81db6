"""MTProto probe against the real DC stub on loopback (IPv4 and IPv6), one test per outcome."""

from __future__ import annotations

import pytest

from probe.lab.servers.mtproto import MTProtoMode, MTProtoServer
from probe.model import Failure, Operation, ProbeResult
from probe.probes import REGISTRY, mtproto
from tests.helpers import refusing_port, settings, target

pytestmark = pytest.mark.parametrize("host", ["127.0.0.1", "::1"])


async def _probe(
    host: str, mode: MTProtoMode, **timeouts: float
) -> tuple[ProbeResult, MTProtoServer]:
    async with MTProtoServer(host, 0, mode) as server:
        result = await mtproto.probe(target("mtproto", host, server.port), settings(**timeouts))
    return result, server


async def test_res_pq_echoing_our_nonce_is_success(host: str) -> None:
    result, server = await _probe(host, MTProtoMode.OK)
    assert result.ok, result
    assert result.details["fingerprints"] == 3
    assert result.details["server_nonce_present"] is True
    assert result.details["pq_bytes"] == 8
    assert result.details["rtt_ms"] >= 0
    assert result.details["peer_family"] == ("ipv6" if ":" in host else "ipv4")
    assert {"connect", "first_byte", "handshake"} <= set(result.phases)
    ((msg_id, nonce),) = server.requests
    assert msg_id % 4 == 0
    assert len(nonce) == 16


async def test_each_probe_sends_a_fresh_nonce(host: str) -> None:
    async with MTProtoServer(host, 0) as server:
        for _ in range(2):
            result = await REGISTRY["mtproto"].run(target("mtproto", host, server.port), settings())
            assert result.ok
    assert server.requests[0][1] != server.requests[1][1]


async def test_wrong_nonce_is_bad_response(host: str) -> None:
    result, _ = await _probe(host, MTProtoMode.WRONG_NONCE)
    assert (result.failure, result.failed_operation) == (Failure.BAD_RESPONSE, Operation.READ)
    assert result.details["reason"] == "nonce_mismatch"


async def test_block_page_is_bad_response_with_evidence(host: str) -> None:
    result, _ = await _probe(host, MTProtoMode.GARBAGE)
    assert (result.failure, result.failed_operation) == (Failure.BAD_RESPONSE, Operation.READ)
    assert result.details["reason"] == "malformed"
    assert bytes.fromhex(result.details["first_bytes_hex"]).startswith(b"HTTP")
    assert "exceeds" in result.details["error"]


async def test_transport_error_is_bad_response_naming_the_code(host: str) -> None:
    result, _ = await _probe(host, MTProtoMode.TRANSPORT_ERROR)
    assert (result.failure, result.failed_operation) == (Failure.BAD_RESPONSE, Operation.READ)
    assert result.details["reason"] == "transport_error"
    assert result.details["transport_error"] == -404
    assert result.details["transport_error_framed"] is True


async def test_giant_reply_is_refused_before_reading_it(host: str) -> None:
    result, _ = await _probe(host, MTProtoMode.GIANT, app_s=5.0)
    assert result.failure == Failure.BAD_RESPONSE
    assert result.details["bytes_received"] == 4  # only the length header was read
    assert result.duration_s < 2.0


async def test_close_without_answer_is_eof(host: str) -> None:
    result, server = await _probe(host, MTProtoMode.CLOSE)
    assert (result.failure, result.failed_operation) == (Failure.EOF, Operation.READ)
    assert result.details["bytes_received"] == 0
    assert len(server.requests) == 1  # the request did arrive: the answer is what is missing


async def test_reset_is_connection_reset(host: str) -> None:
    result, _ = await _probe(host, MTProtoMode.RESET)
    assert (result.failure, result.failed_operation) == (Failure.CONNECTION_RESET, Operation.READ)


async def test_silence_is_a_read_timeout(host: str) -> None:
    result, _ = await _probe(host, MTProtoMode.HANG, app_s=0.3)
    assert (result.failure, result.failed_operation) == (Failure.GENERIC_TIMEOUT, Operation.READ)
    assert 0.25 < result.phases["first_byte"] < 2.0
    assert result.duration_s < 2.0


async def test_stall_mid_reply_is_a_read_timeout_keeping_what_arrived(host: str) -> None:
    result, _ = await _probe(host, MTProtoMode.STALL, app_s=0.3)
    assert (result.failure, result.failed_operation) == (Failure.GENERIC_TIMEOUT, Operation.READ)
    assert result.details["bytes_received"] == 10
    assert result.details["first_bytes_hex"].startswith("64000000")  # length 100 arrived


async def test_closed_port_is_connection_refused(host: str) -> None:
    with refusing_port(host) as port:
        result = await mtproto.probe(target("mtproto", host, port), settings())
    assert (result.failure, result.failed_operation) == (
        Failure.CONNECTION_REFUSED,
        Operation.CONNECT,
    )


async def test_hostname_is_a_config_bug_never_resolved(host: str) -> None:
    # Probes get addresses, never names (resolving would hide DNS tampering); like the
    # tcp probe, a name in `address` raises instead of reaching getaddrinfo.
    t = target("mtproto", "dc1.example", 443)
    with pytest.raises(ValueError, match="does not appear to be an IPv4 or IPv6 address"):
        await mtproto.probe(t, settings())
