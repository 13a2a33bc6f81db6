"""`/metrics` render cost in-process: CPU of the daemon's renderer at N endpoints.

Builds the store the daemon would hold after one round of N IP-literal TCP endpoints (1 in
20 failing, verdicts judged), then times `TextRenderer.render` (what `/metrics` serves):
the first render (every series formatted), and renders after a quarter of the endpoints
got a new round (what a 15 s scrape finds at a 60 s interval).  CPU seconds of this
process, median of ``--repeat``.  No network, no root.  The HTTP figure (render plus
transfer, with probes running beside it) is `daemon_footprint.py`'s.

    .venv/bin/python bench/render_cost.py                 # 1,000 / 5,000 / 10,000 endpoints
    .venv/bin/python bench/render_cost.py --smoke         # a second, for CI
"""

from __future__ import annotations

import argparse
import json
import random
import statistics
import sys
import time
from datetime import UTC, datetime, timedelta
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from probe.config.settings import MetricsSettings
from probe.exporter import TextRenderer
from probe.model import Endpoint, Operation, ProbeResult, ProbeSpec, Target
from probe.results import ResultStore
from probe.verdict.aggregate import judge_round

T0 = datetime(2026, 1, 1, tzinfo=UTC)


def _target(i: int) -> Target:
    host = f"10.{i // 62500}.{i // 250 % 250}.{i % 250 + 1}"
    ep = Endpoint(
        service="bench",
        name=f"e{i}",
        host=host,
        ports=(443,),
        transport="tcp",
        role="signalling",
        probes=(ProbeSpec("tcp"),),
        source="bench",
        confidence="C",
    )
    return Target(ep, "tcp", host, 443, address_source="literal")


def _round(target: Target, i: int, minute: int, rng: random.Random) -> list[ProbeResult]:
    at = T0 + timedelta(minutes=minute, seconds=rng.random())
    if i % 20 == 19:
        phases = {"connect": 2.0}
        return [
            ProbeResult(target, False, at, 2.0, "generic_timeout_error", Operation.CONNECT, phases)
        ]
    rtt = 0.00005 + rng.random() / 10_000
    return [ProbeResult(target, True, at, rtt * 2, phases={"connect": rtt * 2, "connect_rtt": rtt})]


def measure(n: int, repeat: int) -> dict[str, object]:
    rng = random.Random(n)
    targets = [_target(i) for i in range(n)]
    store = ResultStore(series_latency=False)
    for i, t in enumerate(targets):
        store.record_round(_round(t, i, 0, rng))
    store.set_verdicts(judge_round(store.snapshot().results.values()))
    renderer = TextRenderer(store, MetricsSettings)
    started = time.process_time()
    body = renderer.render()
    first = time.process_time() - started
    incremental = []
    for minute in range(1, repeat + 1):
        for i in rng.sample(range(n), n // 4):
            store.record_round(_round(targets[i], i, minute, rng))
        store.snapshot()  # the maps' copy is the store's cost, made once per change
        started = time.process_time()
        body = renderer.render()
        incremental.append(time.process_time() - started)
    series = sum(1 for line in body.splitlines() if line and not line.startswith(b"#"))
    return {
        "bench": "render_cost",
        "endpoints": n,
        "series": series,
        "bytes": len(body),
        "first_render_cpu_s": round(first, 4),
        "quarter_changed_render_cpu_s": round(statistics.median(incremental), 4),
        "repeat": repeat,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--endpoints", default="1000,5000,10000")
    parser.add_argument("--repeat", type=int, default=5)
    parser.add_argument("--smoke", action="store_true", help="a second, for CI")
    args = parser.parse_args()
    if args.smoke:
        args.endpoints, args.repeat = "40", 1
    for n in (int(x) for x in args.endpoints.split(",")):
        print(json.dumps(measure(n, args.repeat), sort_keys=True), flush=True)


if __name__ == "__main__":
    main()
