"""The STUN probe against real STUN servers on loopback (IPv4 and IPv6), every mode."""

from __future__ import annotations

from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import AsyncExitStack
from typing import Any

import pytest

from probe.lab.servers.stun import StunServer
from probe.model import Failure, Operation, ProbeResult
from probe.probes import REGISTRY
from probe.probes import stun as stun_probe
from probe.wire import stun as wire
from tests.helpers import refusing_port, settings, target, unbound_udp_port

HOSTS = ["127.0.0.1", "::1"]
UDP_S = 0.6  # every silent case waits this long: keep it short

Start = Callable[..., Awaitable[StunServer]]


@pytest.fixture
async def start() -> AsyncIterator[Start]:
    async with AsyncExitStack() as stack:

        async def _start(host: str = "127.0.0.1", **kw: Any) -> StunServer:
            return await stack.enter_async_context(StunServer(host, 0, **kw))

        yield _start


async def run(server: StunServer, udp_s: float = UDP_S, **params: Any) -> ProbeResult:
    t = target("stun", server.host, server.port, params=params, transport="udp")
    return await stun_probe.probe(t, settings(udp_s=udp_s))


def test_registered() -> None:
    assert REGISTRY["stun"].run is stun_probe.probe


# ---------------------------------------------------------------- Binding over UDP


@pytest.mark.parametrize("host", HOSTS)
async def test_binding_success_records_mapped_address_rtt_and_no_loss(
    start: Start, host: str
) -> None:
    server = await start(host)
    result = await run(server)
    assert result.ok, result
    d = result.details
    assert (d["count"], d["answered"], d["loss"]) == (3, 3, 0.0)
    assert d["response_class"] == "success"
    assert len(d["rtt_s"]) == 3
    assert all(0 < rtt < UDP_S for rtt in d["rtt_s"])
    assert d["mapped_family"] == ("ipv6" if ":" in host else "ipv4")
    assert d["mapped_port"] > 0
    assert "mapped_address" not in d  # the vantage's public address: opt-in only
    assert d["nat"] is False  # loopback: the relay saw our own socket address
    assert d["software"] == "probe-lab stun"
    assert d["datagrams_sent"] == 3  # answered at once: no retransmission
    assert [t["outcome"] for t in d["transactions"]] == ["answered"] * 3
    assert "stun" in result.phases
    # what went out really was three distinct Binding requests with a FINGERPRINT
    sent = [wire.parse(p) for p in server.packets]
    assert len({m.transaction_id for m in sent}) == 3
    assert all(m.attributes[-1].type == wire.Attr.FINGERPRINT for m in sent)


@pytest.mark.parametrize("host", HOSTS)
async def test_peer_text_is_bounded_and_never_carries_an_address(start: Start, host: str) -> None:
    # SOFTWARE and the error reason are the relay's free text: it may name the address it
    # saw us at (which the mapped address keeps opt-in) and may be ~64 KB long.
    said = f"client {host} port 5555 seen at 127.0.0.1:5555 "
    error = await start(host, behavior="error401", error_reason=said * 500)
    talker = await start(host, software=said)
    for result, key in ((await run(error), "error_reason"), (await run(talker), "software")):
        assert result.ok, result.failure
        text = result.details[key]
        assert "5555" in text  # the text is kept as evidence ...
        assert "127.0.0.1" not in text and "::1" not in text  # ... without addresses
        assert len(text) <= 128


async def test_mapped_address_is_recorded_on_request(start: Start) -> None:
    server = await start()
    result = await run(server, count=1, record_mapped_address=True)
    assert result.details["mapped_address"] == f"127.0.0.1:{result.details['mapped_port']}"


async def test_username_and_software_are_sent_when_asked(start: Start) -> None:
    server = await start()
    result = await run(server, count=1, username="tok:en", software="x", fingerprint=False)
    assert result.ok
    sent = wire.parse(server.packets[0])
    assert sent.get(wire.Attr.USERNAME) == "tok:en"
    assert sent.software == "x"
    assert sent.get(wire.Attr.FINGERPRINT) is None


@pytest.mark.parametrize("host", HOSTS)
async def test_error_401_still_proves_the_path(start: Start, host: str) -> None:
    server = await start(host, behavior="error401")
    result = await run(server)
    assert result.ok
    assert result.details["response_class"] == "error"
    assert result.details["error_code"] == 401
    assert result.details["error_reason"] == "Unauthorized"


@pytest.mark.parametrize("behavior", ["truncated", "bad_cookie", "bad_length"])
async def test_malformed_reply_is_bad_response_without_waiting(start: Start, behavior: str) -> None:
    server = await start(behavior=behavior)
    result = await run(server, udp_s=3.0)
    assert result.failure == Failure.BAD_RESPONSE
    assert result.failed_operation == Operation.READ
    assert result.details["malformed"] == 3
    assert result.details["parse_error"]
    # the broken replies carry our transaction ids: no need to wait out the budget
    assert result.duration_s < 1.0


async def test_garbage_without_transaction_id_is_bad_response_at_the_deadline(
    start: Start,
) -> None:
    server = await start(behavior="garbage")
    result = await run(server)
    assert result.failure == Failure.BAD_RESPONSE
    assert "shorter than the header" in result.details["parse_error"]
    assert UDP_S * 0.9 < result.duration_s < UDP_S + 0.5


async def test_giant_datagram_is_bad_response(start: Start) -> None:
    server = await start(behavior="giant")
    result = await run(server, count=1)
    assert result.failure == Failure.BAD_RESPONSE
    assert result.details["malformed"] >= 1


@pytest.mark.parametrize("host", HOSTS)
async def test_silence_is_udp_no_response_never_ok(start: Start, host: str) -> None:
    server = await start(host, behavior="silent")
    result = await run(server)
    assert not result.ok
    assert result.failure == Failure.UDP_NO_RESPONSE
    assert result.failed_operation == Operation.READ
    assert result.details["loss"] == 1.0
    assert result.details["datagrams_received"] == 0
    assert server.received == result.details["datagrams_sent"] >= 3
    assert UDP_S * 0.9 < result.duration_s < UDP_S + 0.5


async def test_retransmissions_follow_rfc5389_timing(start: Start) -> None:
    server = await start(behavior="silent")
    result = await run(server, udp_s=1.8, count=1)
    assert result.details["transactions"][0]["sent"] == 3  # 0, RTO, 3 RTO (7 RTO > budget)
    t0 = server.arrivals[0]
    gaps = [round(t - t0, 2) for t in server.arrivals]
    assert gaps[0] == 0
    assert 0.45 <= gaps[1] <= 0.7
    assert 1.45 <= gaps[2] <= 1.75


def test_retransmit_offsets() -> None:
    assert stun_probe.retransmit_offsets(5.0) == (0.0, 0.5, 1.5, 3.5)
    assert stun_probe.retransmit_offsets(0.4) == (0.0,)
    assert stun_probe.retransmit_offsets(100.0) == (0.0, 0.5, 1.5, 3.5, 7.5, 15.5, 31.5)


async def test_partial_answers_are_ok_with_their_loss(start: Start) -> None:
    server = await start(answer_first=2)  # a censor letting the first packets through
    result = await run(server, count=3)
    assert result.ok
    assert result.details["answered"] == 2
    assert result.details["loss"] == pytest.approx(1 / 3, abs=1e-3)
    assert [t["outcome"] for t in result.details["transactions"]] == [
        "answered",
        "answered",
        "lost",
    ]


async def test_an_echo_reflecting_our_request_is_bad_response(start: Start) -> None:
    server = await start(behavior="echo")
    result = await run(server)
    assert result.failure == Failure.BAD_RESPONSE
    assert result.details["reflected"] == 3


@pytest.mark.parametrize("host", HOSTS)
async def test_icmp_port_unreachable_is_connection_refused(host: str) -> None:
    port = unbound_udp_port(host)
    t = target("stun", host, port, params={})
    result = await stun_probe.probe(t, settings(udp_s=2.0))
    assert result.failure == Failure.CONNECTION_REFUSED
    assert result.failed_operation == Operation.READ
    assert result.duration_s < 1.0  # the ICMP error, not the timeout, ended it


# ---------------------------------------------------------------- same-port control


async def test_control_tells_stun_filtering_from_address_blocking(start: Start) -> None:
    # One box that drops STUN but echoes everything else: what a content filter does.
    server = await start(behavior="drop_stun_echo_rest")
    result = await run(server, control=True)
    assert result.failure == Failure.UDP_NO_RESPONSE
    control = result.details["control"]
    assert control["replied"] is True
    assert control["echoed"] is True
    assert control["sizes"] == [len(p) for p in server.packets if wire.is_stun(p)][:3]
    random_payloads = [p for p in server.packets if not wire.is_stun(p)]
    assert random_payloads
    assert all(p[0] >= 0xC0 for p in random_payloads)  # no call protocol starts so
    assert "control" in result.phases


async def test_control_silence_is_recorded_not_a_failure(start: Start) -> None:
    server = await start()  # a plain STUN server ignores random payloads
    result = await run(server, control=True)
    assert result.ok
    assert result.details["control"]["replied"] is False
    assert result.details["control"]["sent"] >= 3


# ---------------------------------------------------------------- Binding over TCP


@pytest.mark.parametrize("host", HOSTS)
@pytest.mark.parametrize("framing", ["rfc4571", "none"])
async def test_tcp_binding(start: Start, host: str, framing: str) -> None:
    server = await start(host, transport="tcp", framing=framing)
    result = await run(server, transport="tcp", framing=framing)
    assert result.ok, result
    assert result.details["answered"] == 3
    assert result.details["framing"] == framing
    assert result.details["nat"] is False
    assert "connect" in result.phases


async def test_tcp_error_401_is_ok(start: Start) -> None:
    server = await start(transport="tcp", behavior="error401")
    result = await run(server, transport="tcp")
    assert result.ok
    assert result.details["error_code"] == 401


@pytest.mark.parametrize(
    ("behavior", "framing", "failure"),
    [
        ("truncated", "rfc4571", Failure.BAD_RESPONSE),
        ("garbage", "rfc4571", Failure.BAD_RESPONSE),
        ("garbage", "none", Failure.BAD_RESPONSE),
        ("echo", "rfc4571", Failure.BAD_RESPONSE),
        ("giant", "rfc4571", Failure.BAD_RESPONSE),  # one 60 KB frame, read and refused
        ("giant", "none", Failure.BAD_RESPONSE),  # not a STUN header: nothing more read
        ("truncated", "none", Failure.EOF),  # half a message, then FIN
        ("reset", "rfc4571", Failure.CONNECTION_RESET),
        ("silent", "rfc4571", Failure.GENERIC_TIMEOUT),
    ],
)
async def test_tcp_failures(start: Start, behavior: str, framing: str, failure: Failure) -> None:
    server = await start(transport="tcp", behavior=behavior, framing=framing)
    result = await run(server, transport="tcp", framing=framing)
    assert result.failure == failure
    assert result.failed_operation == Operation.READ


async def test_tcp_refused_fails_at_connect() -> None:
    with refusing_port() as port:
        t = target("stun", "127.0.0.1", port, params={"transport": "tcp"})
        result = await stun_probe.probe(t, settings(udp_s=UDP_S))
    assert result.failure == Failure.CONNECTION_REFUSED
    assert result.failed_operation == Operation.CONNECT


# ---------------------------------------------------------------- call-like flow


@pytest.mark.parametrize("host", HOSTS)
async def test_flow_to_an_echo_reports_no_loss_and_jitter(start: Start, host: str) -> None:
    server = await start(host, behavior="echo")
    result = await run(server, mode="flow", duration_s=1.0, rate_pps=50)
    assert result.ok, result
    d = result.details
    assert d["sent"] == d["received"] == 50
    assert (d["stun_sent"], d["stun_received"]) == (3, 3)
    assert d["loss"] == 0.0
    assert d["cutoff_s"] is None
    assert d["jitter_s"] is not None
    assert d["jitter_s"] >= 0
    assert d["rtt_min_s"] <= d["rtt_median_s"] <= d["rtt_max_s"]
    # the first packets are STUN, the rest RTP-shaped media with sequence numbers
    assert all(wire.is_stun(p) for p in list(server.packets)[:3])
    media = list(server.packets)[3:]
    assert [p[0] for p in media] == [0x80] * 47
    assert [int.from_bytes(p[2:4], "big") for p in media] == list(range(3, 50))
    assert {len(p) for p in media} == {160}
    # ~50 packets a second: the whole flow takes about its duration
    assert 0.9 <= server.arrivals[-1] - server.arrivals[0] <= 1.2


async def test_flow_cut_off_after_n_packets_fails_with_cutoff(start: Start) -> None:
    server = await start(behavior="echo", answer_first=20)
    result = await run(server, udp_s=0.5, mode="flow", duration_s=1.0)
    assert result.failure == Failure.UDP_NO_RESPONSE
    d = result.details
    assert d["received"] == 20
    assert d["sent"] == 50
    assert d["loss"] == pytest.approx(0.6)
    assert 0.3 <= d["cutoff_s"] <= 0.5  # packet 20 left at 0.4 s
    assert d["last_reply_s"] < d["cutoff_s"] + 0.05


async def test_flow_cut_off_after_t_seconds(start: Start) -> None:
    server = await start(behavior="echo", answer_for_s=0.3)
    result = await run(server, udp_s=0.5, mode="flow", duration_s=1.0)
    assert result.failure == Failure.UDP_NO_RESPONSE
    assert 0.2 <= result.details["cutoff_s"] <= 0.5


async def test_flow_silent_from_the_start_is_cut_off_at_zero(start: Start) -> None:
    server = await start(behavior="silent")
    result = await run(server, udp_s=0.3, mode="flow", duration_s=0.5, rate_pps=20)
    assert result.failure == Failure.UDP_NO_RESPONSE
    assert result.details["cutoff_s"] == 0.0
    assert result.details["received"] == 0


async def test_flow_against_a_plain_stun_server_answers_only_the_stun_packets(
    start: Start,
) -> None:
    # Flow mode needs an echo: a STUN server answers the opening Binding requests only.
    server = await start()
    result = await run(server, udp_s=0.3, mode="flow", duration_s=0.6)
    assert result.failure == Failure.UDP_NO_RESPONSE
    assert result.details["stun_received"] == 3
    assert result.details["received"] == 3


# ---------------------------------------------------------------- reflector hello


@pytest.mark.parametrize("host", HOSTS)
async def test_reflector_any_reply_is_success(start: Start, host: str) -> None:
    server = await start(host, behavior="echo")
    tag = bytes(range(16))
    result = await run(server, mode="reflector", peer_tag=tag.hex())
    assert result.ok
    assert server.packets[0] == wire.reflector_hello(tag)
    assert result.details["tag_match"] is True
    assert result.details["reply_bytes"] == 40


async def test_reflector_silence_is_udp_no_response(start: Start) -> None:
    server = await start(behavior="silent")
    result = await run(server, mode="reflector")
    assert result.failure == Failure.UDP_NO_RESPONSE
    assert len(server.packets[0]) == 40  # a random peer tag, the same layout


# ---------------------------------------------------------------- parameters


@pytest.mark.parametrize(
    ("params", "message"),
    [
        ({"cont": 3}, "unknown param 'cont'; did you mean 'count'"),
        ({"count": 0}, "count"),
        ({"count": True}, "count"),
        ({"mode": "turn"}, "mode"),
        ({"transport": "tcp", "mode": "flow"}, "transport: tcp supports"),
        ({"transport": "tcp", "control": True}, "transport: tcp supports"),
        ({"username": ""}, "username"),
        ({"software": "x" * 128}, "software"),
        ({"username": 5}, "username"),
        ({"peer_tag": "abc"}, "peer_tag"),
        ({"mode": "flow", "duration_s": 600, "rate_pps": 500}, "65535"),
    ],
)
def test_invalid_params_are_rejected(params: dict[str, Any], message: str) -> None:
    with pytest.raises(ValueError, match=message):
        stun_probe.StunParams.parse(params)
