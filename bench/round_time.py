"""Round time: `probe once` over 100 / 1,000 / 5,000 TCP targets with a share silent.

Targets are distinct loopback addresses in a private network namespace; every
``--silent-every``-th one has its SYNs dropped, so its probe waits the whole connect
timeout, and so does its ``tcp/repeat`` (the design repeats every failure on a fresh
connection, `probe.swaps`).  Printed beside the measured wall time:

- ``bound_s``: ceil(silent probes incl. repeats / concurrency) x timeout, what the silent
  share must cost at this concurrency (the working targets take ~no time on loopback);
- ``naive_s``: ceil(all probes incl. repeats / concurrency) x timeout, the figure for a
  prober that waits out the timeout on every target;
- startup: the same command with one target (interpreter, imports, config, the gate),
  and the whole process's CPU per probe.

    sudo .venv/bin/python bench/round_time.py            # 100, 1000, 5000 targets
    sudo .venv/bin/python bench/round_time.py --smoke    # seconds, for CI
"""

from __future__ import annotations

import argparse
import math
import tempfile
from pathlib import Path
from typing import Any

from common import (
    Acceptor,
    agent_config,
    drop_to,
    emit,
    enter_private_netns,
    free_port,
    probe_once,
    tcp_endpoints,
)


def measure(n: int, every: int, concurrency: int, timeout_s: float, tmp: Path) -> dict[str, Any]:
    server = Acceptor()

    def config(count: int) -> Path:
        return agent_config(
            tmp / f"once-{count}.yaml",
            tcp_endpoints(count, server.port, silent_every=every),
            listen_port=free_port(),
            control_port=server.port,
            concurrency=concurrency,
            connect_s=timeout_s,
        )

    base_wall, base_cpu = probe_once(config(1))
    wall, cpu = probe_once(config(n))
    silent = n // every
    probes = n + silent  # every failure is repeated once
    return {
        "bench": "round_time",
        "targets": n,
        "silent": silent,
        "concurrency": concurrency,
        "timeout_s": timeout_s,
        "wall_s": round(wall, 2),
        "startup_s": round(base_wall, 2),
        "bound_s": math.ceil(2 * silent / concurrency) * timeout_s,
        "naive_s": math.ceil(probes / concurrency) * timeout_s,
        "over_bound_s": round(
            wall - base_wall - math.ceil(2 * silent / concurrency) * timeout_s, 2
        ),
        "cpu_s": round(cpu, 2),
        "cpu_us_per_probe": round(1e6 * (cpu - base_cpu) / probes, 1),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--targets", default="100,1000,5000")
    parser.add_argument("--silent-every", type=int, default=10, help="1 in N targets silent")
    parser.add_argument("--concurrency", type=int, default=20)
    parser.add_argument("--timeout", type=float, default=1.0, help="connect timeout, seconds")
    parser.add_argument("--smoke", action="store_true", help="a few seconds, for CI")
    args = parser.parse_args()
    if args.smoke:
        args.targets, args.timeout = "30", 0.5
    enter_private_netns()
    drop_to("127.20.0.0/16")
    with tempfile.TemporaryDirectory(prefix="bench-round-") as tmp:
        for n in (int(x) for x in args.targets.split(",")):
            emit(measure(n, args.silent_every, args.concurrency, args.timeout, Path(tmp)))


if __name__ == "__main__":
    main()
