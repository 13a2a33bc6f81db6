"""The OONI-shaped measurement for one result.

ooni/spec ``data-formats``: df-000 base envelope, df-002 ``queries``, df-005
``tcp_connect``, df-006 ``tls_handshakes``/``quic_handshakes``, df-008
``network_events``, with our complete result under ``test_keys.probe_result``.
See docs/archive.md.
"""

from __future__ import annotations

import datetime as dt
import errno
import functools
import ipaddress
import platform
import sys
import uuid
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import dns.rcode

from .. import __version__
from ..classify import IcmpError, classify
from ..evidence import (
    DnsEvidence,
    Evidence,
    ExchangeEvidence,
    IcmpReport,
    QuicEvidence,
    QuicVnEvidence,
    StunEvidence,
    TcpEvidence,
    TlsEvidence,
    TransferEvidence,
)
from ..model import Failure, Operation, ProbeResult, Target, Vantage
from ..records import binary_data, details_json, evidence_of, to_jsonable

TEST_NAME = "messenger_reachability"
TEST_VERSION = "0.1.0"
SOFTWARE_NAME = "messenger-reachability-probe"
DATA_FORMAT_VERSION = "0.2.0"  # OONI base data format version we follow
EXTENSIONS = {"dnst": 0, "netevents": 0, "tcpconnect": 0, "tlshandshake": 0}
OONI_TIME = "%Y-%m-%d %H:%M:%S"

# `TlsEvidence.certificate_source` when the tls probe could not read the chain of its own
# (verifying) handshake and made a second one with verification off, for evidence only.
_UNVERIFIED_SECOND = "unverified_second_handshake"
# df-002, df-005, df-006 and df-008 lists of test_keys, in the order they are written
_OBSERVATIONS = ("queries", "tcp_connect", "tls_handshakes", "quic_handshakes", "network_events")


# -- the OONI envelope ------------------------------------------------------------


def _hostport(address: str, port: int | None) -> str:
    host = f"[{address}]" if ":" in address else address
    return f"{host}:{port}" if port is not None else host


def _input(target: Target) -> str:
    """OONI-style input URL naming the target (cf. ``tcpconnect://149.154.175.50:443``)."""
    host = target.endpoint.host
    if target.address is None:
        return f"{target.probe}://{host}"
    return f"{target.probe}://{_hostport(host, target.port)}"


def _timeline(result: ProbeResult) -> dict[str, tuple[float, float]]:
    """phase -> (t0, t) since the measurement start.

    The recorder keeps durations only, so phases are laid back to back in the
    order they were recorded: an approximation that ignores gaps between phases.
    """
    out: dict[str, tuple[float, float]] = {}
    cursor = 0.0
    for phase, seconds in result.phases.items():
        out[phase] = (cursor, cursor + seconds)
        cursor += seconds
    return out


def _span(
    timeline: Mapping[str, tuple[float, float]], names: tuple[str, ...], end: float
) -> tuple[float, float]:
    for name in names:
        if name in timeline:
            return timeline[name]
    return (0.0, end)


def _failure_at(result: ProbeResult, operation: Operation) -> str | None:
    return result.failure if result.failed_operation == operation else None


def _answer(text: str) -> dict[str, Any]:
    try:
        ip = ipaddress.ip_address(text)
    except ValueError:
        return {"answer_type": "CNAME", "hostname": text, "ttl": None}
    if ip.version == 4:
        return {"answer_type": "A", "ipv4": text, "ttl": None}
    return {"answer_type": "AAAA", "ipv6": text, "ttl": None}


def _engine(resolver: str | None) -> tuple[str, str]:
    """(OONI engine name, resolver_address) for a Target.resolver id."""
    if resolver is None or resolver == "system":
        return "getaddrinfo", ""
    scheme, _, rest = resolver.partition(":")
    if scheme in ("udp", "tcp", "doh"):
        return scheme, rest
    return "unknown", resolver


def _rcode(value: str | None) -> int | None:
    """OONI wants the numeric rcode; our DNS probe records its text (NXDOMAIN)."""
    if value is None:
        return None
    try:
        return int(dns.rcode.from_text(value))
    except (dns.rcode.UnknownRcode, ValueError):
        return None


def _query_failure(result: ProbeResult, answers: tuple[str, ...], bogons: set[str]) -> str | None:
    if result.failed_operation == Operation.RESOLVE:
        if not answers:
            return result.failure
        if result.failure_kind == Failure.DNS_BOGON and bogons & {str(a) for a in answers}:
            return result.failure
        return None
    # One family empty while the other answered: OONI's per-query word for it.
    return None if answers else str(Failure.DNS_NO_ANSWER)


def _queries(
    result: ProbeResult, ev: Evidence, timeline: Mapping[str, tuple[float, float]]
) -> list[Any]:
    """One df-002 query per query type the dns probe asked (its answers by type)."""
    target = result.target
    resolved = target.resolver is not None or "resolve" in result.phases
    if not resolved and result.failed_operation != Operation.RESOLVE:
        return []
    dns_ev = ev if isinstance(ev, DnsEvidence) else DnsEvidence()
    engine, resolver_address = _engine(target.resolver)
    t0, t = _span(timeline, ("resolve",), result.duration_s)
    if dns_ev.answers is not None:
        per_type = dict(dns_ev.answers)
    else:  # no answers recorded (a failure before any reply): one query for the failure
        per_type = {"ANY" if engine == "getaddrinfo" else "A": ()}
    rcodes = dns_ev.rcodes or {}
    bogons = set(dns_ev.bogons or ())
    queries: list[Any] = []
    for query_type, values in per_type.items():
        query: dict[str, Any] = {
            "answers": [_answer(a) for a in values],
            "engine": engine,
            "failure": _query_failure(result, values, bogons),
            "hostname": target.endpoint.host,
            "query_type": query_type,
            "resolver_address": resolver_address,
            "t0": t0,
            "t": t,
            "tags": [],
        }
        rcode = _rcode(rcodes.get(query_type))
        if rcode is not None:
            query["rcode"] = rcode
        queries.append(query)
    return queries


def _tcp_connect(
    result: ProbeResult, network: str, timeline: Mapping[str, tuple[float, float]]
) -> list[Any]:
    target = result.target
    if target.address is None or target.port is None or network != "tcp":
        return []
    if "connect" not in result.phases and result.failed_operation != Operation.CONNECT:
        return []
    failure = _failure_at(result, Operation.CONNECT)
    t0, t = _span(timeline, ("connect",), result.duration_s)
    return [
        {
            "ip": target.address,
            "port": target.port,
            "status": {"failure": failure, "success": failure is None},
            "t0": t0,
            "t": t,
            "tags": [],
        }
    ]


@dataclass(frozen=True)
class _Negotiated:
    """What a measured handshake's evidence says, in df-006's terms."""

    tls_version: str = ""
    cipher_suite: str = ""
    negotiated_protocol: str = ""
    peer_certificates: tuple[bytes, ...] = ()  # DER, leaf first


def _negotiated(ev: Evidence) -> _Negotiated:
    if isinstance(ev, TlsEvidence):
        # A chain read on the evidence-only second handshake belongs to that one.
        unverified = ev.certificate_source == _UNVERIFIED_SECOND
        return _Negotiated(
            ev.tls_version or "",
            ev.cipher or "",
            ev.alpn or "",
            () if unverified else ev.peer_certificates or (),
        )
    if isinstance(ev, QuicEvidence):
        return _Negotiated(
            negotiated_protocol=ev.alpn or "", peer_certificates=ev.peer_certificates or ()
        )
    return _Negotiated()


def _handshake_entry(
    result: ProbeResult,
    network: str,
    span: tuple[float, float],
    failure: str | None,
    negotiated: _Negotiated,
    *,
    no_tls_verify: bool,
) -> dict[str, Any]:
    target = result.target
    return {
        "network": network,
        "address": _hostport(target.address or target.endpoint.host, target.port),
        "cipher_suite": negotiated.cipher_suite,
        "failure": failure,
        "negotiated_protocol": negotiated.negotiated_protocol,
        "no_tls_verify": no_tls_verify,
        "peer_certificates": [binary_data(c) for c in negotiated.peer_certificates],
        "server_name": target.server_name or "",
        "t0": span[0],
        "t": span[1],
        "tags": [],
        "tls_version": negotiated.tls_version,
    }


def _handshake(
    result: ProbeResult,
    ev: Evidence,
    timeline: Mapping[str, tuple[float, float]],
    network: str,
    operation: Operation,
    phases: tuple[str, ...],
) -> list[Any]:
    """The measured handshake.  It always verifies (``no_tls_verify`` false); the tls and
    quic probes keep the chain the peer sent when verification failed: that is where a
    MITM's forged certificate reaches the archive."""
    if not any(p in result.phases for p in phases) and result.failed_operation != operation:
        return []
    span = _span(timeline, phases, result.duration_s)
    failure = _failure_at(result, operation)
    return [_handshake_entry(result, network, span, failure, _negotiated(ev), no_tls_verify=False)]


def _unverified_handshake(
    result: ProbeResult, ev: Evidence, timeline: Mapping[str, tuple[float, float]]
) -> list[Any]:
    """The tls probe's evidence-only second handshake, when it made one: verification off
    (df-006 ``no_tls_verify``), to read the chain that a failed verification hid on a
    Python without ``get_unverified_chain``.  Its chain is archived on it."""
    if not isinstance(ev, TlsEvidence):
        return []
    if ev.certificate_source != _UNVERIFIED_SECOND and ev.certificate_error is None:
        return []  # no second handshake was made
    span = _span(timeline, ("certificate_evidence",), result.duration_s)
    negotiated = _Negotiated(peer_certificates=ev.peer_certificates or ())
    entry = _handshake_entry(
        result, "tcp", span, ev.certificate_error, negotiated, no_tls_verify=True
    )
    return [entry]


def _bytes_received(ev: Evidence) -> int | None:
    """The probe's own count of bytes received, where it keeps one: what a held TCP
    connection or an application exchange got; for a transfer, where its first stalled
    connection froze (server->client TCP payload: the 16-20 KB freeze, FIELD.md B7)."""
    if isinstance(ev, TcpEvidence | ExchangeEvidence):
        return ev.bytes_received
    if isinstance(ev, TransferEvidence):
        stalls = (c.stalled_at_wire_bytes for c in ev.connections)
        return next((n for n in stalls if n is not None), None)
    return None


_ERRNO_BY_NAME = {name: number for number, name in errno.errorcode.items()}


def _icmp_failure(report: IcmpReport) -> str:
    """The failure string of one recorded ICMP error, as `classify` gives it for the
    read that raised it (by ICMP type and code first, then the kernel's errno)."""
    number = _ERRNO_BY_NAME.get(report.errno)
    if number is None:
        number = int(report.errno) if report.errno.isdigit() else errno.EHOSTUNREACH
    exc = IcmpError.of(number, family=report.icmp, icmp_type=report.type, icmp_code=report.code)
    return str(classify(exc, Operation.READ))


def _icmp_events(
    ev: Evidence, address: str | None, span: tuple[float, float]
) -> list[dict[str, Any]]:
    """One failed df-008 ``read_from`` per ICMP error that answered the probe's datagrams:
    how OONI's engine reports an ICMP error on a UDP socket (the read that returned it
    fails with the error's df-007 string).  Type, code, errno and the reporting router
    stay in ``probe_result.details.icmp_errors``; errors that answered none of our
    datagrams (``icmp_stray``) were never ours to report."""
    if not isinstance(ev, DnsEvidence | QuicEvidence | QuicVnEvidence | StunEvidence):
        return []
    events: list[dict[str, Any]] = []
    for report in ev.icmp_errors or ():
        event: dict[str, Any] = {} if address is None else {"address": address}
        event.update(failure=_icmp_failure(report), operation="read_from", proto="udp")
        event.update(t0=span[0], t=span[1], tags=[])
        events.append(event)
    return events


def _udp_peer(result: ProbeResult) -> str | None:
    """Where the probe's UDP datagrams went: the target, or a dns probe's resolver."""
    target = result.target
    if target.probe == "dns":
        engine, resolver_address = _engine(target.resolver)
        return resolver_address if engine == "udp" else None
    if target.address is None or target.port is None:
        return None
    return _hostport(target.address, target.port)


def _network_events(
    result: ProbeResult, ev: Evidence, network: str, timeline: Mapping[str, tuple[float, float]]
) -> list[Any]:
    target = result.target
    last = next(reversed(list(timeline.values())), (0.0, result.duration_s))
    icmp = _icmp_events(ev, _udp_peer(result), (last[0], result.duration_s))
    if target.address is None or target.port is None:
        return icmp  # a dns probe: its resolver's socket is the only one with events
    address = _hostport(target.address, target.port)
    received = _bytes_received(ev)
    events: list[dict[str, Any]] = []
    if network == "tcp" and (
        "connect" in result.phases or result.failed_operation == Operation.CONNECT
    ):
        t0, t = _span(timeline, ("connect",), result.duration_s)
        failure = _failure_at(result, Operation.CONNECT)
        events.append(
            {"address": address, "failure": failure, "operation": "connect", "proto": "tcp",
             "t0": t0, "t": t, "tags": []}
        )  # fmt: skip
    # The read that failed with the first ICMP error is that error's event already.
    first_icmp = icmp[0]["failure"] if icmp else None
    if result.failed_operation in (Operation.READ, Operation.WRITE):
        op = str(result.failed_operation)
        if network == "udp":
            op = "read_from" if op == "read" else "write_to"
        event: dict[str, Any] = {
            "address": address, "failure": result.failure, "operation": op, "proto": network,
            "t0": last[0], "t": result.duration_s, "tags": [],
        }  # fmt: skip
        if received is not None and op.startswith("read"):  # no probe counts bytes sent
            event["num_bytes"] = received
        if not (op == "read_from" and result.failure == first_icmp):
            events.append(event)
    events += icmp
    if received is not None:
        # The byte count at which a transfer stopped is the signature of a freeze (B7).
        events.append(
            {"failure": None, "num_bytes": received, "operation": "bytes_received_cumulative",
             "proto": network, "t0": result.duration_s, "t": result.duration_s, "tags": []}
        )  # fmt: skip
    return events


def _test_keys(result: ProbeResult) -> dict[str, Any]:
    if result.skipped is not None:  # nothing was sent: no observations to report
        empty: dict[str, Any] = {k: [] for k in _OBSERVATIONS}
        return {**empty, "probe_result": result_to_dict(result)}
    timeline = _timeline(result)
    ev = evidence_of(result)
    network = ev.transport  # stun says per run; a dns probe's resolver decides
    tls = (
        _handshake(result, ev, timeline, "tcp", Operation.TLS_HANDSHAKE, ("tls", "tls_handshake"))
        + _unverified_handshake(result, ev, timeline)
        if network == "tcp"
        else []
    )
    return {
        "queries": _queries(result, ev, timeline),
        "tcp_connect": _tcp_connect(result, network, timeline),
        "tls_handshakes": tls,
        "quic_handshakes": _handshake(
            result, ev, timeline, "udp", Operation.QUIC_HANDSHAKE, ("quic", "quic_handshake")
        ),
        "network_events": _network_events(result, ev, network, timeline),
        "probe_result": result_to_dict(result),
    }


def result_to_dict(result: ProbeResult) -> dict[str, Any]:
    """Our full result, JSON-safe."""
    target = result.target
    endpoint = target.endpoint
    return {
        "target": {
            "service": target.service,
            "endpoint": endpoint.name,
            "host": endpoint.host,
            "probe": target.probe,
            "variant": target.variant,
            "overrides": to_jsonable(target.overrides),
            "address": target.address,
            "port": target.port,
            "resolver": target.resolver,
            "address_source": target.address_source,
            "transport": endpoint.transport,
            "role": endpoint.role,
            "server_name": target.server_name,
            "key": list(target.key()),
        },
        "status": result.status,
        "ok": result.ok,
        "t": result.t.isoformat(),
        "duration_s": result.duration_s,
        "failure": result.failure,
        "failure_kind": str(result.failure_kind) if result.failure_kind else None,
        "failed_operation": str(result.failed_operation) if result.failed_operation else None,
        "phases": to_jsonable(result.phases),
        "details": details_json(result),
        "flags": list(result.flags),
        "skipped": str(result.skipped) if result.skipped else None,
    }


@functools.cache  # constant for the process: asked once per archived result
def _platform() -> str:
    return {"linux": "linux", "darwin": "macos", "win32": "windows"}.get(sys.platform, "unknown")


@functools.cache
def _architecture() -> str:
    """df-000's annotation names (Go's GOARCH): arm, arm64, 386, amd64; else the machine."""
    machine = platform.machine().lower()
    names = {"x86_64": "amd64", "amd64": "amd64", "aarch64": "arm64", "arm64": "arm64"}
    if machine in names:
        return names[machine]
    if machine in ("i386", "i486", "i586", "i686", "x86"):
        return "386"
    return "arm" if machine.startswith("arm") else machine or "unknown"


def envelope(
    result: ProbeResult,
    vantage: Vantage,
    *,
    test_start_time: dt.datetime | None = None,
    software_version: str = __version__,
) -> dict[str, Any]:
    """The OONI df-000 measurement for one result.

    ``test_start_time`` is when the round that produced the result started
    (OONI: the start of a related set of measurements); it defaults to the
    measurement's own start.
    """
    start_time = result.t.astimezone(dt.UTC).strftime(OONI_TIME)
    if test_start_time is None:  # the same instant: format it once (strftime is slow)
        test_start = start_time
    else:
        test_start = test_start_time.astimezone(dt.UTC).strftime(OONI_TIME)
    target = result.target
    return {
        "annotations": {
            "engine_name": SOFTWARE_NAME,
            "engine_version": software_version,
            "architecture": _architecture(),
            "platform": _platform(),
            "vantage": vantage.name,
            "vantage_role": vantage.role,
            "service": target.service,
            "endpoint": target.endpoint.name,
            "endpoint_role": target.endpoint.role,
            "probe": target.label,  # as exported: "tls", or "tls/neutral_sni" for a variant
            "status": result.status,
        },
        "data_format_version": DATA_FORMAT_VERSION,
        "extensions": dict(EXTENSIONS),
        "id": str(uuid.uuid4()),
        "input": _input(target),
        "measurement_start_time": start_time,
        "probe_asn": vantage.asn,
        "probe_cc": vantage.country,
        "probe_ip": "127.0.0.1",  # OONI's value for "not shared"; we never record our IP
        # Required by df-000; an OONI collector assigns it on submission, which never
        # happens here, so it stays empty.
        "report_id": "",
        "software_name": SOFTWARE_NAME,
        "software_version": software_version,
        "test_helpers": {},  # required by df-000; the DoH control is in test_keys
        "test_keys": _test_keys(result),
        "test_name": TEST_NAME,
        "test_runtime": result.duration_s,
        "test_start_time": test_start,
        "test_version": TEST_VERSION,
    }
