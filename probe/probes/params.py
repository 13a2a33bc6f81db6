"""Probe parameters: one pure validator per probe, run by the config loader and by the probe.

A probe's params are whatever a ``probes:`` item of a seed or config carries besides
``ports`` (plain YAML data: str, int, float, bool, None, tuples, read-only mappings).
Each probe module exposes a validator ``Callable[[Mapping[str, Any]], object]``
(listed in `probe.probes.PARAMS`) that returns the parsed params or raises
`ParamError` naming the offending key.  The loader calls it for every probe spec,
so a typo fails ``probe check-config`` with the key's file and line instead of
every round at probe time; the probe calls the same function, so the two can
never disagree about what is valid.

The helpers here keep the messages uniform (``must be ...``, ``got ...``) and never
raise anything but `ParamError`, whatever data they are handed.
"""

from __future__ import annotations

import ipaddress
import math
from collections.abc import Callable, Collection, Mapping
from typing import Any

from ..config.strict_yaml import did_you_mean, is_hostname

__all__ = [
    "ParamError",
    "ParamValidator",
    "alpn_param",
    "check_keys",
    "no_params",
    "number_param",
    "shown",
    "sni_param",
]

ParamValidator = Callable[[Mapping[str, Any]], object]

_MAX_ALPN_ID = 255  # RFC 7301 3.1: a protocol name is 1..255 bytes


class ParamError(ValueError):
    """An invalid probe parameter.

    ``key`` names the parameter (None: the params as a whole); ``message`` says what is
    wrong without repeating the key, so the loader can print it after the key's field
    path (``endpoints[3].probes[1].transfer.max_bytes: must be ...``).
    """

    def __init__(self, probe: str, key: str | None, message: str) -> None:
        super().__init__(f"{probe}: {key}: {message}" if key is not None else f"{probe}: {message}")
        self.probe = probe
        self.key = key
        self.message = message


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


def no_params(probe: str) -> ParamValidator:
    """The validator of a probe that takes no params: any key is an error."""

    def validate(params: Mapping[str, Any]) -> None:
        for key in params:
            name = str(key)
            raise ParamError(probe, name, f"unknown param {name!r} ({probe} takes no params)")

    validate.__name__ = f"{probe}_params"
    validate.__doc__ = f"The {probe} probe takes no params: reject any key."
    return validate


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


def sni_param(probe: str, params: Mapping[str, Any]) -> str | None:
    """``params.sni``: a hostname, an IP literal (then no SNI is sent) or null (send none)."""
    value = params.get("sni")
    if value is None:
        return None
    if isinstance(value, str) and (is_hostname(value) or _is_ip(value)):
        return value
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
