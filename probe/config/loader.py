"""Load the agent configuration: defaults, then strict decode, then validate.

Modelled on blackbox_exporter's config loading: every key has a default (the
dataclasses of `probe.config.settings`), a file may override any of them, unknown keys
are errors (with a "did you mean"), and every error is a `ConfigError` whose
``str()`` is ``file:line: field: message``, so ``probe check-config`` can print
it as is.  The seed lists named under ``seeds:`` and the extra ``services:``
are loaded and merged into ``AgentConfig.services``.
"""

from __future__ import annotations

import dataclasses
import errno
import ipaddress
import os
import re
import socket
import ssl
from collections.abc import Callable
from importlib.resources import as_file, files
from importlib.resources.abc import Traversable
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

from ..model import Service, Vantage, freeze
from .seeds import ProbeTypes, _load_resource, decode_service, read_seed_file, shipped_seeds
from .settings import (
    AgentConfig,
    ArchiveSettings,
    ControlSettings,
    HostPort,
    MetricsSettings,
    Resolvers,
    Schedule,
    SwapSettings,
    Timeouts,
    TLSOptions,
    WebSettings,
)
from .strict_yaml import (
    TOO_DEEP,
    YAML_FIELD,
    ConfigError,
    Node,
    did_you_mean,
    is_hostname,
    parse_file,
    with_positions,
)

__all__ = ["DEFAULT_SEEDS", "ConfigError", "load_config"]

# Used when a config file has no `seeds:` key: a config that only sets its vantage
# measures the standard targets.  `seeds: []` measures only the config's services.
DEFAULT_SEEDS: tuple[str, ...] = ("whatsapp", "telegram", "controls")

TOP_KEYS = (
    "vantage",
    "schedule",
    "timeouts",
    "resolvers",
    "tls",
    "swaps",
    "seeds",
    "services",
    "listen",
    "archive",
    "web",
    "metrics",
    "control",
    "log_format",
)
_SECTIONS = frozenset(
    {
        "vantage",
        "schedule",
        "timeouts",
        "resolvers",
        "tls",
        "swaps",
        "archive",
        "web",
        "control",
        "metrics",
    }
)
CONTROL_KEYS = (
    "urls",
    "ca_file",
    "basic_auth_file",
    "poll_interval_s",
    "max_age_s",
    "timeout_s",
    "max_bytes",
)
LOG_FORMATS = ("json", "logfmt")
VANTAGE_ROLES = ("test", "control")

_VANTAGE_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,63}")
_COUNTRY = re.compile(r"[A-Z]{2}")
_ASN = re.compile(r"AS(\d{1,10})")
_BCRYPT = re.compile(r"\$2[aby]?\$\d\d\$[./A-Za-z0-9]{53}")
_BRACKETED = re.compile(r"\[([^\]]*)\]:([^:]*)")


def _keys(cls: type) -> tuple[str, ...]:
    """Config keys of a section are exactly its dataclass's field names."""
    return tuple(f.name for f in dataclasses.fields(cls))


def load_config(path: str | Path | None = None, *, probes: ProbeTypes) -> AgentConfig:
    """Load and validate a config file (None = the embedded default) and its seed lists.

    ``probes``: the probe types endpoints may name and their params parsers (the agent's
    come from `probe.agent_config`, which binds `probe.probes.REGISTRY`).
    Raises `ConfigError` for anything wrong, never another exception for bad input.
    """
    if path is None:
        resource = files("probe") / "default_config.yaml"
        with as_file(resource) as real:
            return _guarded_load(Path(real), str(real), probes)
    return _guarded_load(Path(path), str(path), probes)


def _guarded_load(path: Path, file: str, probes: ProbeTypes) -> AgentConfig:
    try:
        # Plain data first (fast); any error re-reads with positions to report it.
        return with_positions(lambda plain: _load(path, file, probes, plain))
    except RecursionError:  # a walk deeper than the parse (decode checks that first)
        raise ConfigError(file, None, YAML_FIELD, TOO_DEEP) from None


def _load(path: Path, file: str, probes: ProbeTypes, plain: bool) -> AgentConfig:
    root = parse_file(path, file, plain=plain)
    # A section left empty (every line commented out) reads as null: use its defaults.
    m = {k: v for k, v in root.mapping(TOP_KEYS).items() if not (k in _SECTIONS and v.is_null)}
    # Relative paths are relative to the config file's directory, as given (no
    # symlink resolution, like Prometheus), so a config travels with its files.
    base_dir = Path(os.path.abspath(path)).parent

    # Decode sections in file order, so the error reported is the first in the file.
    decoders: dict[str, Callable[[Node], Any]] = {
        "vantage": _vantage,
        "schedule": _schedule,
        "timeouts": _timeouts,
        "resolvers": _resolvers,
        "tls": lambda n: _tls(n, base_dir),
        "swaps": _swaps,
        "seeds": lambda n: _load_seeds(n, base_dir, probes, plain),
        "services": lambda n: _user_services(n, probes),
        "listen": _listen,
        "archive": lambda n: _archive(n, base_dir),
        "web": lambda n: _web(n, base_dir),
        "metrics": _metrics,
        "control": lambda n: _control(n, base_dir),
        "log_format": lambda n: n.choice(LOG_FORMATS),
    }
    d = {key: decoders[key](node) for key, node in m.items()}

    # Cross-section checks, once every section is valid on its own.
    seeded = d["seeds"] if "seeds" in m else _load_seeds(None, base_dir, probes, plain)
    services = _merge(seeded, m.get("services"), d.get("services", ()))
    if not services:
        (m.get("seeds") or root).fail("nothing to probe: no seed lists and no services")
    tls: TLSOptions = d.get("tls", TLSOptions())
    if "tls" in m:
        services = _apply_sni_overrides(m["tls"], tls, services)
    swaps: SwapSettings = d.get("swaps", SwapSettings())
    if "swaps" in m:
        _check_swap_services(m["swaps"], swaps, services)
    resolvers: Resolvers = d.get("resolvers", Resolvers())
    _check_resolvable(m.get("resolvers") or root, resolvers, services)

    vantage = d.get("vantage", AgentConfig().vantage)
    if "control" in m and vantage.role == "control":
        # A control is the reference others are judged against; it judges alone.
        m["control"].fail("a vantage with role: control takes no control vantage of its own")

    default = AgentConfig()
    return AgentConfig(
        vantage=d.get("vantage", default.vantage),
        schedule=d.get("schedule", default.schedule),
        timeouts=d.get("timeouts", default.timeouts),
        resolvers=resolvers,
        tls=tls,
        swaps=swaps,
        seeds=_seed_names(m.get("seeds")),
        services=services,
        listen=d.get("listen", default.listen),
        archive=d.get("archive", default.archive),
        web=d.get("web", default.web),
        metrics=d.get("metrics", default.metrics),
        control=d.get("control"),
        log_format=d.get("log_format", default.log_format),
        source=file,
    )


# -- sections ---------------------------------------------------------------------------


def _vantage(n: Node) -> Vantage:
    m = n.mapping(_keys(Vantage))
    d = Vantage()
    name = (
        m["name"].matching(_VANTAGE_NAME, "a vantage name (letters, digits, . _ -)")
        if "name" in m
        else d.name
    )
    country = (
        m["country"].matching(_COUNTRY, "a two-letter upper-case country code (ISO 3166-1)")
        if "country" in m
        else d.country
    )
    asn = _asn(m["asn"]) if "asn" in m else d.asn
    role = m["role"].choice(VANTAGE_ROLES) if "role" in m else d.role
    return Vantage(name=name, country=country, asn=asn, role=role)  # type: ignore[arg-type]


def _asn(n: Node) -> str:
    value = n.as_str()
    match = _ASN.fullmatch(value)
    if match is None or int(match.group(1)) > 0xFFFFFFFF:
        n.fail(f"{value!r} is not an AS number like AS12389")
    return value


def _schedule(n: Node) -> Schedule:
    m = n.mapping(_keys(Schedule))
    d = Schedule()
    interval = m["interval_s"].seconds() if "interval_s" in m else d.interval_s
    jitter = m["jitter_s"].seconds(allow_zero=True) if "jitter_s" in m else d.jitter_s
    if jitter >= interval:
        # Jitter spreads rounds inside the interval; as large as the interval it
        # would let two rounds of the same target run back to back.
        (m.get("jitter_s") or m.get("interval_s") or n).fail(
            f"jitter_s ({jitter:g}) must be less than interval_s ({interval:g})"
        )
    return Schedule(
        interval_s=interval,
        jitter_s=jitter,
        min_spacing_s=(
            m["min_spacing_s"].seconds(allow_zero=True) if "min_spacing_s" in m else d.min_spacing_s
        ),
        concurrency=m["concurrency"].as_int(1) if "concurrency" in m else d.concurrency,
        per_destination=(
            m["per_destination"].as_int(1) if "per_destination" in m else d.per_destination
        ),
        batch_s=m["batch_s"].seconds(allow_zero=True) if "batch_s" in m else d.batch_s,
    )


def _timeouts(n: Node) -> Timeouts:
    m = n.mapping(_keys(Timeouts))
    return Timeouts(**{key: node.seconds() for key, node in m.items()})


def _resolvers(n: Node) -> Resolvers:
    m = n.mapping(_keys(Resolvers))
    d = Resolvers()

    def resolver(item: Node) -> HostPort:
        return _hostport(item, ip_only=True)

    return Resolvers(
        system=m["system"].as_bool() if "system" in m else d.system,
        udp=tuple(m["udp"].unique_list_of(resolver)) if "udp" in m else d.udp,
        tcp=tuple(m["tcp"].unique_list_of(resolver)) if "tcp" in m else d.tcp,
        doh=_doh(m["doh"]) if "doh" in m and not m["doh"].is_null else d.doh,
        reply_window_s=(
            m["reply_window_s"].seconds(allow_zero=True)
            if "reply_window_s" in m
            else d.reply_window_s
        ),
    )


def _doh(n: Node) -> str:
    value = n.as_str()
    parts = urlsplit(value)
    if parts.scheme != "https" or not parts.hostname:
        n.fail(f"{value!r} is not a DNS-over-HTTPS URL like https://1.1.1.1/dns-query")
    try:
        parts.port  # noqa: B018  # raises on a non-numeric or out-of-range port
    except ValueError:
        n.fail(f"{value!r} has an invalid port")
    return value


def _tls(n: Node, base_dir: Path) -> TLSOptions:
    m = n.mapping(_keys(TLSOptions))
    ca_file = None
    if "ca_file" in m and not m["ca_file"].is_null:
        ca_file = _existing_file(m["ca_file"], base_dir)
        _check_ca_file(m["ca_file"], ca_file)
    overrides = {}
    if "sni_overrides" in m:
        overrides = {
            key: node.hostname() for key, node in m["sni_overrides"].free_mapping().items()
        }
    return TLSOptions(ca_file=ca_file, sni_overrides=freeze(overrides))


def _swaps(n: Node) -> SwapSettings:
    m = n.mapping(_keys(SwapSettings))
    # a hostname: what the tls probe's ``sni`` param takes, so the swap's override
    # (parsed when the swap is planned, `probe.swaps`) cannot fail a round
    neutral = m["neutral_sni"].hostname() if "neutral_sni" in m else SwapSettings.neutral_sni
    per_service = {}
    if "per_service" in m:
        per_service = {
            key: node.hostname() for key, node in m["per_service"].free_mapping().items()
        }
    return SwapSettings(neutral_sni=neutral, per_service=freeze(per_service))


def _check_swap_services(
    swaps_node: Node, swaps: SwapSettings, services: tuple[Service, ...]
) -> None:
    """``swaps.per_service`` keys must name services that exist (a typo would silently
    send the default neutral name)."""
    if not swaps.per_service:
        return
    names = {s.name for s in services}
    nodes = swaps_node.mapping(_keys(SwapSettings))["per_service"].free_mapping()
    for key, node in nodes.items():
        if key not in names:
            _fail_key(node, f"no service named {key!r}{did_you_mean(key, names)}")


def _archive(n: Node, base_dir: Path) -> ArchiveSettings:
    m = n.mapping(_keys(ArchiveSettings))
    d = ArchiveSettings()
    path = d.path
    if "path" in m:
        path = None if m["path"].is_null else str(_relative(m["path"].nonempty_str(), base_dir))
        if path is not None:
            _check_directory(m["path"], Path(path))
    return ArchiveSettings(
        path=path,
        # below a few KiB the archive would rotate on nearly every round
        max_bytes=m["max_bytes"].as_int(4096) if "max_bytes" in m else d.max_bytes,
        keep=m["keep"].as_int(0) if "keep" in m else d.keep,
        compress=m["compress"].as_bool() if "compress" in m else d.compress,
    )


def _metrics(n: Node) -> MetricsSettings:
    m = n.mapping(_keys(MetricsSettings))
    return MetricsSettings(**{key: node.as_bool() for key, node in m.items()})


def _web(n: Node, base_dir: Path) -> WebSettings:
    m = n.mapping(_keys(WebSettings))
    files_ = {
        key: _existing_file(m[key], base_dir)
        for key in ("tls_cert_file", "tls_key_file")
        if key in m and not m[key].is_null
    }
    if len(files_) == 1:
        # one without the other cannot serve TLS; refuse rather than fall back to plain HTTP
        (missing,) = {"tls_cert_file", "tls_key_file"} - set(files_)
        n.fail(f"tls_cert_file and tls_key_file go together: {missing} is missing")
    if files_:
        _check_key_pair(m["tls_key_file"], files_["tls_cert_file"], files_["tls_key_file"])
    users = {}
    if "basic_auth_users" in m:
        for user, node in m["basic_auth_users"].free_mapping().items():
            users[user] = node.matching(_BCRYPT, "a bcrypt hash ($2b$...; never a plain password)")
    allowed: tuple[str, ...] = ()
    if "allowed_hosts" in m:
        allowed = tuple(m["allowed_hosts"].unique_list_of(lambda item: item.host()))
    return WebSettings(
        tls_cert_file=files_.get("tls_cert_file"),
        tls_key_file=files_.get("tls_key_file"),
        basic_auth_users=freeze(users),
        allowed_hosts=allowed,
        max_connections_per_client=(
            m["max_connections_per_client"].as_int(0)
            if "max_connections_per_client" in m
            else WebSettings.max_connections_per_client
        ),
    )


def _control(n: Node, base_dir: Path) -> ControlSettings:
    m = n.mapping(CONTROL_KEYS, required=("urls",))
    d = ControlSettings()
    urls = tuple(m["urls"].unique_list_of(_control_url, nonempty=True))
    ca_file = None
    if "ca_file" in m and not m["ca_file"].is_null:
        ca_file = _existing_file(m["ca_file"], base_dir)
        _check_ca_file(m["ca_file"], ca_file)
    auth_file, auth = None, None
    if "basic_auth_file" in m and not m["basic_auth_file"].is_null:
        auth_file = _existing_file(m["basic_auth_file"], base_dir)
        auth = _credentials(m["basic_auth_file"], Path(auth_file))
    poll = m["poll_interval_s"].seconds() if "poll_interval_s" in m else d.poll_interval_s
    max_age = m["max_age_s"].seconds() if "max_age_s" in m else d.max_age_s
    if max_age < poll:
        # Results would expire between two polls: half the time there would be no control.
        (m.get("max_age_s") or m["poll_interval_s"]).fail(
            f"max_age_s ({max_age:g}) must be at least poll_interval_s ({poll:g})"
        )
    return ControlSettings(
        urls=urls,
        ca_file=ca_file,
        basic_auth_file=auth_file,
        basic_auth=auth,
        poll_interval_s=poll,
        max_age_s=max_age,
        timeout_s=m["timeout_s"].seconds() if "timeout_s" in m else d.timeout_s,
        max_bytes=m["max_bytes"].as_int(1024) if "max_bytes" in m else d.max_bytes,
    )


def _control_url(n: Node) -> str:
    value = n.as_str()
    parts = urlsplit(value)
    if parts.scheme not in ("http", "https") or not parts.hostname:
        n.fail(
            f"{value!r} is not a control agent URL like https://control.example:9464/api/results"
        )
    if parts.username is not None or parts.password is not None:
        n.fail("credentials never go in the URL: put USER:PASSWORD in control.basic_auth_file")
    try:
        parts.port  # noqa: B018  # raises on a non-numeric or out-of-range port
    except ValueError:
        n.fail(f"{value!r} has an invalid port")
    return value


def _credentials(n: Node, path: Path) -> tuple[str, str]:
    """USER:PASSWORD, the first line of the file.  Errors never quote the file's content."""
    try:
        line = path.read_text(encoding="utf-8").splitlines()[0] if path.stat().st_size else ""
    except (OSError, UnicodeDecodeError) as exc:
        n.fail(f"cannot read {path}: {type(exc).__name__}")
    user, sep, password = line.strip().partition(":")
    if not sep or not user or not password:
        n.fail(f"{path}: the first line must be USER:PASSWORD")
    return user, password


def _existing_file(n: Node, base_dir: Path) -> str:
    path = _relative(n.nonempty_str(), base_dir)
    if not path.is_file():
        n.fail(f"not a regular file: {path}" if path.exists() else f"no such file: {path}")
    return str(path)


# What a config points at is loaded here, not where it is used: a CA file that is not one
# made every TLS probe fail as ssl_failed_handshake (which reads as TLS blocking) after
# check-config and a reload had accepted it.


def _check_ca_file(n: Node, path: str) -> None:
    """The CA file must hold PEM certificates that OpenSSL accepts as trust anchors."""
    try:
        ssl.create_default_context().load_verify_locations(cafile=path)
    except ssl.SSLError as exc:
        n.fail(f"{path}: not a PEM CA certificate file ({exc.reason or 'malformed PEM'})")
    except OSError as exc:
        n.fail(f"{path}: cannot read: {exc.strerror}")


def _no_password() -> bytes:
    raise ValueError("encrypted")


def _check_key_pair(n: Node, cert: str, key: str) -> None:
    """The web certificate and key must load together, as the HTTP server loads them."""
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    try:
        context.load_cert_chain(cert, key, password=_no_password)
    except ValueError:  # asked for a password: the agent has none to give (and no prompt)
        n.fail(f"{key}: an encrypted private key is not supported")
    except ssl.SSLError as exc:
        if exc.reason == "KEY_VALUES_MISMATCH":
            n.fail(f"{key} is not the private key of {cert}")
        reason = exc.reason or "malformed PEM"
        n.fail(f"{cert} and {key}: not a PEM certificate and private key ({reason})")
    except OSError as exc:
        n.fail(f"cannot read {cert} or {key}: {exc.strerror}")


def _check_directory(n: Node, path: Path) -> None:
    """A directory the agent can write into, or one it can create (its nearest existing
    ancestor is a writable directory)."""
    existing = path
    while not existing.exists() and existing.parent != existing:
        existing = existing.parent
    if not existing.is_dir():
        what = "" if existing == path else f" (it would go under {existing}, a file)"
        n.fail(f"{path}: not a directory{what}")
    if not os.access(existing, os.W_OK | os.X_OK):
        what = "" if existing == path else f" (cannot create it under {existing})"
        n.fail(f"{path}: not writable{what}")


def _listen(n: Node) -> HostPort:
    """HOST:PORT where HOST is an address of this machine (or a wildcard).  Only the
    address is checked here: whether the port is free can change until the agent starts."""
    listen = _hostport(n, ip_only=False)
    host = listen.host
    if host in ("0.0.0.0", "::"):
        return listen  # every address: nothing to check
    try:
        infos = socket.getaddrinfo(host, 0, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)
    except socket.gaierror:
        n.fail(f"{str(listen)!r}: {host!r} does not resolve")
    for family, kind, proto, _, address in infos:
        with socket.socket(family, kind, proto) as sock:
            try:
                sock.bind(address)
            except OSError as exc:
                if exc.errno == errno.EADDRNOTAVAIL:
                    n.fail(f"{str(listen)!r}: {host} is not an address of this machine")
                n.fail(f"{str(listen)!r}: cannot listen on {host}: {exc.strerror}")
    return listen


def _relative(value: str, base_dir: Path) -> Path:
    path = Path(value).expanduser()
    return path if path.is_absolute() else base_dir / path


def _hostport(n: Node, *, ip_only: bool) -> HostPort:
    """``host:port`` or ``[v6]:port``; resolver hosts must be IP literals."""
    value = n.as_str()
    bracketed = _BRACKETED.fullmatch(value)
    if bracketed:
        host, port_text = bracketed.groups()
        if not _is_ipv6(host):
            n.fail(f"{value!r}: only IPv6 addresses go in brackets")
    elif value.count(":") == 1:
        host, port_text = value.split(":")
    elif _is_ipv6(value):
        n.fail(f"{value!r}: an IPv6 address needs brackets and a port: [ADDRESS]:PORT")
    else:
        n.fail(f"{value!r} is not HOST:PORT (IPv6 as [ADDRESS]:PORT)")
    if not port_text.isdigit() or not 1 <= int(port_text) <= 65535:
        n.fail(f"{value!r}: port must be a number in 1..65535")
    if ip_only and not _is_ip(host):
        n.fail(f"{value!r}: the host must be an IP address (a resolver cannot be looked up)")
    if not ip_only and not (_is_ip(host) or is_hostname(host)):
        n.fail(f"{value!r}: {host!r} is neither an IP address nor a hostname")
    return HostPort(host, int(port_text))


def _is_ip(value: str) -> bool:
    try:
        ipaddress.ip_address(value)
    except ValueError:
        return False
    return True


def _is_ipv6(value: str) -> bool:
    return ":" in value and _is_ip(value)


# -- seeds and services -----------------------------------------------------------------


def _seed_names(n: Node | None) -> tuple[str, ...]:
    return DEFAULT_SEEDS if n is None else tuple(item.as_str() for item in n.sequence())


def _load_seeds(
    n: Node | None, base_dir: Path, probes: ProbeTypes, plain: bool
) -> tuple[Service, ...]:
    shipped = shipped_seeds()
    if n is None:
        return tuple(_load_resource(shipped[name], probes, plain) for name in DEFAULT_SEEDS)
    services: list[Service] = []
    seen: dict[str, Node] = {}
    for item in n.sequence():
        value = item.nonempty_str()
        if value in seen:
            item.fail(f"duplicate seed list {value!r} (first at line {seen[value].line})")
        seen[value] = item
        resource = _seed_resource(item, value, shipped, base_dir)
        if isinstance(resource, Path):
            service = read_seed_file(resource, probes, plain)
        else:
            service = _load_resource(resource, probes, plain)
        _check_new_service(item, f"{item.path}", service, services)
        services.append(service)
    return tuple(services)


def _seed_resource(
    item: Node, value: str, shipped: dict[str, Traversable], base_dir: Path
) -> Traversable | Path:
    """A shipped list by name, else a file path relative to the config's directory."""
    if value in shipped:
        return shipped[value]
    if "/" not in value and not value.endswith((".yaml", ".yml")):
        item.fail(
            f"unknown seed list {value!r}{did_you_mean(value, shipped)} "
            f"(shipped: {', '.join(shipped)}; a file path must contain / or end in .yaml)"
        )
    path = _relative(value, base_dir)
    if not path.is_file():
        item.fail(f"no such seed file: {path}")
    return path


def _user_services(n: Node, probes: ProbeTypes) -> tuple[Service, ...]:
    return tuple(decode_service(item, origin=item.file, probes=probes) for item in n.sequence())


def _merge(
    seeded: tuple[Service, ...], n: Node | None, extra: tuple[Service, ...]
) -> tuple[Service, ...]:
    """Seed services then the config's own; a service id may be defined only once."""
    services = list(seeded)
    items = n.sequence() if n is not None else []
    for item, service in zip(items, extra, strict=True):
        _check_new_service(item, f"{item.path}.service", service, services)
        services.append(service)
    return tuple(services)


def _check_new_service(item: Node, field: str, service: Service, services: list[Service]) -> None:
    for other in services:
        if other.name == service.name:
            raise ConfigError(
                item.file,
                item.line,
                field,
                f"service {service.name!r} is already defined (in {other.origin})",
            )


def _apply_sni_overrides(
    tls_node: Node, tls: TLSOptions, services: tuple[Service, ...]
) -> tuple[Service, ...]:
    """Set ``Endpoint.sni`` from ``tls.sni_overrides`` (keyed by endpoint name)."""
    if not tls.sni_overrides:
        return services
    names = {ep.name for s in services for ep in s.endpoints}
    nodes = tls_node.mapping(_keys(TLSOptions))["sni_overrides"].free_mapping()
    for key, node in nodes.items():
        if key not in names:
            _fail_key(node, f"no endpoint named {key!r}{did_you_mean(key, names)}")
    return tuple(
        dataclasses.replace(
            s,
            endpoints=tuple(
                dataclasses.replace(ep, sni=tls.sni_overrides[ep.name])
                if ep.name in tls.sni_overrides
                else ep
                for ep in s.endpoints
            ),
        )
        for s in services
    )


def _fail_key(node: Node, message: str) -> None:
    raise ConfigError(node.file, node.line, node.path, message)  # a mapping value: its key's line


def _check_resolvable(where: Node, resolvers: Resolvers, services: tuple[Service, ...]) -> None:
    """Hostname endpoints need some resolver; an all-off resolver section is a mistake."""
    if resolvers.system or resolvers.udp or resolvers.tcp or resolvers.doh:
        return
    if any(not ep.is_ip_literal for s in services for ep in s.endpoints):
        where.fail(
            "no resolver configured (system is false, udp/tcp/doh empty) "
            "but some endpoints are hostnames"
        )
