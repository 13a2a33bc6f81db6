"""Soak: the agent at a high probe rate under HTTP load and a reload every few seconds.

Everything runs in an empty network namespace (the script re-runs itself under
``unshare -n``; root needed): an ``ok`` TCP server, a ``refused`` port, a ``dropped`` port
(an nftables drop rule inside the namespace: a connect timeout, like a blackhole) and a
``silent`` UDP port (STUN, never answered).  ``probe run`` measures them every 2 s while
HTTP clients fetch /metrics, /api/results and / back to back and the config is changed
and reloaded every 3 s.  Sampled every 0.5 s: the agent's RSS, open descriptors and
schedule lag.  Printed at the end (``--json``: one JSON object): RSS and descriptors after
warm-up (the first third) against the end, the worst lag, and results per endpoint.
The figures of a long run by hand are in docs/security.md.

    sudo python bench/soak.py --duration 300 [--endpoints 40] [--json]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
INSIDE = "PROBE_SOAK_NAMESPACE"
PORT = 9464
KINDS = ("ok", "refused", "dropped", "silent")
HTTP_CLIENTS = 4
RELOAD_EVERY_S = 3.0
SAMPLE_EVERY_S = 0.5


def config_text(ports: dict[str, int], endpoints: int, flip: int) -> str:
    lines = [
        f"schedule: {{interval_s: 2, jitter_s: {0.5 + flip * 0.1:.1f}, min_spacing_s: 1,"
        " concurrency: 64, per_destination: 64}",
        "timeouts: {connect_s: 1, udp_s: 1, tls_s: 1}",
        "resolvers: {system: false, udp: ['127.0.0.1:9']}",
        "seeds: []",
        f"listen: 127.0.0.1:{PORT}",
        "archive: {path: null}",
        "log_format: json",
        "services:",
        "  - service: controls",
        "    source: soak",
        "    endpoints:",
        f"      - {{name: ctl, host: 127.0.0.1, ports: [{ports['ok']}], role: control,"
        " probes: [tcp], source: soak, confidence: C}",
        "  - service: soak",
        "    source: soak",
        "    endpoints:",
    ]
    for i in range(endpoints):
        kind = KINDS[i % len(KINDS)]
        if kind == "silent":
            lines.append(
                f"      - {{name: {kind}{i}, host: 127.0.0.1, ports: [{ports[kind]}],"
                " transport: udp, role: call-relay, probes: [stun], source: soak, confidence: C}"
            )
        else:
            lines.append(
                f"      - {{name: {kind}{i}, host: 127.0.0.1, ports: [{ports[kind]}],"
                " role: signalling, probes: [tcp], source: soak, confidence: C}"
            )
    return "\n".join(lines) + "\n"


def setup_namespace(ports: dict[str, int]) -> None:
    subprocess.run(["ip", "link", "set", "lo", "up"], check=True)
    rules = (
        "table inet soak {\n  chain out {\n    type filter hook output priority 0;\n"
        f"    tcp dport {ports['dropped']} drop\n  }}\n}}\n"
    )
    subprocess.run(["nft", "-f", "-"], input=rules, text=True, check=True)


def read_status(pid: int) -> tuple[int, int]:
    """(RSS in KiB, open descriptors) of PID."""
    rss = 0
    with open(f"/proc/{pid}/status") as fh:
        for line in fh:
            if line.startswith("VmRSS:"):
                rss = int(line.split()[1])
    return rss, len(os.listdir(f"/proc/{pid}/fd"))


def get(path: str, timeout: float = 5.0) -> tuple[int, bytes]:
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{PORT}{path}", timeout=timeout) as r:
            return int(r.status), r.read()
    except urllib.error.HTTPError as err:
        return err.code, b""
    except OSError:
        return 0, b""


def metric(text: str, name: str) -> float | None:
    for line in text.splitlines():
        if line.startswith(name + " ") or line.startswith(name + "{"):
            return float(line.rsplit(" ", 1)[1])
    return None


async def soak(duration_s: float, endpoints: int, workdir: Path) -> dict[str, Any]:
    async def accept_and_close(_r: asyncio.StreamReader, w: asyncio.StreamWriter) -> None:
        w.close()

    ok_server = await asyncio.start_server(accept_and_close, "127.0.0.1", 0)
    loop = asyncio.get_running_loop()
    silent, _ = await loop.create_datagram_endpoint(
        asyncio.DatagramProtocol, local_addr=("127.0.0.1", 0)
    )
    ports = {
        "ok": ok_server.sockets[0].getsockname()[1],
        "refused": 9,  # nothing listens in a fresh namespace
        "dropped": 7,
        "silent": silent.get_extra_info("sockname")[1],
    }
    setup_namespace(ports)
    config = workdir / "agent.yaml"
    config.write_text(config_text(ports, endpoints, 0))
    log = (workdir / "agent.log").open("wb")
    agent = await asyncio.create_subprocess_exec(
        sys.executable,
        *("-m", "probe", "run", "-c", str(config)),
        cwd=REPO,
        stdout=log,
        stderr=log,
        env={**os.environ, "PYTHONPATH": str(REPO)},
    )
    samples: list[tuple[float, int, int, float]] = []  # (t, rss KiB, fds, lag s)
    counts = {"http": 0, "http_errors": 0, "reloads": 0, "reload_errors": 0}
    stop = asyncio.Event()

    async def http_client() -> None:
        paths = ("/metrics", "/api/results", "/")
        i = 0
        while not stop.is_set():
            status, _ = await asyncio.to_thread(get, paths[i % 3])
            counts["http"] += 1
            counts["http_errors"] += status != 200
            i += 1

    async def reloader() -> None:
        flip = 0
        while not stop.is_set():
            await asyncio.sleep(RELOAD_EVERY_S)
            flip ^= 1
            config.write_text(config_text(ports, endpoints, flip))
            req = urllib.request.Request(f"http://127.0.0.1:{PORT}/-/reload", method="POST")

            def post(r: urllib.request.Request = req) -> int:
                try:
                    with urllib.request.urlopen(r, timeout=10) as resp:
                        return int(resp.status)
                except (urllib.error.URLError, OSError):
                    return 0

            counts["reloads"] += 1
            counts["reload_errors"] += await asyncio.to_thread(post) != 200

    async def sampler(t0: float) -> None:
        while not stop.is_set():
            rss, fds = read_status(agent.pid)
            _, body = await asyncio.to_thread(get, "/metrics", 10)
            lag = metric(body.decode(errors="replace"), "probe_schedule_lag_seconds") or 0.0
            samples.append((time.monotonic() - t0, rss, fds, lag))
            await asyncio.sleep(SAMPLE_EVERY_S)

    try:
        for _ in range(100):
            if (await asyncio.to_thread(get, "/healthz", 1))[0] == 200:
                break
            await asyncio.sleep(0.1)
        t0 = time.monotonic()
        tasks = [asyncio.create_task(http_client()) for _ in range(HTTP_CLIENTS)]
        tasks += [asyncio.create_task(reloader()), asyncio.create_task(sampler(t0))]
        await asyncio.sleep(duration_s)
        stop.set()
        await asyncio.wait(tasks, timeout=15)
        _, body = await asyncio.to_thread(get, "/api/results", 10)
        results = json.loads(body)["results"] if body else []
        _, body = await asyncio.to_thread(get, "/metrics", 10)
        attempts = attempts_by_kind(body.decode(errors="replace"))
    finally:
        agent.terminate()
        try:
            await asyncio.wait_for(agent.wait(), 15)
        except TimeoutError:
            agent.kill()
            await agent.wait()
        log.close()
        ok_server.close()
        silent.close()
    out = summarise(samples, counts, results, endpoints, duration_s, workdir / "agent.log")
    out["attempts_min_by_kind"] = attempts
    return out


def attempts_by_kind(text: str) -> dict[str, int]:
    """The fewest probes run (probe_attempts_total) by any endpoint of each kind: a kind
    whose slow probes a reload cancelled would fall far behind the others."""
    fewest: dict[str, int] = {}
    for line in text.splitlines():
        if not line.startswith("probe_attempts_total{") or 'service="soak"' not in line:
            continue
        endpoint = line.split('endpoint="', 1)[1].split('"', 1)[0]
        kind = endpoint.rstrip("0123456789")
        n = int(float(line.rsplit(" ", 1)[1]))
        fewest[kind] = min(n, fewest.get(kind, n))
    return fewest


def summarise(
    samples: list[tuple[float, int, int, float]],
    counts: dict[str, int],
    results: list[dict[str, Any]],
    endpoints: int,
    duration_s: float,
    log: Path,
) -> dict[str, Any]:
    warm = [s for s in samples if s[0] >= duration_s / 3] or samples
    early, late = warm[: max(1, len(warm) // 4)], warm[-max(1, len(warm) // 4) :]
    measured = {r["endpoint"] for r in results}
    by_status: dict[str, int] = {}
    for r in results:
        by_status[r["status"]] = by_status.get(r["status"], 0) + 1
    lags = [s[3] for s in samples]
    log_lines = sum(1 for _ in log.open("rb"))
    return {
        "duration_s": duration_s,
        "endpoints": endpoints,
        "endpoints_without_results": sorted(
            {f"{k}{i}" for i in range(endpoints) for k in [KINDS[i % len(KINDS)]]} - measured
        ),
        "results_by_status": by_status,
        "rss_kib_after_warmup": int(statistics.median(s[1] for s in early)),
        "rss_kib_at_end": int(statistics.median(s[1] for s in late)),
        "rss_kib_max": max(s[1] for s in samples),
        "fds_after_warmup": int(statistics.median(s[2] for s in early)),
        "fds_at_end": int(statistics.median(s[2] for s in late)),
        "fds_max": max(s[2] for s in samples),
        "lag_s_max": max(lags),
        "lag_s_p50": statistics.median(lags),
        "http_requests": counts["http"],
        "http_errors": counts["http_errors"],
        "reloads": counts["reloads"],
        "reload_errors": counts["reload_errors"],
        "agent_log_lines": log_lines,
        "samples": len(samples),
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--duration", type=float, default=300.0, help="seconds of load")
    parser.add_argument("--endpoints", type=int, default=40)
    parser.add_argument("--json", action="store_true", help="print one JSON object")
    args = parser.parse_args(argv)
    if os.environ.get(INSIDE) is None:
        if os.geteuid() != 0 or shutil.which("unshare") is None or shutil.which("nft") is None:
            print("soak: needs root, unshare(1) and nft(8)", file=sys.stderr)
            return 2
        env = {**os.environ, INSIDE: "1"}
        cmd = ["unshare", "-n", sys.executable, __file__, *(argv or sys.argv[1:])]
        return subprocess.run(cmd, env=env, timeout=args.duration + 120).returncode
    with tempfile.TemporaryDirectory() as tmp:
        out = asyncio.run(soak(args.duration, args.endpoints, Path(tmp)))
    if args.json:
        print(json.dumps(out))
    else:
        for key, value in out.items():
            print(f"{key:28} {value}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
