"""The agent config loader: defaults, strict decode, validation, exact error messages.

Like blackbox_exporter's config_test.go: one ``testdata/invalid-*.yaml`` per error
class, each with its exact expected message.  No network: nothing here resolves
or connects.
"""

from __future__ import annotations

import dataclasses
import os
import time
from importlib.resources import files
from pathlib import Path

import pytest

from probe.config.loader import DEFAULT_SEEDS, TOP_KEYS, ConfigError, load_config
from probe.config.seeds import known_probes
from probe.config.settings import AgentConfig, HostPort
from probe.lab.certs import CertificateAuthority
from probe.model import ProbeSpec
from probe.probes.tls import TLSParams

TESTDATA = Path(__file__).parent / "testdata"
REPO = Path(__file__).parent.parent
# The real registry: the shipped seed lists use every probe.  (No message below lists
# the known probes; tests/test_seeds.py pins those with a fixed set.)
PROBES = known_probes()
SHIPPED = files("probe") / "seeds"


def load(path: str | Path | None) -> AgentConfig:
    return load_config(path, probe_names=PROBES)


def load_error(path: Path, text: str) -> ConfigError:
    """Write TEXT to PATH and load it: the ConfigError it must raise."""
    path.write_text(text)
    with pytest.raises(ConfigError) as info:
        load(path)
    return info.value


# (file, line, field, message); "{testdata}" and "{shipped}" are filled in below.
INVALID: list[tuple[str, int | None, str, str]] = [
    ("invalid-yaml-syntax.yaml", 4, "<yaml>",
     "invalid YAML: expected ',' or ']', but got ':' (while parsing a flow sequence)"),
    ("invalid-empty.yaml", 1, "<root>", "file is empty"),
    ("invalid-not-mapping.yaml", 1, "<root>", "expected a mapping, got a list"),
    ("invalid-unknown-key.yaml", 2, "timeout",
     "unknown key 'timeout'; did you mean 'timeouts'?"),
    ("invalid-unknown-nested-key.yaml", 4, "timeouts.conect_s",
     "unknown key 'conect_s'; did you mean 'connect_s'?"),
    ("invalid-duplicate-key.yaml", 3, "log_format", "duplicate key (first at line 2)"),
    ("invalid-wrong-type.yaml", 3, "schedule.concurrency", "expected an integer, got a string"),
    ("invalid-timeout-zero.yaml", 3, "timeouts.connect_s", "0 must be > 0 seconds"),
    ("invalid-concurrency.yaml", 3, "schedule.concurrency", "0 must be >= 1"),
    ("invalid-jitter.yaml", 4, "schedule.jitter_s",
     "jitter_s (60) must be less than interval_s (60)"),
    ("invalid-vantage-role.yaml", 3, "vantage.role", "'censor' is not one of test, control"),
    ("invalid-country.yaml", 3, "vantage.country",
     "'RUS' is not a two-letter upper-case country code (ISO 3166-1)"),
    ("invalid-country-unquoted-no.yaml", 4, "vantage.country",
     "expected a string, got a boolean (quote the value)"),
    ("invalid-asn.yaml", 3, "vantage.asn", "'as12389' is not an AS number like AS12389"),
    ("invalid-resolver-unbracketed-v6.yaml", 5, "resolvers.udp[1]",
     "'2001:4860:4860::8888': an IPv6 address needs brackets and a port: [ADDRESS]:PORT"),
    ("invalid-resolver-hostname.yaml", 3, "resolvers.tcp[0]",
     "'dns.google:53': the host must be an IP address (a resolver cannot be looked up)"),
    ("invalid-resolver-port.yaml", 3, "resolvers.udp[0]",
     "'[2606:4700:4700::1111]:65536': port must be a number in 1..65535"),
    ("invalid-doh-not-https.yaml", 3, "resolvers.doh",
     "'http://1.1.1.1/dns-query' is not a DNS-over-HTTPS URL like https://1.1.1.1/dns-query"),
    ("invalid-no-resolver.yaml", 2, "resolvers",
     "no resolver configured (system is false, udp/tcp/doh empty) "
     "but some endpoints are hostnames"),
    ("invalid-listen.yaml", 2, "listen", "expected a string, got an integer (quote the value)"),
    ("invalid-log-format.yaml", 2, "log_format",
     "'jsonl' is not one of json, logfmt; did you mean 'json'?"),
    ("invalid-ca-file-missing.yaml", 3, "tls.ca_file",
     "no such file: {testdata}/certs/no-such-ca.pem"),
    ("invalid-sni-override-unknown.yaml", 5, "tls.sni_overrides.google-v5",
     "no endpoint named 'google-v5'; did you mean 'google-v6'?"),
    ("invalid-seeds-unknown-name.yaml", 1, "seeds[0]",
     "unknown seed list 'whatsap'; did you mean 'whatsapp'? (shipped: controls, controls-ru, "
     "telegram, whatsapp; a file path must contain / or end in .yaml)"),
    ("invalid-seeds-missing-file.yaml", 3, "seeds[1]",
     "no such seed file: {testdata}/lists/no-such-seed.yaml"),
    ("invalid-nothing-to-probe.yaml", 1, "seeds",
     "nothing to probe: no seed lists and no services"),
    ("invalid-duplicate-service.yaml", 3, "services[0].service",
     "service 'controls' is already defined (in {shipped}/controls.yaml)"),
    ("invalid-web-tls-half.yaml", 2, "web",
     "tls_cert_file and tls_key_file go together: tls_key_file is missing"),
    ("invalid-web-plain-password.yaml", 4, "web.basic_auth_users.prometheus",
     "'hunter2' is not a bcrypt hash ($2b$...; never a plain password)"),
    ("invalid-service-port-range.yaml", 9, "services[0].endpoints[2].ports[1]",
     "70000 is out of range 1..65535"),
]  # fmt: skip


@pytest.mark.parametrize(("name", "line", "field", "message"), INVALID, ids=lambda v: str(v))
def test_invalid_config_is_one_exact_error(
    name: str, line: int | None, field: str, message: str
) -> None:
    path = TESTDATA / name
    message = message.format(testdata=TESTDATA, shipped=SHIPPED)
    with pytest.raises(ConfigError) as info:
        load(str(path))
    err = info.value
    assert (err.file, err.line, err.field, err.message) == (str(path), line, field, message)
    assert str(err) == f"{path}:{line}: {field}: {message}"


def test_error_inside_a_referenced_seed_file_names_that_file() -> None:
    with pytest.raises(ConfigError) as info:
        load(TESTDATA / "invalid-seeds-file-bad-port.yaml")
    seed = TESTDATA / "seed-bad-port.yaml"
    assert str(info.value) == f"{seed}:6: endpoints[0].ports[1]: 0 is out of range 1..65535"


def test_every_invalid_testdata_file_has_an_expected_message() -> None:
    # An invalid-*.yaml without a table entry would be a test that never runs.
    covered = {row[0] for row in INVALID} | {"invalid-seeds-file-bad-port.yaml"}
    on_disk = {
        p.name
        for p in TESTDATA.glob("invalid-*.yaml")
        if not p.name.startswith(("invalid-seedfile-", "invalid-params-"))  # test_seeds.py
    }
    assert on_disk == covered


def test_missing_file_is_an_error_without_a_line(tmp_path: Path) -> None:
    path = tmp_path / "nope.yaml"
    with pytest.raises(ConfigError) as info:
        load(path)
    assert str(info.value) == f"{path}: <file>: no such file"
    assert "None" not in str(info.value)


def test_directory_and_non_utf8_files_are_errors(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="is a directory"):
        load(tmp_path)
    binary = tmp_path / "latin1.yaml"
    binary.write_bytes(b"seeds: [controls]\nvantage: {name: caf\xe9}\n")
    with pytest.raises(ConfigError) as info:
        load(binary)
    assert (info.value.line, info.value.field, info.value.message) == (
        2,
        "<file>",
        "not UTF-8 text",
    )


def test_python_tags_are_rejected_not_executed(tmp_path: Path) -> None:
    text = "seeds: [controls]\nvantage: !!python/object/apply:os.system [echo]\n"
    err = load_error(tmp_path / "evil.yaml", text)
    assert err.field == "vantage"
    assert err.line == 2
    assert "unsupported YAML tag" in err.message


def test_first_error_in_file_order_is_reported(tmp_path: Path) -> None:
    text = "log_format: xml\nseeds: [controls]\ntimeouts: {dns_s: -1}\n"
    err = load_error(tmp_path / "two-errors.yaml", text)
    assert err.field == "log_format"


def test_embedded_default_config_loads() -> None:
    config = load(None)
    assert config.source.endswith("default_config.yaml")
    assert config.seeds == ("whatsapp", "telegram", "controls")
    assert [s.name for s in config.services] == ["whatsapp", "telegram", "controls"]
    assert config.schedule.interval_s == 300
    assert config.schedule.min_spacing_s == 60
    assert 0 < config.schedule.jitter_s < config.schedule.interval_s
    assert config.listen == HostPort("127.0.0.1", 9464)
    assert config.log_format == "json"
    assert config.resolvers.system is True
    assert config.resolvers.doh is not None
    assert config.resolvers.doh.startswith("https://")
    # public resolvers over both families and both transports
    for resolvers in (config.resolvers.udp, config.resolvers.tcp):
        assert any(":" not in r.host for r in resolvers)
        assert any(":" in r.host for r in resolvers)


def test_embedded_default_is_the_repository_config() -> None:
    embedded = Path(str(files("probe") / "default_config.yaml"))
    assert embedded.resolve() == (REPO / "configs" / "agent.yaml").resolve()


def test_default_config_uses_registered_probes_only() -> None:
    # Without injected names: the real registry (or its bring-up fallback).
    config = load_config(None)
    assert config.services


def test_top_level_keys_cover_every_agent_config_field() -> None:
    # A field added to AgentConfig without a decoder here would be silently unsettable.
    fields = {f.name for f in dataclasses.fields(AgentConfig)} - {"services", "source"}
    assert set(TOP_KEYS) - {"services"} == fields


def test_defaults_apply_when_sections_are_absent(tmp_path: Path) -> None:
    path = tmp_path / "minimal.yaml"
    path.write_text("vantage: {name: msk-1, country: RU, asn: AS12389}\n")
    config = load(path)
    default = AgentConfig()
    assert config.vantage.name == "msk-1"
    assert config.vantage.role == "test"
    assert (config.schedule, config.timeouts, config.resolvers) == (
        default.schedule,
        default.timeouts,
        default.resolvers,
    )
    # no `seeds:` key: the standard lists
    assert config.seeds == DEFAULT_SEEDS
    assert [s.name for s in config.services] == list(DEFAULT_SEEDS)


def test_values_are_decoded(tmp_path: Path) -> None:
    path = tmp_path / "agent.yaml"
    key = tmp_path / "keys" / "web.key"
    key.parent.mkdir()
    leaf = CertificateAuthority().issue("probe.example")
    key.write_bytes(leaf.key_pem)  # the pair is loaded and checked: real PEM
    text = """
vantage: {name: ams-ctl, country: NL, asn: AS1136, role: control}
schedule:
  {interval_s: 120, jitter_s: 0, min_spacing_s: 0, concurrency: 8, per_destination: 1,
   batch_s: 0.5}
timeouts: {connect_s: 2.5, tls_s: 3}
resolvers:
  system: false
  udp: ["9.9.9.9:53", "[2620:fe::fe]:53"]
  tcp: ["[2620:FE::9]:5353"]
  doh: "https://[2620:fe::fe]:443/dns-query"
  reply_window_s: 0
seeds: [controls]
listen: "[::]:9100"
log_format: logfmt
archive: {path: null, max_bytes: 100000, keep: 0, compress: false}
web:
  tls_cert_file: web.crt
  tls_key_file: KEYFILE
  basic_auth_users: {prometheus: "$2b$12$ZnxLMxmw4kEXJ0MnxBHlJuWqWb6Mhfw9hIhJSWtD0LgzMGK5RjPFK"}
"""
    path.write_text(text.replace("KEYFILE", str(key)))
    (tmp_path / "web.crt").write_bytes(leaf.cert_pem)
    config = load(path)
    assert config.vantage.role == "control"
    assert config.schedule.concurrency == 8
    assert config.schedule.jitter_s == 0
    assert config.schedule.batch_s == 0.5
    assert config.timeouts.connect_s == 2.5
    assert config.timeouts.dns_s == AgentConfig().timeouts.dns_s
    assert config.resolvers.udp == (HostPort("9.9.9.9", 53), HostPort("2620:fe::fe", 53))
    assert str(config.resolvers.tcp[0]) == "[2620:FE::9]:5353"
    assert config.resolvers.reply_window_s == 0
    assert config.listen == HostPort("::", 9100)
    assert config.log_format == "logfmt"
    assert config.archive.path is None
    assert config.archive.keep == 0
    assert config.web.tls_cert_file == str(tmp_path / "web.crt")
    assert config.web.tls_key_file == str(key)
    assert set(config.web.basic_auth_users) == {"prometheus"}


def test_relative_paths_resolve_against_the_config_directory(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    conf_dir = tmp_path / "etc" / "probe"
    (conf_dir / "certs").mkdir(parents=True)
    (conf_dir / "lists").mkdir()
    CertificateAuthority().write_ca(conf_dir / "certs" / "lab-ca.pem")  # parsed: real PEM
    (conf_dir / "lists" / "lab.yaml").write_text(
        "service: lab\nsource: lab\nendpoints:\n"
        "  - {host: 127.0.0.1, ports: [8443], role: web, probes: [tcp], source: lab,"
        " confidence: C}\n"
    )
    (conf_dir / "agent.yaml").write_text(
        "seeds: [lists/lab.yaml, controls]\n"
        "tls: {ca_file: certs/lab-ca.pem}\n"
        "archive: {path: data/archive}\n"
    )
    elsewhere = tmp_path / "cwd"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)
    config = load(os.path.relpath(conf_dir / "agent.yaml", elsewhere))
    assert config.tls.ca_file == str(conf_dir / "certs" / "lab-ca.pem")
    assert config.archive.path == str(conf_dir / "data" / "archive")
    assert [s.name for s in config.services] == ["lab", "controls"]
    assert config.services[0].origin == str(conf_dir / "lists" / "lab.yaml")
    assert config.seeds == ("lists/lab.yaml", "controls")


def test_sni_overrides_are_applied_to_endpoints(tmp_path: Path) -> None:
    path = tmp_path / "agent.yaml"
    path.write_text(
        "seeds: [controls]\n"
        "tls:\n"
        "  sni_overrides:\n"
        "    cloudflare-v4: example.org\n"
        "    dns.google: Neutral.Example\n"
    )
    config = load(path)
    by_name = {ep.name: ep for ep in config.services[0].endpoints}
    assert by_name["cloudflare-v4"].sni == "example.org"
    assert by_name["dns.google"].sni == "neutral.example"
    assert by_name["cloudflare-v6"].sni == "one.one.one.one"  # untouched: the seed's own
    assert dict(config.tls.sni_overrides) == {
        "cloudflare-v4": "example.org",
        "dns.google": "neutral.example",
    }


def test_user_services_point_at_a_local_lab(tmp_path: Path) -> None:
    path = tmp_path / "lab.yaml"
    path.write_text(
        """
seeds: []
resolvers: {system: false, udp: ["127.0.0.1:5353"]}
services:
  - service: lab
    display_name: Local lab
    source: censorship lab
    prefixes: [{cidr: 127.0.0.0/8, source: RFC 1122, confidence: C}]
    endpoints:
      - name: lab-dc
        host: 127.0.0.1
        ports: [8443, 8080]
        role: signalling
        probes: [tcp, {tls: {ports: [8443], sni: web.whatsapp.com}}]
        source: lab
        confidence: C
      - {host: "::1", ports: [3478], transport: udp, role: call-relay, probes: [tcp],
         source: lab, confidence: U}
      - {host: lab.test, ports: [443], role: web, probes: [dns],
         addresses: [127.0.0.2], source: lab, confidence: I}
"""
    )
    config = load(path)
    (service,) = config.services
    dc, relay, named = service.endpoints
    assert (service.name, service.display_name, service.origin) == ("lab", "Local lab", str(path))
    tls = TLSParams(sni="web.whatsapp.com", sni_given=True)
    assert dc.probes[1] == ProbeSpec("tls", (8443,), tls)
    assert dc.ports_for("tls") == (8443,)
    assert dc.ports_for("tcp") == (8443, 8080)
    assert relay.transport == "udp"
    assert relay.name == "::1"
    assert named.addresses == ("127.0.0.2",)
    assert all(ep.prefixes == service.prefixes for ep in service.endpoints)


@pytest.mark.parametrize("value", [".nan", ".inf", "-1", "1" + "0" * 400, "true", "[1]"])
def test_a_timeout_must_be_a_finite_positive_number(tmp_path: Path, value: str) -> None:
    err = load_error(tmp_path / "agent.yaml", f"seeds: [controls]\ntimeouts:\n  tls_s: {value}\n")
    assert (err.line, err.field) == (3, "timeouts.tls_s")


def test_an_empty_section_means_its_defaults(tmp_path: Path) -> None:
    path = tmp_path / "agent.yaml"
    path.write_text("seeds: [controls]\ntimeouts:\n  # connect_s: 3\ntls:\n")
    config = load(path)
    assert config.timeouts == AgentConfig().timeouts
    assert config.tls == AgentConfig().tls


def test_an_empty_seeds_key_is_an_error_not_a_default(tmp_path: Path) -> None:
    # `seeds:` with nothing after it is ambiguous (none? the defaults?): refuse it.
    path = tmp_path / "agent.yaml"
    err = load_error(path, "seeds:\n")
    assert str(err) == f"{path}:1: seeds: expected a list, got null"


def test_deep_nesting_is_a_config_error_not_a_traceback(tmp_path: Path) -> None:
    err = load_error(tmp_path / "deep.yaml", "vantage: " + "[" * 5000 + "]" * 5000 + "\n")
    assert "nested too deeply" in err.message


def test_a_recursive_alias_is_a_config_error(tmp_path: Path) -> None:
    load_error(
        tmp_path / "loop.yaml",
        "seeds: []\nresolvers: {system: false}\nservices:\n"
        "  - service: lab\n    source: t\n    endpoints:\n"
        "      - {host: 127.0.0.1, ports: [443], role: web, source: t, confidence: C,\n"
        "         probes: [{transfer: {path: &a [*a]}}]}\n",
    )


def test_an_alias_bomb_is_refused_quickly(tmp_path: Path) -> None:
    """782 bytes of doubling aliases ("billion laughs") expand to 2**27 nodes: walking them
    hung check-config, and a reload froze the running agent's event loop for good."""
    anchors = ["a0: &a0 [x, x]"] + [f"a{i}: &a{i} [*a{i - 1}, *a{i - 1}]" for i in range(1, 26)]
    path = tmp_path / "laughs.yaml"
    path.write_text(
        "seeds: []\nresolvers: {system: false}\nservices:\n"
        "  - service: lab\n    source: t\n    endpoints:\n"
        "      - {host: 127.0.0.1, ports: [443], role: web, source: t, confidence: C,\n"
        f"         probes: [{{transfer: {{{', '.join(anchors)}}}}}]}}\n"
    )
    started = time.monotonic()
    with pytest.raises(ConfigError) as info:
        load(path)
    assert time.monotonic() - started < 5
    assert "aliases expand" in info.value.message


def test_neutral_sni_is_configurable_globally_and_per_service(tmp_path: Path) -> None:
    assert load_config(None).swaps.neutral_sni == "example.com"  # the documented default
    path = tmp_path / "agent.yaml"
    path.write_text(
        "seeds: [controls, telegram]\n"
        "swaps:\n"
        "  neutral_sni: Research.Example\n"
        "  per_service:\n"
        "    telegram: tg-neutral.example\n"
    )
    swaps = load(path).swaps
    assert swaps.neutral_sni == "research.example"
    assert swaps.neutral_for("telegram") == "tg-neutral.example"
    assert swaps.neutral_for("controls") == "research.example"


@pytest.mark.parametrize(
    ("text", "line", "field", "message"),
    [
        (
            "seeds: [controls]\nswaps:\n  per_service:\n    telegramm: n.example\n",
            4,
            "swaps.per_service.telegramm",
            "no service named 'telegramm'",
        ),
        ("seeds: [controls]\nswaps:\n  neutral_sni: 'not a name'\n", 3, "swaps.neutral_sni", ""),
        ("seeds: [controls]\nswaps:\n  neutral: x.example\n", 3, "swaps.neutral", ""),
    ],
)
def test_bad_swap_settings_name_file_line_and_field(
    tmp_path: Path, text: str, line: int, field: str, message: str
) -> None:
    err = load_error(tmp_path / "agent.yaml", text)
    assert (err.line, err.field) == (line, field), str(err)
    assert message in str(err)
