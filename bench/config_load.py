"""Config loading cost per endpoint, in CPU time: `load_config` and its YAML parse alone.

Writes a config with N endpoints in the seed schema (flow style, as a generated list
would be) and loads it with `probe.config.loader.load_config` several times, timing each
load with ``time.process_time`` (CPU of this process, so other work on a shared machine
does not count) and printing the minimum, per endpoint, for:

- the full load as the agent does it: libyaml's events read as plain data
  (`strict_yaml.read_plain`), then decoded and validated;
- a load with positions: PyYAML's node tree from libyaml (what a file with an error
  costs: the plain read fails, then this one runs and reports it);
- the pure-Python PyYAML fallback (PyYAML without libyaml: the node tree, in Python);
- the YAML parse alone: plain data from libyaml's events, ``yaml.compose`` with
  libyaml, ``yaml.compose`` in pure Python.

Target (issue 13): full load <= 50 us per endpoint.  No network.  ``--smoke`` runs a
tiny size once, so CI keeps this script working.

    python bench/config_load.py [--endpoints 2000] [--repeat 7] [--smoke]
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import yaml

import probe.config.strict_yaml as strict_yaml
from probe.agent_config import load_config

TARGET_US = 50.0


def write_config(path: Path, endpoints: int) -> Path:
    """A valid config with ENDPOINTS endpoints spread over services of 500."""
    lines = [
        "vantage: {name: bench, country: ZZ, asn: AS64500, role: test}",
        "resolvers: {system: false, udp: ['127.0.0.1:53']}",
        "seeds: []",
        "archive: {path: null}",
        "services:",
    ]
    for i in range(endpoints):
        if i % 500 == 0:
            lines += [f"  - service: s{i // 500}", "    source: bench", "    endpoints:"]
        a, b = divmod(i, 250)
        lines.append(
            f"      - {{name: e{i}, host: 10.{a // 250}.{a % 250}.{b + 1}, ports: [443, 80],"
            " role: signalling, probes: [tcp, tls], source: bench, confidence: C}"
        )
    path.write_text("\n".join(lines) + "\n")
    return path


def cpu_us(run: Callable[[], Any], endpoints: int, repeat: int) -> float:
    """The least CPU time of REPEAT runs, in microseconds per endpoint."""
    best = float("inf")
    for _ in range(repeat):
        started = time.process_time()
        run()
        best = min(best, time.process_time() - started)
    return best / endpoints * 1e6


@contextmanager
def patched(**values: Any) -> Iterator[None]:
    """`strict_yaml` module attributes set for a while (the bench's switches)."""
    saved = {name: getattr(strict_yaml, name) for name in values}
    for name, value in values.items():
        setattr(strict_yaml, name, value)
    try:
        yield
    finally:
        for name, value in saved.items():
            setattr(strict_yaml, name, value)


def load_us(path: Path, endpoints: int, repeat: int) -> float:
    config = load_config(path)  # untimed: the first load imports the probe registry
    assert sum(len(s.endpoints) for s in config.services) == endpoints
    return cpu_us(lambda: load_config(path), endpoints, repeat)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    parser.add_argument("--endpoints", type=int, default=2000)
    parser.add_argument("--repeat", type=int, default=7)
    parser.add_argument("--smoke", action="store_true", help="tiny and once (for CI)")
    args = parser.parse_args(argv)
    endpoints, repeat = (50, 1) if args.smoke else (args.endpoints, args.repeat)
    c_loader = strict_yaml._FAST_LOADER
    with tempfile.TemporaryDirectory() as tmp:
        path = write_config(Path(tmp) / "bench.yaml", endpoints)
        text = path.read_text()
        print(f"config: {endpoints} endpoints, {len(text)} bytes; CPU time, min of {repeat}")
        slow = load_us(path, endpoints, repeat)
        with patched(_FAST_LOADER=None):
            pure = load_us(path, endpoints, repeat)
            parse_pure = cpu_us(lambda: yaml.compose(text, Loader=yaml.SafeLoader), endpoints, 1)
        if c_loader is None:
            print("libyaml: not available in this PyYAML; every figure is pure Python")
            print(f"load_config: {slow:.1f} us/endpoint")
            print(f"of which the YAML parse alone (yaml.compose): {parse_pure:.1f} us/endpoint")
            return 0
        fast = slow
        with patched(read_plain=lambda _text: strict_yaml._UNREAD):
            positioned = load_us(path, endpoints, repeat)
        parse_plain = cpu_us(lambda: strict_yaml.read_plain(text), endpoints, repeat)
        parse_tree = cpu_us(lambda: yaml.compose(text, Loader=c_loader), endpoints, repeat)
    verdict = "meets" if fast <= TARGET_US else "misses"
    print(
        f"load_config, libyaml plain data: {fast:.1f} us/endpoint ({verdict} target {TARGET_US:g})"
    )
    print(
        "load_config with positions (libyaml node tree; what a file with an error costs): "
        f"{positioned:.1f} us/endpoint"
    )
    print(
        "load_config in pure Python (PyYAML without libyaml): "
        f"{pure:.1f} us/endpoint ({pure / fast:.1f}x)"
    )
    print(
        f"YAML parse alone: libyaml plain data {parse_plain:.1f}, libyaml yaml.compose "
        f"{parse_tree:.1f}, pure Python yaml.compose {parse_pure:.1f} us/endpoint"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
