"""The agent's config loading: `probe.config` bound to the probe registry.

`probe.config` knows no probe type: it sits below `probe.probes` (whose modules read its
settings) and takes the probe types a file may name, with their params parsers, from
its caller.  This module hands it `probe.probes.REGISTRY`; the command line, the daemon
and the tests load configs and seed lists through it.
"""

from __future__ import annotations

from collections.abc import Collection
from pathlib import Path

from .config import loader, seeds
from .config.seeds import ProbeTypes
from .config.settings import AgentConfig
from .model import Service
from .probes import REGISTRY

__all__ = ["known_probes", "load_config", "load_seed_file", "load_shipped", "probe_types"]


def probe_types(probe_names: Collection[str] | None = None) -> ProbeTypes:
    """The registry's probe types, restricted to ``probe_names`` if given."""
    return ProbeTypes.of(REGISTRY, probe_names)


def known_probes() -> frozenset[str]:
    """Probe names a config may use: the keys of `probe.probes.REGISTRY`."""
    return frozenset(REGISTRY)


def load_config(
    path: str | Path | None = None, *, probe_names: Collection[str] | None = None
) -> AgentConfig:
    """`probe.config.loader.load_config` with the registry's probe types (``probe_names``
    restricts them)."""
    return loader.load_config(path, probes=probe_types(probe_names))


def load_seed_file(
    path: str | Path, *, probe_names: Collection[str] | None = None, file: str | None = None
) -> Service:
    """`probe.config.seeds.load_seed_file` with the registry's probe types."""
    return seeds.load_seed_file(path, probe_types(probe_names), file=file)


def load_shipped(name: str, *, probe_names: Collection[str] | None = None) -> Service:
    """`probe.config.seeds.load_shipped` with the registry's probe types."""
    return seeds.load_shipped(name, probe_types(probe_names))
