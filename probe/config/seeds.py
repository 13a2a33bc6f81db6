"""Seed lists: the curated targets of a service (``seeds/*.yaml``) loaded into `Service`.

One schema serves the shipped lists, user seed files and the ``services:`` block
of the agent config, so the agent can be pointed at any target (a local test lab
included) without code changes.  Decoding is strict (see `probe.config.strict_yaml`): every
mistake is a `ConfigError` with file, line and field.

Every endpoint and prefix must say where it comes from (``source``) and how sure
we are (``confidence``: C read in a source, I inferred, U unverified): the lists
go stale, and a reviewer must be able to re-check each line.
"""

from __future__ import annotations

import ipaddress
import re
from collections.abc import Callable, Collection, Mapping
from dataclasses import dataclass
from importlib.resources import files
from importlib.resources.abc import Traversable
from pathlib import Path
from typing import Any, Protocol

from ..model import ROLES, Endpoint, ParamError, ProbeParams, ProbeSpec, Service
from .strict_yaml import (
    ConfigError,
    Node,
    PlainNode,
    canonical_ip,
    did_you_mean,
    is_hostname,
    parse_file,
    parse_plain,
    parse_text,
    with_positions,
)

__all__ = [
    "CONFIDENCES",
    "ParamsParser",
    "ProbeTypes",
    "decode_service",
    "load_seed_file",
    "load_shipped",
    "prefix_warnings",
    "shipped_seeds",
]

CONFIDENCES = ("C", "I", "U")
TRANSPORTS = ("tcp", "udp")

SERVICE_KEYS = ("service", "display_name", "source", "prefixes", "endpoints")
PREFIX_KEYS = ("cidr", "source", "confidence")
ENDPOINT_KEYS = (
    "name",
    "host",
    "ports",
    "transport",
    "role",
    "probes",
    "addresses",
    "sni",
    "source",
    "confidence",
    "domestic",
)

# Service ids and endpoint names become metric label values: keep them tame.
_SERVICE_ID = re.compile(r"[a-z0-9][a-z0-9_-]{0,62}")
_ENDPOINT_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._:-]{0,127}")

# Probes that query DNS for the endpoint's hostname: meaningless on an IP literal.
_NEEDS_HOSTNAME = frozenset({"dns"})

Network = ipaddress.IPv4Network | ipaddress.IPv6Network


class ParamsParser(Protocol):
    """How one probe type reads its params as written (plain YAML data) into its typed
    params, raising `ParamError` naming the key (`probe.probes.ProbeType.parse`)."""

    def parse(self, params: Mapping[str, Any], /) -> ProbeParams: ...


@dataclass(frozen=True)
class ProbeTypes:
    """The probe types a file may name, and each one's params parser.

    Handed in by the caller (normally `probe.agent_config`, from `probe.probes.REGISTRY`):
    the config layer sits below the probes, whose modules read its settings, and imports
    none of them.  ``names`` may restrict ``parsers`` (tests pin the list that errors
    print); a name without a parser is refused as not in the registry.
    """

    parsers: Mapping[str, ParamsParser]
    names: frozenset[str]

    @classmethod
    def of(
        cls, parsers: Mapping[str, ParamsParser], names: Collection[str] | None = None
    ) -> ProbeTypes:
        return cls(parsers, frozenset(names) if names is not None else frozenset(parsers))


def shipped_seeds() -> dict[str, Traversable]:
    """The seed lists shipped inside the package, by name (file name without .yaml)."""
    folder = files("probe") / "seeds"
    found = {
        entry.name.removesuffix(".yaml"): entry
        for entry in folder.iterdir()
        if entry.name.endswith(".yaml") and entry.is_file()
    }
    return dict(sorted(found.items()))


def load_shipped(name: str, probes: ProbeTypes) -> Service:
    """Load a shipped seed list by name (``whatsapp``, ``telegram``, ``controls``...)."""
    shipped = shipped_seeds()
    if name not in shipped:
        raise KeyError(f"no shipped seed list {name!r}{did_you_mean(name, shipped)}")
    return _load_resource(shipped[name], probes)


def _load_resource(resource: Traversable, probes: ProbeTypes, plain: bool | None = None) -> Service:
    """A shipped seed list.  ``plain``: read as plain data (True), with positions (False)
    or plain first, then with positions to report an error (None; see `with_positions`)."""
    if plain is None:
        return with_positions(lambda plain: _load_resource(resource, probes, plain))
    if isinstance(resource, Path):
        root = parse_file(resource, plain=plain)
    elif plain:  # inside a zip or another non-filesystem loader
        root = parse_plain(resource.read_text(encoding="utf-8"), str(resource))
    else:
        root = parse_text(resource.read_text(encoding="utf-8"), str(resource))
    return decode_service(root, origin=root.file, probes=probes)


def load_seed_file(path: str | Path, probes: ProbeTypes, *, file: str | None = None) -> Service:
    """Load one seed file.  ``file`` is how the file is named in errors (default: ``path``)."""
    return with_positions(lambda plain: read_seed_file(Path(path), probes, plain, file))


def read_seed_file(path: Path, probes: ProbeTypes, plain: bool, file: str | None = None) -> Service:
    """`load_seed_file` read one way: as plain data or with positions (`with_positions`)."""
    root = parse_file(path, file if file is not None else str(path), plain=plain)
    return decode_service(root, origin=root.file, probes=probes)


def decode_service(root: Node, *, origin: str, probes: ProbeTypes) -> Service:
    """Decode one service mapping (a seed file's top level or an item of ``services:``)."""
    m = root.mapping(SERVICE_KEYS, required=("service", "source", "endpoints"))
    name = m["service"].matching(_SERVICE_ID, "a service id (lower-case letters, digits, - _)")
    display = m["display_name"].nonempty_str() if "display_name" in m else name
    source = m["source"].nonempty_str()
    prefixes = tuple(m["prefixes"].unique_list_of(_prefix)) if "prefixes" in m else ()
    items = m["endpoints"]
    if isinstance(items, PlainNode):
        endpoints = _plain_endpoints(items, name, prefixes, probes)
    else:
        endpoints = tuple(_endpoint(n, name, prefixes, probes) for n in items.sequence())
    if not endpoints:
        items.fail("must not be empty")
    _check_unique_names(items, endpoints)
    return Service(
        name=name,
        display_name=display,
        endpoints=endpoints,
        prefixes=prefixes,
        origin=origin,
        source=source,
    )


def _check_unique_names(endpoints_node: Node, endpoints: tuple[Endpoint, ...]) -> None:
    if isinstance(endpoints_node, PlainNode):
        if len({ep.name for ep in endpoints}) != len(endpoints):
            endpoints_node.fail("duplicate endpoint name")  # re-read with positions to say where
        return
    first: dict[str, int] = {}
    for item, ep in zip(endpoints_node.sequence(), endpoints, strict=True):
        if ep.name in first:
            raise ConfigError(
                item.file,
                item.line,
                f"{item.path}.name",
                f"duplicate endpoint name {ep.name!r} (first at line {first[ep.name]})",
            )
        first[ep.name] = item.line


def _provenance(m: dict[str, Node], owner: Node) -> tuple[str, str]:
    """``source`` and ``confidence``: both required on every endpoint and prefix."""
    for key in ("source", "confidence"):
        if key not in m:
            raise ConfigError(
                owner.file,
                owner.line,
                owner.child_path(key),
                "required key missing (every endpoint and prefix says where it comes from "
                "and how sure we are: confidence C, I or U)",
            )
    return m["source"].nonempty_str(), m["confidence"].choice(CONFIDENCES)


def _prefix(n: Node) -> Network:
    m = n.mapping(PREFIX_KEYS, required=("cidr",))
    _provenance(m, n)
    cidr = m["cidr"]
    text = cidr.as_str()
    try:
        return ipaddress.ip_network(text, strict=True)
    except ValueError:
        pass
    try:
        loose = ipaddress.ip_network(text, strict=False)
    except ValueError:
        cidr.fail(f"{text!r} is not an IPv4 or IPv6 prefix (e.g. 192.0.2.0/24)")
    cidr.fail(f"{text!r} has host bits set; did you mean {str(loose)!r}?")


def _endpoint(n: Node, service: str, prefixes: tuple[Network, ...], types: ProbeTypes) -> Endpoint:
    m = n.mapping(ENDPOINT_KEYS, required=("host", "ports", "role", "probes"))
    source, confidence = _provenance(m, n)
    host = m["host"].host()
    name = (
        m["name"].matching(_ENDPOINT_NAME, "an endpoint name (letters, digits, . _ : -)")
        if "name" in m
        else host
    )
    ports = tuple(m["ports"].unique_list_of(Node.port, nonempty=True))
    transport = m["transport"].choice(TRANSPORTS) if "transport" in m else "tcp"
    role = m["role"].choice(ROLES)
    is_ip = canonical_ip(host) is not None  # host is canonical: an IPv4 costs no parse
    probes = _probes(m["probes"], ports, types, is_ip)
    addresses = tuple(m["addresses"].unique_list_of(Node.ip)) if "addresses" in m else ()
    sni = m["sni"].hostname() if "sni" in m and not m["sni"].is_null else None
    domestic = m["domestic"].as_bool() if "domestic" in m else False
    if domestic and role != "control":
        m["domestic"].fail("only a control endpoint (role: control) can be domestic")
    return Endpoint(
        service=service,
        name=name,
        host=host,
        ports=ports,
        transport=transport,  # type: ignore[arg-type]  # checked by choice()
        role=role,
        probes=probes,
        addresses=addresses,
        prefixes=prefixes,
        sni=sni,
        source=source,
        confidence=confidence,
        domestic=domestic,
    )


_ENDPOINT_KEY_SET = frozenset(ENDPOINT_KEYS)


def _plain_endpoints(
    items: PlainNode, service: str, prefixes: tuple[Network, ...], types: ProbeTypes
) -> tuple[Endpoint, ...]:
    """The endpoints of a service read as plain data (`strict_yaml.read_plain`).

    The cost of a long list is here, so an endpoint of the usual shape (scalars, a list
    of ports, a list of probe names) is checked straight on its dict, and the probe
    specs, the same for most endpoints, are parsed once per distinct list.  Any other
    shape goes through the generic cursor walk (`_endpoint`).  Every check is the
    generic one's, value for value: `tests/test_config_plain.py` holds the two side by
    side.  A failed check raises on plain data, so the file is re-read with positions.
    """
    values = items.value
    if type(values) is not list:
        items.fail("expected a list")
    specs: dict[Any, tuple[ProbeSpec, ...]] = {}
    out = []
    for i, value in enumerate(values):
        n = PlainNode(value, items.file, f"{items.path}[{i}]")
        endpoint = _usual_endpoint(n, service, prefixes, types, specs)
        out.append(endpoint or _endpoint(n, service, prefixes, types))
    return tuple(out)


def _usual_endpoint(
    n: PlainNode,
    service: str,
    prefixes: tuple[Network, ...],
    types: ProbeTypes,
    specs: dict[Any, tuple[ProbeSpec, ...]],
) -> Endpoint | None:
    """`_endpoint` for an endpoint of the usual shape, all checks passed; None for any
    other (`_endpoint` then decides, and says what is wrong)."""
    d = n.value
    if type(d) is not dict or not _ENDPOINT_KEY_SET.issuperset(d):
        return None
    try:
        host, ports, role, probes = d["host"], d["ports"], d["role"], d["probes"]
        source, confidence = d["source"], d["confidence"]
    except KeyError:
        return None
    if type(host) is not str or type(ports) is not list or type(probes) is not list:
        return None
    if type(source) is not str or not source.strip() or confidence not in CONFIDENCES:
        return None
    if type(role) is not str or role not in ROLES:
        return None
    canonical = canonical_ip(host)
    if canonical is None:
        if not is_hostname(host):
            return None
        host = host.lower()
    else:
        host = canonical
    name = d.get("name", host)
    if "name" in d and (type(name) is not str or not _ENDPOINT_NAME.fullmatch(name)):
        return None
    for port in ports:
        if type(port) is not int or not 1 <= port <= 65535:
            return None
    if not ports or len(set(ports)) != len(ports):  # ints only: hashable, as the generic walk
        return None
    transport = d.get("transport", "tcp")
    if type(transport) is not str or transport not in TRANSPORTS:
        return None
    domestic = d.get("domestic", False)
    if type(domestic) is not bool or (domestic and role != "control"):
        return None
    if d.get("sni") is not None or "addresses" in d:
        return None  # less usual: the generic walk
    is_ip = canonical is not None
    port_tuple = tuple(ports)
    # The probe list as a key: names as they are, params by repr (types kept apart:
    # 1, 1.0, True and '1' read differently); ports count only where a spec has its own.
    key: Any = tuple(probes) if all(type(p) is str for p in probes) else repr(probes)
    key = (key, is_ip) if type(key) is tuple else (key, is_ip, port_tuple)
    parsed = specs.get(key)
    if parsed is None:
        where = PlainNode(probes, n.file, n.child_path("probes"))
        parsed = specs[key] = _probes(where, port_tuple, types, is_ip)
    return Endpoint(
        service=service,
        name=name,
        host=host,
        ports=port_tuple,
        transport=transport,  # type: ignore[arg-type]  # checked against TRANSPORTS
        role=role,
        probes=parsed,
        addresses=(),
        prefixes=prefixes,
        sni=None,
        source=source,
        confidence=confidence,
        domestic=domestic,
    )


def _probes(
    n: Node, ports: tuple[int, ...], types: ProbeTypes, is_ip: bool
) -> tuple[ProbeSpec, ...]:
    specs: list[ProbeSpec] = []
    first: dict[str, int] = {}
    for item in n.sequence():
        spec = _probe(item, ports, types)
        if spec.name in first:
            item.fail(f"duplicate probe {spec.name!r} (first at line {first[spec.name]})")
        if is_ip and spec.name in _NEEDS_HOSTNAME:
            item.fail(f"probe {spec.name!r} needs a hostname, but host is an IP address")
        first[spec.name] = item.line
        specs.append(spec)
    if not specs:
        n.fail("must not be empty")
    return tuple(specs)


def _probe(item: Node, ports: tuple[int, ...], types: ProbeTypes) -> ProbeSpec:
    """``tcp`` or ``{tcp: {ports: [443], <params>}}`` -> `ProbeSpec`, params parsed."""
    if not item.is_mapping:
        name = item.as_str()
        _check_probe_name(name, item, item.line, types.names)
        return ProbeSpec(name, None, _parse_params(types, name, item, {}))
    entries = item.free_mapping()
    if len(entries) != 1:
        item.fail(
            f"a probe is a name or a one-key mapping {{name: {{params}}}}, got {len(entries)} keys"
        )
    ((name, body),) = entries.items()
    _check_probe_name(name, item, body.line, types.names)  # a value's line is its key's
    params = {} if body.is_null else body.free_mapping()
    spec_ports: tuple[int, ...] | None = None
    if "ports" in params:
        spec_ports = tuple(params.pop("ports").unique_list_of(_port_in(ports), nonempty=True))
    return ProbeSpec(name, spec_ports, _parse_params(types, name, body, params))


def _parse_params(
    types: ProbeTypes, name: str, where: Node, nodes: Mapping[str, Node]
) -> ProbeParams:
    """Parse the probe's params into its typed params now, once: a bad param fails the
    load, not every round, and the probe reads attributes.

    The error points at the offending key's line (``...probes[1].transfer.max_bytes``)
    when the `ParamError` names a key written in the file.  A named key the file does
    not set (a clash with its default) is still the field, at the probe's line; a plain
    ValueError points at the probe's params (``...probes[1].transfer``).
    """
    parser = types.parsers.get(name)
    if parser is None:  # a caller's own ``names`` allowed it
        where.fail(f"probe {name!r} is not in the probe registry")
    try:
        parsed: ProbeParams = parser.parse({k: v.plain() for k, v in nodes.items()})
    except ValueError as exc:
        key, message = (exc.key, exc.message) if isinstance(exc, ParamError) else (None, str(exc))
        node = nodes.get(key) if key is not None else None
        if node is not None:
            raise ConfigError(node.file, node.line, node.path, message) from None
        field = where.child_path(key) if key is not None else where.field
        raise ConfigError(where.file, where.line, field, message) from None
    return parsed


def _check_probe_name(name: str, item: Node, line: int, probe_names: frozenset[str]) -> None:
    if name not in probe_names:
        raise ConfigError(
            item.file,
            line,
            item.field,
            f"unknown probe {name!r}{did_you_mean(name, probe_names)} "
            f"(known: {', '.join(sorted(probe_names))})",
        )


def _port_in(ports: tuple[int, ...]) -> Callable[[Node], int]:
    def port(n: Node) -> int:
        value = n.port()
        if value not in ports:
            n.fail(f"port {value} is not one of the endpoint's ports {list(ports)}")
        return value

    return port


def prefix_warnings(service: Service) -> list[str]:
    """Known addresses (and IP-literal hosts) outside the service's prefixes.

    Not an error: prefix lists and addresses drift independently.  But an
    address outside the prefixes breaks the DNS answer-consistency check, so
    ``check-config`` and the seed tests report it.
    """
    if not service.prefixes:
        return []
    out: list[str] = []
    for ep in service.endpoints:
        known = ((ep.host,) if ep.is_ip_literal else ()) + ep.addresses
        for addr in known:
            ip = ipaddress.ip_address(addr)
            if not any(ip in net for net in service.prefixes):
                out.append(
                    f"{service.origin}: {service.name}/{ep.name}: {addr} is outside "
                    "the service prefixes"
                )
    return out
