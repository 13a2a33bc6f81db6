"""Observations: one result in the form the verdict engine judges, whoever produced it.

`ProbeResult`s from `probe.round`, `Observation`s built by the lab, and the flat JSON
records of ``/api/results`` (`probe.statuspage.results_json`) or JSON Lines all become an
`Observation` (`normalise`), so the rules do not care how results were gathered.  The
evidence line of one observation (`describe`) lives here too.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any

from ..evidence import DnsEvidence, Evidence, empty_evidence
from ..model import Failure, ProbeResult, failure_kind
from ..records import RecordFields, is_result_record, read_result_record

# Stands for "nothing recorded": filled in with the probe's own empty evidence.
_NO_EVIDENCE = Evidence()


@dataclass(frozen=True)
class Observation:
    """The normalised form of one result, whoever produced it.

    ``probe`` is the label as shown and exported (``tls`` or ``tls/neutral_sni``).
    ``evidence`` (the probe's typed evidence) and ``flags`` are optional: rules that need
    them (certificate fingerprints, DNS answers, stall byte counts) degrade to lower
    confidence without.  Left out, ``evidence`` is the probe's empty evidence.
    """

    service: str
    endpoint: str
    probe: str
    address: str | None
    port: int | None
    ok: bool
    failure: str | None = None
    failed_operation: str | None = None
    resolver: str | None = None
    skipped: str | None = None
    role: str = ""
    evidence: Evidence = _NO_EVIDENCE
    flags: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        # the probe's own empty evidence knows the probe's transport (quic: UDP)
        if self.evidence is _NO_EVIDENCE:
            object.__setattr__(self, "evidence", empty_evidence(self.probe))

    @property
    def base(self) -> str:
        return self.probe.split("/", 1)[0]

    @property
    def variant(self) -> str:
        return self.probe.partition("/")[2]

    @property
    def is_attempt(self) -> bool:
        """A first run or a repeat, which the rules judge; a swap is only consulted."""
        return not self.variant or self.variant.startswith("repeat")

    @property
    def kind(self) -> Failure | None:
        return failure_kind(self.failure)

    @property
    def l4(self) -> str:
        return "dns" if self.base == "dns" else self.evidence.transport

    @property
    def path(self) -> tuple[str, str, int | None]:
        return (self.l4, self.address or "", self.port)

    @property
    def connected(self) -> bool:
        """A TCP handshake completed (the probe got past ``connect``)."""
        return self.l4 == "tcp" and (self.ok or self.failed_operation not in (None, "connect"))


def from_result(result: ProbeResult) -> Observation:
    t = result.target
    return Observation(
        service=t.service,
        endpoint=t.endpoint.name,
        probe=t.label,
        address=t.address,
        port=t.port,
        ok=result.ok,
        failure=result.failure,
        failed_operation=str(result.failed_operation) if result.failed_operation else None,
        resolver=t.resolver,
        skipped=str(result.skipped) if result.skipped else None,
        role=t.endpoint.role,
        evidence=result.evidence,
        flags=result.flags,
    )


def from_record(record: Mapping[str, Any]) -> Observation:
    """From a flat result record (`probe.records`: JSON Lines, ``/api/results``)."""
    return from_fields(read_result_record(record))


def from_fields(fields: RecordFields) -> Observation:
    """From a result record's fields (`probe.records.read_result_record`, or an archived
    result: `probe.archive.result_fields`)."""
    return Observation(
        service=fields.service,
        endpoint=fields.endpoint,
        probe=fields.probe,
        address=fields.address,
        port=fields.port,
        ok=fields.ok,
        failure=fields.failure,
        failed_operation=fields.failed_operation,
        resolver=fields.resolver,
        skipped=fields.skipped,
        role=fields.role,
        evidence=fields.evidence,
        flags=fields.flags,
    )


def from_api(payload: Mapping[str, Any]) -> list[Observation]:
    """Every result of a control agent's ``/api/results`` document."""
    return [from_record(r) for r in payload.get("results", ()) if is_result_record(r)]


Item = ProbeResult | Observation | Mapping[str, Any]


def normalise(items: Iterable[Item]) -> list[Observation]:
    out = []
    for item in items:
        if isinstance(item, Observation):
            out.append(item)
        elif isinstance(item, ProbeResult):
            out.append(from_result(item))
        else:
            out.append(from_record(item))
    return out


# --------------------------------------------------------------------------- evidence


def _hostport(address: str | None, port: int | None) -> str:
    if address is None:
        return "-" if port is None else f"port {port}"
    host = f"[{address}]" if ":" in address else address
    return host if port is None else f"{host}:{port}"


def describe(o: Observation) -> str:
    """One short evidence line: ``tls 10.0.0.5:443 connection_reset (tls_handshake)``."""
    where = (o.resolver or "system") if o.base == "dns" else _hostport(o.address, o.port)
    if o.skipped:
        return f"{o.probe} {where} skipped ({o.skipped})"
    if o.ok:
        text = f"{o.probe} {where} ok"
    else:
        failure = (o.failure or "")[:60]
        text = f"{o.probe} {where} {failure} ({o.failed_operation or '-'})"
    if o.base == "dns":
        answers = dns_answers(o)
        if answers:
            text += " " + ",".join(sorted(answers)[:2]) + (" …" if len(answers) > 2 else "")
    return text


def describe_control(o: Observation) -> str:
    return "control " + describe(o)


def dns_answers(o: Observation) -> frozenset[str]:
    """The A and AAAA addresses a resolver answered (none for any other probe)."""
    ev = o.evidence
    return frozenset(ev.addresses()) if isinstance(ev, DnsEvidence) else frozenset()


def same_failure(a: Observation, b: Observation) -> bool:
    return a.kind == b.kind and a.failed_operation == b.failed_operation
