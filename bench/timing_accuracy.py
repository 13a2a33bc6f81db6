"""Timing accuracy: connect times against a known delay, at 1, 100 and 500 probes in flight.

A censorship lab (`probe.lab`: client, censor, servers namespaces) delays every packet
from the servers to the client by DELAY ms (NFQUEUE handler in the censor: this kernel
has no netem).  N endpoints on the delayed addresses are probed at once, N in flight,
each on a port of its own (the servers namespace forwards them all to the echo listener
on that address), so each connection's SYN-ACK can be told apart on the path:

- agent: `probe once` in the client namespace (concurrency and per-destination bound N),
  both connect figures: the loop-timed ``connect`` and the kernel's ``connect_rtt``;
- blackbox_exporter in the client namespace, N `/probe` requests at once,
  ``probe_duration_seconds`` of its tcp module (a bare connect).

The delay is KNOWN per connection: the handler logs, for every SYN-ACK, how long it
really held it (from the censor's kernel receiving it to the release; `censor.Delay.synacks`).
The path without the handler is measured too (``base``: the kernel's RTT of serial
connects to an undelayed address, median).  Printed, in ms, median and p99:

- ``*_vs_injected``: measured - (base + that connection's injected delay): the prober's
  own error;
- ``*_error`` (as before): measured - the nominal DELAY: prober and injector together;
- ``injector_late``: injected - DELAY, how far the injector itself strays;
- ``agent_loop_minus_kernel``: the agent's event-loop share.

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

PORT = 7  # the echo listeners' port
FIRST_PORT = 20000  # endpoint i is probed on FIRST_PORT + i, sent on to PORT (same address)
ADDRESSES = 8  # spread the endpoints over this many delayed service addresses
BASE = ADDRESSES + 2  # service address that is not delayed: the path without the handler
BASE_CONNECTS = 20

REDIRECT = f"""
table ip timing_accuracy {{
  chain pre {{
    type nat hook prerouting priority dstnat;
    tcp dport {FIRST_PORT}-{FIRST_PORT + 9999} dnat to ip daddr:{PORT}
  }}
}}
"""

# The kernel's SYN/SYN-ACK RTT (tcpi_rtt, µs) of serial connects, as the agent reads it.
BASE_RTT = """
import json, socket, struct, sys
out = []
for _ in range(int(sys.argv[3])):
    with socket.create_connection((sys.argv[1], int(sys.argv[2])), timeout=5) as s:
        info = s.getsockopt(socket.IPPROTO_TCP, socket.TCP_INFO, 104)
        out.append(struct.unpack_from("=I", info, 68)[0])
print(json.dumps(out))
"""

BLACKBOX = """
import json, subprocess, sys, time, urllib.request
from concurrent.futures import ThreadPoolExecutor
targets = json.loads(sys.argv[1])
cfg = sys.argv[2]
warm_up = sys.argv[3]  # an undelayed target: the delayed ones then see one connection each
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
    get("http://127.0.0.1:19115/probe?module=tcp&target=" + warm_up)
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


Key = tuple[str, int]  # (server address, server port): one connection per key


def target(lab: Lab, i: int) -> Key:
    """Endpoint i's address and port (a port of its own: its SYN-ACK can be told apart)."""
    return lab.addr.service(1 + i % ADDRESSES), FIRST_PORT + i


def agent_config(lab: Lab, n: int, path: Path) -> Path:
    endpoints = "\n".join(
        f"      - {{name: e{i}, host: {host}, ports: [{port}],"
        f" role: signalling, probes: [tcp], source: bench, confidence: C}}"
        for i, (host, port) in ((i, target(lab, i)) for i in range(n))
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


class Injected(dict[Key, float]):
    """Each connection's injected delay in ms, from the handler's log since the last
    reading.  A key seen twice (a retransmitted SYN-ACK, a second connection) is
    ambiguous: left out.  ``verdict_ms``: how long each release call took, the bound on
    how much later than its release the client may have seen a SYN-ACK."""

    def __init__(self, delay: c.Delay) -> None:
        seen: dict[Key, list[float]] = {}
        self.verdict_ms: list[float] = []
        for record in delay.synacks():
            key = (record["server"], record["server_port"])
            seen.setdefault(key, []).append(record["held_us"] / 1000)
            self.verdict_ms.append(record["verdict_us"] / 1000)
        super().__init__((key, held[0]) for key, held in seen.items() if len(held) == 1)


def base_rtt_ms(lab: Lab) -> float:
    """The path without the handler: median kernel RTT of serial connects, in ms."""
    host, port = lab.addr.service(BASE), FIRST_PORT
    done = lab.exec("client", [PYTHON, "-c", BASE_RTT, host, str(port), str(BASE_CONNECTS)])
    if done.returncode != 0:
        sys.exit(f"bench: base RTT: {done.stderr[-500:]}")
    return float(median(json.loads(done.stdout))) / 1000


def spread(prefix: str, values: list[float]) -> dict[str, float]:
    return {
        f"{prefix}_ms_p50": round(median(values), 3),
        f"{prefix}_ms_p99": round(pct(values, 0.99), 3),
    }


def run_agent(lab: Lab, n: int, delay: c.Delay, base_ms: float) -> dict[str, Any]:
    config = agent_config(lab, n, lab.workdir / f"agent-{n}.yaml")
    Injected(delay)  # forget what came before this run
    done = lab.exec(
        "client", [PYTHON, "-m", "probe", "once", "-c", str(config), "--format", "json"], 300
    )
    held = Injected(delay)
    records = [json.loads(line) for line in done.stdout.splitlines() if line.startswith("{")]
    ok = [
        r
        for r in records
        if r.get("ok") and r.get("service") == "bench" and r.get("probe") == "tcp"
    ]
    if len(ok) < n:
        print(
            f"agent: {n - len(ok)} of {n} probes failed (exit {done.returncode})", file=sys.stderr
        )
    nominal = delay.ms
    loop = [1000 * r["phases"]["connect"] for r in ok]
    timed = [r for r in ok if "connect_rtt" in r["phases"]]
    kernel = [1000 * r["phases"]["connect_rtt"] for r in timed]
    known = [r for r in timed if (r["address"], r["port"]) in held]
    truth = [base_ms + held[(r["address"], r["port"])] for r in known]
    figures: dict[str, Any] = {"agent_ok": len(ok), "agent_matched": len(known)}
    figures.update(spread("agent_loop_connect_error", [x - nominal for x in loop]))
    figures.update(spread("agent_kernel_connect_rtt_error", [x - nominal for x in kernel]))
    figures.update(
        spread(
            "agent_kernel_connect_rtt_vs_injected",
            [1000 * r["phases"]["connect_rtt"] - t for r, t in zip(known, truth, strict=True)],
        )
    )
    figures.update(
        spread(
            "agent_loop_connect_vs_injected",
            [1000 * r["phases"]["connect"] - t for r, t in zip(known, truth, strict=True)],
        )
    )
    figures.update(
        spread(
            "agent_loop_minus_kernel",
            [1000 * (r["phases"]["connect"] - r["phases"]["connect_rtt"]) for r in timed],
        )
    )
    figures.update(spread("injector_late_agent_run", [held[k] - nominal for k in held]))
    figures.update(spread("injector_verdict_agent_run", held.verdict_ms))
    return figures


def run_blackbox(lab: Lab, n: int, delay: c.Delay, base_ms: float) -> dict[str, Any]:
    cfg = lab.workdir / "blackbox.yml"
    cfg.write_text("modules:\n  tcp:\n    prober: tcp\n    timeout: 10s\n")
    cfg.chmod(0o644)
    targets = [target(lab, i) for i in range(n)]
    warm_up = f"{lab.addr.service(BASE)}:{FIRST_PORT}"
    Injected(delay)
    listed = json.dumps([f"{h}:{p}" for h, p in targets])
    done = lab.exec("client", [PYTHON, "-c", BLACKBOX, listed, str(cfg), warm_up], 300)
    held = Injected(delay)
    pairs = json.loads(done.stdout or "[]")
    measured = [
        (key, 1000 * seconds) for key, (ok, seconds) in zip(targets, pairs, strict=True) if ok
    ]
    figures: dict[str, Any] = {
        "blackbox_ok": len(measured),
        "blackbox_matched": sum(key in held for key, _ in measured),
    }
    figures.update(spread("blackbox_duration_error", [ms - delay.ms for _, ms in measured]))
    figures.update(
        spread(
            "blackbox_duration_vs_injected",
            [ms - base_ms - held[key] for key, ms in measured if key in held],
        )
    )
    return figures


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--in-flight", default="1,100,500")
    parser.add_argument("--delay-ms", type=float, default=50.0)
    parser.add_argument(
        "--no-realtime",
        action="store_true",
        help="run the delay handler under the normal scheduling policy, not SCHED_FIFO",
    )
    parser.add_argument("--smoke", action="store_true", help="a few seconds, for CI")
    args = parser.parse_args()
    if args.smoke:
        args.in_flight = "1,10"
    reason = lab_available()
    if reason is not None:
        sys.exit(f"bench: {reason}")
    with Lab(services=BASE) as lab:
        lab.serve(
            [
                {"kind": "tcp", "host": lab.addr.service(i), "port": PORT, "mode": "echo"}
                for i in range(1, BASE + 1)
            ]
        )
        nft = lab.workdir / "redirect.nft"
        nft.write_text(REDIRECT)
        done = lab.exec("servers", ["nft", "-f", str(nft)])
        if done.returncode != 0:
            sys.exit(f"bench: nft in the servers namespace: {done.stderr[-500:]}")
        delayed = [lab.addr.service(i) for i in range(1, ADDRESSES + 2)]
        delay = c.Delay(args.delay_ms, delayed, direction="down", realtime=not args.no_realtime)
        with lab.censor.active(delay):
            sched = delay.handler.ready.get("sched") if delay.handler else None
            for n in (int(x) for x in args.in_flight.split(",")):
                figures: dict[str, Any] = {"bench": "timing_accuracy", "in_flight": n}
                base_ms = base_rtt_ms(lab)
                figures.update(delay_ms=args.delay_ms, base_rtt_ms=round(base_ms, 3))
                figures["injector_sched"] = sched
                figures.update(run_agent(lab, n, delay, base_ms))
                figures.update(run_blackbox(lab, n, delay, base_ms))
                emit(figures)


if __name__ == "__main__":
    main()
