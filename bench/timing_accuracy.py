"""Timing accuracy: connect times with a known delay, at 1, 100 and 500 probes in flight.

A censorship lab (`probe.lab`: client, censor, servers namespaces) delays every packet
from the servers to the client by DELAY ms (NFQUEUE handler in the censor: this kernel
has no netem).  N endpoints on the delayed addresses are probed at once, N in flight:

- agent: `probe once` in the client namespace (concurrency and per-destination bound N),
  both connect figures: the loop-timed ``connect`` and the kernel's ``connect_rtt``;
- blackbox_exporter in the client namespace, N `/probe` requests at once,
  ``probe_duration_seconds`` of its tcp module (a bare connect).

Printed: error = measured - injected delay, median and p99, in ms.  The NFQUEUE handler
adds ~0.4 ms of its own and releases a burst one packet at a time, so some of the
"error" at 500 in flight is the path's, identical for every prober; the agent's own share
is ``connect - connect_rtt``.

    sudo .venv/bin/python bench/timing_accuracy.py            # 1, 100, 500 in flight
    sudo .venv/bin/python bench/timing_accuracy.py --smoke    # seconds, for CI
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

from common import PYTHON, emit, median, pct

from probe.lab import censor as c
from probe.lab.topology import Lab, lab_available

PORT = 7
ADDRESSES = 8  # spread the endpoints over this many delayed service addresses

BLACKBOX = """
import json, subprocess, sys, time, urllib.request
from concurrent.futures import ThreadPoolExecutor
targets = json.loads(sys.argv[1])
cfg = sys.argv[2]
proc = subprocess.Popen(["prometheus-blackbox-exporter", "--config.file=" + cfg,
                         "--web.listen-address=127.0.0.1:19115", "--log.level=error"],
                        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
def get(url):
    with urllib.request.urlopen(url, timeout=30) as r:
        return r.read().decode()
try:
    for _ in range(100):
        try:
            get("http://127.0.0.1:19115/-/healthy"); break
        except OSError:
            time.sleep(0.1)
    urls = ["http://127.0.0.1:19115/probe?module=tcp&target=" + t for t in targets]
    get(urls[0])  # warm-up
    with ThreadPoolExecutor(len(urls)) as pool:
        bodies = list(pool.map(get, urls))
finally:
    proc.terminate(); proc.wait()
out = []
for body in bodies:
    ok = "probe_success 1" in body
    for line in body.splitlines():
        if line.startswith("probe_duration_seconds "):
            out.append((ok, float(line.split()[1])))
print(json.dumps(out))
"""


def agent_config(lab: Lab, n: int, path: Path) -> Path:
    endpoints = "\n".join(
        f"      - {{name: e{i}, host: {lab.addr.service(1 + i % ADDRESSES)}, ports: [{PORT}],"
        f" role: signalling, probes: [tcp], source: bench, confidence: C}}"
        for i in range(n)
    )
    path.write_text(
        f"""
vantage: {{name: bench, country: ZZ, asn: AS64500, role: test}}
schedule: {{concurrency: {max(n, 1)}, per_destination: {max(n, 1)}}}
timeouts: {{connect_s: 10}}
resolvers: {{system: false, udp: ["127.0.0.1:9"]}}
seeds: []
archive: {{path: null}}
services:
  - service: controls
    source: bench
    endpoints:
      - {{name: ctl, host: {lab.addr.service(ADDRESSES + 1)}, ports: [{PORT}], role: control,
          probes: [tcp], source: bench, confidence: C}}
  - service: bench
    source: bench
    endpoints:
{endpoints}
"""
    )
    path.chmod(0o644)
    return path


def run_agent(lab: Lab, n: int, delay_ms: float) -> dict[str, Any]:
    config = agent_config(lab, n, lab.workdir / f"agent-{n}.yaml")
    done = lab.exec(
        "client", [PYTHON, "-m", "probe", "once", "-c", str(config), "--format", "json"], 300
    )
    records = [json.loads(line) for line in done.stdout.splitlines() if line.startswith("{")]
    ok = [
        r
        for r in records
        if r.get("ok") and r.get("service") == "bench" and r.get("probe") == "tcp"
    ]
    loop = [1000 * r["phases"]["connect"] - delay_ms for r in ok]
    kernel = [
        1000 * r["phases"]["connect_rtt"] - delay_ms for r in ok if "connect_rtt" in r["phases"]
    ]
    own = [
        1000 * (r["phases"]["connect"] - r["phases"]["connect_rtt"])
        for r in ok
        if "connect_rtt" in r["phases"]
    ]
    if len(ok) < n:
        print(
            f"agent: {n - len(ok)} of {n} probes failed (exit {done.returncode})", file=sys.stderr
        )
    return {
        "agent_ok": len(ok),
        "agent_loop_connect_error_ms_p50": round(median(loop), 3),
        "agent_loop_connect_error_ms_p99": round(pct(loop, 0.99), 3),
        "agent_kernel_connect_rtt_error_ms_p50": round(median(kernel), 3),
        "agent_kernel_connect_rtt_error_ms_p99": round(pct(kernel, 0.99), 3),
        "agent_loop_minus_kernel_ms_p50": round(median(own), 3),
        "agent_loop_minus_kernel_ms_p99": round(pct(own, 0.99), 3),
    }


def run_blackbox(lab: Lab, n: int, delay_ms: float) -> dict[str, Any]:
    cfg = lab.workdir / "blackbox.yml"
    cfg.write_text("modules:\n  tcp:\n    prober: tcp\n    timeout: 10s\n")
    cfg.chmod(0o644)
    targets = [f"{lab.addr.service(1 + i % ADDRESSES)}:{PORT}" for i in range(n)]
    done = lab.exec("client", [PYTHON, "-c", BLACKBOX, json.dumps(targets), str(cfg)], 300)
    pairs = json.loads(done.stdout or "[]")
    errors = [1000 * seconds - delay_ms for ok, seconds in pairs if ok]
    return {
        "blackbox_ok": len(errors),
        "blackbox_duration_error_ms_p50": round(median(errors), 3),
        "blackbox_duration_error_ms_p99": round(pct(errors, 0.99), 3),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--in-flight", default="1,100,500")
    parser.add_argument("--delay-ms", type=float, default=50.0)
    parser.add_argument("--smoke", action="store_true", help="a few seconds, for CI")
    args = parser.parse_args()
    if args.smoke:
        args.in_flight = "1,10"
    reason = lab_available()
    if reason is not None:
        sys.exit(f"bench: {reason}")
    with Lab(services=ADDRESSES + 2) as lab:
        lab.serve(
            [
                {"kind": "tcp", "host": lab.addr.service(i), "port": PORT, "mode": "echo"}
                for i in range(1, ADDRESSES + 2)
            ]
        )
        delayed = [lab.addr.service(i) for i in range(1, ADDRESSES + 2)]
        with lab.censor.active(c.Delay(args.delay_ms, delayed, direction="down")):
            for n in (int(x) for x in args.in_flight.split(",")):
                figures: dict[str, Any] = {"bench": "timing_accuracy", "in_flight": n}
                figures["delay_ms"] = args.delay_ms
                figures.update(run_agent(lab, n, args.delay_ms))
                figures.update(run_blackbox(lab, n, args.delay_ms))
                emit(figures)


if __name__ == "__main__":
    main()
