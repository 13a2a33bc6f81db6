"""Config loading cost per endpoint: libyaml (`yaml.CSafeLoader`) vs pure-Python PyYAML.

Writes a config with N endpoints in the seed schema (flow style, as a generated list
would be), loads it with `probe.config.loader.load_config` several times with each parser and
prints the median time per endpoint.  Target (issue 13): <= 50 us per endpoint.  No
network.  ``--smoke`` runs a tiny size once, so CI keeps this script working.

    python bench/config_load.py [--endpoints 2000] [--repeat 5] [--smoke]
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import yaml

import probe.config.strict_yaml
from probe.config.loader import load_config

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


def per_endpoint_us(path: Path, endpoints: int, repeat: int, fast: bool) -> float:
    saved = probe.config.strict_yaml._FAST_LOADER
    if not fast:
        probe.config.strict_yaml._FAST_LOADER = None
    try:
        load_config(path)  # untimed: the first load imports the probe registry
        times = []
        for _ in range(repeat):
            started = time.perf_counter()
            config = load_config(path)
            times.append(time.perf_counter() - started)
        assert sum(len(s.endpoints) for s in config.services) == endpoints
    finally:
        probe.config.strict_yaml._FAST_LOADER = saved
    return statistics.median(times) / endpoints * 1e6


def parse_us(path: Path, endpoints: int, repeat: int, loader: type[yaml.SafeLoader]) -> float:
    """The YAML parse alone (``yaml.compose``), without decoding and validation."""
    text = path.read_text()
    times = []
    for _ in range(repeat):
        started = time.perf_counter()
        yaml.compose(text, Loader=loader)
        times.append(time.perf_counter() - started)
    return statistics.median(times) / endpoints * 1e6


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--endpoints", type=int, default=2000)
    parser.add_argument("--repeat", type=int, default=5)
    parser.add_argument("--smoke", action="store_true", help="tiny and once (for CI)")
    args = parser.parse_args(argv)
    endpoints, repeat = (50, 1) if args.smoke else (args.endpoints, args.repeat)
    with tempfile.TemporaryDirectory() as tmp:
        path = write_config(Path(tmp) / "bench.yaml", endpoints)
        size = path.stat().st_size
        print(f"config: {endpoints} endpoints, {size} bytes, median of {repeat}")
        has_c = probe.config.strict_yaml._FAST_LOADER is not None
        fast = per_endpoint_us(path, endpoints, repeat, fast=True) if has_c else None
        slow = per_endpoint_us(path, endpoints, repeat, fast=False)
        c_loader = probe.config.strict_yaml._FAST_LOADER
        parse_fast = parse_us(path, endpoints, repeat, c_loader) if c_loader else None
        parse_slow = parse_us(path, endpoints, repeat, yaml.SafeLoader)
    if fast is not None:
        verdict = "meets" if fast <= TARGET_US else "misses"
        print(f"libyaml (CSafeLoader): {fast:.1f} us/endpoint ({verdict} target {TARGET_US:g})")
        print(f"pure Python (SafeLoader): {slow:.1f} us/endpoint ({slow / fast:.1f}x libyaml)")
        assert parse_fast is not None
        print(
            f"of which the YAML parse alone: libyaml {parse_fast:.1f}, pure Python "
            f"{parse_slow:.1f} us/endpoint ({parse_slow / parse_fast:.1f}x)"
        )
    else:
        print("libyaml: not available in this PyYAML")
        print(f"pure Python (SafeLoader): {slow:.1f} us/endpoint")
        print(f"of which the YAML parse alone: {parse_slow:.1f} us/endpoint")
    return 0


if __name__ == "__main__":
    sys.exit(main())
