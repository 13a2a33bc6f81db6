"""Append-only measurement archive: one JSON object per line, in OONI's envelope.

Every `ProbeResult` becomes one line shaped like an OONI measurement so OONI
tooling and habits apply, with our complete result under
``test_keys.probe_result``.  See docs/archive.md.

- `probe.archive.ooni`: the envelope and ``test_keys`` built from a result.
- `probe.archive.writer`: `ArchiveWriter`, crash-safe appends, rotation, retention.
- `probe.archive.reader`: `iter_archive`, reading the files back (``probe archive``),
  and `result_fields`, an archived result as a flat record's fields (to judge again).
"""

from ..records import to_jsonable
from .ooni import envelope, result_to_dict
from .reader import ReadStats, iter_archive, result_fields
from .writer import CURRENT_NAME, ArchiveWriter

__all__ = [
    "CURRENT_NAME",
    "ArchiveWriter",
    "ReadStats",
    "envelope",
    "iter_archive",
    "result_fields",
    "result_to_dict",
    "to_jsonable",
]
