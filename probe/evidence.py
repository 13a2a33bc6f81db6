"""Typed evidence: one frozen dataclass per probe, and its JSON form.

Each probe records what it saw in its own evidence class (`DnsEvidence`, `TlsEvidence`,
...) and `probe.model.ProbeResult` carries it.  Readers use attributes, so mypy catches a
misspelt field (a misspelt string key once lost MITM certificates on their way to the
archive).  The JSON form is what the archive, ``--json`` output, ``/api/results`` and a
control vantage exchange: ``to_json()`` writes exactly the keys the probes always wrote
(under ``"details"`` in every record), and ``from_json()`` reads them back.

The JSON rules, per field (declared once, with `field` metadata):

- an optional field (``X | None``) whose value is None is left out; a field marked
  `KEEP_NONE` is written as ``null`` (the probe records "nothing" there, e.g. no SNI);
- a `FLAG` (a bool written only when true) is left out when false;
- a `FLAT` field holds a nested record (`Record`) whose keys are written into the
  parent object: keys a probe records together at one step (``sni`` and ``alpn_offered``;
  ``local_family`` and ``peer_family``), so "not recorded" and "recorded as null" differ;
- bytes are base64 (``peer_certificates`` is base64 DER, leaf first: OONI's form);
- tuples are JSON lists, mappings JSON objects, nested records JSON objects.

``from_json`` never raises: archived records, records from a control vantage and
hand-made ones may lack keys or hold other types, and a wrong or missing value becomes
the field's default.  The verdict re-judges records through it.

``evidence.transport`` says whether the probe's packets went over TCP or UDP (the
stun probe can run over either: its ``transport`` field decides).

A new probe gets its class here and an entry in `EVIDENCE` (tests/test_evidence.py
checks that every probe has one and fuzzes the JSON round trip of all of them).
"""

from __future__ import annotations

import base64
import binascii
import dataclasses
import types
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any, ClassVar, Literal, Self, Union, get_args, get_origin, get_type_hints

__all__ = [
    "EVIDENCE",
    "FLAG",
    "FLAT",
    "KEEP_NONE",
    "CertificateEvidence",
    "DnsEvidence",
    "DnsReply",
    "Evidence",
    "ExchangeEvidence",
    "HandshakeProgress",
    "IcmpReport",
    "MtprotoEvidence",
    "QuicClose",
    "QuicDatagrams",
    "QuicEvidence",
    "QuicNegotiated",
    "QuicOffer",
    "QuicVnEvidence",
    "Record",
    "SocketEvidence",
    "StunBinding",
    "StunControl",
    "StunEvidence",
    "StunFlow",
    "StunReflector",
    "StunReflectorReply",
    "StunResponse",
    "StunTransaction",
    "StunTxnReply",
    "TcpEvidence",
    "TlsEvidence",
    "TlsNegotiated",
    "TlsOffer",
    "TransferConnection",
    "TransferEvidence",
    "TransferHandshake",
    "TransferRequest",
    "TransferSummary",
    "TransferUploads",
    "Transport",
    "WhatsappEvidence",
    "empty_evidence",
    "evidence_class",
    "evidence_from_json",
]

Transport = Literal["tcp", "udp"]


# --------------------------------------------------------------------------- field kinds


# Metadata for `dataclasses.field`: ``field(default=None, metadata=KEEP_NONE)``.
# KEEP_NONE: an optional field written as ``null`` when None (absent only inside an
# absent `FLAT` group).  FLAG: a bool written only when true (``"eof": true``).  FLAT: a
# nested `Record` whose keys go into the parent's JSON object (None: no keys).  A field
# whose JSON key is not its Python name: ``metadata={"key": "class"}``.
KEEP_NONE: Mapping[str, Any] = types.MappingProxyType({"keep_none": True})
FLAG: Mapping[str, Any] = types.MappingProxyType({"omit_false": True})
FLAT: Mapping[str, Any] = types.MappingProxyType({"flat": True})


# --------------------------------------------------------------------------- the codec


class _Bad(Exception):
    """A JSON value that does not fit the field's type: the field keeps its default."""


Decoder = Callable[[object], Any]


def _decode_str(raw: object) -> str:
    if isinstance(raw, str):
        return raw
    raise _Bad


def _decode_int(raw: object) -> int:
    if isinstance(raw, int) and not isinstance(raw, bool):
        return raw
    raise _Bad


def _decode_float(raw: object) -> float:
    if isinstance(raw, int | float) and not isinstance(raw, bool):
        return float(raw)
    raise _Bad


def _decode_bool(raw: object) -> bool:
    if isinstance(raw, bool):
        return raw
    raise _Bad


def _decode_bytes(raw: object) -> bytes:
    if isinstance(raw, str):
        try:
            return base64.b64decode(raw, validate=True)
        except (binascii.Error, ValueError):
            raise _Bad from None
    raise _Bad


def _optional(inner: Decoder) -> Decoder:
    def decode(raw: object) -> Any:
        return None if raw is None else inner(raw)

    return decode


def _literal(allowed: tuple[object, ...]) -> Decoder:
    def decode(raw: object) -> Any:
        # a str/int literal only: True == 1 must not pass for 1
        for value in allowed:
            if type(raw) is type(value) and raw == value:
                return value
        raise _Bad

    return decode


def _sequence(inner: Decoder) -> Decoder:
    def decode(raw: object) -> tuple[Any, ...]:
        if not isinstance(raw, list | tuple):
            raise _Bad
        out = []
        for item in raw:
            try:
                out.append(inner(item))
            except _Bad:
                continue  # one bad element does not cost the others
        return tuple(out)

    return decode


def _mapping(inner: Decoder) -> Decoder:
    def decode(raw: object) -> Mapping[str, Any]:
        if not isinstance(raw, Mapping):
            raise _Bad
        out: dict[str, Any] = {}
        for key, value in raw.items():
            try:
                out[str(key)] = inner(value)
            except _Bad:
                continue
        return types.MappingProxyType(out)

    return decode


def _nested(cls: type[Record]) -> Decoder:
    def decode(raw: object) -> Record:
        if not isinstance(raw, Mapping):
            raise _Bad
        return cls.from_json(raw)

    return decode


_SCALARS: dict[object, Decoder] = {
    str: _decode_str,
    int: _decode_int,
    float: _decode_float,
    bool: _decode_bool,
    bytes: _decode_bytes,
}


def _decoder(tp: Any) -> Decoder:
    """The decoder for a field's type; a type outside this list is a programming error."""
    if tp in _SCALARS:
        return _SCALARS[tp]
    origin, args = get_origin(tp), get_args(tp)
    if origin in (Union, types.UnionType):
        rest = [a for a in args if a is not type(None)]
        if len(rest) != 1 or len(args) != 2:
            raise TypeError(f"evidence fields take X | None, not {tp}")
        return _optional(_decoder(rest[0]))
    if origin is Literal:
        return _literal(args)
    if origin is tuple and len(args) == 2 and args[1] is Ellipsis:
        return _sequence(_decoder(args[0]))
    if origin is Mapping and args and args[0] is str:
        return _mapping(_decoder(args[1]))
    if isinstance(tp, type) and issubclass(tp, Record):
        return _nested(tp)
    raise TypeError(f"no evidence codec for {tp!r}")


def _encode(value: Any) -> Any:
    if isinstance(value, Record):
        return value.to_json()
    if isinstance(value, bytes):
        return base64.b64encode(value).decode("ascii")
    if isinstance(value, tuple | list):
        return [_encode(v) for v in value]
    if isinstance(value, Mapping):
        return {str(k): _encode(v) for k, v in value.items()}
    return value


@dataclass(frozen=True, kw_only=True)
class _Field:
    name: str
    key: str
    decode: Decoder
    keep_none: bool
    omit_false: bool
    group: type[Record] | None  # a `flat` field's record type
    mapping: bool  # a Mapping field: frozen on construction


def _origin_type(tp: Any) -> Any:
    """``X`` for ``X | None``."""
    if get_origin(tp) in (Union, types.UnionType):
        rest = [a for a in get_args(tp) if a is not type(None)]
        return rest[0] if len(rest) == 1 else tp
    return tp


def _fields(cls: type[Record]) -> tuple[_Field, ...]:
    # Built once per class, on first use (the class is complete by then), kept on the class.
    built: tuple[_Field, ...] | None = cls.__dict__.get("_codec_fields")
    if built is None:
        built = _build_fields(cls)
        setattr(cls, "_codec_fields", built)  # noqa: B010 (not a dataclass field)
    return built


def _build_fields(cls: type[Record]) -> tuple[_Field, ...]:
    hints = get_type_hints(cls)
    out = []
    for f in dataclasses.fields(cls):
        tp = hints[f.name]
        base = _origin_type(tp)
        group = base if f.metadata.get("flat") else None
        if group is not None and not (isinstance(group, type) and issubclass(group, Record)):
            raise TypeError(f"{cls.__name__}.{f.name}: a flat field holds a Record")
        out.append(
            _Field(
                name=f.name,
                key=f.metadata.get("key") or f.name,
                decode=_decoder(tp),
                keep_none=bool(f.metadata.get("keep_none")),
                omit_false=bool(f.metadata.get("omit_false")),
                group=group,
                mapping=get_origin(base) is Mapping,
            )
        )
    return tuple(out)


# What `Record.to_json` runs per field, precomputed per class (as `_fields`): the field's
# name, its key, keep_none, omit_false and whether it is flat.  Plain tuples, read
# without attribute lookups: a probe's evidence is encoded for every archived result.
_Step = tuple[str, str, bool, bool, bool]
# Values written as they are (`_encode` returns them unchanged): skipping the call for
# them is most of what encoding a record costs.  Exact types: a subclass goes the long way.
_PLAIN: frozenset[type] = frozenset({str, int, float, bool})


def _encode_plan(cls: type[Record]) -> tuple[_Step, ...]:
    built: tuple[_Step, ...] | None = cls.__dict__.get("_codec_plan")
    if built is None:
        built = tuple(
            (f.name, f.key, f.keep_none, f.omit_false, f.group is not None) for f in _fields(cls)
        )
        setattr(cls, "_codec_plan", built)  # noqa: B010 (not a dataclass field)
    return built


def _mapping_fields(cls: type[Record]) -> tuple[str, ...]:
    """The names of the class's Mapping fields (frozen on construction); most have none."""
    built: tuple[str, ...] | None = cls.__dict__.get("_codec_mappings")
    if built is None:
        built = tuple(f.name for f in _fields(cls) if f.mapping)
        setattr(cls, "_codec_mappings", built)  # noqa: B010 (not a dataclass field)
    return built


def _always_keys(cls: type[Record]) -> frozenset[str]:
    """Keys the record writes whenever it is present: how a `flat` group is recognised."""
    built: frozenset[str] | None = cls.__dict__.get("_codec_always")
    if built is None:
        built = _build_always_keys(cls)
        setattr(cls, "_codec_always", built)  # noqa: B010 (not a dataclass field)
    return built


def _build_always_keys(cls: type[Record]) -> frozenset[str]:
    keys: set[str] = set()
    for f in _fields(cls):
        if f.group is not None:
            continue
        default = next(x for x in dataclasses.fields(cls) if x.name == f.name).default
        if f.keep_none or (default is not None and not f.omit_false):
            keys.add(f.key)
    if not keys:
        raise TypeError(f"{cls.__name__} writes no key for certain: it cannot be flat")
    return frozenset(keys)


@dataclass(frozen=True, kw_only=True)
class Record:
    """A frozen dataclass with a JSON form (see the module docstring for the rules)."""

    def __post_init__(self) -> None:
        # A mapping handed in by a probe is copied and frozen: evidence never changes.
        for name in _mapping_fields(type(self)):
            value = getattr(self, name)
            if value is not None and not isinstance(value, types.MappingProxyType):
                object.__setattr__(self, name, types.MappingProxyType(dict(value)))

    def to_json(self) -> dict[str, Any]:
        """The JSON object (plain dicts, lists, str, numbers, bools, None)."""
        out: dict[str, Any] = {}
        for name, key, keep_none, omit_false, flat in _encode_plan(type(self)):
            value = getattr(self, name)
            if value is None:
                if keep_none and not flat:
                    out[key] = None
            elif flat:
                out.update(value.to_json())
            elif omit_false and value is False:
                continue
            else:
                out[key] = value if type(value) in _PLAIN else _encode(value)
        return out

    @classmethod
    def from_json(cls, data: object) -> Self:
        """Read a JSON object back; never raises (wrong or missing values: defaults)."""
        if not isinstance(data, Mapping):
            data = {}
        values: dict[str, Any] = {}
        for f in _fields(cls):
            if f.group is not None:
                if any(key in data for key in _always_keys(f.group)):
                    values[f.name] = f.group.from_json(data)
                continue
            if f.key not in data:
                continue
            try:
                values[f.name] = f.decode(data[f.key])
            except _Bad:
                continue
        return cls(**values)


@dataclass(frozen=True, kw_only=True)
class Evidence(Record):
    """What one probe run recorded.  Subclasses: one per probe.

    ``internal_error`` is set on any probe's evidence when a bug escaped the probe
    (`probe.probes.base.run_guarded`): the exception's type name, nothing else.
    This base class is also the evidence of a probe this agent does not know.
    """

    PROBE: ClassVar[str] = ""
    TRANSPORT: ClassVar[Transport] = "tcp"

    internal_error: str | None = None

    @property
    def transport(self) -> Transport:
        """``tcp`` or ``udp``: what the probe's packets went over."""
        return self.TRANSPORT


# --------------------------------------------------------------------------- shared parts


@dataclass(frozen=True, kw_only=True)
class SocketEvidence(Record):
    """Address families of both ends of a connected socket (never the local address: it
    identifies the vantage).  None: the kernel no longer knew (the peer had reset)."""

    local_family: str | None = field(default=None, metadata=KEEP_NONE)
    peer_family: str | None = field(default=None, metadata=KEEP_NONE)


@dataclass(frozen=True, kw_only=True)
class CertificateEvidence(Record):
    """A leaf certificate's fingerprint and identity; ``parse_error`` when it would not
    parse (a hostile peer's DER is evidence too)."""

    sha256: str = ""
    der_bytes: int = 0
    subject: str | None = None
    issuer: str | None = None
    serial: str | None = None
    not_before: str | None = None
    not_after: str | None = None
    sans: tuple[str, ...] | None = None  # "DNS:name", "IP:address"
    parse_error: str | None = None


@dataclass(frozen=True, kw_only=True)
class IcmpReport(Record):
    """One ICMP error that answered a datagram of a UDP probe (``IP_RECVERR``): what the
    reporting node said and who it was.  ``reporter`` is a router on the path (a censor
    rejecting the flow, or the target's last hop when the target is down), never the
    vantage's own address."""

    icmp: str = ""  # icmp | icmpv6
    type: int = 0  # 3 / 1: destination unreachable
    code: int = 0  # e.g. 1 host unreachable, 13 admin prohibited; v6 3 address unreachable
    errno: str = ""  # the kernel's name for it: EHOSTUNREACH, ECONNREFUSED, EACCES ...
    reporter: str | None = None


# --------------------------------------------------------------------------- dns


@dataclass(frozen=True, kw_only=True)
class DnsReply(Record):
    """One reply (or failed HTTP exchange, for DoH) kept as evidence for one query."""

    qtype: str = ""
    delay_s: float | None = None
    garbage_hex: str | None = None  # the first bytes of a reply that did not parse
    rcode: str | None = None
    answers: tuple[str, ...] | None = None
    mismatch: bool = field(
        default=False, metadata=FLAG
    )  # wrong transaction ID or question: not our answer
    http_status: int | None = None
    http_error: str | None = None  # DoH: no readable HTTP response (exception type)
    content_type: str | None = None
    oversized: bool = field(default=False, metadata=FLAG)


@dataclass(frozen=True, kw_only=True)
class DnsEvidence(Evidence):
    """The dns probe: per query type (A, AAAA) the addresses, rcodes and errors; every
    reply kept (not for the system resolver); the bogons that failed the probe."""

    PROBE: ClassVar[str] = "dns"
    TRANSPORT: ClassVar[Transport] = "udp"

    resolver: str | None = None  # system | udp:HOST:PORT | tcp:HOST:PORT | doh:URL
    answers: Mapping[str, tuple[str, ...]] | None = None  # qtype -> addresses
    rcodes: Mapping[str, str] | None = None  # qtype -> NOERROR, NXDOMAIN, ...
    errors: Mapping[str, str] | None = None  # qtype -> failure, when no usable reply came
    replies: tuple[DnsReply, ...] | None = None
    bogons: tuple[str, ...] | None = None
    icmp_errors: tuple[IcmpReport, ...] | None = None  # UDP: ICMP errors, any query
    icmp_stray: int | None = None  # ICMP errors that answered none of our datagrams

    @property
    def transport(self) -> Transport:
        """What the resolver's queries went over (the system stub: UDP, as a rule)."""
        kind = (self.resolver or "").partition(":")[0]
        return "tcp" if kind in ("tcp", "doh") else "udp"

    def addresses(self, qtype: str | None = None) -> tuple[str, ...]:
        """The addresses of one query type, or of A then AAAA."""
        answers = self.answers or {}
        if qtype is not None:
            return tuple(answers.get(qtype, ()))
        return (*answers.get("A", ()), *answers.get("AAAA", ()))


# --------------------------------------------------------------------------- tcp


@dataclass(frozen=True, kw_only=True)
class TcpEvidence(Evidence):
    """The tcp probe: connect time (loop and kernel), families, and what a held
    connection received."""

    PROBE: ClassVar[str] = "tcp"

    connect_rtt_s: float | None = None  # the kernel's SYN/SYN-ACK round trip
    socket: SocketEvidence | None = field(default=None, metadata=FLAT)
    connect_time_s: float | None = None
    hold_s: float | None = None
    bytes_received: int | None = None
    first_bytes_hex: str | None = None


# --------------------------------------------------------------------------- tls


@dataclass(frozen=True, kw_only=True)
class TlsOffer(Record):
    """What the ClientHello offered."""

    sni: str | None = field(default=None, metadata=KEEP_NONE)  # None: no SNI sent
    alpn_offered: tuple[str, ...] = ()
    client_hello_shape: str | None = None  # only another shape than the default


@dataclass(frozen=True, kw_only=True)
class HandshakeProgress(Record):
    """Bytes each way during a TLS handshake and the server's messages seen: where it
    broke (``stage``) is the evidence."""

    stage: str = ""  # before_client_hello | awaiting_server_hello | mid_handshake
    bytes_sent: int = 0
    bytes_received: int = 0
    server_messages: tuple[str, ...] = ()
    eof: bool = field(default=False, metadata=FLAG)
    timeout_s: float | None = None  # the time the handshake was allowed (timeouts only)


@dataclass(frozen=True, kw_only=True)
class TlsNegotiated(Record):
    """What a completed handshake agreed on."""

    tls_version: str | None = field(default=None, metadata=KEEP_NONE)
    alpn: str | None = field(default=None, metadata=KEEP_NONE)
    cipher: str | None = field(default=None, metadata=KEEP_NONE)


@dataclass(frozen=True, kw_only=True)
class TlsEvidence(Evidence):
    """The tls probe.  On a failed verification the whole chain the peer sent is kept
    (``peer_certificates``, DER, leaf first): a MITM certificate is the finding."""

    PROBE: ClassVar[str] = "tls"

    offer: TlsOffer | None = field(default=None, metadata=FLAT)
    connect_rtt_s: float | None = None
    socket: SocketEvidence | None = field(default=None, metadata=FLAT)
    connect_time_s: float | None = None
    handshake: HandshakeProgress | None = None
    client_hello_split_at: int | None = None
    negotiated: TlsNegotiated | None = field(default=None, metadata=FLAT)
    verify_code: int | None = None
    verify_message: str | None = None
    certificate: CertificateEvidence | None = None
    certificate_source: str | None = None  # handshake | unverified_second_handshake
    peer_certificates: tuple[bytes, ...] | None = None
    certificate_error: str | None = None  # the evidence-only second handshake failed

    @property
    def sni(self) -> str | None:
        return self.offer.sni if self.offer is not None else None

    @property
    def alpn(self) -> str | None:
        return self.negotiated.alpn if self.negotiated is not None else None

    @property
    def cipher(self) -> str | None:
        return self.negotiated.cipher if self.negotiated is not None else None

    @property
    def tls_version(self) -> str | None:
        return self.negotiated.tls_version if self.negotiated is not None else None


# --------------------------------------------------------------------------- quic


@dataclass(frozen=True, kw_only=True)
class QuicOffer(Record):
    sni: str | None = field(default=None, metadata=KEEP_NONE)
    alpn_offered: tuple[str, ...] = ()
    quic_version: str = ""  # "0x00000001"


@dataclass(frozen=True, kw_only=True)
class QuicDatagrams(Record):
    """Datagrams each way and the packet types the server sent (handshake progress)."""

    datagrams_sent: int = 0
    datagrams_received: int = 0
    # initial, handshake, 1RTT ...; None: not recorded (records older than the field)
    server_packet_types: tuple[str, ...] | None = None
    initial_datagram_bytes: int | None = field(default=None, metadata=KEEP_NONE)


@dataclass(frozen=True, kw_only=True)
class QuicNegotiated(Record):
    alpn: str | None = field(default=None, metadata=KEEP_NONE)


@dataclass(frozen=True, kw_only=True)
class QuicClose(Record):
    """The CONNECTION_CLOSE that ended the handshake, and who sent it."""

    quic_close_by: str = ""  # peer | local
    quic_error_code: str = ""  # "0x128"
    quic_error_space: str = ""  # transport | application
    quic_frame_type: int | None = field(default=None, metadata=KEEP_NONE)
    quic_reason: str = ""


@dataclass(frozen=True, kw_only=True)
class QuicEvidence(Evidence):
    """The quic probe (one QUIC handshake).  The peer certificate is kept on failure too,
    and the chain (DER, leaf first) when the handshake did not complete."""

    PROBE: ClassVar[str] = "quic"
    TRANSPORT: ClassVar[Transport] = "udp"

    offer: QuicOffer | None = field(default=None, metadata=FLAT)
    datagrams: QuicDatagrams | None = field(default=None, metadata=FLAT)
    certificate: CertificateEvidence | None = None
    certificate_source: str | None = None
    peer_certificates: tuple[bytes, ...] | None = None
    negotiated: QuicNegotiated | None = field(default=None, metadata=FLAT)
    offered_versions: tuple[str, ...] | None = None  # a Version Negotiation's list
    close: QuicClose | None = field(default=None, metadata=FLAT)
    icmp_errors: tuple[IcmpReport, ...] | None = None
    icmp_stray: int | None = None  # ICMP errors that answered none of our datagrams

    @property
    def sni(self) -> str | None:
        return self.offer.sni if self.offer is not None else None

    @property
    def alpn(self) -> str | None:
        return self.negotiated.alpn if self.negotiated is not None else None


@dataclass(frozen=True, kw_only=True)
class QuicVnEvidence(Evidence):
    """The quic_vn probe: the reserved version sent and the Version Negotiation back."""

    PROBE: ClassVar[str] = "quic_vn"
    TRANSPORT: ClassVar[Transport] = "udp"

    probe_version: str | None = None
    datagram_bytes: int | None = None
    datagrams_sent: int | None = None
    datagrams_received: int | None = None
    invalid_reply: str | None = None  # why the first reply was not our VN
    offered_versions: tuple[str, ...] | None = None
    offers_quic_v1: bool | None = None
    icmp_errors: tuple[IcmpReport, ...] | None = None
    icmp_stray: int | None = None  # ICMP errors that answered none of our datagrams


# --------------------------------------------------------------------------- stun


@dataclass(frozen=True, kw_only=True)
class StunControl(Record):
    """Random datagrams of the same sizes to the same address and port, sent first."""

    sent: int = 0
    replied: bool = False
    sizes: tuple[int, ...] = ()
    error: str | None = None
    rtt_s: float | None = None
    echoed: bool | None = None


@dataclass(frozen=True, kw_only=True)
class StunTxnReply(Record):
    """The class and error code of the response that resolved a transaction."""

    msg_class: str = field(default="", metadata={"key": "class"})  # success | error
    error_code: int | None = field(default=None, metadata=KEEP_NONE)


@dataclass(frozen=True, kw_only=True)
class StunTransaction(Record):
    outcome: str = "lost"  # answered | malformed | reflected | lost
    rtt_s: float | None = field(default=None, metadata=KEEP_NONE)
    sent: int | None = None  # sends of this request (UDP)
    reply: StunTxnReply | None = field(default=None, metadata=FLAT)
    error: str | None = None


@dataclass(frozen=True, kw_only=True)
class StunResponse(Record):
    """The first answer: its class, error, the address the relay saw us at (family and
    port; the address itself only on request), whether a NAT rewrote us, its software."""

    response_class: str = ""
    error_code: int | None = None
    error_reason: str | None = None
    mapped_family: str | None = None
    mapped_port: int | None = None
    mapped_address: str | None = None
    nat: bool | None = None
    software: str | None = None


@dataclass(frozen=True, kw_only=True)
class StunBinding(Record):
    """``mode: binding``: the tally of the Binding transactions."""

    icmp_error: str | None = None  # an ICMP error after an answer came (UDP)
    stream_error: str | None = None  # the stream broke after an answer came (TCP)
    count: int = 0
    answered: int = 0
    loss: float = 0.0
    rtt_s: tuple[float | None, ...] = ()
    transactions: tuple[StunTransaction, ...] = ()
    malformed: int = 0
    reflected: int = 0
    unmatched: int = 0
    duplicates: int = 0
    parse_error: str | None = None
    response: StunResponse | None = field(default=None, metadata=FLAT)
    datagrams_sent: int | None = None
    datagrams_received: int | None = None
    datagrams_dropped: int | None = None


@dataclass(frozen=True, kw_only=True)
class StunReflectorReply(Record):
    rtt_s: float | None = field(default=None, metadata=KEEP_NONE)
    reply_bytes: int = 0
    tag_match: bool = False
    echoed: bool = False


@dataclass(frozen=True, kw_only=True)
class StunReflector(Record):
    """``mode: reflector``: Telegram's reflector hello and the reply."""

    reply: StunReflectorReply | None = field(default=None, metadata=FLAT)
    hello_bytes: int = 0
    datagrams_sent: int | None = None


@dataclass(frozen=True, kw_only=True)
class StunFlow(Record):
    """``mode: flow``: a call-like flow's loss, RFC 3550 jitter and cut-off."""

    rate_pps: float = 0.0
    duration_s: float = 0.0
    sent: int = 0
    received: int = 0
    loss: float | None = field(default=None, metadata=KEEP_NONE)
    stun_sent: int = 0
    stun_received: int = 0
    jitter_s: float | None = field(default=None, metadata=KEEP_NONE)
    rtt_min_s: float | None = field(default=None, metadata=KEEP_NONE)
    rtt_median_s: float | None = field(default=None, metadata=KEEP_NONE)
    rtt_max_s: float | None = field(default=None, metadata=KEEP_NONE)
    unmatched: int = 0
    duplicates: int = 0
    last_reply_s: float | None = field(default=None, metadata=KEEP_NONE)
    cutoff_s: float | None = field(
        default=None, metadata=KEEP_NONE
    )  # when replies stopped for good


StunMode = Literal["binding", "flow", "reflector"]


@dataclass(frozen=True, kw_only=True)
class StunEvidence(Evidence):
    """The stun probe.  One of ``binding`` / ``reflector`` / ``flow`` per run (its
    ``mode``); their keys share the top level of the JSON object."""

    PROBE: ClassVar[str] = "stun"
    TRANSPORT: ClassVar[Transport] = "udp"

    stun_transport: Transport | None = field(default=None, metadata={"key": "transport"})
    mode: StunMode | None = None
    framing: str | None = None  # TCP only: rfc4571 | none
    control: StunControl | None = None
    binding: StunBinding | None = field(default=None, metadata=FLAT)
    reflector: StunReflector | None = field(default=None, metadata=FLAT)
    flow: StunFlow | None = field(default=None, metadata=FLAT)
    icmp_errors: tuple[IcmpReport, ...] | None = None  # UDP (not the control's socket)
    icmp_stray: int | None = None  # ICMP errors that answered none of our datagrams

    @property
    def transport(self) -> Transport:
        return self.stun_transport or "udp"

    @classmethod
    def from_json(cls, data: object) -> Self:
        # The three modes share key names (loss, unmatched ...): the mode says which one.
        ev = super().from_json(data)
        mode = ev.mode
        return dataclasses.replace(
            ev,
            binding=ev.binding if mode == "binding" else None,
            reflector=ev.reflector if mode == "reflector" else None,
            flow=ev.flow if mode == "flow" else None,
        )


# --------------------------------------------------------------------------- transfer


@dataclass(frozen=True, kw_only=True)
class TransferRequest(Record):
    sni: str | None = field(default=None, metadata=KEEP_NONE)
    path: str = "/"


@dataclass(frozen=True, kw_only=True)
class TransferConnection(Record):
    """What one connection saw (floats rounded to 4 places).  ``wire_bytes`` counts
    server->client TCP payload, TLS included."""

    index: int = 0
    direction: str = ""  # download | upload
    outcome: str = ""  # complete | limit | deadline | stalled | failed
    failure: str | None = None
    failed_operation: str | None = None
    stage: str | None = None  # first_byte | head | body
    connect_s: float | None = None
    tls_s: float | None = None
    ttfb_s: float | None = None
    duration_s: float = 0.0
    status: int | None = None
    framing: str | None = None
    content_length: int | None = None
    body_bytes: int = 0
    wire_bytes: int = 0
    handshake_wire_bytes: int | None = None
    handshake_messages: tuple[str, ...] | None = None
    response_wire_bytes: int = 0
    stalled_at_bytes: int | None = None
    stalled_at_wire_bytes: int | None = None
    silent_s: float | None = None
    acks_in_silence: bool | None = None
    longest_gap_s: float | None = None
    long_gaps: int = 0
    kbps: float | None = None
    upload_bytes: int | None = None
    upload_kbps: float | None = None
    eof: str | None = None  # close_notify | ragged


@dataclass(frozen=True, kw_only=True)
class TransferSummary(Record):
    connections: tuple[TransferConnection, ...] = ()
    connections_attempted: int = 0
    stalled_connections: int = 0
    stalled_fraction: float = 0.0
    stalled_at_bytes: tuple[int | None, ...] = ()
    stalled_at_wire_bytes: tuple[int | None, ...] = ()
    median_kbps: float | None = field(default=None, metadata=KEEP_NONE)
    measured_connections: int = 0
    throttle_kbps: float = 0.0


@dataclass(frozen=True, kw_only=True)
class TransferUploads(Record):
    uploads: tuple[TransferConnection, ...] = ()
    median_upload_kbps: float | None = field(default=None, metadata=KEEP_NONE)


@dataclass(frozen=True, kw_only=True)
class TransferHandshake(Record):
    """A failed connection's handshake, in the shape the tls probe's verdict rule reads."""

    bytes_received: int = 0
    server_messages: tuple[str, ...] = ()


@dataclass(frozen=True, kw_only=True)
class TransferEvidence(Evidence):
    """The transfer probe: every connection's record and the run's summary."""

    PROBE: ClassVar[str] = "transfer"

    request: TransferRequest | None = field(default=None, metadata=FLAT)
    summary: TransferSummary | None = field(default=None, metadata=FLAT)
    upload: TransferUploads | None = field(default=None, metadata=FLAT)
    handshake: TransferHandshake | None = None
    throttled_directions: tuple[str, ...] | None = None  # download, upload

    @property
    def sni(self) -> str | None:
        return self.request.sni if self.request is not None else None

    @property
    def connections(self) -> tuple[TransferConnection, ...]:
        return self.summary.connections if self.summary is not None else ()


# --------------------------------------------------------------------------- mtproto, whatsapp


@dataclass(frozen=True, kw_only=True)
class ExchangeEvidence(Evidence):
    """One request, one bounded reply over TCP (`probe.probes._exchange`)."""

    connect_rtt_s: float | None = None
    socket: SocketEvidence | None = field(default=None, metadata=FLAT)
    app_timeout_s: float | None = None
    reason: str | None = None  # bad_response: malformed | nonce_mismatch | transport_error
    error: str | None = None  # what was malformed
    bytes_received: int | None = None
    first_bytes_hex: str | None = None
    rtt_ms: float | None = None  # request written -> reply parsed (success)


@dataclass(frozen=True, kw_only=True)
class MtprotoEvidence(ExchangeEvidence):
    PROBE: ClassVar[str] = "mtproto"

    transport_error: int | None = None  # the DC's code, e.g. -404
    transport_error_framed: bool | None = None
    server_nonce_present: bool | None = None
    fingerprints: int | None = None
    pq_bytes: int | None = None


@dataclass(frozen=True, kw_only=True)
class WhatsappEvidence(ExchangeEvidence):
    PROBE: ClassVar[str] = "whatsapp"

    static_bytes: int | None = None
    payload_bytes: int | None = None


# --------------------------------------------------------------------------- dispatch

EVIDENCE: Mapping[str, type[Evidence]] = types.MappingProxyType(
    {
        cls.PROBE: cls
        for cls in (
            DnsEvidence,
            TcpEvidence,
            TlsEvidence,
            QuicEvidence,
            QuicVnEvidence,
            StunEvidence,
            TransferEvidence,
            MtprotoEvidence,
            WhatsappEvidence,
        )
    }
)


def evidence_class(probe: str) -> type[Evidence]:
    """The evidence class of a probe name or label (``tls/neutral_sni`` -> `TlsEvidence`);
    `Evidence` itself for a probe this agent does not know."""
    return EVIDENCE.get(probe.split("/", 1)[0], Evidence)


def empty_evidence(probe: str) -> Evidence:
    return evidence_class(probe)()


def evidence_from_json(probe: str, data: object) -> Evidence:
    """A record's ``details`` read back as the probe's evidence; never raises."""
    return evidence_class(str(probe)).from_json(data)
