"""Seed lists: the shipped lists load and are well-sourced; the schema is strict.

No network: nothing here resolves or connects.
"""

from __future__ import annotations

import contextlib
import copy
import ipaddress
from dataclasses import FrozenInstanceError, fields
from pathlib import Path
from typing import Any

import pytest
import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from probe.agent_config import known_probes, load_config, load_seed_file, load_shipped, probe_types
from probe.config.loader import TOP_KEYS, ConfigError
from probe.config.seeds import (
    CONFIDENCES,
    ENDPOINT_KEYS,
    SERVICE_KEYS,
    decode_service,
    prefix_warnings,
    shipped_seeds,
)
from probe.config.settings import Resolvers, Schedule, Timeouts, TLSOptions
from probe.config.strict_yaml import parse_text
from probe.evidence import EVIDENCE
from probe.model import Vantage, freeze
from probe.probes import REGISTRY
from probe.probes.dns import DnsParams
from probe.probes.params import ParamError
from probe.probes.quic_vn import QuicVnParams
from probe.probes.stun import StunParams
from probe.probes.tcp import TcpParams
from probe.probes.tls import TLSParams
from probe.probes.transfer import TransferParams

TESTDATA = Path(__file__).parent / "testdata"
# Fixed for the schema tests, so messages listing the known probes do not change as
# probes are added.  The shipped lists load with the real registry (they use every probe).
PROBES = frozenset({"dns", "tcp", "tls"})
SHIPPED = sorted(shipped_seeds())

# (file, line, field, message)
INVALID: list[tuple[str, int, str, str]] = [
    ("invalid-seedfile-not-mapping.yaml", 1, "<root>", "expected a mapping, got a string"),
    ("invalid-seedfile-bad-service-id.yaml", 1, "service",
     "'My Lab' is not a service id (lower-case letters, digits, - _)"),
    ("invalid-seedfile-no-endpoints.yaml", 3, "endpoints", "must not be empty"),
    ("invalid-seedfile-unknown-key.yaml", 7, "endpoints[0].port",
     "unknown key 'port'; did you mean 'ports'?"),
    ("invalid-seedfile-missing-host.yaml", 7, "endpoints[0].host", "required key missing"),
    ("invalid-seedfile-missing-source.yaml", 7, "endpoints[0].source",
     "required key missing (every endpoint and prefix says where it comes from and how sure "
     "we are: confidence C, I or U)"),
    ("invalid-seedfile-missing-confidence-prefix.yaml", 5, "prefixes[1].confidence",
     "required key missing (every endpoint and prefix says where it comes from and how sure "
     "we are: confidence C, I or U)"),
    ("invalid-seedfile-bad-confidence.yaml", 7, "endpoints[0].confidence",
     "'high' is not one of C, I, U"),
    ("invalid-seedfile-prefix-host-bits.yaml", 4, "prefixes[0].cidr",
     "'127.0.0.1/8' has host bits set; did you mean '127.0.0.0/8'?"),
    ("invalid-seedfile-bad-cidr.yaml", 4, "prefixes[0].cidr",
     "'127.0.0.0/33' is not an IPv4 or IPv6 prefix (e.g. 192.0.2.0/24)"),
    ("invalid-seedfile-duplicate-endpoint.yaml", 9, "endpoints[2].name",
     "duplicate endpoint name 'a' (first at line 7)"),
    ("invalid-seedfile-duplicate-endpoint-host.yaml", 8, "endpoints[1].name",
     "duplicate endpoint name '127.0.0.1' (first at line 7)"),
    ("invalid-seedfile-unknown-probe.yaml", 7, "endpoints[0].probes[1]",
     "unknown probe 'tsl'; did you mean 'tls'? (known: dns, tcp, tls)"),
    ("invalid-seedfile-unknown-probe-mapping.yaml", 12, "endpoints[0].probes[1]",
     "unknown probe 'tpc'; did you mean 'tcp'? (known: dns, tcp, tls)"),
    ("invalid-seedfile-probe-two-keys.yaml", 11, "endpoints[0].probes[0]",
     "a probe is a name or a one-key mapping {name: {params}}, got 2 keys"),
    ("invalid-seedfile-probe-port-not-in-endpoint.yaml", 12,
     "endpoints[0].probes[1].tls.ports[1]",
     "port 8443 is not one of the endpoint's ports [443, 80]"),
    ("invalid-seedfile-duplicate-probe.yaml", 7, "endpoints[0].probes[2]",
     "duplicate probe 'dns' (first at line 7)"),
    ("invalid-seedfile-probes-empty.yaml", 7, "endpoints[0].probes", "must not be empty"),
    ("invalid-seedfile-dns-on-ip.yaml", 7, "endpoints[0].probes[0]",
     "probe 'dns' needs a hostname, but host is an IP address"),
    ("invalid-seedfile-bad-role.yaml", 7, "endpoints[0].role",
     "'signaling' is not one of signalling, web, media, registration, call-relay, control; "
     "did you mean 'signalling'?"),
    ("invalid-seedfile-bad-transport.yaml", 7, "endpoints[0].transport",
     "'sctp' is not one of tcp, udp"),
    ("invalid-seedfile-domestic-not-control.yaml", 7, "endpoints[0].domestic",
     "only a control endpoint (role: control) can be domestic"),
    ("invalid-seedfile-bad-host.yaml", 7, "endpoints[0].host",
     "'web_whatsapp.com' is neither an IP address nor a valid hostname"),
    ("invalid-seedfile-bad-address.yaml", 7, "endpoints[0].addresses[1]",
     "'127.0.0.256' is not an IPv4 or IPv6 address"),
    ("invalid-seedfile-bad-sni.yaml", 7, "endpoints[0].sni",
     "'not a hostname' is not a valid hostname"),
    ("invalid-seedfile-empty-ports.yaml", 7, "endpoints[0].ports", "must not be empty"),
    ("invalid-seedfile-duplicate-port.yaml", 7, "endpoints[0].ports[2]",
     "duplicate value 443 (first at line 7)"),
    ("invalid-seedfile-port-type.yaml", 7, "endpoints[0].ports[0]",
     "expected an integer, got a string"),
]  # fmt: skip


@pytest.mark.parametrize(("name", "line", "field", "message"), INVALID, ids=lambda v: str(v))
def test_invalid_seed_file_is_one_exact_error(
    name: str, line: int, field: str, message: str
) -> None:
    path = TESTDATA / name
    with pytest.raises(ConfigError) as info:
        load_seed_file(path, probe_names=PROBES)
    assert str(info.value) == f"{path}:{line}: {field}: {message}"


def test_every_invalid_seed_testdata_file_has_an_expected_message() -> None:
    on_disk = {p.name for p in TESTDATA.glob("invalid-seedfile-*.yaml")}
    assert on_disk == {row[0] for row in INVALID}


# Probe params are parsed at load time by each probe's own params class
# (`probe.probes.REGISTRY`), so these use the real registry.  (file, line, field, message)
INVALID_PARAMS: list[tuple[str, int, str, str]] = [
    ("invalid-params-dns.yaml", 11, "endpoints[0].probes[0].dns.resolver",
     "unknown param 'resolver' (dns takes no params)"),
    ("invalid-params-mtproto.yaml", 11, "endpoints[0].probes[0].mtproto.nonce",
     "unknown param 'nonce' (mtproto takes no params)"),
    ("invalid-params-tcp-hold.yaml", 11, "endpoints[0].probes[0].tcp.hold_s",
     "must be a number in [0, 300], got -1"),
    ("invalid-params-tls-alpn.yaml", 14, "endpoints[0].probes[1].tls.alpn",
     "must be a protocol name or a list of them (e.g. [h2, http/1.1]), got ['h2', 3]"),
    ("invalid-params-tls-sni.yaml", 11, "endpoints[0].probes[0].tls.sni",
     "must be a hostname, an IP address or null, got 'not a host'"),
    ("invalid-params-quic-version.yaml", 12, "endpoints[0].probes[0].quic.version",
     "must be one of v1, v2, got 'v3'"),
    ("invalid-params-quic-vn-version.yaml", 11, "endpoints[0].probes[0].quic_vn.version",
     "0x00000001 would not be negotiated"),
    ("invalid-params-stun-count.yaml", 13, "endpoints[0].probes[0].stun.count",
     "must be an integer in [1, 20], got 0"),
    ("invalid-params-stun-unknown-key.yaml", 11, "endpoints[0].probes[0].stun.usrname",
     "unknown param 'usrname'; did you mean 'username'? (known: control, count, duration_s, "
     "fingerprint, framing, mode, payload_size, peer_tag, rate_pps, record_mapped_address, "
     "software, stun_packets, transport, username)"),
    ("invalid-params-stun-tcp-flow.yaml", 13, "endpoints[0].probes[0].stun.transport",
     "tcp supports mode binding without control"),
    ("invalid-params-whatsapp-version.yaml", 11, "endpoints[0].probes[0].whatsapp.wa_version",
     "must be two byte values like [6, 3], got [6, 256]"),
    ("invalid-params-transfer-max-bytes.yaml", 19, "endpoints[3].probes[1].transfer.max_bytes",
     "must be an integer in [1, 1073741824], got 0"),
    ("invalid-params-transfer-path.yaml", 11, "endpoints[0].probes[0].transfer.path",
     "must be a path starting with '/', got 'index.html'"),
]  # fmt: skip


@pytest.mark.parametrize(("name", "line", "field", "message"), INVALID_PARAMS, ids=lambda v: str(v))
def test_an_invalid_probe_param_is_one_exact_error_at_its_key(
    name: str, line: int, field: str, message: str
) -> None:
    path = TESTDATA / name
    with pytest.raises(ConfigError) as info:
        load_seed_file(path)
    assert str(info.value) == f"{path}:{line}: {field}: {message}"


def test_every_invalid_params_testdata_file_has_an_expected_message() -> None:
    on_disk = {p.name for p in TESTDATA.glob("invalid-params-*.yaml")}
    assert on_disk == {row[0] for row in INVALID_PARAMS}


def test_every_registry_entry_is_named_for_its_key_its_params_and_its_evidence() -> None:
    assert set(REGISTRY) == set(EVIDENCE)  # one evidence class per probe, no other
    for name, entry in REGISTRY.items():
        assert entry.name == name == entry.params.PROBE == entry.evidence.PROBE
        assert entry.evidence is EVIDENCE[name]
        assert entry.parse({}) == entry.params()  # the defaults parse from nothing
    # the transport comes from the evidence classes, the one place that says it
    udp = {name for name, entry in REGISTRY.items() if entry.transport == "udp"}
    assert udp == {"dns", "quic", "quic_vn", "stun"}


def test_a_param_error_in_the_config_services_block_uses_the_config_path(
    tmp_path: Path,
) -> None:
    path = tmp_path / "agent.yaml"
    path.write_text(
        "seeds: []\nservices:\n  - service: lab\n    source: lab\n    endpoints:\n"
        "      - host: 127.0.0.1\n        ports: [3478]\n        transport: udp\n"
        "        role: call-relay\n        probes:\n          - stun: {mode: turn}\n"
        "        source: lab\n        confidence: C\n"
    )
    with pytest.raises(ConfigError) as info:
        load_config(path)
    assert (info.value.line, info.value.field, info.value.message) == (
        11,
        "services[0].endpoints[0].probes[0].stun.mode",
        "must be one of binding, flow, reflector, got 'turn'",
    )


_LAB_ENDPOINT = """
service: lab
source: lab
endpoints:
  - host: 127.0.0.1
    ports: [443]
    role: web
    probes:
      - tcp: {hold_s: 1}
    source: lab
    confidence: C
"""


def _parse_with(monkeypatch: pytest.MonkeyPatch, parse: Any) -> None:
    """Stand ``parse(params)`` in for the tcp params parser."""
    stand_in = classmethod(lambda _cls, params, base=None: parse(params))
    monkeypatch.setattr(TcpParams, "parse", stand_in)


def test_a_parser_naming_a_key_not_in_the_file_points_at_the_params(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # e.g. a limit on a combination where one side is a default: the field names the
    # param to set, the line is the probe's
    def strict(params: Any) -> None:
        raise ParamError("tcp", "linger_s", "must be set with hold_s")

    _parse_with(monkeypatch, strict)
    with pytest.raises(ConfigError) as info:
        _decode(_LAB_ENDPOINT)
    assert (
        str(info.value)
        == "mem.yaml:9: endpoints[0].probes[0].tcp.linger_s: must be set with hold_s"
    )


def test_a_plain_value_error_from_a_parser_points_at_the_params(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    def plain(params: Any) -> None:
        raise ValueError("tcp: hold_s and a port 443 do not mix")

    _parse_with(monkeypatch, plain)
    with pytest.raises(ConfigError) as info:
        _decode(_LAB_ENDPOINT)
    assert str(info.value) == (
        "mem.yaml:9: endpoints[0].probes[0].tcp: tcp: hold_s and a port 443 do not mix"
    )


def test_a_bare_probe_name_is_parsed_with_empty_params(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    seen: list[dict[str, Any]] = []

    def parse(params: Any) -> TcpParams:
        seen.append(dict(params))
        return TcpParams()

    _parse_with(monkeypatch, parse)
    _decode(_LAB_ENDPOINT.replace("- tcp: {hold_s: 1}", "- tcp"))
    _decode(_LAB_ENDPOINT.replace("- tcp: {hold_s: 1}", "- tcp:"))
    _decode(_LAB_ENDPOINT)
    assert seen == [{}, {}, {"hold_s": 1}]


def test_params_are_parsed_once_at_load_into_the_probes_typed_params() -> None:
    (ep,) = _decode(_LAB_ENDPOINT).endpoints
    assert ep.spec("tcp").params == TcpParams(hold_s=1.0)
    (bare,) = _decode(_LAB_ENDPOINT.replace("- tcp: {hold_s: 1}", "- tcp")).endpoints
    assert bare.spec("tcp").params == TcpParams()


def test_valid_params_of_every_probe_load() -> None:
    service = _decode(
        """
service: lab
source: lab
endpoints:
  - host: lab.example
    ports: [443, 3478]
    role: web
    probes:
      - dns
      - tcp: {ports: [443], hold_s: 2.5}
      - tls: {ports: [443], sni: neutral.example, alpn: h2}
      - quic: {ports: [443], sni: null, alpn: [h3], version: v2}
      - quic_vn: {ports: [443], version: "0xbabababa"}
      - mtproto: {ports: [443]}
      - whatsapp: {ports: [443], wa_version: [5, 2]}
      - stun: {ports: [3478], mode: reflector, peer_tag: 00112233445566778899aabbccddeeff}
      - transfer: {ports: [443], path: /k/a.jpg, connections: 3, sni: 192.0.2.1}
    source: lab
    confidence: C
""",
        known_probes(),
    )
    (ep,) = service.endpoints
    assert [s.name for s in ep.probes][-1] == "transfer"
    assert ep.spec("quic_vn").params == QuicVnParams(0xBABABABA)  # parsed, typed


def test_a_seed_error_in_the_config_services_block_uses_the_config_path(tmp_path: Path) -> None:
    # Same schema, same messages; the field path gains the services[i] prefix.
    path = tmp_path / "agent.yaml"
    path.write_text(
        "seeds: []\nservices:\n  - service: lab\n    source: lab\n    endpoints:\n"
        "      - {host: 127.0.0.1, ports: [443], role: web, probes: [tcp], source: lab}\n"
    )
    with pytest.raises(ConfigError) as info:
        load_config(path, probe_names=PROBES)
    assert (info.value.line, info.value.field) == (6, "services[0].endpoints[0].confidence")


# -- the shipped lists --------------------------------------------------------------------


def test_the_expected_lists_are_shipped() -> None:
    assert {"whatsapp", "telegram", "controls", "controls-ru"} <= set(SHIPPED)


@pytest.mark.parametrize("name", SHIPPED)
def test_shipped_seed_loads_with_the_real_probe_registry(name: str) -> None:
    service = load_shipped(name, probe_names=known_probes())
    assert service.name == name
    assert service.endpoints
    assert all(spec.name in known_probes() for ep in service.endpoints for spec in ep.probes)


@pytest.mark.parametrize("name", SHIPPED)
def test_every_endpoint_and_prefix_is_sourced(name: str) -> None:
    service = load_shipped(name)
    assert service.source
    for ep in service.endpoints:
        assert ep.source.strip(), ep.name
        assert ep.confidence in CONFIDENCES, ep.name
    # Prefixes are decoded into networks; check the raw file for their provenance.
    raw = yaml.safe_load(Path(str(shipped_seeds()[name])).read_text())
    for prefix in raw.get("prefixes", []):
        assert prefix["source"].strip(), prefix
        assert prefix["confidence"] in CONFIDENCES, prefix


@pytest.mark.parametrize("name", SHIPPED)
def test_known_addresses_fall_inside_the_service_prefixes(name: str) -> None:
    # The DNS answer-consistency check relies on the prefixes covering every
    # address we know to be genuine; a stale prefix list would raise false flags.
    assert prefix_warnings(load_shipped(name)) == []


@pytest.mark.parametrize("name", SHIPPED)
def test_shipped_seed_says_how_to_update_it(name: str) -> None:
    text = Path(str(shipped_seeds()[name])).read_text()
    assert text.startswith("#")
    assert "How to update" in text
    assert "check-config" in text


def test_messenger_lists_cover_ipv4_and_ipv6() -> None:
    for name in ("whatsapp", "telegram", "controls"):
        service = load_shipped(name)
        versions = {net.version for net in service.prefixes}
        assert versions == {4, 6}, name
    telegram = load_shipped("telegram")
    literals = [ipaddress.ip_address(ep.host) for ep in telegram.endpoints if ep.is_ip_literal]
    assert {ip.version for ip in literals} == {4, 6}
    controls = load_shipped("controls")
    literals = [ipaddress.ip_address(ep.host) for ep in controls.endpoints if ep.is_ip_literal]
    assert {ip.version for ip in literals} == {4, 6}


def test_controls_are_role_control_on_tcp_443_with_tls() -> None:
    controls = load_shipped("controls")
    for ep in controls.endpoints:
        assert ep.role == "control"
        assert ep.ports == (443,)
        assert ep.spec("tcp") is not None
        assert ep.spec("tls") is not None
        # an IP literal needs an SNI its certificate names, or TLS proves nothing
        assert ep.sni or not ep.is_ip_literal


def test_domestic_controls_are_marked_so_the_gate_can_tell_an_allowlist() -> None:
    assert all(ep.domestic and ep.role == "control" for ep in load_shipped("controls-ru").endpoints)
    assert not any(ep.domestic for ep in load_shipped("controls").endpoints)


def test_endpoint_names_are_unique_across_the_default_lists() -> None:
    # tls.sni_overrides is keyed by endpoint name: a clash would override both.
    config = load_config(None)
    names = [ep.name for s in config.services for ep in s.endpoints]
    assert len(names) == len(set(names))


def test_seed_layout_matches_field_notes() -> None:
    wa = {ep.name: ep for ep in load_shipped("whatsapp").endpoints}
    assert {f"e{i}.whatsapp.net" for i in range(1, 17)} <= set(wa)
    assert wa["g.whatsapp.net"].ports == (5222, 443, 80)
    for host in ("web.whatsapp.com", "v.whatsapp.net", "mmg.whatsapp.net"):
        assert wa[host].ports_for("tls") == (443,)
    tg = {ep.name: ep for ep in load_shipped("telegram").endpoints}
    for dc in ("dc1", "dc2", "dc3", "dc4", "dc5"):
        assert tg[dc].ports == (443, 80)
        assert tg[dc].role == "signalling"
    assert tg["web.telegram.org"].ports_for("tls") == (443,)


def test_application_handshakes_cover_the_signalling_endpoints() -> None:
    wa = {ep.name: ep for ep in load_shipped("whatsapp").endpoints}
    assert wa["g.whatsapp.net"].ports_for("whatsapp") == (5222, 443)
    for i in range(1, 17):
        assert wa[f"e{i}.whatsapp.net"].ports_for("whatsapp") == (5222, 443)
    tg = load_shipped("telegram").endpoints
    dcs = [ep for ep in tg if ep.name.startswith("dc")]
    assert len(dcs) == 13  # DC1-5 IPv4, their aliases, DC1-5 IPv6
    for ep in dcs:
        v6 = ipaddress.ip_address(ep.host).version == 6
        assert ep.ports_for("mtproto") == ((443,) if v6 else (443, 80)), ep.name
        assert ep.spec("tcp") is not None
    for ep in tg:
        if ep.role == "media":
            assert ep.ports_for("mtproto") == (443,), ep.name


def test_call_relays_are_udp_stun_samples_inside_the_service_prefixes() -> None:
    # (prefix membership itself: test_known_addresses_fall_inside_the_service_prefixes)
    for name, expected in (("whatsapp", {3478, 3480}), ("telegram", {1400, 596, 597})):
        relays = [ep for ep in load_shipped(name).endpoints if ep.role == "call-relay"]
        assert relays, name
        ports: set[int] = set()
        for ep in relays:
            assert (ep.transport, ep.is_ip_literal, [s.name for s in ep.probes]) == (
                "udp",
                True,
                ["stun"],
            ), ep.name
            stun = StunParams.of(ep.spec("stun"))  # type: ignore[arg-type]
            assert stun.username is None  # no source gives a relay credential
            if stun.mode == "binding":
                assert stun.count == 3
            else:
                assert stun.mode == "reflector" and 596 <= ep.ports[0] <= 599
            ports |= set(ep.ports)
        assert ports == expected, name


def test_each_messenger_has_one_bulk_object_on_its_web_host() -> None:
    for name, host in (("whatsapp", "web.whatsapp.com"), ("telegram", "web.telegram.org")):
        bulk = [ep for ep in load_shipped(name).endpoints if ep.spec("transfer")]
        assert [ep.host for ep in bulk] == [host]
        params = TransferParams.of(bulk[0].spec("transfer"))  # type: ignore[arg-type]
        assert params.path.startswith("/") and params.path != "/"
        assert params.connections == 3


def test_quic_vn_only_beside_quic() -> None:
    # A silent quic_vn next to working TCP reads as UDP blocking, so it goes only where
    # a quic probe (and a reason to expect QUIC) is listed too.
    for name in ("whatsapp", "telegram"):
        for ep in load_shipped(name).endpoints:
            if ep.spec("quic_vn"):
                assert ep.spec("quic"), ep.name
    tg = {ep.name: ep for ep in load_shipped("telegram").endpoints}
    assert tg["web.telegram.org"].spec("quic") and not tg["web.telegram.org"].spec("quic_vn")


# -- decoding details ---------------------------------------------------------------------


def _decode(text: str, probes: frozenset[str] = PROBES) -> Any:
    return decode_service(
        parse_text(text, "mem.yaml"), origin="mem.yaml", probes=probe_types(probes)
    )


def test_defaults_and_normalisation() -> None:
    service = _decode(
        """
service: lab
source: lab
prefixes:
  - {cidr: "2001:DB8::/32", source: RFC 3849, confidence: C}
endpoints:
  - {host: "2001:0DB8::0001", ports: [443], role: web, probes: [tcp], source: lab,
     confidence: U, addresses: ["2001:db8:0::2"]}
  - {host: Lab.Example, ports: [443], role: web, probes: [tcp], source: lab, confidence: I}
"""
    )
    v6, named = service.endpoints
    assert service.display_name == "lab"
    assert service.origin == "mem.yaml"
    assert (v6.host, v6.name, v6.transport) == ("2001:db8::1", "2001:db8::1", "tcp")
    assert v6.addresses == ("2001:db8::2",)
    assert (named.host, named.sni) == ("lab.example", None)
    assert v6.prefixes == named.prefixes == (ipaddress.ip_network("2001:db8::/32"),)


def test_probe_entry_forms() -> None:
    service = _decode(
        """
service: lab
source: lab
endpoints:
  - host: lab.example
    ports: [443, 80]
    role: web
    probes:
      - dns
      - tcp:
      - tls: {ports: [443], alpn: [h2, http/1.1]}
    source: lab
    confidence: C
""",
    )
    (ep,) = service.endpoints
    dns, tcp, tls = ep.probes
    assert (dns.name, dns.ports, dns.params) == ("dns", None, DnsParams())
    assert (tcp.name, tcp.ports, tcp.params) == ("tcp", None, TcpParams())
    assert (tls.name, tls.ports) == ("tls", (443,))
    assert tls.params == TLSParams(alpn=("h2", "http/1.1"))
    with pytest.raises(FrozenInstanceError):
        tls.params.alpn = ("h3",)  # type: ignore[misc,union-attr]


def test_a_probe_name_the_registry_lacks_is_an_error_even_when_allowed() -> None:
    # a caller's own probe_names cannot run a probe nothing parses the params of
    text = _LAB_ENDPOINT.replace("- tcp: {hold_s: 1}", "- lab-probe: {extra: 1}")
    with pytest.raises(ConfigError) as info:
        _decode(text, PROBES | {"lab-probe"})
    assert str(info.value) == (
        "mem.yaml:9: endpoints[0].probes[0].lab-probe: probe 'lab-probe' is not in the "
        "probe registry"
    )


def test_yaml_anchors_and_merge_keys_work() -> None:
    service = _decode(
        """
service: lab
source: lab
endpoints:
  - &base {host: a.example, ports: [443], role: web, probes: [tcp], source: lab, confidence: C}
  - {<<: *base, host: b.example}
  - <<: [{host: c.example, role: media}, *base]
    confidence: U
"""
    )
    a, b, c = service.endpoints
    assert [ep.host for ep in service.endpoints] == ["a.example", "b.example", "c.example"]
    assert b.ports == a.ports
    # SafeLoader precedence: own keys, then earlier merged mappings
    assert (c.role, c.confidence, c.source) == ("media", "U", "lab")


def test_a_recursive_merge_is_an_error_not_a_hang() -> None:
    with pytest.raises(ConfigError, match="recursive merge key"):
        _decode("service: lab\nsource: lab\nendpoints:\n  - &a {<<: *a}\n")


def test_prefix_warnings_name_an_address_outside_the_prefixes() -> None:
    service = _decode(
        """
service: lab
source: lab
prefixes: [{cidr: 192.0.2.0/24, source: RFC 5737, confidence: C}]
endpoints:
  - {name: in, host: 192.0.2.1, ports: [443], role: web, probes: [tcp], source: lab,
     confidence: C}
  - {name: out, host: 198.51.100.1, ports: [443], role: web, probes: [tcp], source: lab,
     confidence: C, addresses: ["2001:db8::1"]}
"""
    )
    assert prefix_warnings(service) == [
        "mem.yaml: lab/out: 198.51.100.1 is outside the service prefixes",
        "mem.yaml: lab/out: 2001:db8::1 is outside the service prefixes",
    ]


def test_unknown_shipped_name_suggests_the_closest() -> None:
    with pytest.raises(KeyError, match="did you mean 'telegram'"):
        load_shipped("telegarm")


# -- hostile input never escapes as anything but ConfigError ------------------------------

_SECTION_KEYS = sorted(
    {f.name for cls in (Vantage, Schedule, Timeouts, Resolvers, TLSOptions) for f in fields(cls)}
)
_scalars = st.one_of(st.none(), st.booleans(), st.integers(), st.floats(), st.text(max_size=20))
_values = st.recursive(
    _scalars,
    lambda inner: (
        st.lists(inner, max_size=4)
        | st.dictionaries(st.sampled_from([*ENDPOINT_KEYS, "x"]), inner, max_size=4)
    ),
    max_leaves=12,
)


@settings(max_examples=150, deadline=None)
@given(st.text(max_size=300))
def test_arbitrary_text_is_a_service_or_a_config_error(text: str) -> None:
    with contextlib.suppress(ConfigError):
        _decode(text)


@settings(max_examples=60, deadline=None)
@given(st.dictionaries(st.sampled_from([*SERVICE_KEYS, "x"]), _values, max_size=5))
def test_arbitrary_structure_is_a_service_or_a_config_error(doc: dict[str, Any]) -> None:
    with contextlib.suppress(ConfigError):
        _decode(yaml.safe_dump(doc))


@settings(
    max_examples=100, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(st.text(max_size=200))
def test_arbitrary_config_text_is_a_config_or_a_config_error(tmp_path: Path, text: str) -> None:
    path = tmp_path / "fuzz.yaml"
    path.write_text(text, encoding="utf-8", errors="surrogatepass")
    with contextlib.suppress(ConfigError):
        load_config(path, probe_names=PROBES)


@settings(
    max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(st.dictionaries(st.sampled_from([*TOP_KEYS, "x"]), _values, max_size=5))
def test_arbitrary_config_structure_is_a_config_or_a_config_error(
    tmp_path: Path, doc: dict[str, Any]
) -> None:
    doc.setdefault("seeds", [])  # keep each example fast: no shipped lists unless drawn
    path = tmp_path / "fuzz.yaml"
    path.write_text(yaml.safe_dump(doc))
    with contextlib.suppress(ConfigError):
        load_config(path, probe_names=PROBES)


_VALID_SEED: dict[str, Any] = {
    "service": "lab",
    "source": "lab",
    "prefixes": [{"cidr": "127.0.0.0/8", "source": "RFC 1122", "confidence": "C"}],
    "endpoints": [
        {
            "name": "a",
            "host": "lab.example",
            "ports": [443, 80],
            "transport": "tcp",
            "role": "web",
            "probes": ["dns", {"tls": {"ports": [443], "alpn": ["h2"]}}],
            "addresses": ["127.0.0.1"],
            "sni": "x.example",
            "source": "lab",
            "confidence": "C",
        }
    ],
}


def _value_paths(value: Any, prefix: tuple[Any, ...] = ()) -> list[tuple[Any, ...]]:
    out = [prefix] if prefix else []
    items = (
        value.items()
        if isinstance(value, dict)
        else enumerate(value)
        if isinstance(value, list)
        else ()
    )
    for key, child in items:
        out += _value_paths(child, (*prefix, key))
    return out


@settings(max_examples=150, deadline=None)
@given(st.sampled_from(_value_paths(_VALID_SEED)), _values)
def test_one_mutated_value_in_a_valid_seed_is_a_service_or_a_config_error(
    path: tuple[Any, ...], value: Any
) -> None:
    # Mutating one value of a valid document reaches the deep validators that
    # random documents rarely get past.
    doc = copy.deepcopy(_VALID_SEED)
    parent = doc
    for key in path[:-1]:
        parent = parent[key]
    parent[path[-1]] = value
    with contextlib.suppress(ConfigError):
        _decode(yaml.safe_dump(doc))


def test_the_unmutated_seed_used_for_fuzzing_is_valid() -> None:
    assert _decode(yaml.safe_dump(_VALID_SEED)).endpoints[0].name == "a"


# Every key some validator knows, plus one none does: random values then reach every check.
_PARAM_KEYS = sorted(
    {"hold_s", "sni", "alpn", "shape", "split_hello", "version", "wa_version", "x"}
    | set(StunParams.__dataclass_fields__)
    | set(TransferParams.__dataclass_fields__)
)
_PARAM_VALUES = st.one_of(
    _values,
    st.sampled_from(["v1", "v2", "0xbabababa", "/", "/a b", "h3", "lab.example", "binding"]),
    st.lists(st.integers(-1, 300), max_size=3).map(tuple),
    st.floats(allow_nan=True, allow_infinity=True),
    st.integers(min_value=-(2**70), max_value=2**70),
)


@settings(max_examples=300, deadline=None)
@given(
    st.sampled_from(sorted(REGISTRY)),
    st.dictionaries(st.sampled_from(_PARAM_KEYS), _PARAM_VALUES, max_size=4),
    st.dictionaries(st.sampled_from(_PARAM_KEYS), _PARAM_VALUES, max_size=2),
)
def test_a_params_parser_returns_its_params_or_raises_param_error_only(
    name: str, params: dict[str, Any], overrides: dict[str, Any]
) -> None:
    # Whatever the YAML holds, the loader must see a ParamError (-> ConfigError), never
    # a TypeError or OverflowError escaping as a traceback; and overrides over parsed
    # params (a follow-up's) go through the same checks.
    entry = REGISTRY[name]
    with contextlib.suppress(ParamError):
        parsed = entry.parse(freeze(params))
        assert isinstance(parsed, entry.params)
        assert isinstance(entry.parse(freeze(overrides), parsed), entry.params)
