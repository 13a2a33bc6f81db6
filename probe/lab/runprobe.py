"""``python -m probe.lab.runprobe JOB``: run ONE real probe and print its JSON record.

The lab runs it inside a vantage namespace (`probe.lab.topology.Lab.probe`), so a probe
from `probe.probes.REGISTRY` runs unmodified behind the censor.  ``probe once`` does the
same for a whole configured round; this entry point exists so a test can aim one probe
at one lab address without writing a config file.  JOB is JSON::

    {"probe": "tls", "address": "10.200.100.1", "port": 443, "host": "e1.whatsapp.net",
     "params": {"sni": "neutral.example"}, "timeouts": {"tls_s": 2},
     "ca_file": "/tmp/plab.../ca.pem"}

Keys: ``probe`` (required), ``address``, ``port``, ``host`` (the endpoint's name: SNI,
Host header, DNS query name; default the address), ``resolver`` (DNS probes),
``params``, ``timeouts`` (fields of `Timeouts`), ``ca_file``, ``transport``,
``reply_window_s``, ``service``, ``prefixes`` (CIDR strings).  Output: one line, the
record of `probe.records.result_record`.  Exit 0 if the probe succeeded, 1 if it failed,
2 for a bad job.

``python -m probe.lab.runprobe --serve`` keeps running instead (`Lab.prober`): it prints
``{"ready": true}``, then answers each stdin line ``{"cmd": "probe", "jobs": [JOB, ...]}``
with ``{"records": [...]}`` (the jobs run concurrently), until EOF.  Importing the probe
stack costs most of a second per process; a long-lived prober pays it once per lab.
"""

from __future__ import annotations

import asyncio
import contextlib
import ipaddress
import json
import signal
import sys
from collections.abc import Mapping, Sequence
from typing import Any

from ..config.settings import ProbeSettings, Resolvers, Timeouts, TLSOptions
from ..model import Endpoint, ProbeSpec, Target
from ..probes import REGISTRY
from ..probes.base import run_guarded
from ..records import result_record

__all__ = ["main", "target_of"]

_KEYS = frozenset(
    {
        "probe",
        "address",
        "port",
        "host",
        "resolver",
        "params",
        "timeouts",
        "ca_file",
        "transport",
        "reply_window_s",
        "service",
        "prefixes",
    }
)


def target_of(job: Mapping[str, Any]) -> tuple[Target, ProbeSettings]:
    """The target and settings a job describes (ValueError for a bad job)."""
    unknown = sorted(set(job) - _KEYS)
    if unknown:
        raise ValueError(f"unknown job keys {unknown}")
    name = str(job["probe"])
    if name not in REGISTRY:
        raise ValueError(f"unknown probe {name!r}; known: {sorted(REGISTRY)}")
    probe_type = REGISTRY[name]
    address = job.get("address")
    port = job.get("port")
    host = str(job.get("host") or address or "localhost")
    prefixes = tuple(ipaddress.ip_network(p) for p in job.get("prefixes", ()))
    endpoint = Endpoint(
        service=str(job.get("service", "lab")),
        name=host,
        host=host,
        ports=(int(port),) if port else (),
        # what the probe speaks to the endpoint; dns speaks to a resolver: the seed default
        transport=job.get("transport", "tcp" if name == "dns" else probe_type.transport),
        role="signalling",
        # a bad param is a bad job: ParamError is a ValueError
        probes=(ProbeSpec(name, None, probe_type.parse(job.get("params", {}))),),
        prefixes=prefixes,
        source="lab",
        confidence="C",
    )
    target = Target(
        endpoint,
        name,
        str(address) if address else None,
        int(port) if port else None,
        job.get("resolver"),
        "literal" if address else "",
    )
    settings = ProbeSettings(
        timeouts=Timeouts(**job.get("timeouts", {})),
        resolvers=Resolvers(system=True, reply_window_s=float(job.get("reply_window_s", 0.5))),
        tls=TLSOptions(ca_file=job.get("ca_file")),
    )
    return target, settings


async def _run(job: Mapping[str, Any]) -> dict[str, Any]:
    target, settings = target_of(job)
    result = await run_guarded(REGISTRY[target.probe].run, target, settings)
    return result_record(result, "lab", "online")


async def _serve() -> int:
    loop = asyncio.get_running_loop()
    stop = asyncio.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    reader = asyncio.StreamReader(limit=1 << 20)
    await loop.connect_read_pipe(lambda: asyncio.StreamReaderProtocol(reader), sys.stdin)
    _emit({"ready": True})
    commands = asyncio.create_task(_commands(reader, stop))
    await stop.wait()
    commands.cancel()
    with contextlib.suppress(asyncio.CancelledError):
        await commands
    return 0


async def _commands(reader: asyncio.StreamReader, stop: asyncio.Event) -> None:
    try:
        while line := await reader.readline():
            try:
                cmd = json.loads(line)
                if cmd.get("cmd") != "probe":
                    raise ValueError(f"unknown command {cmd.get('cmd')!r}")
                records = await asyncio.gather(*(_run(job) for job in cmd["jobs"]))
                _emit({"records": records})
            except (ValueError, KeyError, TypeError, AttributeError) as exc:
                _emit({"error": f"{type(exc).__name__}: {exc}"})
    except (ValueError, OSError):
        pass
    finally:
        stop.set()


def _emit(obj: Mapping[str, Any]) -> None:
    sys.stdout.write(json.dumps(obj, sort_keys=True) + "\n")
    sys.stdout.flush()


def main(argv: Sequence[str] | None = None) -> int:
    args = list(sys.argv[1:] if argv is None else argv)
    if args == ["--serve"]:
        return asyncio.run(_serve())
    try:
        if len(args) != 1:
            raise ValueError("usage: python -m probe.lab.runprobe JOB_JSON")
        job = json.loads(args[0])
        if not isinstance(job, dict):
            raise ValueError("the job must be a JSON object")
        record = asyncio.run(_run(job))
    except (ValueError, KeyError, TypeError) as exc:
        print(f"runprobe: {type(exc).__name__}: {exc}", file=sys.stderr)
        return 2
    sys.stdout.write(json.dumps(record, sort_keys=True) + "\n")
    return 0 if record["ok"] else 1


if __name__ == "__main__":
    raise SystemExit(main())
