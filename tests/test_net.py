"""The shared transports (probe/probes/_net): the sans-IO TLS client against a real TLS
server in memory (two SSLObjects, no sockets, as aioquic tests its QuicConnection), and
the TCP connect, the TLS pump and the connected-UDP channel against real loopback servers."""

from __future__ import annotations

import asyncio
import contextlib
import socket
import ssl
import struct
import sys
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import cast

import pytest
from hypothesis import given
from hypothesis import strategies as st

from probe.classify import IcmpError, classify
from probe.lab.certs import CertificateAuthority
from probe.lab.servers.tcp import TCPMode, TCPServer
from probe.lab.servers.tls import TLSMode, TLSServer, server_context
from probe.model import Operation
from probe.probes._net.tcp import (
    address_families,
    close_streams,
    connect,
    kernel_connect_rtt,
    open_streams,
    since_last_ack,
    watch_path,
)
from probe.probes._net.tls import Negotiated, TlsClient
from probe.probes._net.tls_pump import TlsPump
from probe.probes._net.udp import ICMP_KEEP, UdpChannel, _icmp_error, icmp_evidence
from probe.wire.errqueue import IP_RECVERR, IPV6_RECVERR, QueuedError, parse_error_queue
from tests.agentproc import REPO, needs_unshare, required_tool, run_driver
from tests.helpers import refusing_port, unbound_udp_port

NAME = "net.test"
HOSTS = pytest.mark.parametrize(("host", "family"), [("127.0.0.1", "ipv4"), ("::1", "ipv6")])


def client_context(ca_file: str) -> ssl.SSLContext:
    ctx = ssl.create_default_context(cafile=ca_file)
    ctx.set_alpn_protocols(["h2", "http/1.1"])
    return ctx


class MemoryServer:
    """A real OpenSSL server endpoint driven through memory BIOs: no socket anywhere."""

    def __init__(self, ca: CertificateAuthority, name: str = NAME) -> None:
        ctx = server_context(ca.issue(name, chain=True), alpn=["http/1.1"])
        self.incoming, self.outgoing = ssl.MemoryBIO(), ssl.MemoryBIO()
        self.ssl = ctx.wrap_bio(self.incoming, self.outgoing, server_side=True)
        self.done = False

    def step(self) -> None:
        if self.done:
            return
        try:
            self.ssl.do_handshake()
            self.done = True
        except ssl.SSLWantReadError:
            pass


def shuttle(client: TlsClient, server: MemoryServer, rounds: int = 10) -> int:
    """Move bytes both ways until the client's handshake completes; returns bytes moved."""
    moved = 0
    for _ in range(rounds):  # a TLS 1.3 handshake needs two flights each way
        done = client.do_handshake()
        out = client.data_to_send()
        moved += len(out)
        server.incoming.write(out)
        server.step()
        back = server.outgoing.read()
        moved += len(back)
        client.feed(back)
        if done and not back:
            return moved
    raise AssertionError("handshake did not complete in memory")


@pytest.fixture
def ca_file_path(ca: CertificateAuthority, tmp_path: Path) -> str:
    return str(ca.write_ca(tmp_path / "ca.pem"))


# --- sans-IO TLS client, in memory -----------------------------------------------------------


def test_handshake_in_memory_counts_every_byte_each_way(
    ca: CertificateAuthority, ca_file_path: str
) -> None:
    client = TlsClient(client_context(ca_file_path), NAME)
    server = MemoryServer(ca)
    assert not client.do_handshake()  # the ClientHello is queued, nothing arrived yet
    hello = client.data_to_send()
    assert hello[:1] == b"\x16" and NAME.encode() in hello
    assert client.bytes_sent == len(hello) and client.bytes_received == 0
    server.incoming.write(hello)
    moved = len(hello) + shuttle(client, server)
    assert client.handshake_complete and server.done
    assert client.bytes_sent + client.bytes_received == moved
    assert client.negotiated() == Negotiated(
        tls_version="TLSv1.3",
        alpn="http/1.1",
        cipher=server.ssl.cipher()[0],  # type: ignore[index]
    )
    der = client.peer_certificate()
    assert der is not None and client.peer_chain()[0] == der
    assert len(client.peer_chain()) == 2  # leaf and the intermediate the server sent


def test_plaintext_both_ways_and_close_notify_ends_the_stream(
    ca: CertificateAuthority, ca_file_path: str
) -> None:
    client = TlsClient(client_context(ca_file_path), NAME)
    server = MemoryServer(ca)
    shuttle(client, server)
    client.write(b"GET / HTTP/1.1\r\n\r\n")
    server.incoming.write(client.data_to_send())
    assert server.ssl.read(1024) == b"GET / HTTP/1.1\r\n\r\n"
    assert client.read(1024) is None  # nothing fed yet: a whole record is missing
    server.ssl.write(b"hello")
    record = server.outgoing.read()
    client.feed(record[:3])  # half a record header: still nothing to read
    assert client.read(1024) is None
    client.feed(record[3:])
    assert client.read(1024) == b"hello"
    with contextlib.suppress(ssl.SSLWantReadError):
        server.ssl.unwrap()
    client.feed(server.outgoing.read())
    assert client.read(1024) == b""
    assert client.close_kind == "close_notify"


def test_eof_without_close_notify_is_ragged(ca: CertificateAuthority, ca_file_path: str) -> None:
    client = TlsClient(client_context(ca_file_path), NAME)
    shuttle(client, MemoryServer(ca))
    client.feed(b"")  # nothing: an empty piece is not the EOF
    assert client.read(1024) is None and not client.eof_received
    client.feed_eof()
    assert client.eof_received
    assert client.read(1024) == b""
    assert client.close_kind == "ragged"


def test_failed_verification_keeps_the_chain_and_queues_an_alert(ca_file_path: str) -> None:
    client = TlsClient(client_context(ca_file_path), NAME)
    server = MemoryServer(CertificateAuthority("Interceptor CA"))
    with pytest.raises(ssl.SSLCertVerificationError):
        shuttle(client, server)
    assert client.peer_certificate() is None  # what getpeercert gives after a failure
    assert len(client.peer_chain()) == 2  # the MITM chain is still the evidence
    alert = client.data_to_send()
    assert alert[:1] == b"\x15"  # an alert record tells the server why


def test_bytes_that_are_not_tls_raise_ssl_error(ca_file_path: str) -> None:
    client = TlsClient(client_context(ca_file_path), NAME)
    assert not client.do_handshake()
    client.data_to_send()
    client.feed(b"HTTP/1.1 403 Forbidden\r\n\r\n")
    with pytest.raises(ssl.SSLError):
        client.do_handshake()
    assert client.bytes_received == 26


def test_close_queues_close_notify(ca: CertificateAuthority, ca_file_path: str) -> None:
    client = TlsClient(client_context(ca_file_path), NAME)
    server = MemoryServer(ca)
    shuttle(client, server)
    client.close()
    server.incoming.write(client.data_to_send())
    assert server.ssl.read(1024) == b""  # the server saw our close_notify


# --- TCP connect -------------------------------------------------------------------------


@HOSTS
async def test_connect_reads_kernel_rtt_and_families(host: str, family: str) -> None:
    async with TCPServer(host, mode=TCPMode.HOLD) as server:
        sock = await connect(host, server.port, 2.0)
        with contextlib.closing(sock):
            rtt = kernel_connect_rtt(sock)
            families = address_families(sock)
            watch_path(sock)
            since = since_last_ack(sock)
    assert rtt is not None and rtt > 0  # one SYN/SYN-ACK sample, kernel-timed
    assert families == (family, family)
    assert since is not None and since >= 0


@HOSTS
async def test_connect_refused_raises(host: str, family: str) -> None:
    with refusing_port(host) as port, pytest.raises(ConnectionRefusedError):
        await connect(host, port, 2.0)


async def test_connect_rejects_a_hostname_rather_than_resolving_it() -> None:
    with pytest.raises(ValueError, match="does not appear to be an IPv4 or IPv6 address"):
        await connect("localhost", 443, 2.0)


async def test_address_families_after_the_peer_reset_say_none_for_the_peer() -> None:
    async with TCPServer("127.0.0.1", mode=TCPMode.RESET) as server:
        sock = await connect("127.0.0.1", server.port, 2.0)
        with contextlib.closing(sock):
            with pytest.raises(ConnectionResetError):
                async with asyncio.timeout(5):
                    await asyncio.get_running_loop().sock_recv(sock, 1)
            families = address_families(sock)
    assert families == ("ipv4", None)


async def test_streams_over_a_connected_socket_echo_and_close_with_fin() -> None:
    async with TCPServer("127.0.0.1", mode=TCPMode.ECHO) as server:
        reader, writer = await open_streams(await connect("127.0.0.1", server.port, 2.0))
        writer.write(b"ping")
        async with asyncio.timeout(5):
            assert await reader.readexactly(4) == b"ping"
        await close_streams(writer)
        await server.wait_for(lambda s: s.open_connections == 0, 2)
        assert server.client_closed == 1  # our FIN, not an RST
    assert writer.is_closing()


# --- the TLS pump over a real loopback server -----------------------------------------------


@HOSTS
async def test_pump_handshake_echo_and_counters(
    host: str, family: str, ca: CertificateAuthority, ca_file_path: str
) -> None:
    pieces: list[bytes] = []
    async with TLSServer(host, cert=ca.issue(NAME)) as server:
        sock = await connect(host, server.port, 2.0)
        with contextlib.closing(sock):
            client = TlsClient(client_context(ca_file_path), NAME)
            pump = TlsPump(sock, client, read_size=16 * 1024, on_receive=pieces.append)
            async with asyncio.timeout(5):
                await pump.handshake()
                await pump.write(b"ping", 2.0)
                reply = await pump.read(lambda: 2.0)
            assert pump.sent == client.bytes_sent > 0
            pump.close_notify()  # best effort, never counted: it is not the exchange
        assert list(server.sni_seen) == [NAME]
    assert reply == b"ping"
    assert pump.received == sum(map(len, pieces)) == client.bytes_received
    assert client.bytes_sent > pump.sent


async def test_pump_send_first_takes_the_client_hello(
    ca: CertificateAuthority, ca_file_path: str
) -> None:
    firsts: list[bytes] = []
    async with TLSServer("127.0.0.1", cert=ca.issue(NAME)) as server:
        sock = await connect("127.0.0.1", server.port, 2.0)
        loop = asyncio.get_running_loop()

        async def send_first(data: bytes) -> None:
            firsts.append(data)
            await loop.sock_sendall(sock, data)

        with contextlib.closing(sock):
            client = TlsClient(client_context(ca_file_path), NAME)
            pump = TlsPump(sock, client, read_size=4096, send_first=send_first)
            async with asyncio.timeout(5):
                await pump.handshake()
    assert len(firsts) == 1 and NAME.encode() in firsts[0]  # only the first flight


async def test_pump_eof_during_handshake(ca_file_path: str) -> None:
    async with TLSServer("127.0.0.1", mode=TLSMode.CLOSE_AFTER_HELLO) as server:
        sock = await connect("127.0.0.1", server.port, 2.0)
        with contextlib.closing(sock):
            pump = TlsPump(sock, TlsClient(client_context(ca_file_path), NAME), read_size=4096)
            with pytest.raises((ssl.SSLError, EOFError)):
                async with asyncio.timeout(5):
                    await pump.handshake()
    assert pump.eof and pump.received == 0


async def test_pump_read_times_out_on_the_budget(
    ca: CertificateAuthority, ca_file_path: str
) -> None:
    async with TLSServer("127.0.0.1", cert=ca.issue(NAME)) as server:
        sock = await connect("127.0.0.1", server.port, 2.0)
        with contextlib.closing(sock):
            pump = TlsPump(sock, TlsClient(client_context(ca_file_path), NAME), read_size=4096)
            async with asyncio.timeout(5):
                await pump.handshake()
            with pytest.raises(TimeoutError):
                await pump.read(lambda: 0.05)  # the echo server says nothing unasked


# --- connected UDP ---------------------------------------------------------------------------


class _Echo(asyncio.DatagramProtocol):
    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.DatagramTransport, transport)

    def datagram_received(self, data: bytes, addr: tuple[str, int]) -> None:
        for _ in range(data.count(b"!") + 1):  # "x!!" comes back three times
            self.transport.sendto(data, addr)


@contextlib.asynccontextmanager
async def udp_echo(host: str) -> AsyncIterator[int]:
    loop = asyncio.get_running_loop()
    transport, _ = await loop.create_datagram_endpoint(_Echo, local_addr=(host, 0))
    try:
        yield int(transport.get_extra_info("sockname")[1])
    finally:
        transport.close()


@HOSTS
async def test_channel_stamps_send_and_arrival(host: str, family: str) -> None:
    async with udp_echo(host) as port, await UdpChannel.open(host, port) as channel:
        sent_at = channel.send(b"hello")
        item = await channel.recv(time.monotonic() + 2.0)
        assert channel.local[0] in (host, "::1")
    assert item is not None
    arrived, data = item
    assert data == b"hello" and arrived >= sent_at
    assert (channel.sent, channel.received, channel.dropped) == (1, 1, 0)


async def test_channel_recv_gives_none_at_the_deadline() -> None:
    async with udp_echo("127.0.0.1") as port, await UdpChannel.open("127.0.0.1", port) as ch:
        assert await ch.recv(time.monotonic() + 0.05) is None
        assert await ch.recv(time.monotonic() - 1) is None  # a past deadline: no wait
    assert ch.received == 0


@HOSTS
async def test_channel_raises_icmp_port_unreachable(host: str, family: str) -> None:
    port = unbound_udp_port(host)
    async with await UdpChannel.open(host, port) as channel:
        channel.send(b"anyone?")
        with pytest.raises(ConnectionRefusedError) as caught:
            await channel.recv(time.monotonic() + 2.0)
    # still a ConnectionRefusedError, and now with what the ICMP error said and who said it
    err = caught.value
    assert isinstance(err, IcmpError)
    want = ("icmp", 3, 3) if family == "ipv4" else ("icmpv6", 1, 4)
    assert (err.family, err.icmp_type, err.icmp_code, err.reporter) == (*want, host)
    assert str(classify(err, Operation.READ)) == "connection_refused"
    reports, stray = icmp_evidence([channel.icmp])
    assert reports is not None and stray is None
    assert [(r.icmp, r.type, r.code, r.errno, r.reporter) for r in reports] == [
        (*want, "ECONNREFUSED", host)
    ]


@HOSTS
async def test_an_icmp_error_for_a_datagram_we_did_not_send_is_stray_not_our_failure(
    host: str, family: str
) -> None:
    """An error quoting another datagram (a late one for an earlier flow on the same port,
    or a forged one) is counted and dropped; the next error that quotes ours is raised."""
    port = unbound_udp_port(host)
    async with await UdpChannel.open(host, port) as channel:
        sock = channel.icmp._sock  # sends a datagram the watch never saw
        sock.send(b"a datagram of an earlier flow")
        assert await channel.recv(time.monotonic() + 0.3) is None
        assert channel.icmp.stray == 1 and channel.icmp.errors == []
        channel.send(b"ours")
        with pytest.raises(IcmpError):
            await channel.recv(time.monotonic() + 2.0)
    assert len(channel.icmp.errors) == 1 and channel.icmp.stray == 1


async def test_an_icmp_flood_is_bounded_and_the_error_queue_drained() -> None:
    """Loopback does not rate-limit ICMP: every datagram to a closed port comes back as an
    error.  At most ICMP_KEEP are recorded, the rest counted, and the error queue is
    left empty (a non-empty one would keep the socket in EPOLLERR: a spinning loop)."""
    port = unbound_udp_port("127.0.0.1")
    sends = 3 * ICMP_KEEP
    raised = 0
    async with await UdpChannel.open("127.0.0.1", port) as channel:
        for i in range(sends):
            channel.send(b"flood %d" % i)
            await asyncio.sleep(0)  # let the loop read what came back
        deadline = time.monotonic() + 0.5
        while True:  # bounded: each pass reads a queued error or ends at the deadline
            try:
                if await channel.recv(deadline) is None:
                    break
            except IcmpError:
                raised += 1
        watch = channel.icmp
        with pytest.raises(BlockingIOError):
            watch._sock.recvmsg(64, 512, socket.MSG_ERRQUEUE)
    assert len(watch.errors) == ICMP_KEEP
    assert watch.unrecorded > 0 and watch.stray == 0
    assert 0 < raised <= sends


_REJECT_DRIVER = """
import asyncio, json, subprocess, sys, time
from probe.classify import classify
from probe.model import Operation
from probe.probes._net.udp import UdpChannel

RULES = {
    ("127.0.0.1", 9): "ip daddr 127.0.0.1 udp dport 9 reject with icmp type host-unreachable",
    ("127.0.0.1", 10): "ip daddr 127.0.0.1 udp dport 10 reject with icmp type net-unreachable",
    ("127.0.0.1", 11): "ip daddr 127.0.0.1 udp dport 11 reject with icmp type admin-prohibited",
    ("::1", 9): "ip6 daddr ::1 udp dport 9 reject with icmpv6 type addr-unreachable",
    ("::1", 10): "ip6 daddr ::1 udp dport 10 reject with icmpv6 type no-route",
    ("::1", 11): "ip6 daddr ::1 udp dport 11 reject with icmpv6 type admin-prohibited",
}
subprocess.run(["ip", "link", "set", "lo", "up"], check=True)
subprocess.run(["nft", "add", "table", "inet", "t"], check=True)
subprocess.run(
    ["nft", "add", "chain", "inet", "t", "inp", "{ type filter hook input priority 0; }"],
    check=True,
)
for rule in RULES.values():
    subprocess.run(["nft", "add", "rule", "inet", "t", "inp", *rule.split()], check=True)


async def one(host, port):
    async with await UdpChannel.open(host, port) as channel:
        channel.send(b"x" * 40)
        try:
            await channel.recv(time.monotonic() + 2.0)
        except OSError as exc:
            return [
                str(classify(exc, Operation.READ)),
                getattr(exc, "icmp_type", None),
                getattr(exc, "icmp_code", None),
                getattr(exc, "reporter", None),
            ]
        return ["silence"]


async def main():
    return {f"{h} {p}": await one(h, p) for h, p in RULES}

print(json.dumps(asyncio.run(main())))
"""


@needs_unshare("for a namespace whose nftables rejects UDP with ICMP")
def test_host_and_network_unreachable_reach_a_connected_channel(tmp_path: Path) -> None:
    """What IP_RECVERR changes: without it these (but admin-prohibited) read as silence."""
    required_tool("nft", package="nftables")
    got = run_driver(_REJECT_DRIVER, "-n", workdir=tmp_path, cwd=REPO, timeout_s=30)
    assert got == {
        "127.0.0.1 9": ["host_unreachable", 3, 1, "127.0.0.1"],
        "127.0.0.1 10": ["network_unreachable", 3, 0, "127.0.0.1"],
        "127.0.0.1 11": ["host_unreachable", 3, 13, "127.0.0.1"],
        "::1 9": ["host_unreachable", 1, 3, "::1"],
        "::1 10": ["network_unreachable", 1, 0, "::1"],
        # the kernel says EACCES; the ICMP code makes it read as its IPv4 twin
        "::1 11": ["host_unreachable", 1, 1, "::1"],
    }


async def test_channel_queue_limit_drops_a_flood_and_counts_it() -> None:
    async with (
        udp_echo("127.0.0.1") as port,
        await UdpChannel.open("127.0.0.1", port, queue_limit=2) as channel,
    ):
        channel.send(b"x!!!!")  # five echoes come back, two fit the queue
        deadline = time.monotonic() + 2.0
        # asyncio reads one datagram per loop pass and offers nothing to wait on: poll,
        # bounded in time
        while channel.dropped < 3 and time.monotonic() < deadline:  # noqa: ASYNC110
            await asyncio.sleep(0.01)
        got = [await channel.recv(time.monotonic() + 0.05) for _ in range(3)]
    assert channel.dropped == 3
    assert [item is not None for item in got] == [True, True, False]


def test_socket_module_has_tcp_info() -> None:
    # the kernel connect RTT (perf/timing work) depends on it: on Linux it must exist
    assert hasattr(socket, "TCP_INFO")


@given(
    st.lists(
        st.tuples(
            st.sampled_from([0, 41, 1]), st.sampled_from([11, 25, 3]), st.binary(max_size=64)
        ),
        max_size=3,
    )
)
def test_error_queue_control_data_never_crashes_the_parser(
    ancdata: list[tuple[int, int, bytes]],
) -> None:
    """The kernel writes it, but a peer picks the ICMP type, code and quoted bytes: any
    layout gives an IcmpError or nothing."""
    err = _icmp_error(ancdata)
    assert err is None or isinstance(err, IcmpError)


def _sockaddr(family: int, packed: bytes) -> bytes:
    """A ``sockaddr_in`` / ``sockaddr_in6`` as the kernel lays out SO_EE_OFFENDER."""
    head = family.to_bytes(2, sys.byteorder) + b"\0\0"  # sa_family_t (host order), port
    if family == socket.AF_INET6:
        return head + b"\0" * 4 + packed + b"\0" * 4  # flowinfo, address, scope id
    return head + packed + b"\0" * 8


_ORIGINS = {2: "icmp", 3: "icmpv6"}


@given(
    origin=st.integers(0, 255),
    icmp_type=st.integers(0, 255),
    icmp_code=st.integers(0, 255),
    err=st.integers(0, 2**32 - 1),
    v6=st.booleans(),
    offender=st.one_of(
        st.binary(max_size=32),
        st.binary(min_size=4, max_size=4).map(lambda a: _sockaddr(socket.AF_INET, a)),
        st.binary(min_size=16, max_size=16).map(lambda a: _sockaddr(socket.AF_INET6, a)),
    ),
)
def test_the_shared_error_queue_parser_reads_what_the_kernel_lays_out(
    origin: int, icmp_type: int, icmp_code: int, err: int, v6: bool, offender: bytes
) -> None:
    """Any sock_extended_err a peer could steer (type, code, offender) parses to exactly
    its fields, or to None for an origin that is not ICMP; never an exception."""
    level, kind = (socket.IPPROTO_IPV6, IPV6_RECVERR) if v6 else (socket.SOL_IP, IP_RECVERR)
    data = struct.pack("=IBBBBII", err, origin, icmp_type, icmp_code, 0, 0, 0) + offender
    got = parse_error_queue([(level, kind, data)])
    if origin not in _ORIGINS:
        assert got is None
        return
    assert got is not None
    assert (got.errno, got.family, got.icmp_type, got.icmp_code) == (
        err,
        _ORIGINS[origin],
        icmp_type,
        icmp_code,
    )
    family = int.from_bytes(offender[:2], sys.byteorder) if len(offender) >= 2 else 0
    if family == socket.AF_INET and len(offender) >= 8:
        assert got.offender == socket.inet_ntop(socket.AF_INET, offender[4:8])
    elif family == socket.AF_INET6 and len(offender) >= 24:
        assert got.offender == socket.inet_ntop(socket.AF_INET6, offender[8:24])
    else:
        assert got.offender is None  # unspecified or short: never a made-up 0.0.0.0


def test_the_error_queue_parser_ignores_other_control_messages() -> None:
    icmp = struct.pack("=IBBBBII", 113, 2, 3, 1, 0, 0, 0) + _sockaddr(
        socket.AF_INET, socket.inet_aton("10.9.8.7")
    )
    timestamp = (socket.SOL_SOCKET, 29, b"\0" * 16)  # SO_TIMESTAMP beside it
    assert parse_error_queue([timestamp]) is None
    assert parse_error_queue([(socket.SOL_SOCKET, IP_RECVERR, icmp)]) is None  # wrong level
    got = parse_error_queue([timestamp, (socket.SOL_IP, IP_RECVERR, icmp)])
    assert got == QueuedError(113, "icmp", 3, 1, "10.9.8.7")
    assert not got.time_exceeded
    assert QueuedError(113, "icmp", 11, 0, None).time_exceeded
    assert QueuedError(113, "icmpv6", 3, 0, None).time_exceeded
    assert not QueuedError(113, "icmpv6", 11, 0, None).time_exceeded
