"""Probe parameters: the typed params base, and the helpers every probe's parser uses.

A probe's params are whatever a ``probes:`` item of a seed or config carries besides
``ports`` (plain YAML data: str, int, float, bool, None, tuples, read-only mappings).
Each probe has one frozen dataclass of params (a `probe.model.ProbeParams`) whose
``parse`` returns it or raises `ParamError` naming the offending key (defined beside
`ProbeParams` in `probe.model`: the config loader catches it and imports no probe).  The
config loader parses every probe spec once, at load time, so a typo fails ``probe
check-config`` with the key's file and line instead of every round at probe time, and the
probe then reads typed attributes.  A follow-up's overrides go through the same ``parse``, over the
spec's params (``base``), when the follow-up is planned.

The helpers here keep the messages uniform (``must be ...``, ``got ...``) and never
raise anything but `ParamError`, whatever data they are handed.
"""

from __future__ import annotations

import ipaddress
import math
from collections.abc import Collection, Mapping
from dataclasses import dataclass
from typing import Any, Protocol, Self

from ..config.strict_yaml import did_you_mean, is_hostname
from ..model import ParamError, ProbeParams

__all__ = [
    "NoParams",
    "ParamError",
    "ProbeParams",
    "SniParams",
    "alpn_param",
    "bool_param",
    "check_keys",
    "number_param",
    "shown",
    "sni_param",
]

_MAX_ALPN_ID = 255  # RFC 7301 3.1: a protocol name is 1..255 bytes


def shown(value: object) -> str:
    """A value as written in YAML, short: ``'x'``, ``3``, ``true``, ``null``, ``a list``."""
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, str | int | float):
        text = repr(value)
        return text if len(text) <= 60 else text[:57] + "..."
    if isinstance(value, Mapping):
        return "a mapping"
    if isinstance(value, list | tuple):
        # a short list of scalars reads best as written: [6, 256]
        if len(value) <= 4 and all(v is None or isinstance(v, str | int | float) for v in value):
            text = "[" + ", ".join(shown(v) for v in value) + "]"
            if len(text) <= 60:
                return text
        return "a list"
    return f"a {type(value).__name__}"


def check_keys(probe: str, params: Mapping[str, Any], known: Collection[str]) -> None:
    """Reject the first key (in file order) that is not one of ``known``."""
    for key in params:
        if key not in known:
            name = str(key)
            raise ParamError(
                probe,
                name,
                f"unknown param {name!r}{did_you_mean(name, known)} "
                f"(known: {', '.join(sorted(known))})",
            )


@dataclass(frozen=True)
class NoParams(ProbeParams):
    """The params of a probe that takes none (a subclass per probe names it): any key is
    an error."""

    @classmethod
    def parse(cls, params: Mapping[str, Any], base: Self | None = None) -> Self:
        for key in params:
            name = str(key)
            raise ParamError(
                cls.PROBE, name, f"unknown param {name!r} ({cls.PROBE} takes no params)"
            )
        return base if base is not None else cls()


class SniParams(Protocol):
    """Params with an ``sni`` override (tls, quic, transfer; see `tls.server_names`)."""

    @property
    def sni(self) -> str | None: ...  # what to send (an IP literal: none, verify the IP)

    @property
    def sni_given(self) -> bool: ...  # False: the endpoint's name; True: ``sni`` (null too)


def number_param(
    probe: str,
    params: Mapping[str, Any],
    key: str,
    default: float,
    low: float,
    high: float,
    *,
    integer: bool = False,
) -> float:
    """``params[key]`` (or ``default``): a finite number (an integer if asked) in [low, high]."""
    value = params.get(key, default)
    kinds = (int,) if integer else (int, float)
    # bool is an int subclass, and `true` for a count is a mistake, not 1
    if (
        isinstance(value, bool)
        or not isinstance(value, kinds)
        or (isinstance(value, float) and not math.isfinite(value))
        or not low <= value <= high
    ):
        what = "an integer" if integer else "a number"
        raise ParamError(
            probe, key, f"must be {what} in [{_num(low)}, {_num(high)}], got {shown(value)}"
        )
    return value


def _num(x: float) -> str:
    """A bound as a person writes it: 1073741824, not 1.07374e+09; 0.1, not 0.1000."""
    return str(int(x)) if float(x).is_integer() else repr(float(x))


def bool_param(probe: str, params: Mapping[str, Any], key: str, default: bool) -> bool:
    """``params[key]`` (or ``default``): true or false, nothing YAML might read as one."""
    value = params.get(key, default)
    if not isinstance(value, bool):
        raise ParamError(probe, key, f"must be true or false, got {shown(value)}")
    return value


def sni_param(
    probe: str, params: Mapping[str, Any], base: SniParams | None = None
) -> tuple[str | None, bool]:
    """``params.sni`` as (sni, given): a hostname, an IP literal (then no SNI is sent) or
    null (send none); not given: ``base``'s choice, else the endpoint's name."""
    if "sni" not in params:
        return (base.sni, base.sni_given) if base is not None else (None, False)
    value = params["sni"]
    if value is None or (isinstance(value, str) and (is_hostname(value) or _is_ip(value))):
        return value, True
    raise ParamError(probe, "sni", f"must be a hostname, an IP address or null, got {shown(value)}")


def alpn_param(probe: str, params: Mapping[str, Any], default: tuple[str, ...]) -> tuple[str, ...]:
    """``params.alpn``: one protocol name or a list of them (``[]`` offers none)."""
    value = params.get("alpn", default)
    names = (value,) if isinstance(value, str) else value
    if isinstance(names, list | tuple) and all(_is_alpn_id(n) for n in names):
        return tuple(names)
    raise ParamError(
        probe,
        "alpn",
        f"must be a protocol name or a list of them (e.g. [h2, http/1.1]), got {shown(value)}",
    )


def _is_alpn_id(name: object) -> bool:
    # ssl and aioquic encode the names as ASCII; printable keeps a typo'd control
    # character out of the ClientHello
    return (
        isinstance(name, str)
        and 0 < len(name) <= _MAX_ALPN_ID
        and name.isascii()
        and name.isprintable()
    )


def _is_ip(value: str) -> bool:
    try:
        ipaddress.ip_address(value)
    except ValueError:
        return False
    return True
