"""CPU per probe: the agent vs blackbox_exporter vs a bare asyncio loop, alternated in one run.

Same targets for all three (TCP connects and verifying TLS handshakes to loopback
servers on distinct 127/8 addresses), concurrency 20, whole-process CPU of the prober
(user + system, all threads) divided by the probes it ran:

- agent: `probe run` in steady state (scheduler, store, verdicts, archive, exporter
  self-metrics all included), probes counted from `probe_attempts_total`; once more with
  the archive off (``agent_no_archive``), to show what the OONI-format archive costs;
  once more with ``schedule.batch_s: 0`` (``agent_unbatched``: every round on its own
  wake-up, as before batching), to show what starting due rounds together saves;
- blackbox_exporter (Debian `prometheus-blackbox-exporter`): `/probe?module=...` requests,
  20 at a time; the exporter's CPU only (the HTTP client is this script);
- blackbox_exporter once more, paced at the agent's probe rate (``blackbox_paced``): the
  agent's figure is taken at that rate, and at ~50 probes a second every probe wakes an
  idle process (cold caches, one loop pass per event), which costs any prober 2-4x the
  CPU of the same probe run back to back (a bare asyncio connect: ~130 us back to back,
  ~680 us paced at 50/s, measured here).  ``agent_over_blackbox_paced`` is the
  like-for-like ratio;
- the agent once more as `probe once --archive` (``agent_once``): one round over the
  same number of endpoints as blackbox's requests, back to back, its CPU minus that of a
  20-endpoint round (start-up, config) per extra probe: ``agent_once_over_blackbox`` is
  the back-to-back like-for-like ratio (a round still has the gate, the verdicts, the
  archive and the JSON output on top);
- bare asyncio: `open_connection` (with a prebuilt SSLContext for TLS) in a subprocess that
  times only its probe loop: the floor for a Python prober.

    sudo .venv/bin/python bench/probe_cost.py            # 2 alternations
    sudo .venv/bin/python bench/probe_cost.py --smoke    # seconds, for CI
"""

from __future__ import annotations

import argparse
import asyncio
import shutil
import ssl
import subprocess
import sys
import tempfile
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

from common import (
    PYTHON,
    Acceptor,
    address,
    agent_config,
    cpu_s,
    emit,
    enter_private_netns,
    free_port,
    get,
    median,
    probe_once,
    start_agent,
    stop,
    total,
    wait_http,
)

from probe.lab.certs import CertificateAuthority

NAME = "bench.example"
CONCURRENCY = 20
SMALL_ROUND = 20  # endpoints of the round whose CPU `run_agent_once` subtracts


class TLSServer:
    """A TLS server on every address of the private namespace, in a thread of its own."""

    def __init__(self, ctx: ssl.SSLContext) -> None:
        self.port = free_port()
        self._ready = threading.Event()
        threading.Thread(target=asyncio.run, args=(self._serve(ctx),), daemon=True).start()
        self._ready.wait(10)

    async def _serve(self, ctx: ssl.SSLContext) -> None:
        async def handle(_: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            writer.close()

        server = await asyncio.start_server(handle, "0.0.0.0", self.port, ssl=ctx, backlog=4096)
        self._ready.set()
        async with server:
            await server.serve_forever()


def endpoints_yaml(kind: str, n: int, port: int) -> str:
    extra = f" sni: {NAME}," if kind == "tls" else ""
    return "\n".join(
        f"      - {{name: e{i}, host: {address(i)}, ports: [{port}], role: signalling,"
        f" probes: [{kind}],{extra} source: bench, confidence: C}}"
        for i in range(n)
    )


def run_agent(
    kind: str,
    port: int,
    ca_file: Path,
    n: int,
    window_s: float,
    tmp: Path,
    archive: bool = True,
    batch_s: float | None = None,
) -> float:
    listen = free_port()
    interval = max(2.0, n / 50)  # ~50 probes a second
    config = agent_config(
        tmp / f"agent-{kind}.yaml",
        endpoints_yaml(kind, n, port),
        listen_port=listen,
        control_port=port,
        interval_s=interval,
        jitter_s=interval / 2,
        concurrency=CONCURRENCY,
        archive=tmp / f"archive-{kind}" if archive else None,
        batch_s=batch_s,  # None: the agent's default (rounds due together start together)
        extra=f"tls: {{ca_file: {ca_file}}}",
    )
    proc = start_agent(config, tmp / f"agent-{kind}.log")
    url = f"http://127.0.0.1:{listen}"
    try:
        wait_http(url + "/-/ready", 60)
        time.sleep(interval)  # warm-up: the first round
        _, before = get(url + "/metrics")
        cpu0 = cpu_s(proc.pid)
        time.sleep(window_s)
        cpu1 = cpu_s(proc.pid)
        time.sleep(1.1)  # past the render cache
        _, after = get(url + "/metrics")
    finally:
        stop(proc)
    probes = total(after.decode(), "probe_attempts_total") - total(
        before.decode(), "probe_attempts_total"
    )
    return (cpu1 - cpu0) / max(probes, 1)


def run_agent_once(kind: str, port: int, ca_file: Path, n: int, tmp: Path) -> float:
    """`probe once --archive` (one round, back to back like blackbox's requests): the CPU
    of a round over ``n`` endpoints minus one over ``SMALL_ROUND``, per extra probe, so
    interpreter start-up and config parsing are left out."""

    def cpu_of_round(count: int) -> float:
        config = agent_config(
            tmp / f"once-{kind}-{count}.yaml",
            endpoints_yaml(kind, count, port),
            listen_port=free_port(),
            control_port=port,
            concurrency=CONCURRENCY,
            extra=f"tls: {{ca_file: {ca_file}}}",
        )
        archive = str(tmp / f"once-archive-{kind}")
        return probe_once(config, "--archive", archive, timeout_s=600)[1]

    small = cpu_of_round(SMALL_ROUND)
    return (cpu_of_round(n) - small) / (n - SMALL_ROUND)


def blackbox_config(path: Path, ca_file: Path) -> Path:
    path.write_text(
        f"""modules:
  tcp:
    prober: tcp
    timeout: 5s
  tls:
    prober: tcp
    timeout: 5s
    tcp:
      tls: true
      tls_config:
        ca_file: {ca_file}
        server_name: {NAME}
"""
    )
    return path


def agent_rate(n: int) -> float:
    """Probes a second `run_agent` runs: every endpoint once per interval."""
    return n / max(2.0, n / 50)


def run_blackbox(
    kind: str, port: int, config: Path, n: int, count: int, rate: float | None = None
) -> float:
    """blackbox's CPU per probe: requests back to back (``rate`` None), or started at
    ``rate`` a second (at most CONCURRENCY in flight either way)."""
    listen = free_port()
    proc = subprocess.Popen(
        [
            shutil.which("prometheus-blackbox-exporter") or "prometheus-blackbox-exporter",
            f"--config.file={config}",
            f"--web.listen-address=127.0.0.1:{listen}",
            "--log.level=error",
        ],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    url = f"http://127.0.0.1:{listen}"
    try:
        wait_http(url + "/-/healthy", 30)
        urls = [f"{url}/probe?module={kind}&target={address(i % n)}:{port}" for i in range(count)]
        with ThreadPoolExecutor(CONCURRENCY) as pool:
            list(pool.map(get, urls[: CONCURRENCY * 2]))  # warm-up
            cpu0 = cpu_s(proc.pid)
            bodies = list(pool.map(get, urls)) if rate is None else paced(pool, urls, rate)
            cpu1 = cpu_s(proc.pid)
    finally:
        stop(proc)
    failed = sum(b"probe_success 1" not in body for _, body in bodies)
    if failed:
        print(f"blackbox: {failed} of {count} probes failed", file=sys.stderr)
    return (cpu1 - cpu0) / count


def paced(pool: ThreadPoolExecutor, urls: list[str], rate: float) -> list[tuple[float, bytes]]:
    """GET every URL, one started every 1/rate seconds (bounded: len(urls) / rate)."""
    t0 = time.monotonic()
    futures = []
    for i, url in enumerate(urls):
        futures.append(pool.submit(get, url))
        time.sleep(max(0.0, t0 + (i + 1) / rate - time.monotonic()))
    return [f.result() for f in futures]


BARE = """
import asyncio, ssl, sys, time
kind, ca = sys.argv[1], sys.argv[5]
port, n, count = (int(a) for a in sys.argv[2:5])
def address(i): return f"127.10.{i // 250 % 250 + 1}.{i % 250 + 1}"
ctx = ssl.create_default_context(cafile=ca) if kind == "tls" else None
async def one(i, bound):
    async with bound:
        r, w = await asyncio.open_connection(address(i % n), port, ssl=ctx,
                                             server_hostname="bench.example" if ctx else None)
        w.close()
        await w.wait_closed()
async def main():
    bound = asyncio.Semaphore(20)
    await asyncio.gather(*(one(i, bound) for i in range(40)))
    t0 = time.process_time()
    await asyncio.gather(*(one(i, bound) for i in range(count)))
    print(time.process_time() - t0)
asyncio.run(main())
"""


def run_bare(kind: str, port: int, ca_file: Path, n: int, count: int) -> float:
    out = subprocess.run(
        [PYTHON, "-c", BARE, kind, str(port), str(n), str(count), str(ca_file)],
        capture_output=True,
        text=True,
        check=True,
        timeout=300,
    )
    return float(out.stdout.strip()) / count


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--endpoints", type=int, default=500)
    parser.add_argument("--window", type=float, default=15.0, help="agent seconds measured")
    parser.add_argument("--smoke", action="store_true", help="a few seconds, for CI")
    args = parser.parse_args()
    if args.smoke:
        args.repeats, args.endpoints, args.window = 1, 20, 1.0
    enter_private_netns()
    count = 60 if args.smoke else 2000
    with tempfile.TemporaryDirectory(prefix="bench-cost-") as tmpdir:
        tmp = Path(tmpdir)
        ca = CertificateAuthority("bench CA")
        ca_file = ca.write_ca(tmp / "ca.pem")
        tls_server = TLSServer(ca.issue(NAME).server_context(tmp, "leaf"))
        tcp_server = Acceptor()
        bb = blackbox_config(tmp / "blackbox.yml", ca_file)
        ports = {"tcp": tcp_server.port, "tls": tls_server.port}
        figures: dict[str, dict[str, list[float]]] = {}
        for _ in range(args.repeats):
            for kind, port in ports.items():
                f = figures.setdefault(
                    kind,
                    {
                        "agent": [],
                        "agent_no_archive": [],
                        "agent_unbatched": [],
                        "agent_once": [],
                        "blackbox": [],
                        "blackbox_paced": [],
                        "bare": [],
                    },
                )
                f["agent"].append(run_agent(kind, port, ca_file, args.endpoints, args.window, tmp))
                f["agent_no_archive"].append(
                    run_agent(kind, port, ca_file, args.endpoints, args.window, tmp, archive=False)
                )
                f["agent_unbatched"].append(
                    run_agent(kind, port, ca_file, args.endpoints, args.window, tmp, batch_s=0)
                )
                f["agent_once"].append(run_agent_once(kind, port, ca_file, count, tmp))
                f["blackbox"].append(run_blackbox(kind, port, bb, args.endpoints, count))
                rate = agent_rate(args.endpoints)
                paced_count = max(CONCURRENCY, int(rate * args.window))  # the agent's window
                f["blackbox_paced"].append(
                    run_blackbox(kind, port, bb, args.endpoints, paced_count, rate)
                )
                f["bare"].append(run_bare(kind, port, ca_file, args.endpoints, count))
        for kind, f in figures.items():
            us = {tool: median(v) * 1e6 for tool, v in f.items()}
            out: dict[str, Any] = {"bench": "probe_cost", "probe": kind, "repeats": args.repeats}
            out.update({f"{tool}_cpu_us_per_probe": round(v, 1) for tool, v in us.items()})
            out["agent_over_blackbox"] = round(us["agent"] / us["blackbox"], 2)
            out["agent_over_blackbox_paced"] = round(us["agent"] / us["blackbox_paced"], 2)
            out["agent_once_over_blackbox"] = round(us["agent_once"] / us["blackbox"], 2)
            out["agent_unbatched_over_blackbox_paced"] = round(
                us["agent_unbatched"] / us["blackbox_paced"], 2
            )
            out["probes_per_s"] = round(agent_rate(args.endpoints), 1)
            out["agent_over_bare"] = round(us["agent"] / us["bare"], 2)
            out["all_runs_us"] = {t: [round(x * 1e6, 1) for x in v] for t, v in f.items()}
            emit(out)


if __name__ == "__main__":
    main()
