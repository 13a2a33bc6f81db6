"""Plain-data config loading (issue 13 item 4): the fast read gives what the positioned
read gives, and every error is still the positioned read's, word for word.

`load_config` first reads a file as plain data (`strict_yaml.read_plain`: libyaml's
events, no node tree, no lines) and re-reads it with positions only when something is
wrong (`strict_yaml.with_positions`).  Tested here: `read_plain` builds exactly what
``yaml.load`` builds, or leaves the file to the node tree; a load gives the same
`AgentConfig` either way; an error names the same file, line and field either way; the
shortcut for endpoints of the usual shape (`seeds._usual_endpoint`) accepts exactly what
the generic walk accepts, value for value.  No network.
"""

from __future__ import annotations

import itertools
from importlib.resources import files
from pathlib import Path
from typing import Any

import pytest
import yaml
from hypothesis import given, settings
from hypothesis import strategies as st

import probe.config.strict_yaml as strict_yaml
from probe.agent_config import known_probes, load_config, probe_types
from probe.config import seeds
from probe.config.loader import ConfigError
from probe.config.strict_yaml import PlainNode, read_plain
from probe.model import Endpoint

REPO = Path(__file__).resolve().parents[1]
TESTDATA = Path(__file__).parent / "testdata"
needs_libyaml = pytest.mark.skipif(
    strict_yaml._FAST_LOADER is None, reason="PyYAML built without libyaml"
)
PROBES = known_probes()
TYPES = probe_types()


def _yaml_files() -> list[Path]:
    shipped = [
        Path(str(p)) for p in (files("probe") / "seeds").iterdir() if p.name.endswith("yaml")
    ]
    return (
        sorted(TESTDATA.glob("*.yaml"))
        + sorted(shipped)
        + sorted((REPO / "configs").glob("agent*.yaml"))
        + [REPO / "probe" / "default_config.yaml"]
    )


def _typed(value: Any) -> str:
    """A value with its types spelled out: 1, 1.0 and True compare equal, reprs do not."""
    return repr(value)


@needs_libyaml
@pytest.mark.parametrize("path", _yaml_files(), ids=lambda p: p.name)
def test_read_plain_builds_what_yaml_load_builds(path: Path) -> None:
    text = path.read_text(encoding="utf-8")
    plain = read_plain(text)
    if plain is strict_yaml._UNREAD:
        return  # left to the node tree (tested below for what must be)
    assert _typed(plain) == _typed(yaml.load(text, Loader=yaml.SafeLoader))


@needs_libyaml
def test_the_shipped_files_and_the_default_config_are_read_as_plain_data() -> None:
    """The fast read is not a path nothing takes: every file the agent ships takes it."""
    shipped = _yaml_files()[-7:]
    assert len(shipped) == 7 and shipped[-1].name == "default_config.yaml"
    for path in shipped:
        assert read_plain(path.read_text(encoding="utf-8")) is not strict_yaml._UNREAD, path


SCALARS = (
    "a: [1, -2, +3, 0x1f, 0o17, 1_000, 1.5, -0.5e3, .inf, -.Inf, .nan, 1:30, 190:20:30.15]\n"
    "b: [yes, No, ON, off, true, FALSE, y, n, null, ~, Null, '', \"1\", '1.5', 01, 0b101]\n"
    "c: [on1, 1.2.3.4, '2001:db8::1', 10.0.0.1, 1e3, '~', nul, a b, 'x: y', -x]\n"
    "d:\n  e:\n  f: [[], {}, [[1]], {g: {h: [i]}}]\n"
    "g: |\n  block\n  text\n"
    "h: >-\n  folded\n  text\n"
    "i:\n  - 1\n  - - x\n    - y\n  - k: v\n    l: [1, 1, 1]\n"
)


@needs_libyaml
def test_read_plain_resolves_scalars_as_safe_loader_does() -> None:
    """YAML 1.1's implicit types (ints in any base, sexagesimal, .inf, yes/no/on/off,
    null spellings), quoted scalars as strings, empty values, nested collections."""
    plain = read_plain(SCALARS)
    assert plain is not strict_yaml._UNREAD
    reference = yaml.load(SCALARS, Loader=yaml.SafeLoader)
    assert _typed(plain).replace("nan", "NAN") == _typed(reference).replace("nan", "NAN")


UNREAD = [
    "a: &x 1\nb: 2\n",  # an anchor (PyYAML refuses a repeated one even unused)
    "a: &x 1\nb: *x\n",
    "a: &x {b: 1}\nc:\n  <<: *x\n",
    "a: !!str 1\n",
    "a: !!python/object:os.system ls\n",
    "a: !custom x\n",
    "a: !!set {b}\n",
    "a: 2024-01-01\n",  # a timestamp
    "a: =\n",  # YAML's value key
    "a: 1\na: 2\n",  # a repeated key
    "{a: 1, a: 1}\n",
    "1: a\n",  # a key that is not a string
    "null: a\n",
    "[a]: b\n",
    "? {a: 1}\n: b\n",
    "--- a\n--- b\n",
    "",
    "# only a comment\n",
    "a: [1, 2\n",
    "a: b: c\n",
    "a: \x07bell\n",
    "- [" * 50 + "]" * 49 + "\n",
]


@needs_libyaml
@pytest.mark.parametrize("text", UNREAD)
def test_read_plain_leaves_the_unusual_to_the_node_tree(text: str) -> None:
    """Anchors, aliases, merge keys, tags, timestamps, repeated or non-string keys,
    several documents, none, syntax errors: the node tree reads them (and judges them)."""
    assert read_plain(text) is strict_yaml._UNREAD


def _positioned(monkeypatch: pytest.MonkeyPatch) -> None:
    """Every file read with positions only, as before plain data existed."""
    monkeypatch.setattr(strict_yaml, "read_plain", lambda _text: strict_yaml._UNREAD)


def _load_both(path: Path | None, monkeypatch: pytest.MonkeyPatch) -> tuple[Any, Any]:
    """(result or error text) of a plain-first load and of a positioned-only one."""

    def once() -> Any:
        try:
            return load_config(path, probe_names=PROBES)
        except ConfigError as exc:
            return f"ConfigError: {exc}"

    first = once()
    with monkeypatch.context() as m:
        _positioned(m)
        return first, once()


ENDPOINT = (
    "{name: e0, host: 10.0.0.1, ports: [443, 80], role: signalling, probes: [tcp, tls], "
    "source: test, confidence: C}"
)
MIXED_ENDPOINTS = [
    ENDPOINT,
    ENDPOINT.replace("e0", "e1").replace("10.0.0.1", "10.0.0.2"),
    "{host: Example.COM, ports: [443], role: web, probes: [dns, tcp, tls], source: s, "
    "confidence: I}",
    "{name: v6, host: '2001:DB8::1', ports: [443], role: web, probes: [tcp], source: s, "
    "confidence: U, addresses: ['10.0.0.3']}",
    "{name: p, host: p.example, ports: [443, 8443], role: media, transport: tcp, source: s, "
    "confidence: C, sni: Front.Example, probes: [tcp, {tls: {ports: [8443], alpn: [h2]}}]}",
    "{name: q, host: q.example, ports: [443, 8443], role: media, source: s, confidence: C, "
    "probes: [tcp, {tls: {ports: [443], alpn: [h2]}}]}",
    "{name: u, host: 10.0.0.9, ports: [3478], role: call-relay, transport: udp, source: s, "
    "confidence: C, probes: [stun]}",
    "{name: d, host: 10.0.0.10, ports: [443], role: control, domestic: true, source: s, "
    "confidence: C, probes: [tcp]}",
    "{name: n, host: n.example, ports: [443], role: web, source: s, confidence: C, "
    "probes: [{tcp: null}, {tls: {sni: null}}]}",
]


def _config(endpoints: list[str]) -> str:
    lines = [
        "vantage: {name: t, country: ZZ, asn: AS64500, role: test}",
        "resolvers: {system: false, udp: ['127.0.0.1:53']}",
        "seeds: []",
        "archive: {path: null}",
        "schedule: {interval_s: 60.0, jitter_s: 5}",
        "services:",
        "  - service: svc",
        "    source: test",
        "    endpoints:",
    ]
    return "\n".join(lines + [f"      - {e}" for e in endpoints]) + "\n"


@needs_libyaml
def test_a_valid_config_loads_the_same_either_way(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    path = tmp_path / "agent.yaml"
    path.write_text(_config(MIXED_ENDPOINTS))
    plain, positioned = _load_both(path, monkeypatch)
    assert not isinstance(plain, str), plain
    assert plain == positioned
    assert len(plain.services[0].endpoints) == len(MIXED_ENDPOINTS)


@needs_libyaml
def test_the_default_config_loads_the_same_either_way(monkeypatch: pytest.MonkeyPatch) -> None:
    plain, positioned = _load_both(None, monkeypatch)
    assert not isinstance(plain, str), plain
    assert plain == positioned


# (what replaces ENDPOINT's text in the second endpoint, line, field, message start)
ERRORS = [
    (
        "ports: [443, 80]",
        "ports: [[443]]",
        "services[0].endpoints[1].ports[0]",
        "expected a single value, got a list",
    ),
    ("role: signalling", "role: nope", "services[0].endpoints[1].role", "'nope' is not one of"),
    (
        "ports: [443, 80]",
        "ports: [443, 443]",
        "services[0].endpoints[1].ports[1]",
        "duplicate value 443",
    ),
    (
        "ports: [443, 80]",
        "ports: [true]",
        "services[0].endpoints[1].ports[0]",
        "expected an integer, got a boolean",
    ),
    (
        "ports: [443, 80]",
        "ports: [70000]",
        "services[0].endpoints[1].ports[0]",
        "70000 is out of range 1..65535",
    ),
    (
        "host: 10.0.0.1",
        "host: bad_host",
        "services[0].endpoints[1].host",
        "'bad_host' is neither an IP address nor a valid hostname",
    ),
    (
        "probes: [tcp, tls]",
        "probes: [tcp, dns]",
        "services[0].endpoints[1].probes[1]",
        "probe 'dns' needs a hostname, but host is an IP address",
    ),
    (
        "probes: [tcp, tls]",
        "probes: [tcp, tcp]",
        "services[0].endpoints[1].probes[1]",
        "duplicate probe 'tcp'",
    ),
    (
        "probes: [tcp, tls]",
        "probes: [tcp, {tls: {ports: [8080]}}]",
        "services[0].endpoints[1].probes[1].tls.ports[0]",
        "port 8080 is not one of",
    ),
    (
        "probes: [tcp, tls]",
        "probes: [tcp, {tls: {alpn: 5}}]",
        "services[0].endpoints[1].probes[1].tls.alpn",
        "must be a protocol name",
    ),
    (
        "probes: [tcp, tls]",
        "probes: [tpc]",
        "services[0].endpoints[1].probes[0]",
        "unknown probe 'tpc'; did you mean 'tcp'?",
    ),
    ("confidence: C", "confidence: X", "services[0].endpoints[1].confidence", "'X' is not one of"),
    ("source: test", "source: ''", "services[0].endpoints[1].source", "must not be empty"),
    (
        "name: e0",
        "name: e0, colour: red",
        "services[0].endpoints[1].colour",
        "unknown key 'colour'",
    ),
    ("name: e0", "name: 'a b'", "services[0].endpoints[1].name", "'a b' is not an endpoint name"),
    (
        "role: signalling",
        "role: signalling, domestic: true",
        "services[0].endpoints[1].domestic",
        "only a control endpoint",
    ),
    (
        "role: signalling",
        "role: signalling, transport: sctp",
        "services[0].endpoints[1].transport",
        "'sctp' is not one of",
    ),
    (
        "name: e0",
        "name: e0, ports: [1]",
        "services[0].endpoints[1].ports",
        "duplicate key (first at line 11)",
    ),
    (
        "host: 10.0.0.1",
        "host: &h 10.0.0.1",
        "services[0].endpoints[1].name",
        "duplicate endpoint name 'e0' (first at line 10)",
    ),
    (
        "host: 10.0.0.1",
        "host: 2024-01-01",
        "services[0].endpoints[1].host",
        "expected a string, got a timestamp (quote the value)",
    ),
]


@needs_libyaml
@pytest.mark.parametrize(("old", "new", "field", "message"), ERRORS, ids=lambda v: str(v)[:40])
def test_an_error_names_the_same_file_line_and_field_either_way(
    old: str, new: str, field: str, message: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The second endpoint (line 11) is broken in one way each: the plain read fails, the
    positioned re-read reports it, and that report is the positioned-only load's."""
    path = tmp_path / "agent.yaml"
    second = ENDPOINT.replace(old, new)
    if "endpoint name" not in message:
        second = second.replace("e0", "e1", 1)
    path.write_text(_config([ENDPOINT, second]))
    plain, positioned = _load_both(path, monkeypatch)
    assert plain == positioned
    assert plain.startswith(f"ConfigError: {path}:11: {field}: {message}"), plain


# -- the usual-shape shortcut against the generic walk ----------------------------------

BASE: dict[str, Any] = {
    "name": "e0",
    "host": "10.0.0.1",
    "ports": [443, 80],
    "role": "signalling",
    "probes": ["tcp", "tls"],
    "source": "s",
    "confidence": "C",
}
VARIANTS: dict[str, list[Any]] = {
    "name": ["e-1.x:y", "x y", "", 5, True, None, "a" * 200, "::1", "_x", ["e"], {"e": 1}],
    "host": [
        ["h.example"],
        {"h": 1},
        "Example.COM",
        "10.0.0.01",
        "::1",
        "2001:DB8::1",
        "bad_host",
        "",
        5,
        None,
        "1.2.3.4.",
        "256.1.1.1",
        "a..b",
        "x" * 64 + ".example",
    ],
    "ports": [
        [[443]],
        [{"a": 1}],
        [443, [443]],
        [],
        [443, 443],
        [0],
        [65536],
        [True],
        [443.0],
        "443",
        [443],
        443,
        None,
        [1, 65535],
        ["443"],
    ],
    "role": ["web", "control", "nope", 5, None, ["web"], {"web": 1}],
    "probes": [
        [["tcp"]],
        [{"tcp": {"ports": [[443]]}}],
        {"tcp": None},
        [],
        ["tcp", "tcp"],
        ["dns"],
        ["nope"],
        "tcp",
        [5],
        None,
        ["tcp", None],
        [{"tls": {"sni": "x.example"}}],
        [{"tcp": {"ports": [443]}}],
        [{"tcp": {"ports": [8080]}}],
        [{"tls": None}],
        [{"tls": {"alpn": ["h2"]}}],
        [{"tls": {}, "tcp": {}}],
        ["stun"],
        [{"tls": {"alpn": 5}}],
    ],
    "source": ["", " ", 5, None, "x", ["s"], {"s": 1}],
    "confidence": ["X", "c", 1, None, "U", "I", ["C"], {"C": 1}],
    "transport": ["udp", "tcp", "sctp", 1, None, ["tcp"], {"tcp": 1}],
    "domestic": [True, False, 1, "yes", None, [True], {"a": 1}],
    "sni": [None, "x.example", "X.Example", "bad_", 5, ["x.example"]],
    "addresses": [["10.0.0.2"], [], ["x"], "10.0.0.2", ["10.0.0.2", "10.0.0.2"], [["10.0.0.2"]]],
    "colour": ["red"],
}
MISSING = object()


def _variants() -> list[dict[str, Any]]:
    out = [dict(BASE)]
    for key, values in VARIANTS.items():
        for value in [*values, MISSING]:
            d = dict(BASE)
            if value is MISSING:
                d.pop(key, None)
            else:
                d[key] = value
            out.append(d)
    # pairs that interact: a control may be domestic; an IP host cannot take dns
    for role, domestic, host in itertools.product(
        ["control", "web"], [True, False], ["10.0.0.1", "h.example"]
    ):
        out.append(BASE | {"role": role, "domestic": domestic, "host": host, "probes": ["dns"]})
    return out


def _generic(d: dict[str, Any]) -> Endpoint | str:
    try:
        return seeds._endpoint(PlainNode(d, "f.yaml", "e"), "svc", (), TYPES)
    except ConfigError as exc:
        return f"error: {exc.message}"


def _usual(d: dict[str, Any], specs: dict[Any, Any]) -> Endpoint | str | None:
    try:
        return seeds._usual_endpoint(PlainNode(d, "f.yaml", "e"), "svc", (), TYPES, specs)
    except ConfigError as exc:
        return f"error: {exc.message}"


@pytest.mark.parametrize("d", _variants(), ids=lambda d: repr(d)[:70])
def test_the_usual_endpoint_shortcut_accepts_exactly_what_the_generic_walk_does(
    d: dict[str, Any],
) -> None:
    """Either the shortcut declines (None: the generic walk decides), or it gives the
    generic walk's own Endpoint; it never accepts what the generic walk refuses.  Its
    probe-spec table is shared, as in a load, with the base endpoint's entry in it."""
    specs: dict[Any, Any] = {}
    assert _usual(dict(BASE), specs) == _generic(dict(BASE))
    got = _usual(d, specs)
    expected = _generic(d)
    if got is None:
        return
    if isinstance(expected, str):
        assert isinstance(got, str) and got.startswith("error: "), (got, expected)
    else:
        assert got == expected


def test_the_probe_spec_table_keeps_apart_what_reads_differently() -> None:
    """Specs are shared between endpoints with the same probe list, but never across an
    IP host and a hostname (dns), or across other ports (a spec's own ``ports``)."""
    specs: dict[Any, Any] = {}
    named = BASE | {"host": "h.example", "probes": ["dns", "tcp"]}
    first = _usual(named, specs)
    assert isinstance(first, Endpoint)
    assert (
        _usual(BASE | {"name": "e1", "host": "h2.example", "probes": ["dns", "tcp"]}, specs).probes
        is first.probes
    )  # type: ignore[union-attr]
    ip = _usual(BASE | {"probes": ["dns", "tcp"]}, specs)
    assert ip == "error: probe 'dns' needs a hostname, but host is an IP address"
    own_ports = [{"tls": {"ports": [8443]}}]
    assert isinstance(_usual(BASE | {"ports": [443, 8443], "probes": own_ports}, specs), Endpoint)
    other = _usual(BASE | {"ports": [443, 80], "probes": own_ports}, specs)
    assert isinstance(other, str) and "port 8443 is not one of" in other


@needs_libyaml
def test_a_long_valid_list_is_read_plain_and_one_past_the_value_bound_is_not(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """8,000 endpoints (more indicators than the node tree's quick bound admits, far
    fewer values than the bound) are read as plain data; past the bound the node tree
    reads the file and refuses it with its own message."""
    from bench.config_load import write_config

    text = write_config(tmp_path / "long.yaml", 8000).read_text()
    assert strict_yaml._node_bound(text) > strict_yaml._MAX_NODES
    assert read_plain(text) is not strict_yaml._UNREAD
    monkeypatch.setattr(strict_yaml, "_MAX_NODES", 20)
    small = tmp_path / "small.yaml"
    small.write_text(_config([ENDPOINT, ENDPOINT.replace("e0", "e1")]))
    assert read_plain(small.read_text()) is strict_yaml._UNREAD
    with pytest.raises(ConfigError) as info:
        load_config(small)
    assert (
        str(info.value) == f"{small}:4: <yaml>: too many values: more than 20 (a config "
        "or seed list has far fewer; split the list)"
    )


_WORDS = st.sampled_from(
    [
        "a",
        "yes",
        "No",
        "on",
        "1",
        "01",
        "0x1f",
        "1.5",
        "1_0",
        "1:30",
        ".inf",
        "~",
        "null",
        "",
        "2024-01-01",
        "<<",
        "=",
        "e1",
        "10.0.0.1",
        "::1",
        "a: b",
        "- x",
        "&a",
        "*a",
        "!t",
        "#c",
        "'q'",
        '"d"',
        "[x]",
        "{y}",
        "x,y",
        " pad ",
        "é",
        "\t",
    ]
)
_SCALARS = _WORDS | st.integers(-(2**70), 2**70) | st.booleans() | st.none() | st.floats()
_DATA = st.recursive(
    _SCALARS,
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(_WORDS, inner, max_size=4),
    max_leaves=12,
)


@needs_libyaml
@settings(max_examples=300, deadline=None)
@given(_DATA, st.booleans(), st.sampled_from(["", "a: 1\n", "&x ", "!!str ", "? "]))
def test_read_plain_on_any_document_is_yaml_load_or_leaves_it(
    data: Any, flow: bool, prefix: str
) -> None:
    """Whatever the document (tricky scalars, both styles, odd prefixes that make some
    documents invalid or unusual), read_plain gives exactly yaml.load's value, types
    included, or leaves the document to the node tree."""
    text = prefix + yaml.safe_dump(data, default_flow_style=flow, allow_unicode=True)
    plain = read_plain(text)
    if plain is strict_yaml._UNREAD:
        return
    assert _typed(plain) == _typed(yaml.load(text, Loader=yaml.SafeLoader))
