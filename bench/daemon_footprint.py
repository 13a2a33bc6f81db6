"""Daemon footprint: `probe run` with N TCP endpoints on loopback, interval 60 s.

For each N it starts the agent, lets the first round (spread over the jitter) finish,
then measures over a window: CPU as a share of one core, RSS, schedule lag (the agent's
own `probe_schedule_lag_recent_seconds`, over the last 1,024 round starts), the time to
render `/metrics` (a request after the one-second render cache expired), its series
count and size, and how far the loop-timed `connect` of the latest results sits above the
kernel's `connect_rtt` (loopback: the truth is ~0.05 ms).  A share of the endpoints is
silent (SYNs dropped) so rounds also carry timeouts.

    sudo .venv/bin/python bench/daemon_footprint.py            # 1,000 and 5,000 endpoints
    sudo .venv/bin/python bench/daemon_footprint.py --smoke    # seconds, for CI
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path
from typing import Any

from common import (
    Acceptor,
    agent_config,
    cpu_s,
    drop_to,
    emit,
    enter_private_netns,
    free_port,
    get,
    median,
    pct,
    rss_mib,
    sample,
    start_agent,
    stop,
    tcp_endpoints,
    wait_http,
)


def measure(
    n: int, interval_s: float, window_s: float, workdir: Path, batch_s: float | None
) -> dict[str, Any]:
    acceptor = Acceptor()
    port = free_port()
    config = agent_config(
        workdir / f"agent-{n}-{batch_s}.yaml",
        tcp_endpoints(n, acceptor.port, silent_every=20),
        listen_port=port,
        control_port=acceptor.port,
        interval_s=interval_s,
        jitter_s=interval_s / 2,  # the first round spreads over this
        archive=workdir / f"archive-{n}-{batch_s}",
        batch_s=batch_s,
    )
    proc = start_agent(config, workdir / f"agent-{n}-{batch_s}.log")
    url = f"http://127.0.0.1:{port}"
    try:
        wait_http(url + "/-/ready", 60)
        t_start = time.monotonic()
        time.sleep(interval_s)  # first round: every endpoint measured once
        cpu0, t0 = cpu_s(proc.pid), time.monotonic()
        rss_max, renders = 0.0, []
        while time.monotonic() - t0 < window_s:
            time.sleep(min(15.0, window_s / 3))  # a Prometheus-like scrape interval
            seconds, body = get(url + "/metrics")
            renders.append(seconds)
            rss_max = max(rss_max, rss_mib(proc.pid))
        cpu1, t1 = cpu_s(proc.pid), time.monotonic()
        text = body.decode()
        _, api = get(url + "/api/results")
        results = json.loads(api)["results"]
    finally:
        stop(proc)
    excess = [
        (r["phases"]["connect"] - r["phases"]["connect_rtt"]) * 1000
        for r in results
        if r.get("ok") and "connect_rtt" in r.get("phases", {})
    ]
    series = sum(1 for line in text.splitlines() if line and not line.startswith("#"))
    return {
        "endpoints": n,
        "interval_s": interval_s,
        "batch_s": "default" if batch_s is None else batch_s,
        "window_s": round(t1 - t0, 1),
        "cpu_pct_of_one_core": round(100 * (cpu1 - cpu0) / (t1 - t0), 2),
        "rss_max_mib": round(rss_max, 1),
        "lag_p50_ms": round(
            1000 * (sample(text, "probe_schedule_lag_recent_seconds", percentile="50") or 0), 2
        ),
        "lag_p99_ms": round(
            1000 * (sample(text, "probe_schedule_lag_recent_seconds", percentile="99") or 0), 2
        ),
        "lag_max_ms": round(
            1000 * (sample(text, "probe_schedule_lag_recent_seconds", percentile="100") or 0), 2
        ),
        "metrics_render_s_max": round(max(renders), 3),
        "metrics_render_s_median": round(median(renders), 3),
        "metrics_series": series,
        "metrics_bytes": len(body),
        "series_per_endpoint": round(series / n, 1),
        "connect_excess_over_kernel_ms_p50": round(median(excess), 3),
        "connect_excess_over_kernel_ms_p99": round(pct(excess, 0.99), 3),
        "results_with_rtt": len(excess),
        "startup_to_end_s": round(t1 - t_start, 1),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--endpoints", default="1000,5000")
    parser.add_argument("--interval", type=float, default=60.0)
    parser.add_argument("--window", type=float, default=90.0, help="seconds measured per N")
    parser.add_argument(
        "--batch",
        default="default",
        help="schedule.batch_s values to run in turn per N, e.g. 1,0 (default: the agent's)",
    )
    parser.add_argument("--smoke", action="store_true", help="a few seconds, for CI")
    args = parser.parse_args()
    if args.smoke:
        args.endpoints, args.interval, args.window = "40", 2.0, 3.0
    enter_private_netns()
    drop_to("127.20.0.0/16")
    with tempfile.TemporaryDirectory(prefix="bench-daemon-") as tmp:
        batches = [None if b == "default" else float(b) for b in args.batch.split(",")]
        for n in (int(x) for x in args.endpoints.split(",")):
            for batch in batches:
                figures = measure(n, args.interval, args.window, Path(tmp), batch)
                emit({"bench": "daemon_footprint", **figures})


if __name__ == "__main__":
    main()
