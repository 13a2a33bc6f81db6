"""Command line: `probe once | check-config | ...`.  Errors are one line, never a traceback."""

from __future__ import annotations

import argparse
import asyncio
import logging
import os
import sys
from collections.abc import Callable, Sequence
from typing import TextIO

from . import __version__, logs
from .config import ConfigError, load_config
from .round import RoundReport, run_round

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

log = logging.getLogger("probe")


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
    report = asyncio.run(run_round(config, progress=_progress(sys.stderr)))
    if args.format == "json":
        for line in json_lines(report):
            sys.stdout.write(line + "\n")
    else:
        sys.stdout.write(table(report))
    log.info("round finished", extra={"summary": summary(report)})
    return _exit_code(report)


def cmd_check_config(args: argparse.Namespace) -> int:
    config = load_config(args.file)
    endpoints = sum(len(s.endpoints) for s in config.services)
    print(f"{config.source}: ok ({len(config.services)} services, {endpoints} endpoints)")
    return EXIT_OK


def cmd_run(args: argparse.Namespace) -> int:
    from .daemon import serve

    config = load_config(args.config)
    logs.setup(config.log_format, args.log_level or "info")
    return asyncio.run(serve(config, args.config))


def cmd_archive(args: argparse.Namespace) -> int:
    import json
    from datetime import datetime

    from .archive import ReadStats, iter_archive

    directory = args.dir or load_config(args.config).archive.path
    if directory is None:
        print("probe: the archive is disabled in this config", file=sys.stderr)
        return EXIT_USAGE
    since = datetime.fromisoformat(args.since) if args.since else None
    stats = ReadStats()
    for record in iter_archive(
        directory, since, args.service, args.probe, args.failed, stats=stats
    ):
        sys.stdout.write(json.dumps(record, sort_keys=True) + "\n")
    if stats.torn or stats.corrupt:
        print(
            f"probe: skipped {stats.torn} torn and {stats.corrupt} corrupt line(s)", file=sys.stderr
        )
    return EXIT_OK


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
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
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

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
    arch.add_argument("--since", help="ISO 8601 time (UTC if no offset)")
    arch.add_argument("--service")
    arch.add_argument("--probe")
    arch.add_argument("--failed", action="store_true", help="only failed measurements")
    arch.set_defaults(func=cmd_archive)

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
    except BrokenPipeError:  # `probe once | head`: the reader left; not an error of ours
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return EXIT_OK
    except KeyboardInterrupt:
        print("probe: interrupted", file=sys.stderr)
        return 130
