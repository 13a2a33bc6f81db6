"""The OONI-shaped measurement for one result.

ooni/spec ``data-formats``: df-000 base envelope, df-002 ``queries``, df-005
``tcp_connect``, df-006 ``tls_handshakes``/``quic_handshakes``, df-008
``network_events``, with our complete result under ``test_keys.probe_result``.
See docs/archive.md.
"""

from __future__ import annotations

import base64
import dataclasses
import datetime as dt
import enum
import functools
import ipaddress
import math
import platform
import ssl
import sys
import uuid
from collections.abc import Mapping
from typing import Any

import dns.rcode

from .. import __version__
from ..model import Failure, Operation, ProbeResult, Target, Vantage

TEST_NAME = "messenger_reachability"
TEST_VERSION = "0.1.0"
SOFTWARE_NAME = "messenger-reachability-probe"
DATA_FORMAT_VERSION = "0.2.0"  # OONI base data format version we follow
EXTENSIONS = {"dnst": 0, "netevents": 0, "tcpconnect": 0, "tlshandshake": 0}
OONI_TIME = "%Y-%m-%d %H:%M:%S"

_MAX_DEPTH = 32
_UDP_PROBES = frozenset({"quic", "quic_vn", "stun"})  # UDP unless details say otherwise


# -- JSON-safe values -----------------------------------------------------------


def _binary(data: bytes) -> dict[str, str]:
    """OONI's BinaryData object (df-001)."""
    return {"data": base64.b64encode(data).decode("ascii"), "format": "base64"}


def to_jsonable(value: Any, _depth: int = 0) -> Any:
    """A JSON-safe copy of evidence: never raises, whatever a probe put in ``details``.

    bytes -> OONI BinaryData; non-finite floats -> "nan"/"inf"/"-inf" strings
    (JSON has no such numbers); sets -> sorted lists; unknown objects -> str().
    """
    if value is None or isinstance(value, bool | int | str):
        return value
    if isinstance(value, float):
        return value if math.isfinite(value) else str(value)
    if _depth >= _MAX_DEPTH:
        return "<too deep>"
    if isinstance(value, bytes | bytearray | memoryview):
        return _binary(bytes(value))
    if isinstance(value, enum.Enum):
        return to_jsonable(value.value, _depth + 1)
    if isinstance(value, dt.datetime | dt.date | dt.time):
        return value.isoformat()
    if isinstance(value, Mapping):
        return {str(k): to_jsonable(v, _depth + 1) for k, v in value.items()}
    if isinstance(value, set | frozenset):
        return sorted((to_jsonable(v, _depth + 1) for v in value), key=repr)
    if isinstance(value, list | tuple):
        return [to_jsonable(v, _depth + 1) for v in value]
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        fields = {f.name: getattr(value, f.name) for f in dataclasses.fields(value)}
        return to_jsonable(fields, _depth + 1)
    return str(value)  # ipaddress objects, paths, anything else: its readable form


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


def _network(result: ProbeResult) -> str:
    for key in ("network", "transport"):  # e.g. STUN over TCP says transport=tcp
        declared = result.details.get(key)
        if declared in ("tcp", "udp"):
            return str(declared)
    if result.target.probe in _UDP_PROBES:
        return "udp"
    return result.target.endpoint.transport


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


def _answer(value: Any) -> dict[str, Any]:
    if isinstance(value, Mapping):
        return {str(k): to_jsonable(v) for k, v in value.items()}
    text = str(value)
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


def _as_list(value: Any) -> list[Any]:
    if value is None or isinstance(value, str | bytes | Mapping):
        return [] if value is None else [value]
    try:
        return list(value)
    except TypeError:
        return [value]


def _rcode(value: Any) -> int | None:
    """OONI wants the numeric rcode; our DNS probe records its text (NXDOMAIN)."""
    if isinstance(value, int) and not isinstance(value, bool):
        return value
    if isinstance(value, str):
        try:
            return int(dns.rcode.from_text(value))
        except (dns.rcode.UnknownRcode, ValueError):
            return None
    return None


def _query_failure(result: ProbeResult, answers: list[Any], bogons: set[str]) -> str | None:
    if result.failed_operation == Operation.RESOLVE:
        if not answers:
            return result.failure
        if result.failure_kind == Failure.DNS_BOGON and bogons & {str(a) for a in answers}:
            return result.failure
        return None
    # One family empty while the other answered: OONI's per-query word for it.
    return None if answers else str(Failure.DNS_NO_ANSWER)


def _queries(result: ProbeResult, timeline: Mapping[str, tuple[float, float]]) -> list[Any]:
    """One df-002 query per query type (``details["answers"]`` maps type -> addresses)."""
    target = result.target
    resolved = target.resolver is not None or "resolve" in result.phases
    if not resolved and result.failed_operation != Operation.RESOLVE:
        return []
    details = result.details
    engine, resolver_address = _engine(target.resolver)
    t0, t = _span(timeline, ("resolve",), result.duration_s)
    answers = details.get("answers")
    if isinstance(answers, Mapping):
        per_type = {str(qt): _as_list(v) for qt, v in answers.items()}
    else:  # a flat list from a probe that does not split by type
        per_type = {"ANY" if engine == "getaddrinfo" else "A": _as_list(answers)}
    rcodes = details.get("rcodes")
    rcodes = rcodes if isinstance(rcodes, Mapping) else {}
    bogons = {str(b) for b in _as_list(details.get("bogons"))}
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


def _tcp_connect(result: ProbeResult, timeline: Mapping[str, tuple[float, float]]) -> list[Any]:
    target = result.target
    if target.address is None or target.port is None or _network(result) != "tcp":
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


def _certificate(value: Any) -> Any:
    if isinstance(value, bytes | bytearray | memoryview):
        return _binary(bytes(value))
    if isinstance(value, str) and value.lstrip().startswith("-----BEGIN CERTIFICATE-----"):
        try:
            return _binary(ssl.PEM_cert_to_DER_cert(value))
        except ValueError:
            return value
    if isinstance(value, str):
        return {"data": value, "format": "base64"}  # already base64 DER
    return to_jsonable(value)


def _handshake(
    result: ProbeResult,
    timeline: Mapping[str, tuple[float, float]],
    network: str,
    operation: Operation,
    phases: tuple[str, ...],
) -> list[Any]:
    target = result.target
    if not any(p in result.phases for p in phases) and result.failed_operation != operation:
        return []
    details = result.details
    # The tls and quic probes keep the chain (base64 DER, leaf first) when verification
    # failed: that is where a MITM's forged certificate reaches the archive.
    certs = details.get("peer_certificates")
    t0, t = _span(timeline, phases, result.duration_s)
    return [
        {
            "network": network,
            "address": _hostport(target.address or target.endpoint.host, target.port),
            "cipher_suite": str(details.get("cipher_suite") or details.get("cipher") or ""),
            "failure": _failure_at(result, operation),
            "negotiated_protocol": str(details.get("alpn") or ""),
            # Our handshakes always verify; the evidence-only second connection of the
            # tls probe is not a handshake of the measurement.
            "no_tls_verify": False,
            "peer_certificates": [_certificate(c) for c in _as_list(certs)],
            "server_name": target.server_name or "",
            "t0": t0,
            "t": t,
            "tags": [],
            "tls_version": str(details.get("tls_version") or ""),
        }
    ]


def _network_events(result: ProbeResult, timeline: Mapping[str, tuple[float, float]]) -> list[Any]:
    target = result.target
    if target.address is None or target.port is None:
        return []
    network = _network(result)
    address = _hostport(target.address, target.port)
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
    if result.failed_operation in (Operation.READ, Operation.WRITE):
        op = str(result.failed_operation)
        if network == "udp":
            op = "read_from" if op == "read" else "write_to"
        counted = result.details.get("bytes_received" if op.startswith("read") else "bytes_sent")
        last = next(reversed(list(timeline.values())), (0.0, result.duration_s))
        event: dict[str, Any] = {
            "address": address, "failure": result.failure, "operation": op, "proto": network,
            "t0": last[0], "t": result.duration_s, "tags": [],
        }  # fmt: skip
        if isinstance(counted, int) and not isinstance(counted, bool):
            event["num_bytes"] = counted
        events.append(event)
    received = result.details.get("bytes_received")
    if isinstance(received, int) and not isinstance(received, bool):
        # The byte count at which a transfer stopped is the signature of a freeze (B7).
        events.append(
            {"failure": None, "num_bytes": received, "operation": "bytes_received_cumulative",
             "proto": network, "t0": result.duration_s, "t": result.duration_s, "tags": []}
        )  # fmt: skip
    return events


def _test_keys(result: ProbeResult) -> dict[str, Any]:
    timeline = _timeline(result)
    network = _network(result)
    details = result.details
    built: dict[str, list[Any]] = {
        "queries": _queries(result, timeline),
        "tcp_connect": _tcp_connect(result, timeline),
        "tls_handshakes": (
            _handshake(result, timeline, "tcp", Operation.TLS_HANDSHAKE, ("tls", "tls_handshake"))
            if network == "tcp"
            else []
        ),
        "quic_handshakes": _handshake(
            result, timeline, "udp", Operation.QUIC_HANDSHAKE, ("quic", "quic_handshake")
        ),
        "network_events": _network_events(result, timeline),
    }
    if result.skipped is not None:
        built = {k: [] for k in built}  # nothing was sent: no observations to report
    # A probe that knows more (several queries, every read) may give OONI-shaped
    # lists itself under the same keys; they win over the reconstruction.
    for key in built:
        if key in details:
            built[key] = _as_list(to_jsonable(details[key]))
    return {**built, "probe_result": result_to_dict(result)}


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
        "details": to_jsonable(result.details),
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
