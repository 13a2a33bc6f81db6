"""A socket error queue's ICMP report (``IP_RECVERR`` / ``IPV6_RECVERR``), parsed.

Sans-IO: the control messages of one ``recvmsg(..., MSG_ERRQUEUE)`` in, a `QueuedError`
out.  Each message holds a ``struct sock_extended_err`` followed by the offender's
``sockaddr_in`` / ``sockaddr_in6`` (SO_EE_OFFENDER: the node that sent the ICMP error;
ip(7), <linux/errqueue.h>).  The kernel writes the layout, but a peer picks the ICMP
type, code and the node's address: whatever the bytes, `parse_error_queue` gives a
`QueuedError` or None and never raises (fuzzed in tests/test_net.py).

Both readers of the queue use it: the probes' connected UDP sockets
(`probe.probes._net.udp`) and `probe trace`'s TTL walk (`probe.trace`).
"""

from __future__ import annotations

import socket
import struct
import sys
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Literal

__all__ = [
    "IPV6_RECVERR",
    "IP_RECVERR",
    "QueuedError",
    "parse_error_queue",
]

# <linux/in.h>, <linux/in6.h>, <linux/errqueue.h>: Python's socket module lacks them
IP_RECVERR = 11
IPV6_RECVERR = 25
_SO_EE_ORIGIN_ICMP = 2
_SO_EE_ORIGIN_ICMP6 = 3
_EXTENDED_ERR = struct.Struct("=IBBBBII")  # ee_errno, origin, type, code, pad, info, data
_ICMP_TIME_EXCEEDED = 11
_ICMP6_TIME_EXCEEDED = 3
_LEVELS = {
    (socket.SOL_IP, IP_RECVERR),
    (socket.IPPROTO_IPV6, IPV6_RECVERR),
}


@dataclass(frozen=True, slots=True)
class QueuedError:
    """One ICMP error as the kernel queued it.

    ``errno``: the kernel's translation (0 when it gave none); ``family``, ``icmp_type``
    and ``icmp_code``: what the reporting node said; ``offender``: that node's address
    (a router on the path, or the destination), None when the kernel left it unset.
    """

    errno: int
    family: Literal["icmp", "icmpv6"]
    icmp_type: int
    icmp_code: int
    offender: str | None

    @property
    def time_exceeded(self) -> bool:
        """The TTL / hop limit ran out on the way (what a traceroute waits for)."""
        expired = _ICMP_TIME_EXCEEDED if self.family == "icmp" else _ICMP6_TIME_EXCEEDED
        return self.icmp_type == expired


def parse_error_queue(ancdata: Iterable[tuple[int, int, bytes]]) -> QueuedError | None:
    """The ICMP error in one error-queue message's control data; None when it holds none
    (no ``IP_RECVERR`` message, too short, or a local error such as EMSGSIZE, which the
    send that caused it already raised)."""
    for level, kind, data in ancdata:
        if (level, kind) not in _LEVELS or len(data) < _EXTENDED_ERR.size:
            continue
        err, origin, icmp_type, icmp_code, _pad, _info, _data = _EXTENDED_ERR.unpack_from(data)
        if origin not in (_SO_EE_ORIGIN_ICMP, _SO_EE_ORIGIN_ICMP6):
            return None
        return QueuedError(
            errno=err,
            family="icmp" if origin == _SO_EE_ORIGIN_ICMP else "icmpv6",
            icmp_type=icmp_type,
            icmp_code=icmp_code,
            offender=_offender(data[_EXTENDED_ERR.size :]),
        )
    return None


def _offender(sockaddr: bytes) -> str | None:
    """The address in the ``sockaddr_in`` / ``sockaddr_in6`` after the extended error;
    None when its family is unspecified (the kernel did not know the sender) or short."""
    if len(sockaddr) < 2:
        return None
    family = int.from_bytes(sockaddr[:2], sys.byteorder)  # sa_family_t: host order
    if family == socket.AF_INET and len(sockaddr) >= 8:
        return socket.inet_ntop(socket.AF_INET, sockaddr[4:8])
    if family == socket.AF_INET6 and len(sockaddr) >= 24:
        return socket.inet_ntop(socket.AF_INET6, sockaddr[8:24])
    return None
