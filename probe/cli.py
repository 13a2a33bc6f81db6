"""Command line: `probe once | check-config | ...`.  Errors are one line, never a traceback."""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import os
import sys
from collections.abc import Callable, Sequence
from dataclasses import replace
from datetime import datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any, TextIO

from . import __version__, logs
from .agent_config import known_probes, load_config
from .config.loader import ConfigError
from .config.settings import AgentConfig
from .model import Endpoint
from .records import is_result_record
from .round import RoundReport, run_round
from .verdict.aggregate import judge_round
from .verdict.observations import Observation, from_api, from_record

if TYPE_CHECKING:
    from .archive import ArchiveWriter

EXIT_OK = 0  # round done, nothing failed
EXIT_FAILURES = 1  # round done, at least one probe failed (see the results)
EXIT_USAGE = 2  # bad command line or configuration
EXIT_OFFLINE = 3  # the vantage itself is offline: nothing was measured

_EPILOG = """exit codes:
  0  round completed and every probe succeeded (or was not applicable)
  1  round completed and at least one probe failed
  2  usage or configuration error (one line on stderr names file, line and field)
  3  the vantage is offline: no control target reachable, nothing was measured
"""

# the services the shipped seed lists define (seeds/*.yaml), named in --help
SHIPPED_SERVICES = ("whatsapp", "telegram", "controls", "controls-ru")

log = logging.getLogger("probe")


class _Parser(argparse.ArgumentParser):
    """An ArgumentParser whose epilog can be computed when help is shown, so listing the
    lab scenarios costs nothing to commands that never print that help."""

    def __init__(self, *args: Any, epilog_from: Callable[[], str] | None = None, **kw: Any):
        super().__init__(*args, **kw)
        self._epilog_from = epilog_from

    def format_help(self) -> str:
        if self._epilog_from is not None:
            self.epilog = self._epilog_from()
        return super().format_help()


def _lab_scenarios() -> str:
    from .lab.scenarios import CATALOGUE

    return "scenarios (--only NAME):\n" + "\n".join(
        f"  {s.name:<26} {s.description}" for s in CATALOGUE
    )


def _progress(stream: TextIO) -> Callable[[int, int], None] | None:
    """A one-line counter on an interactive terminal; silent when piped or logged."""
    if not stream.isatty():
        return None

    def show(done: int, total: int) -> None:
        stream.write(f"\r\x1b[Kprobing {done}/{total}")
        if done == total:
            stream.write("\r\x1b[K")
        stream.flush()

    return show


def _exit_code(report: RoundReport) -> int:
    if not report.state.online:
        return EXIT_OFFLINE
    return EXIT_FAILURES if any(r.status == "failed" for r in report.results) else EXIT_OK


def cmd_once(args: argparse.Namespace) -> int:
    from .output import json_lines, summary, table

    config = load_config(args.config)
    logs.setup(config.log_format, args.log_level or "warning")
    log.info("round starting", extra={"config": config.source, "vantage": config.vantage.name})
    control = _control_results(args.control_results) if args.control_results else None
    archive = _open_archive(config, args.archive) if args.archive else None
    report = asyncio.run(run_round(config, progress=_progress(sys.stderr)))
    if archive is not None:
        _archive(archive, report)
    if control is not None:
        # The same round, judged again next to what the control vantage saw.
        verdicts = judge_round(report.results, control=control, vantage_role=config.vantage.role)
        report = replace(report, verdicts=verdicts)
    if args.format == "json":
        for line in json_lines(report):
            sys.stdout.write(line + "\n")
    else:
        sys.stdout.write(table(report))
    log.info("round finished", extra={"summary": summary(report)})
    return _exit_code(report)


def _open_archive(config: AgentConfig, directory: str) -> ArchiveWriter:
    """Opened before the round, so a bad directory costs no measuring."""
    from .archive import ArchiveWriter

    try:
        settings = replace(config.archive, path=directory)
        writer = ArchiveWriter.from_settings(settings, config.vantage)
    except OSError as exc:
        raise UsageError(f"--archive {directory}: {exc.strerror or exc}") from exc
    assert writer is not None  # the path is set
    return writer


def _archive(writer: ArchiveWriter, report: RoundReport) -> None:
    with writer:
        for result in report.results:
            writer.write(result)
    if writer.write_errors:
        log.warning("archive write errors", extra={"lost": writer.write_errors})


class UsageError(Exception):
    """A bad command-line argument (exit 2, one line)."""


def _control_results(path: str) -> list[Observation]:
    """A control vantage's results: its ``probe once --format json`` JSON Lines (verdict
    records are skipped) or its ``/api/results`` document."""
    try:
        text = Path(path).read_text(encoding="utf-8")
        try:
            document = json.loads(text)
        except ValueError:
            document = None  # JSON Lines: more than one document
        if isinstance(document, dict) and "results" in document:
            return from_api(document)
        records = [json.loads(line) for line in text.splitlines() if line.strip()]
        return [from_record(r) for r in records if is_result_record(r)]
    except (OSError, ValueError, KeyError, TypeError, AttributeError) as exc:
        raise UsageError(f"--control-results {path}: {type(exc).__name__}: {exc}") from exc


def cmd_lab(args: argparse.Namespace) -> int:
    from .lab.demo import cleanup, demo

    if args.action == "cleanup":
        return cleanup(force=args.force)
    return demo(args.only or (), repeat=args.repeat)


def cmd_trace(args: argparse.Namespace) -> int:
    from .trace import TraceError
    from .tracecmd import main as trace_main

    endpoints: list[Endpoint] = []
    vantage_asn = args.vantage_asn
    if not _looks_like_ip(args.target) or args.config:
        config = load_config(args.config)
        endpoints = [ep for svc in config.services for ep in svc.endpoints]
        vantage_asn = vantage_asn or config.vantage.asn or None
    try:
        return trace_main(args, endpoints, vantage_asn)
    except TraceError as exc:
        raise UsageError(f"trace: {exc}") from exc


def _looks_like_ip(text: str) -> bool:
    import ipaddress

    try:
        ipaddress.ip_address(text)
    except ValueError:
        return False
    return True


def cmd_check_config(args: argparse.Namespace) -> int:
    config = load_config(args.file)
    endpoints = sum(len(s.endpoints) for s in config.services)
    print(f"{config.source}: ok ({len(config.services)} services, {endpoints} endpoints)")
    return EXIT_OK


# glibc mallopt parameters (malloc.h)
_M_MMAP_THRESHOLD = -3
_M_ARENA_MAX = -8
# Blocks from this size up get their own mapping, returned to the system when freed.
MMAP_THRESHOLD = 1 << 20
MALLOC_ARENAS = 2


def tune_malloc() -> bool:
    """Keep the daemon's resident memory near what it uses (glibc only; True if applied).

    By default glibc gives every thread that allocates an arena of its own (render,
    verdicts, archive, HTTP), and after the first multi-megabyte ``/metrics`` body is
    freed it raises its mmap threshold, so later bodies come from those arenas and their
    freed pages stay resident.  Two arenas and a fixed 1 MiB threshold measured 76 MiB
    instead of 84 MiB at 1,000 endpoints (bench/README.md)."""
    import ctypes
    import platform

    if platform.libc_ver()[0] != "glibc":
        return False
    try:
        mallopt = ctypes.CDLL(None).mallopt
    except (OSError, AttributeError):
        return False
    return bool(mallopt(_M_ARENA_MAX, MALLOC_ARENAS) and mallopt(_M_MMAP_THRESHOLD, MMAP_THRESHOLD))


def cmd_run(args: argparse.Namespace) -> int:
    from .daemon import serve

    tune_malloc()  # before the daemon's threads start allocating
    config = load_config(args.config)
    logs.setup(config.log_format, args.log_level or "info")
    return asyncio.run(serve(config, args.config))


def cmd_archive(args: argparse.Namespace) -> int:
    import json

    from .archive import ReadStats, iter_archive

    directory = args.dir or load_config(args.config).archive.path
    if directory is None:
        print("probe: the archive is disabled in this config", file=sys.stderr)
        return EXIT_USAGE
    if not Path(directory).is_dir():  # a typo must not read as "nothing archived"
        print(f"probe: archive: no archive directory at {directory}", file=sys.stderr)
        return EXIT_USAGE
    since = args.since
    stats = ReadStats()
    for record in iter_archive(
        directory, since, args.service, args.probe, args.failed, stats=stats
    ):
        sys.stdout.write(json.dumps(record, sort_keys=True) + "\n")
    if stats.torn or stats.corrupt:
        print(
            f"probe: skipped {stats.torn} torn and {stats.corrupt} corrupt line(s)", file=sys.stderr
        )
    if stats.records == 0:
        print(f"probe: archive: no measurement in {directory} matches", file=sys.stderr)
    return EXIT_OK


def _iso_time(text: str) -> datetime:
    """argparse type: an ISO 8601 time (UTC when no offset is given)."""
    try:
        return datetime.fromisoformat(text)
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"{text!r} is not an ISO 8601 time like 2025-08-01 or 2025-08-01T12:00Z"
        ) from None


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(
        prog="probe",
        description="Measure reachability and censorship of WhatsApp and Telegram endpoints.",
        epilog=_EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    parser.add_argument(
        "--log-level",
        default=None,
        choices=["debug", "info", "warning", "error"],
        help="default: info for run, warning otherwise",
    )
    sub = parser.add_subparsers(
        dest="command", required=True, metavar="COMMAND", parser_class=_Parser
    )

    once = sub.add_parser(
        "once",
        help="run one round over all configured targets and print it",
        epilog=_EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    once.add_argument("-c", "--config", help="config file (default: the embedded default)")
    once.add_argument(
        "--format",
        choices=["table", "json"],
        default="table",
        help="table for people, json for JSON Lines (one result a line)",
    )
    once.add_argument(
        "--control-results",
        metavar="FILE",
        help="judge verdicts next to a control vantage's results: its `probe once "
        "--format json` output or its /api/results document",
    )
    once.add_argument(
        "--archive",
        metavar="DIR",
        help="also append the round's measurements to the archive in DIR (OONI-style "
        "JSON Lines, docs/archive.md; rotation settings from the config's archive:)",
    )
    once.set_defaults(func=cmd_once)

    run = sub.add_parser(
        "run",
        help="run the agent: schedule probes, serve /metrics and /",
        description="Long-running agent. SIGHUP or POST /-/reload reloads the "
        "config (an invalid one is rejected and the old one keeps running); "
        "SIGTERM/SIGINT stop it cleanly.",
    )
    run.add_argument("-c", "--config", help="config file (default: the embedded default)")
    run.set_defaults(func=cmd_run)

    arch = sub.add_parser("archive", help="read the measurement archive back (JSON Lines)")
    arch.add_argument("-c", "--config", help="config whose archive.path to read")
    arch.add_argument("--dir", help="archive directory (overrides the config)")
    arch.add_argument("--since", type=_iso_time, help="ISO 8601 time (UTC if no offset)")
    arch.add_argument(
        "--service",
        help="only this service, as named in the config (the shipped lists: "
        f"{', '.join(SHIPPED_SERVICES)})",
    )
    arch.add_argument("--probe", help=f"only this probe type ({', '.join(sorted(known_probes()))})")
    arch.add_argument("--failed", action="store_true", help="only failed measurements")
    arch.set_defaults(func=cmd_archive)

    lab = sub.add_parser(
        "lab",
        epilog_from=_lab_scenarios,
        formatter_class=argparse.RawDescriptionHelpFormatter,
        help="the censorship lab (root): watch the agent classify each censor behaviour",
        description="demo: build the network-namespace lab, run every scenario (or --only) "
        "and print expected vs observed verdicts; exit 0 if all match.  cleanup: remove "
        "labs left by crashed runs.  See docs/lab.md.",
    )
    lab.add_argument("action", choices=["demo", "cleanup"])
    lab.add_argument(
        "--only",
        action="append",
        metavar="NAME",
        help="run only this scenario (repeatable; the names are listed below)",
    )
    lab.add_argument("--force", action="store_true", help="cleanup: also labs of live owners")
    lab.add_argument(
        "--repeat",
        type=int,
        default=1,
        choices=range(1, 51),
        metavar="N",
        help="demo: run each scenario N times in a row (1-50); a tally per scenario at the end",
    )
    lab.set_defaults(func=cmd_lab)

    trace = sub.add_parser(
        "trace",
        help="locate the censor: repeat a path's triggering packet with increasing TTL",
        description="Censor localisation (docs/trace.md): sends the triggering packet of "
        "a path (TCP SYN, TLS ClientHello, QUIC Initial, STUN request, DNS query) with "
        "TTL 1, 2, ... and reports the hop at which the block appears.  No privileges "
        "needed.  Sends real packets to TARGET: never part of `probe run`.",
    )
    trace.add_argument("target", help="service/endpoint from the config, or an IP address")
    trace.add_argument("-c", "--config", help="config file (default: the embedded default)")
    trace.add_argument("--probe", choices=["tcp", "tls", "quic", "stun", "dns"], help="the trigger")
    trace.add_argument("--port", type=int, help="default: the endpoint's (443, 3478, 53)")
    trace.add_argument("--sni", help="tls: the SNI (default: the endpoint's)")
    trace.add_argument("--name", help="dns: the name to query")
    trace.add_argument("--max-hops", type=int, default=12, help="1..32 (default 12)")
    trace.add_argument("--timeout", type=float, default=1.0, help="seconds per TTL")
    trace.add_argument("--interval", type=float, default=0.1, help="seconds between probes")
    trace.add_argument(
        "--asn-map",
        metavar="FILE",
        help="prefix-to-AS table ('PREFIX ASN' lines or a RouteViews pfx2as dump): names the "
        "censor hop's AS and whether it is the vantage's own",
    )
    trace.add_argument("--vantage-asn", help="the vantage's AS (default: the config's)")
    trace.add_argument("--format", choices=["table", "json"], default="table")
    trace.set_defaults(func=cmd_trace)

    check = sub.add_parser("check-config", help="validate a config file and exit")
    check.add_argument("file")
    check.set_defaults(func=cmd_check_config)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return int(args.func(args))
    except ConfigError as exc:
        print(f"probe: config error: {exc}", file=sys.stderr)
        return EXIT_USAGE
    except UsageError as exc:
        print(f"probe: {exc}", file=sys.stderr)
        return EXIT_USAGE
    except BrokenPipeError:  # `probe once | head`: the reader left; not an error of ours
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return EXIT_OK
    except KeyboardInterrupt:
        print("probe: interrupted", file=sys.stderr)
        return 130
