"""Attack 8 (log flood): a hostile QUIC server floods the log through aioquic's logger.

Before: a server answering every Initial with hundreds of Version Negotiation packets that
list the client's own version made aioquic log one warning each (1,026 lines from one
probe).  Now the loggers of libraries are capped (a burst, a notice, then nothing for a
while) and their per-connection info lines are off.  Loopback only.
"""

from __future__ import annotations

import asyncio
import json
import logging
from collections.abc import Callable, Iterator
from typing import Any, cast

import pytest

from probe import logs
from probe.probes import quic
from probe.wire import WireError
from probe.wire.quic import QUIC_V1, build_version_negotiation, parse_long_header
from tests.helpers import settings, target

VN_PER_DATAGRAM = 300


class VNFlood(asyncio.DatagramProtocol):
    """Answers each long-header datagram with VN_PER_DATAGRAM Version Negotiation packets
    that list QUIC v1 itself (which a client must ignore, and aioquic logs)."""

    transport: asyncio.DatagramTransport | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.DatagramTransport, transport)

    def datagram_received(self, data: bytes, addr: Any) -> None:
        try:
            header = parse_long_header(data)
        except WireError:
            return
        packet = build_version_negotiation(header.scid, header.dcid, (QUIC_V1,))
        assert self.transport is not None
        for _ in range(VN_PER_DATAGRAM):
            self.transport.sendto(packet, addr)


@pytest.fixture
def agent_logging() -> Iterator[Callable[[], None]]:
    """Sets up the agent's own logging (JSON on stderr) when called from the test body
    (where capsys has replaced stderr), and undoes it afterwards."""
    root = logging.getLogger()
    saved = root.handlers[:], root.level
    levels = {name: logging.getLogger(name).level for name in logs.QUIET_LIBRARIES}
    yield lambda: logs.setup("json", "info")
    root.handlers[:], _ = saved
    root.setLevel(saved[1])
    for name, level in levels.items():
        logging.getLogger(name).setLevel(level)


async def test_a_version_negotiation_flood_logs_a_bounded_number_of_lines(
    agent_logging: Callable[[], None], capsys: pytest.CaptureFixture[str]
) -> None:
    agent_logging()
    loop = asyncio.get_running_loop()
    transport, _ = await loop.create_datagram_endpoint(VNFlood, local_addr=("127.0.0.1", 0))
    try:
        port = transport.get_extra_info("sockname")[1]
        result = await quic.probe(target("quic", "127.0.0.1", port), settings(quic_s=1.5))
    finally:
        transport.close()
    assert not result.ok  # no handshake with a server that only negotiates
    events = [json.loads(line) for line in capsys.readouterr().err.splitlines()]
    quic_lines = [e for e in events if e["logger"] == "quic"]
    assert len(quic_lines) <= logs.THIRD_PARTY_BURST + 1, len(quic_lines)
    assert quic_lines and "dropping the rest" in quic_lines[-1]["msg"]


def test_our_own_loggers_are_never_capped(
    agent_logging: Callable[[], None], capsys: pytest.CaptureFixture[str]
) -> None:
    agent_logging()
    for i in range(3 * logs.THIRD_PARTY_BURST):
        logging.getLogger("probe.test").warning("ours %d", i)
        logging.getLogger("somelib").warning("theirs %d", i)
    events = [json.loads(line) for line in capsys.readouterr().err.splitlines()]
    assert sum(e["logger"] == "probe.test" for e in events) == 3 * logs.THIRD_PARTY_BURST
    assert sum(e["logger"] == "somelib" for e in events) == logs.THIRD_PARTY_BURST + 1
