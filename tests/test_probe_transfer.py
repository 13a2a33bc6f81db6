"""Transfer probe against the real HTTPS bulk server on loopback (port 0, IPv4 and IPv6):
a clean download, the B7 freeze on every and on some connections, B6 throttling (download
and upload), reset, premature EOF, bytes that are not HTTP, a silent server, the deadline,
and connect / TLS failures."""

from __future__ import annotations

import re
import socket
import ssl
from typing import Any

import pytest

from probe.lab.certs import CertificateAuthority, LeafCert
from probe.lab.servers.https_bulk import BulkBehaviour, HTTPSBulkServer
from probe.lab.servers.tls import TLSMode, TLSServer, server_context
from probe.model import Failure, Operation, ProbeResult
from probe.probes import REGISTRY, transfer
from probe.probes.transfer import TransferParams
from tests.helpers import refusing_port, settings, target

HOST = "bulk.test"
KIB = 1024
STALL_S = 0.5
# A server that stops writing on loopback still answers keepalives from its kernel, so the
# probe watches such a silence to the deadline (the path works): keep that short here.
FROZEN_DEADLINE_S = 2.0


def _ipv6_loopback() -> bool:
    try:
        with socket.socket(socket.AF_INET6) as sock:
            sock.bind(("::1", 0))
    except OSError:
        return False
    return True


@pytest.fixture(scope="module")
def leaf(ca: CertificateAuthority) -> LeafCert:
    return ca.issue(HOST)


@pytest.fixture(scope="module")
def ca_file(ca: CertificateAuthority, tmp_path_factory: pytest.TempPathFactory) -> str:
    # one path for the module (shadows conftest's per-test file): the probe caches its
    # client context per CA file, and loading the system store costs ~0.1 s per test
    return str(ca.write_ca(tmp_path_factory.mktemp("ca") / "ca.pem"))


async def _run(
    ca_file: str | None,
    *,
    behaviour: BulkBehaviour | None = None,
    cert: LeafCert | None = None,
    ssl_context: ssl.SSLContext | None = None,
    params: dict[str, Any] | None = None,
    address: str = "127.0.0.1",
    **timeouts: float,
) -> tuple[ProbeResult, HTTPSBulkServer]:
    server = HTTPSBulkServer(address, cert=cert, ssl_context=ssl_context, behaviour=behaviour)
    async with server:
        tgt = target("transfer", address, server.port, host=HOST, params=params or {})
        # generous by default so a loaded CI machine cannot fake a stall; tests of stalls
        # and silences pass a short STALL_S / APP_S and wait only that long
        limits = {"stall_s": 2.0, "app_s": 2.0, **timeouts}
        result = await transfer.probe(tgt, settings(ca_file=ca_file, resolvers=None, **limits))
    return result, server


def _conns(result: ProbeResult, key: str = "connections") -> list[dict[str, Any]]:
    return list(result.details[key])


def test_transfer_is_registered() -> None:
    assert REGISTRY["transfer"].run is transfer.probe


@pytest.mark.parametrize(
    "address",
    [
        "127.0.0.1",
        pytest.param(
            "::1", marks=pytest.mark.skipif(not _ipv6_loopback(), reason="no IPv6 loopback")
        ),
    ],
)
async def test_clean_download_over_fresh_connections_is_ok(
    address: str, leaf: LeafCert, ca_file: str
) -> None:
    result, server = await _run(
        ca_file, cert=leaf, behaviour=BulkBehaviour(body_bytes=256 * KIB), address=address
    )
    assert result.ok, result
    assert server.accepted == 3
    assert server.requests == 3
    conns = _conns(result)
    assert [c["outcome"] for c in conns] == ["complete"] * 3
    for conn in conns:
        assert conn["body_bytes"] == conn["content_length"] == 256 * KIB
        assert conn["status"] == 200
        assert conn["wire_bytes"] > conn["body_bytes"] + conn["handshake_wire_bytes"]
    assert result.details["median_kbps"] > 300
    assert result.details["stalled_fraction"] == 0.0
    assert result.details["sni"] == HOST
    assert set(result.phases) == {"connect", "tls", "first_byte", "transfer"}
    assert result.flags == ()


@pytest.mark.parametrize("framing", ["chunked", "close"])
async def test_chunked_and_close_delimited_bodies_are_counted_exactly(
    framing: str, leaf: LeafCert, ca_file: str
) -> None:
    behaviour = BulkBehaviour(body_bytes=100_000, framing=framing)  # type: ignore[arg-type]
    result, _ = await _run(ca_file, cert=leaf, behaviour=behaviour, params={"connections": 1})
    assert result.ok, result
    (conn,) = _conns(result)
    assert conn["framing"] == framing
    assert conn["body_bytes"] == 100_000


async def test_max_bytes_stops_reading(leaf: LeafCert, ca_file: str) -> None:
    params = {"connections": 1, "max_bytes": 256 * KIB}
    result, _ = await _run(
        ca_file, cert=leaf, behaviour=BulkBehaviour(body_bytes=8 * 1024 * KIB), params=params
    )
    assert result.ok, result
    (conn,) = _conns(result)
    assert conn["outcome"] == "limit"
    assert 256 * KIB <= conn["body_bytes"] < 256 * KIB + 64 * KIB


async def test_freeze_after_16k_is_stall_after_bytes(leaf: LeafCert, ca_file: str) -> None:
    behaviour = BulkBehaviour(mode="freeze", cut_after=16 * KIB)
    result, server = await _run(
        ca_file, cert=leaf, behaviour=behaviour, stall_s=STALL_S, transfer_s=FROZEN_DEADLINE_S
    )
    assert result.failure == Failure.STALL_AFTER_BYTES
    assert result.failed_operation is Operation.READ
    assert result.details["stalled_at_bytes"] == [16 * KIB] * 3
    for wire in result.details["stalled_at_wire_bytes"]:
        assert 16 * KIB < wire <= 64 * KIB  # body + handshake + TLS framing, inside the window
    assert result.details["stalled_fraction"] == 1.0
    assert server.cut == [1, 2, 3]
    for conn in _conns(result):
        assert conn["outcome"] == "stalled"
        assert conn["stage"] == "body"
        # watched for stall_s and then the confirm window: it never resumed
        assert conn["silent_s"] >= (1 + transfer.CONFIRM_FACTOR) * STALL_S
        # the server's kernel kept answering keepalives: the path works, so the silence
        # was watched up to the deadline before it counted
        assert conn["acks_in_silence"] is True
    assert result.failure == "stall_after_bytes"  # bounded: the byte counts live in details


async def test_freeze_on_some_connections_is_reported_with_its_fraction(
    leaf: LeafCert, ca_file: str
) -> None:
    behaviour = BulkBehaviour(mode="freeze", cut_after=16 * KIB, cut_every=2, body_bytes=128 * KIB)
    result, server = await _run(
        ca_file, cert=leaf, behaviour=behaviour, stall_s=STALL_S, transfer_s=FROZEN_DEADLINE_S
    )
    assert result.failure == Failure.STALL_AFTER_BYTES
    assert [c["outcome"] for c in _conns(result)] == ["complete", "stalled", "complete"]
    assert result.details["stalled_connections"] == 1
    assert result.details["stalled_fraction"] == pytest.approx(1 / 3, abs=0.001)
    assert result.details["stalled_at_bytes"] == [16 * KIB]
    assert result.details["measured_connections"] == 2  # the healthy ones still measured
    assert server.cut == [2]


@pytest.mark.parametrize(
    ("params", "failure"),
    [
        ({}, Failure.GENERIC_TIMEOUT),  # past the 64 KiB window: not the B7 signature
        ({"stall_max_bytes": 256 * KIB}, Failure.STALL_AFTER_BYTES),
    ],
)
async def test_stall_beyond_the_window_is_a_timeout(
    params: dict[str, Any], failure: Failure, leaf: LeafCert, ca_file: str
) -> None:
    behaviour = BulkBehaviour(mode="freeze", cut_after=128 * KIB)
    result, _ = await _run(
        ca_file,
        cert=leaf,
        behaviour=behaviour,
        params={"connections": 1, **params},
        stall_s=STALL_S,
        transfer_s=FROZEN_DEADLINE_S,
    )
    assert result.failure == failure
    assert result.failed_operation is Operation.READ
    assert result.details["stalled_at_bytes"] == [128 * KIB]


@pytest.mark.parametrize(
    ("num_tickets", "failure", "stage"),
    [
        # no byte at all after the request (B5 as on the wire): first-byte timeout
        (0, Failure.GENERIC_TIMEOUT, "first_byte"),
        # TLS 1.3 session tickets arrive, then nothing: a stall at 0 body bytes (documented)
        (2, Failure.STALL_AFTER_BYTES, "head"),
    ],
)
async def test_silent_server_after_handshake(
    num_tickets: int, failure: Failure, stage: str, leaf: LeafCert, ca_file: str
) -> None:
    ctx = server_context(leaf)
    ctx.num_tickets = num_tickets
    result, server = await _run(
        ca_file,
        ssl_context=ctx,
        behaviour=BulkBehaviour(mode="silent"),
        params={"connections": 1},
        app_s=STALL_S,
        stall_s=STALL_S,
        transfer_s=FROZEN_DEADLINE_S,
    )
    assert result.failure == failure
    assert result.failed_operation is Operation.READ
    (conn,) = _conns(result)
    assert conn["stage"] == stage
    assert "ttfb_s" not in conn
    assert conn["body_bytes"] == 0
    assert server.cut == [1]


async def test_rate_limited_server_is_throttled(leaf: LeafCert, ca_file: str) -> None:
    behaviour = BulkBehaviour(body_bytes=64 * KIB, rate_kbps=200)
    result, _ = await _run(ca_file, cert=leaf, behaviour=behaviour, params={"connections": 2})
    assert result.failure == Failure.THROTTLED
    assert result.failed_operation is Operation.READ
    assert 150 < result.details["median_kbps"] < 300
    assert result.details["throttled_directions"] == ["download"]
    assert [c["outcome"] for c in _conns(result)] == ["complete", "complete"]


async def test_paced_body_too_small_to_measure_is_not_judged(leaf: LeafCert, ca_file: str) -> None:
    behaviour = BulkBehaviour(body_bytes=8 * KIB, rate_kbps=200)
    result, _ = await _run(ca_file, cert=leaf, behaviour=behaviour, params={"connections": 1})
    assert result.ok, result
    assert result.flags == ("transfer_too_small_to_measure",)
    assert result.details["measured_connections"] == 0


async def test_transfer_cut_by_the_deadline_is_still_measured(leaf: LeafCert, ca_file: str) -> None:
    behaviour = BulkBehaviour(body_bytes=1024 * KIB, rate_kbps=200)
    params = {"connections": 1, "throttle_min_bytes": 16 * KIB}
    result, _ = await _run(ca_file, cert=leaf, behaviour=behaviour, params=params, transfer_s=1.5)
    assert result.failure == Failure.THROTTLED
    (conn,) = _conns(result)
    assert conn["outcome"] == "deadline"
    assert 16 * KIB <= conn["body_bytes"] < 64 * KIB
    assert conn["duration_s"] < 2.0


async def test_reset_mid_body_is_connection_reset(leaf: LeafCert, ca_file: str) -> None:
    behaviour = BulkBehaviour(mode="reset", cut_after=32 * KIB)
    result, _ = await _run(ca_file, cert=leaf, behaviour=behaviour, params={"connections": 1})
    assert result.failure == Failure.CONNECTION_RESET
    assert result.failed_operation is Operation.READ
    (conn,) = _conns(result)
    assert conn["stage"] == "body"
    assert conn["status"] == 200
    assert conn["body_bytes"] <= 32 * KIB


@pytest.mark.parametrize(
    ("raw", "failure", "stage"),
    [
        # FIN (with close_notify) before Content-Length was reached
        (b"HTTP/1.1 200 OK\r\nContent-Length: 100000\r\n\r\n" + b"x" * 1000, Failure.EOF, "body"),
        (b"SSH-2.0-OpenSSH_9.6\r\n\r\n", Failure.BAD_RESPONSE, "head"),  # not HTTP
        (b"HTTP/1.1 200 OK\r\nX: " + b"a" * 20_000 + b"\r\n\r\n", Failure.BAD_RESPONSE, "head"),
        (
            b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\nContent-Length: 6\r\n\r\n",
            Failure.BAD_RESPONSE,
            "head",
        ),
        (
            b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\nzz\r\n",
            Failure.BAD_RESPONSE,
            "body",
        ),
        (b"", Failure.EOF, "head"),  # closes without a byte of response
    ],
    ids=["eof_before_length", "not_http", "giant_head", "conflicting_length", "bad_chunk", "empty"],
)
async def test_hostile_responses_are_classified(
    raw: bytes, failure: Failure, stage: str, leaf: LeafCert, ca_file: str
) -> None:
    behaviour = BulkBehaviour(raw_response=raw)
    result, _ = await _run(ca_file, cert=leaf, behaviour=behaviour, params={"connections": 1})
    assert result.failure == failure
    assert result.failed_operation is Operation.READ
    assert _conns(result)[0]["stage"] == stage


async def test_upload_measures_upstream_rate(leaf: LeafCert, ca_file: str) -> None:
    params = {"connections": 1, "upload_bytes": 128 * KIB}
    result, server = await _run(
        ca_file, cert=leaf, behaviour=BulkBehaviour(body_bytes=128 * KIB), params=params
    )
    assert result.ok, result
    assert server.uploads == [128 * KIB]
    (upload,) = _conns(result, "uploads")
    assert upload["upload_bytes"] == 128 * KIB
    assert upload["status"] == 200
    assert upload["upload_kbps"] > 300
    assert result.details["median_upload_kbps"] == pytest.approx(upload["upload_kbps"], rel=0.01)


async def test_throttled_upload_is_throttled_on_write(leaf: LeafCert, ca_file: str) -> None:
    behaviour = BulkBehaviour(body_bytes=4 * KIB, upload_rate_kbps=200)
    params = {"connections": 1, "upload_bytes": 64 * KIB}
    result, server = await _run(ca_file, cert=leaf, behaviour=behaviour, params=params)
    assert result.failure == Failure.THROTTLED
    assert result.failed_operation is Operation.WRITE
    assert result.details["throttled_directions"] == ["upload"]
    assert 150 < result.details["median_upload_kbps"] < 300
    assert server.uploads == [64 * KIB]


@pytest.mark.parametrize(
    ("case", "failure"),
    [
        ("unknown_ca", Failure.SSL_UNKNOWN_AUTHORITY),
        ("wrong_name", Failure.SSL_INVALID_HOSTNAME),
        ("expired", Failure.SSL_INVALID_CERTIFICATE),
    ],
)
async def test_certificate_failures_are_classified_and_end_the_probe(
    case: str, failure: Failure, ca: CertificateAuthority, leaf: LeafCert, ca_file: str
) -> None:
    cert = ca.issue(HOST, expired=True) if case == "expired" else leaf
    params = {"sni": "other.test"} if case == "wrong_name" else {}
    result, server = await _run(None if case == "unknown_ca" else ca_file, cert=cert, params=params)
    assert result.failure == failure
    assert result.failed_operation is Operation.TLS_HANDSHAKE
    assert result.details["connections_attempted"] == 1  # no point hitting the wall 3 times
    assert server.requests == 0


@pytest.mark.parametrize(
    ("mode", "failure"),
    [
        (TLSMode.RESET_AFTER_HELLO, Failure.CONNECTION_RESET),  # B3, RST variant
        (TLSMode.HANG_AFTER_HELLO, Failure.GENERIC_TIMEOUT),  # B3, silent drop
    ],
)
async def test_handshake_blocked_by_a_censor(mode: TLSMode, failure: Failure, ca_file: str) -> None:
    async with TLSServer("127.0.0.1", mode=mode) as server:
        tgt = target("transfer", "127.0.0.1", server.port, host=HOST)
        result = await transfer.probe(tgt, settings(ca_file=ca_file, tls_s=0.5))
    assert result.failure == failure
    assert result.failed_operation is Operation.TLS_HANDSHAKE


async def test_closed_port_is_connection_refused(ca_file: str) -> None:
    with refusing_port() as port:
        tgt = target("transfer", "127.0.0.1", port, host=HOST)
        result = await transfer.probe(tgt, settings(ca_file=ca_file))
    assert result.failure == Failure.CONNECTION_REFUSED
    assert result.failed_operation is Operation.CONNECT
    assert result.details["connections_attempted"] == 1


@pytest.mark.parametrize(
    ("params", "message"),
    [
        ({"bogus": 1}, "bogus: unknown param 'bogus'"),
        ({"connections": 0}, "connections: must be an integer in [1, 20], got 0"),
        ({"max_bytes": True}, "max_bytes: must be an integer"),
        ({"path": "index.html"}, "path: must be a path starting with '/'"),
        ({"path": "/a\r\nX: y"}, "invalid request path"),
        ({"throttle_kbps": -1}, "throttle_kbps: must be a number > 0, got -1"),
        ({"sni": "not a host"}, "sni: must be a hostname"),
    ],
)
def test_invalid_params_are_rejected(params: dict[str, Any], message: str) -> None:
    with pytest.raises(ValueError, match=re.escape(message)):
        TransferParams.parse(params)


def test_default_params() -> None:
    p = TransferParams.parse({})
    assert (p.path, p.connections, p.max_bytes, p.upload_bytes) == ("/", 3, 1024 * KIB, 0)
    assert (p.throttle_kbps, p.throttle_min_bytes, p.stall_max_bytes) == (300.0, 64 * KIB, 64 * KIB)


async def test_ip_literal_target_verifies_the_address(
    ca: CertificateAuthority, ca_file: str
) -> None:
    # no name at all: no SNI is sent, the certificate's IP SAN is checked, Host is the IP
    cert = ca.issue("127.0.0.1")
    async with HTTPSBulkServer(
        "127.0.0.1", cert=cert, behaviour=BulkBehaviour(body_bytes=1000)
    ) as srv:
        tgt = target("transfer", "127.0.0.1", srv.port, params={"connections": 1})
        result = await transfer.probe(tgt, settings(ca_file=ca_file))
    assert result.ok, result
    assert result.details["sni"] is None
    assert _conns(result)[0]["body_bytes"] == 1000


async def test_a_gap_longer_than_stall_s_that_resumes_is_no_stall(
    leaf: LeafCert, ca_file: str
) -> None:
    # a retransmission back-off on a shaped path: silence past stall_s, then the rest
    behaviour = BulkBehaviour(mode="pause", cut_after=16 * KIB, pause_s=2 * STALL_S)
    result, server = await _run(
        ca_file,
        cert=leaf,
        behaviour=behaviour,
        params={"connections": 1, "throttle_kbps": 1},
        stall_s=STALL_S,
        transfer_s=FROZEN_DEADLINE_S,
    )
    assert result.ok, result.details
    (conn,) = _conns(result)
    assert conn["outcome"] == "complete"
    assert conn["body_bytes"] == behaviour.body_bytes  # it counts toward throughput
    assert conn["long_gaps"] == 1
    assert conn["longest_gap_s"] >= 2 * STALL_S
    assert result.details["stalled_connections"] == 0
    assert server.cut == [1]


@pytest.mark.parametrize("cut_after", [12 * KIB, 24 * KIB, 36 * KIB])
async def test_freezes_across_the_reported_range_give_their_byte_counts(
    cut_after: int, leaf: LeafCert, ca_file: str
) -> None:
    behaviour = BulkBehaviour(mode="freeze", cut_after=cut_after)
    result, _ = await _run(
        ca_file,
        cert=leaf,
        behaviour=behaviour,
        params={"connections": 1},
        stall_s=STALL_S,
        transfer_s=FROZEN_DEADLINE_S,
    )
    assert result.failure == Failure.STALL_AFTER_BYTES
    assert result.details["stalled_at_bytes"] == [cut_after]
    for wire in result.details["stalled_at_wire_bytes"]:
        assert cut_after < wire < cut_after + 8 * KIB  # body + handshake + TLS framing


async def test_a_flow_the_deadline_cut_short_is_measured_whatever_its_size(
    leaf: LeafCert, ca_file: str
) -> None:
    # a very slow path: far below throttle_min_bytes arrive before transfer_s runs out
    behaviour = BulkBehaviour(rate_kbps=40, burst_bytes=1024)
    result, _ = await _run(
        ca_file,
        cert=leaf,
        behaviour=behaviour,
        params={"connections": 1},
        transfer_s=1.5,
        stall_s=1.0,
    )
    (conn,) = _conns(result)
    assert conn["outcome"] == "deadline"
    assert conn["body_bytes"] < 64 * KIB  # the default throttle_min_bytes
    assert result.failure == Failure.THROTTLED, result.details
    assert result.details["measured_connections"] == 1
