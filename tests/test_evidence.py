"""Typed evidence: JSON round trips, tolerant reading, today's key shapes, no string-key reads."""

from __future__ import annotations

import dataclasses
import json
import types
from collections.abc import Mapping
from typing import Any, Literal, Union, get_args, get_origin, get_type_hints

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from probe.evidence import (
    EVIDENCE,
    CertificateEvidence,
    DnsEvidence,
    DnsReply,
    Evidence,
    HandshakeProgress,
    QuicEvidence,
    QuicNegotiated,
    Record,
    SocketEvidence,
    StunBinding,
    StunEvidence,
    StunFlow,
    StunReflector,
    TcpEvidence,
    TlsEvidence,
    TlsNegotiated,
    TlsOffer,
    TransferEvidence,
    TransferRequest,
    TransferSummary,
    empty_evidence,
    evidence_class,
    evidence_from_json,
)
from probe.probes import REGISTRY

# --------------------------------------------------------------------------- strategies


def _strategy(tp: Any) -> st.SearchStrategy[Any]:
    """Values of an evidence field's type (the codec's own list of types)."""
    scalars: dict[Any, st.SearchStrategy[Any]] = {
        str: st.text(max_size=12),
        int: st.integers(),
        # JSON has no NaN; NaN would not even equal itself after a round trip
        float: st.floats(allow_nan=False, allow_infinity=False),
        bool: st.booleans(),
        bytes: st.binary(max_size=24),
    }
    if tp in scalars:
        return scalars[tp]
    origin, args = get_origin(tp), get_args(tp)
    if origin in (Union, types.UnionType):
        (inner,) = [a for a in args if a is not type(None)]
        return st.none() | _strategy(inner)
    if origin is Literal:
        return st.sampled_from(args)
    if origin is tuple:
        return st.lists(_strategy(args[0]), max_size=3).map(tuple)
    if origin is Mapping:
        return st.dictionaries(st.text(max_size=6), _strategy(args[1]), max_size=3)
    if isinstance(tp, type) and issubclass(tp, Record):
        return records(tp)
    raise AssertionError(f"no strategy for {tp!r}")


def records(cls: type[Record]) -> st.SearchStrategy[Any]:
    hints = get_type_hints(cls)
    fields = {f.name: _strategy(hints[f.name]) for f in dataclasses.fields(cls)}
    if cls is StunEvidence:
        # one run per mode: the three modes share key names, the mode tells them apart
        return st.one_of(
            st.builds(cls, **{**fields, "mode": st.none(), "binding": st.none(),
                              "reflector": st.none(), "flow": st.none()}),
            st.builds(cls, **{**fields, "mode": st.just("binding"),
                              "reflector": st.none(), "flow": st.none()}),
            st.builds(cls, **{**fields, "mode": st.just("reflector"),
                              "binding": st.none(), "flow": st.none()}),
            st.builds(cls, **{**fields, "mode": st.just("flow"),
                              "binding": st.none(), "reflector": st.none()}),
        )  # fmt: skip
    return st.builds(cls, **fields)


CLASSES = [Evidence, *EVIDENCE.values()]
json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=8),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner),
    max_leaves=20,
)


def _keys(cls: type[Record]) -> set[str]:
    """Every JSON key a record can write at its top level, its `flat` groups' included."""
    hints = get_type_hints(cls)
    keys: set[str] = set()
    for f in dataclasses.fields(cls):
        if f.metadata.get("flat"):
            (group,) = [a for a in get_args(hints[f.name]) if a is not type(None)]
            keys |= _keys(group)
        else:
            keys.add(f.metadata.get("key") or f.name)
    return keys


# JSON objects that use the evidence's own keys, so the wrong-type paths are reached
KEYS = sorted({k for cls in CLASSES for k in _keys(cls)})  # type: ignore[arg-type]
keyed_objects = st.dictionaries(st.sampled_from(KEYS), json_values, max_size=8)


# --------------------------------------------------------------------------- the contract


def test_every_probe_has_an_evidence_class() -> None:
    assert set(EVIDENCE) == set(REGISTRY)
    for name, cls in EVIDENCE.items():
        assert name == cls.PROBE
        assert evidence_class(f"{name}/some_variant") is cls


def test_an_unknown_probe_gets_the_base_evidence() -> None:
    assert evidence_class("carrier_pigeon") is Evidence
    assert evidence_from_json("carrier_pigeon", {"internal_error": "KeyError", "x": 1}) == (
        Evidence(internal_error="KeyError")
    )


@pytest.mark.parametrize("cls", CLASSES, ids=lambda c: c.__name__)
@settings(max_examples=30)
@given(data=st.data())
def test_json_round_trip(cls: type[Evidence], data: st.DataObject) -> None:
    evidence = data.draw(records(cls))
    encoded = evidence.to_json()
    assert cls.from_json(encoded) == evidence
    # what the archive writes: plain JSON, no NaN
    assert cls.from_json(json.loads(json.dumps(encoded, allow_nan=False))) == evidence
    assert evidence_from_json(cls.PROBE or "unknown", encoded) == evidence


@pytest.mark.parametrize("cls", CLASSES, ids=lambda c: c.__name__)
@settings(max_examples=40)
@given(raw=json_values | keyed_objects)
def test_from_json_never_raises(cls: type[Evidence], raw: object) -> None:
    evidence = cls.from_json(raw)
    assert type(evidence) is cls
    # and what it read writes back to something it reads the same way
    assert cls.from_json(evidence.to_json()) == evidence


@given(probe=st.text(max_size=10), raw=json_values | keyed_objects)
def test_evidence_from_json_never_raises(probe: str, raw: object) -> None:
    assert isinstance(evidence_from_json(probe, raw), Evidence)


@pytest.mark.parametrize("cls", CLASSES, ids=lambda c: c.__name__)
def test_evidence_is_read_by_attribute_only(cls: type[Evidence]) -> None:
    """The transitional mapping shim is gone: a string-key read is an error, not a value
    that a misspelt key silently turns into None (how MITM chains once missed the archive)."""
    evidence = cls()
    assert not isinstance(evidence, Mapping)
    with pytest.raises(TypeError):
        evidence["internal_error"]  # type: ignore[index]
    assert not hasattr(evidence, "get")


# --------------------------------------------------------------------------- today's shapes


def test_missing_and_wrong_values_fall_back_to_defaults() -> None:
    raw = {
        "resolver": 5,
        "answers": {"A": ["192.0.2.1", 7], "AAAA": "not a list"},
        "rcodes": ["NOERROR"],
        "replies": [{"qtype": "A", "delay_s": "soon", "mismatch": True}, "garbage"],
        "bogons": None,
    }
    assert DnsEvidence.from_json(raw) == DnsEvidence(
        answers={"A": ("192.0.2.1",)},
        replies=(DnsReply(qtype="A", mismatch=True),),
    )


def test_internal_error_alone_writes_one_key() -> None:
    for name in EVIDENCE:
        evidence = dataclasses.replace(empty_evidence(name), internal_error="KeyError")
        assert evidence.to_json() == {"internal_error": "KeyError"}


def test_tcp_connect_failure_keeps_only_the_connect_time() -> None:
    assert TcpEvidence(connect_time_s=0.5).to_json() == {"connect_time_s": 0.5}
    held = TcpEvidence(
        connect_rtt_s=0.01,
        socket=SocketEvidence(local_family="ipv4", peer_family=None),
        connect_time_s=0.02,
        hold_s=1.0,
        bytes_received=0,
    )
    assert held.to_json() == {
        "connect_rtt_s": 0.01,
        "local_family": "ipv4",
        "peer_family": None,  # recorded: the kernel no longer knew
        "connect_time_s": 0.02,
        "hold_s": 1.0,
        "bytes_received": 0,
    }


def test_tls_keeps_no_sni_as_null_and_the_chain_as_base64_der() -> None:
    evidence = TlsEvidence(
        offer=TlsOffer(sni=None, alpn_offered=("h2", "http/1.1")),
        handshake=HandshakeProgress(stage="mid_handshake", bytes_sent=300, bytes_received=9),
        negotiated=TlsNegotiated(tls_version="TLSv1.3", alpn=None, cipher="TLS_AES_128_GCM_SHA256"),
        certificate=CertificateEvidence(sha256="ab", der_bytes=3, sans=("DNS:a.example",)),
        certificate_source="handshake",
        peer_certificates=(b"\x30\x01\x00",),
    )
    assert evidence.to_json() == {
        "sni": None,
        "alpn_offered": ["h2", "http/1.1"],
        "handshake": {
            "stage": "mid_handshake",
            "bytes_sent": 300,
            "bytes_received": 9,
            "server_messages": [],
        },
        "tls_version": "TLSv1.3",
        "alpn": None,
        "cipher": "TLS_AES_128_GCM_SHA256",
        "certificate": {"sha256": "ab", "der_bytes": 3, "sans": ["DNS:a.example"]},
        "certificate_source": "handshake",
        "peer_certificates": ["MAEA"],
    }
    assert (evidence.sni, evidence.alpn, evidence.tls_version) == (None, None, "TLSv1.3")
    # an archived chain that is not base64 loses only the bad entry
    read = TlsEvidence.from_json({"peer_certificates": ["MAEA", "not base64!"]})
    assert read.peer_certificates == (b"\x30\x01\x00",)


def test_a_quic_handshake_without_alpn_says_so() -> None:
    assert QuicEvidence(negotiated=QuicNegotiated(alpn=None)).to_json() == {"alpn": None}
    assert QuicEvidence().to_json() == {}


def test_stun_modes_share_key_names_and_the_mode_decides() -> None:
    flow = StunEvidence(stun_transport="udp", mode="flow", flow=StunFlow(sent=10, loss=0.5))
    binding = StunEvidence(stun_transport="udp", mode="binding", binding=StunBinding(count=3))
    assert flow.to_json()["loss"] == 0.5 and binding.to_json()["loss"] == 0.0
    assert StunEvidence.from_json(flow.to_json()) == flow
    assert StunEvidence.from_json(binding.to_json()) == binding
    reflector = StunEvidence(mode="reflector", reflector=StunReflector(hello_bytes=36))
    assert StunEvidence.from_json(reflector.to_json()) == reflector


def test_transport_per_probe_and_per_run() -> None:
    assert TcpEvidence().transport == "tcp"
    assert QuicEvidence().transport == "udp"
    assert evidence_from_json("quic_vn", {}).transport == "udp"
    assert StunEvidence().transport == "udp"
    assert StunEvidence.from_json({"transport": "tcp", "mode": "binding"}).transport == "tcp"
    assert DnsEvidence(resolver="udp:192.0.2.53:53").transport == "udp"
    assert DnsEvidence(resolver="doh:https://dns.example/dns-query").transport == "tcp"
    assert evidence_from_json("mtproto", {}).transport == "tcp"


def test_mappings_are_frozen_copies() -> None:
    answers = {"A": ("192.0.2.1",)}
    evidence = DnsEvidence(answers=answers)
    answers["AAAA"] = ("2001:db8::1",)
    assert evidence.addresses() == ("192.0.2.1",)
    with pytest.raises(TypeError):
        evidence.answers["A"] = ()  # type: ignore[index]


def test_transfer_sni_and_connections_read_through_their_groups() -> None:
    evidence = TransferEvidence(
        request=TransferRequest(sni="cdn.example", path="/big"),
        summary=TransferSummary(connections_attempted=0, median_kbps=None),
    )
    assert evidence.sni == "cdn.example" and evidence.connections == ()
    assert evidence.to_json()["median_kbps"] is None
    assert TransferEvidence().connections == ()
