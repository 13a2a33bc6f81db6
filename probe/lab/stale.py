"""Owner records and stale labs: what a crashed run leaves behind, and its removal.

Every lab writes ``/run/probe-lab/ID.json`` naming its owner process (pid and start time)
before it creates anything.  `cleanup_stale` removes the labs whose owner is gone and is
run at the start of every lab; labs of live owners (other runs, other engineers) are
never touched unless ``force`` says so.  ``python -m probe.lab.stale list|cleanup``
(also reachable as ``python -m probe.lab.topology``) does the same by hand.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import shutil
import signal
import time
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

from .netns import ETC_NETNS, NETNS_RUN_DIR, PREFIX, SHORT, LabError, run

__all__ = ["RECORD_DIR", "cleanup_stale", "destroy", "lab_namespaces", "main", "write_record"]

log = logging.getLogger(__name__)

RECORD_DIR = Path("/run/probe-lab")


def write_record(lab_id: str, namespaces: Sequence[str], workdir: Path) -> None:
    """Name this process as the owner of lab ``lab_id`` (before anything is created)."""
    RECORD_DIR.mkdir(mode=0o755, exist_ok=True)
    record = {
        "pid": os.getpid(),
        "start": _start_time(os.getpid()),
        "namespaces": list(namespaces),
        "workdir": str(workdir),
        "created": time.time(),
    }
    (RECORD_DIR / f"{lab_id}.json").write_text(json.dumps(record))


def _start_time(pid: int) -> str | None:
    """The process's start time in clock ticks (field 22 of /proc/PID/stat): with the
    pid it identifies a process even after the pid number is reused."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    return stat.rsplit(")", 1)[1].split()[19]


def _owner_alive(record: Mapping[str, Any]) -> bool:
    pid = record.get("pid")
    return isinstance(pid, int) and _start_time(pid) == record.get("start")


def lab_namespaces(prefix: str) -> dict[str, list[str]]:
    """Lab id -> its namespaces, for every namespace named PREFIX*-{cli,cen,srv,ctl}."""
    labs: dict[str, list[str]] = {}
    try:
        names = os.listdir(NETNS_RUN_DIR)
    except FileNotFoundError:
        names = []
    shorts = tuple(f"-{s}" for s in SHORT.values())
    for name in names:
        if name.startswith(prefix) and name.endswith(shorts):
            labs.setdefault(name.rsplit("-", 1)[0], []).append(name)
    for record in RECORD_DIR.glob(f"{prefix}*.json") if RECORD_DIR.is_dir() else ():
        labs.setdefault(record.stem, [])
    return labs


def destroy(lab_id: str, namespaces: Iterable[str], workdir: str | None = None) -> list[str]:
    """Kill what runs in the namespaces, delete them and their files; errors as text."""
    errors: list[str] = []
    namespaces = list(namespaces)
    for ns in namespaces:
        if not (NETNS_RUN_DIR / ns).exists():
            continue
        pids = run(["ip", "netns", "pids", ns], check=False).split()
        for pid in pids:
            with contextlib.suppress(ProcessLookupError, ValueError):
                os.kill(int(pid), signal.SIGKILL)
    existing = [ns for ns in namespaces if (NETNS_RUN_DIR / ns).exists()]
    if existing:
        try:
            run(
                ["ip", "-force", "-batch", "-"], input="".join(f"netns del {n}\n" for n in existing)
            )
        except LabError as exc:
            errors.append(str(exc))
    for ns in namespaces:
        shutil.rmtree(ETC_NETNS / ns, ignore_errors=True)
        if (NETNS_RUN_DIR / ns).exists():
            errors.append(f"namespace {ns} still exists")
    if workdir:
        shutil.rmtree(workdir, ignore_errors=True)
    with contextlib.suppress(FileNotFoundError):
        (RECORD_DIR / f"{lab_id}.json").unlink()
    return errors


def cleanup_stale(prefix: str = PREFIX, *, force: bool = False) -> list[str]:
    """Remove labs left behind by crashed runs: those whose owner process is gone
    (``force``: every lab with ``prefix``, also live ones).  Returns the lab ids removed."""
    removed = []
    for lab_id, namespaces in sorted(lab_namespaces(prefix).items()):
        record_path = RECORD_DIR / f"{lab_id}.json"
        try:
            record = json.loads(record_path.read_text())
        except (OSError, ValueError):
            record = {}
        if not force and record and _owner_alive(record):
            continue
        if not force and not record and _young(namespaces):
            continue  # a lab being created right now writes its record first; be safe anyway
        all_ns = sorted(set(namespaces) | set(record.get("namespaces", [])))
        errors = destroy(lab_id, all_ns, record.get("workdir"))
        for error in errors:
            log.warning("cleanup of %s: %s", lab_id, error)
        removed.append(lab_id)
    return removed


def _young(namespaces: Iterable[str], age_s: float = 60.0) -> bool:
    now = time.time()
    for ns in namespaces:
        with contextlib.suppress(OSError):
            if now - (NETNS_RUN_DIR / ns).stat().st_mtime < age_s:
                return True
    return False


def main(argv: Sequence[str] | None = None) -> int:
    import argparse

    parser = argparse.ArgumentParser(
        prog="python -m probe.lab.stale",
        description="Remove censorship labs left behind by crashed runs.",
    )
    parser.add_argument("command", choices=["cleanup", "list"])
    parser.add_argument("--prefix", default=PREFIX)
    parser.add_argument("--force", action="store_true", help="also remove labs whose owner lives")
    args = parser.parse_args(argv)
    if args.command == "list":
        for lab_id, namespaces in sorted(lab_namespaces(args.prefix).items()):
            print(lab_id, " ".join(sorted(namespaces)))
        return 0
    for lab_id in cleanup_stale(args.prefix, force=args.force):
        print(f"removed {lab_id}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
