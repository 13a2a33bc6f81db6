"""Reading the archive back: every record, oldest file first, filtered."""

from __future__ import annotations

import dataclasses
import datetime as dt
import gzip
import json
import logging
import os
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import IO, Any, cast

from ..records import RecordFields, fields_from
from .writer import CURRENT_NAME, rotated_files, rotation_time

# The package's name, as before the split: log records and filters keep their logger.
log = logging.getLogger("probe.archive")


@dataclasses.dataclass
class ReadStats:
    """What `iter_archive` skipped.  ``torn``: a file's last line without its newline
    (the line being written when the writer died); ``corrupt``: any other line
    that is not a JSON object (a fragment isolated by the writer)."""

    records: int = 0
    torn: int = 0
    corrupt: int = 0


def _open_archive(path: Path) -> IO[bytes]:
    if path.name.endswith(".gz"):
        return cast(IO[bytes], gzip.open(path, "rb"))  # typeshed: GzipFile is not IO[bytes]
    return path.open("rb")


def _read_file(path: Path, stats: ReadStats) -> Iterator[dict[str, Any]]:
    try:
        handle = _open_archive(path)
    except FileNotFoundError:
        # Compressed (or pruned) since the listing: read its .gz twin if there is one.
        twin = path.with_name(path.name + ".gz")
        if path.suffix != ".jsonl" or not twin.exists():
            return
        handle = _open_archive(twin)
    with handle:
        try:
            for line in handle:
                if not line.endswith(b"\n"):
                    stats.torn += 1  # only ever the last line of a file
                    continue
                if not line.strip():
                    continue  # the separator the writer adds after a lost write
                try:
                    record = json.loads(line)
                except ValueError:
                    record = None
                if isinstance(record, dict):
                    yield record
                else:
                    stats.corrupt += 1
        except (EOFError, gzip.BadGzipFile, OSError) as exc:
            log.warning("archive file %s is damaged: %s", path, exc)
            stats.torn += 1


def _record_time(record: Mapping[str, Any]) -> dt.datetime | None:
    try:
        t = dt.datetime.fromisoformat(record["test_keys"]["probe_result"]["t"])
    except (KeyError, TypeError, ValueError):
        return None
    return t if t.tzinfo else t.replace(tzinfo=dt.UTC)


def _matches(
    record: Mapping[str, Any],
    since: dt.datetime | None,
    service: str | None,
    probe: str | None,
    failed_only: bool,
) -> bool:
    annotations = record.get("annotations")
    if not isinstance(annotations, Mapping):  # a damaged or foreign record: no annotations
        annotations = {}
    if service is not None and annotations.get("service") != service:
        return False
    if probe is not None and annotations.get("probe") != probe:
        return False
    if failed_only and annotations.get("status") != "failed":
        return False
    if since is not None:
        t = _record_time(record)
        if t is None or t < since:
            return False
    return True


def iter_archive(
    directory: str | os.PathLike[str],
    since: dt.datetime | None = None,
    service: str | None = None,
    probe: str | None = None,
    failed_only: bool = False,
    *,
    stats: ReadStats | None = None,
) -> Iterator[dict[str, Any]]:
    """Every archived measurement, oldest file first, filtered.

    ``since`` (naive means UTC) compares with the result's precise start time.
    ``failed_only`` keeps failed results (skipped ones are not failures).
    Pass a `ReadStats` to learn how many lines were skipped.
    """
    stats = stats if stats is not None else ReadStats()
    if since is not None and since.tzinfo is None:
        since = since.replace(tzinfo=dt.UTC)
    root = Path(directory)
    if not root.is_dir():
        return
    files = rotated_files(root)
    if (root / CURRENT_NAME).exists():
        files.append(root / CURRENT_NAME)
    for path in files:
        rotated_at = rotation_time(path)
        if since is not None and rotated_at is not None and rotated_at < since:
            continue  # every line in it started before it was rotated away
        for record in _read_file(path, stats):
            if _matches(record, since, service, probe, failed_only):
                stats.records += 1
                yield record


def result_fields(record: Mapping[str, Any]) -> RecordFields:
    """The archived result of one measurement as the fields of a flat result record
    (`probe.records`), so a verdict can be judged again from the archive.  The archive
    keeps no vantage state: ``vantage_state`` is None.  Raises KeyError, TypeError or
    ValueError on a record that is not one of our measurements."""
    result = record["test_keys"]["probe_result"]
    target = result["target"]
    variant = target.get("variant") or ""
    probe = f"{target['probe']}/{variant}" if variant else str(target["probe"])
    annotations = record.get("annotations")
    vantage = annotations.get("vantage") if isinstance(annotations, Mapping) else None
    return fields_from(target, result, probe=probe, vantage=vantage, vantage_state=None)
