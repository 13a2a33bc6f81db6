"""The flat JSON records of results and verdicts: built here, read back here.

One flat record per result is what scripts and other agents read: ``probe once
--format json`` writes it as JSON Lines (`probe.output`), ``/api/results`` serves
it (`probe.statuspage`), and a test vantage reads a control vantage's records
back into verdict observations (`probe.verdict.from_record`, `probe.control`).
This module is the only place that spells the record's keys: `result_record`
builds one from a `ProbeResult`, `read_result_record` reads one back into typed
`RecordFields` (through `fields_from`, which also reads an archived result).  The
field names are stable (docs/records.md); change them here or nowhere.

`to_jsonable` is the one way evidence becomes JSON, here and in the archive
(`probe.archive`, whose OONI envelope carries the nested full result instead).
"""

from __future__ import annotations

import base64
import dataclasses
import datetime as dt
import enum
import math
from collections.abc import Mapping
from typing import Any, Protocol, overload

from .evidence import Evidence, evidence_from_json
from .model import ProbeResult, freeze

__all__ = [
    "RESULT",
    "VERDICT",
    "RecordFields",
    "VerdictFields",
    "api_result_record",
    "binary_data",
    "details_json",
    "evidence_of",
    "fields_from",
    "is_result_record",
    "iso_z",
    "optional_str",
    "read_details",
    "read_flags",
    "read_result_record",
    "result_record",
    "to_jsonable",
    "verdict_line",
    "verdict_record",
]

RESULT = "result"  # the ``type`` of a result record in JSON Lines
VERDICT = "verdict"  # ... and of a verdict record
_MAX_DEPTH = 32


# -- JSON-safe values ---------------------------------------------------------------


def binary_data(data: bytes) -> dict[str, str]:
    """OONI's BinaryData object (df-001): how bytes appear in any of our JSON."""
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
        return binary_data(bytes(value))
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


@overload
def iso_z(t: dt.datetime) -> str: ...
@overload
def iso_z(t: dt.datetime | None) -> str | None: ...
def iso_z(t: dt.datetime | None) -> str | None:
    """ISO 8601 with ``Z`` for UTC, as every flat record writes times."""
    return t.isoformat().replace("+00:00", "Z") if t else None


# -- evidence ---------------------------------------------------------------------------


def evidence_of(result: ProbeResult) -> Evidence:
    """A result's evidence, typed (`probe.evidence`): what readers use, never string keys."""
    return result.evidence


def details_json(result: ProbeResult) -> Any:
    """The result's evidence as JSON (the ``details`` of every record), JSON-safe."""
    # to_json: the evidence's own form (its dataclass fields are not its JSON keys);
    # to_jsonable on top, because a probe may have recorded a NaN or an infinity.
    return to_jsonable(result.evidence.to_json())


# -- result records -----------------------------------------------------------------


def result_record(result: ProbeResult, vantage: str, vantage_state: str) -> dict[str, Any]:
    """The flat JSON record of one result (stable field names: scripts depend on them)."""
    t = result.target
    return {
        "type": RESULT,
        "t": iso_z(result.t),
        "vantage": vantage,
        "vantage_state": vantage_state,
        "service": t.service,
        "endpoint": t.endpoint.name,
        "role": t.endpoint.role,
        "probe": t.label,
        "address": t.address,
        "port": t.port,
        "resolver": t.resolver,
        "address_source": t.address_source or None,
        "status": result.status,
        "ok": result.ok,
        "failure": result.failure,
        "failed_operation": str(result.failed_operation) if result.failed_operation else None,
        "skipped": str(result.skipped) if result.skipped else None,
        "duration_s": round(result.duration_s, 6),
        "phases": {k: round(v, 6) for k, v in result.phases.items()},
        "flags": list(result.flags),
        "details": details_json(result),
    }


def api_result_record(
    result: ProbeResult, vantage: str, vantage_state: str, changed_at: dt.datetime | None
) -> dict[str, Any]:
    """The record as ``/api/results`` serves it: with when the result last changed."""
    return {**result_record(result, vantage, vantage_state), "changed_at": iso_z(changed_at)}


def is_result_record(record: Mapping[str, Any]) -> bool:
    """A result (not a verdict) record; records without ``type`` (``/api/results``) are."""
    return bool(record.get("type", RESULT) == RESULT)


@dataclasses.dataclass(frozen=True)
class RecordFields:
    """A flat result record read back (`read_result_record`).

    ``probe`` is the label as exported (``tls`` or ``tls/neutral_sni``); ``t`` the
    start time as written (`measured_at` parses it).  Fields a record may lack are
    None (or empty), so records from an older or foreign agent still read.
    """

    service: str
    endpoint: str
    probe: str
    address: str | None
    port: int | None
    ok: bool
    failure: str | None
    failed_operation: str | None
    resolver: str | None
    skipped: str | None
    role: str
    details: Mapping[str, Any]
    flags: tuple[str, ...]
    t: str | None
    vantage: str | None
    vantage_state: str | None

    @property
    def evidence(self) -> Evidence:
        """``details`` read as the probe's typed evidence (`probe.evidence`; never raises)."""
        return evidence_from_json(self.probe, self.details)

    def measured_at(self) -> dt.datetime:
        """The result's start time (UTC when the record has no offset).  Raises
        ValueError when the record has none or it is not ISO 8601."""
        if self.t is None:
            raise ValueError("the record has no time")
        t = dt.datetime.fromisoformat(self.t)
        return t if t.tzinfo is not None else t.replace(tzinfo=dt.UTC)


def read_result_record(record: Mapping[str, Any]) -> RecordFields:
    """The fields of a flat result record, typed.  ``service``, ``endpoint`` and ``probe``
    are required (KeyError); a ``port`` that is not an integer raises ValueError or
    TypeError.  Callers reading untrusted documents (a control's) catch those."""
    return fields_from(
        record,
        record,
        probe=str(record["probe"]),
        vantage=record.get("vantage"),
        vantage_state=record.get("vantage_state"),
    )


def fields_from(
    target: Mapping[str, Any],
    result: Mapping[str, Any],
    *,
    probe: str,
    vantage: Any,
    vantage_state: Any,
) -> RecordFields:
    """One result's fields, read from the mapping that names what was measured
    (``target``: service, endpoint, address, port, resolver, role) and the one that says
    what happened (``result``: ok, failure, failed_operation, skipped, details, flags, t).
    A flat record is both at once (`read_result_record`); the archive's envelope nests
    the target inside the result (`probe.archive.result_fields`).  ``probe`` is the label
    as exported; ``vantage`` and ``vantage_state`` as found (None when absent).  Raises
    KeyError without ``service`` or ``endpoint``, ValueError or TypeError on a ``port``
    that is not an integer."""
    port = target.get("port")
    return RecordFields(
        service=str(target["service"]),
        endpoint=str(target["endpoint"]),
        probe=probe,
        address=optional_str(target.get("address")),
        port=int(port) if port is not None else None,
        ok=bool(result.get("ok")),
        failure=optional_str(result.get("failure")),
        failed_operation=optional_str(result.get("failed_operation")),
        resolver=optional_str(target.get("resolver")),
        skipped=optional_str(result.get("skipped")),
        role=str(target.get("role") or ""),
        details=read_details(result.get("details")),
        flags=read_flags(result.get("flags")),
        t=optional_str(result.get("t")),
        vantage=optional_str(vantage),
        vantage_state=optional_str(vantage_state),
    )


def optional_str(value: Any) -> str | None:
    """A record's optional text field: null stays None, anything else its text."""
    return None if value is None else str(value)


def read_details(value: Any) -> Mapping[str, Any]:
    """A record's ``details`` (the evidence's JSON form): an object, else none at all."""
    return freeze(value) if isinstance(value, Mapping) else freeze()


def read_flags(value: Any) -> tuple[str, ...]:
    """Flags from a JSON record: a list of strings (a lone string is one flag, not letters)."""
    if isinstance(value, str):
        return (value,)
    if isinstance(value, list | tuple):
        return tuple(str(v) for v in value)
    return ()


# -- verdict records ----------------------------------------------------------------


class VerdictFields(Protocol):
    """What a verdict record shows and the exporter reads (`EndpointVerdict` and
    `ServiceVerdict` of `probe.verdict.vocabulary` satisfy it).  ``endpoint`` is None for
    a service-level verdict; ``evidence`` is for the status page, never a label."""

    @property
    def service(self) -> str: ...
    @property
    def endpoint(self) -> str | None: ...
    @property
    def verdict(self) -> str: ...
    @property
    def confidence(self) -> float: ...
    @property
    def blocked_fraction(self) -> float | None: ...
    @property
    def evidence(self) -> Any: ...


def verdict_record(verdict: VerdictFields) -> dict[str, Any]:
    """A verdict as ``/api/results`` lists it; ``endpoint`` is null for a service's own.
    Every evidence line is kept: only the table shortens them."""
    return {
        "service": verdict.service,
        "endpoint": verdict.endpoint,
        "verdict": str(verdict.verdict),
        "confidence": verdict.confidence,
        "blocked_fraction": verdict.blocked_fraction,
        "evidence": to_jsonable(verdict.evidence),
    }


def verdict_line(verdict: VerdictFields, vantage: str, t: str) -> dict[str, Any]:
    """A verdict as a JSON Lines record: the ``/api/results`` fields, and which kind of
    record it is, when the round started and which vantage judged."""
    return {
        "type": VERDICT,
        "t": t,
        "vantage": vantage,
        "level": "service" if verdict.endpoint is None else "endpoint",
        **verdict_record(verdict),
    }
