"""Attack 7: huge configs and non-regular files.

Before: a 2.4 MB file of 1.2 M list items took 20 s and 850 MB in ``check-config`` (and the
same in a running agent's reload), and the error blamed aliases; a FIFO as the config hung
``check-config`` forever.  Now values are counted before the tree is built and the file
must be a regular file.  ``probe check-config`` runs as a process; nothing uses the network.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

from tests.agentproc import REPO

ITEMS = 1_200_000


# `probe check-config PATH` that also prints its own peak RSS (KiB) as a last stderr line.
_MEASURED = (
    "import resource, sys\n"
    "from probe.cli import main\n"
    "rc = main(['check-config', sys.argv[1]])\n"
    "print(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss, file=sys.stderr)\n"
    "sys.exit(rc)\n"
)


def check_config(path: Path, timeout_s: float = 60) -> tuple[subprocess.CompletedProcess[str], int]:
    """(the run, with the RSS line taken off its stderr; its peak RSS in KiB)."""
    done = subprocess.run(
        [sys.executable, "-c", _MEASURED, str(path)],
        capture_output=True,
        text=True,
        timeout=timeout_s,
        cwd=REPO,
    )
    stderr, _, rss = done.stderr.rstrip("\n").rpartition("\n")
    done.stderr = stderr + "\n" if stderr else ""
    return done, int(rss)


def test_a_million_list_items_are_refused_early_and_named_correctly(tmp_path: Path) -> None:
    path = tmp_path / "huge.yaml"
    path.write_text("seeds: []\nservices: [" + "1," * ITEMS + "1]\n")
    assert 2_000_000 < path.stat().st_size < 4 * 1024 * 1024  # under the byte cap
    done, peak_kib = check_config(path)
    assert done.returncode == 2, done.stderr
    assert done.stderr == (
        f"probe: config error: {path}:2: <yaml>: too many values: more than 250000 "
        "(a config or seed list has far fewer; split the list)\n"
    )
    assert "alias" not in done.stderr
    # The tree is never built: far below the 850 MB it took (the interpreter with the
    # package imported and the file read is ~70 MB).
    assert peak_kib < 200 * 1024, f"peak RSS {peak_kib} KiB"


def test_a_fifo_is_refused_at_once(tmp_path: Path) -> None:
    fifo = tmp_path / "agent.yaml"
    os.mkfifo(fifo)
    done, _ = check_config(fifo, timeout_s=30)  # before: blocked in open() until the timeout
    assert done.returncode == 2
    assert done.stderr == f"probe: config error: {fifo}: <file>: not a regular file\n"


def test_a_device_is_refused_too(tmp_path: Path) -> None:
    done, _ = check_config(Path("/dev/zero"), timeout_s=30)
    assert done.returncode == 2
    assert done.stderr.endswith("<file>: not a regular file\n"), done.stderr


def test_a_big_but_legal_config_still_loads(tmp_path: Path) -> None:
    """Just under the limit is fine: the count refuses absurd files, not big target lists."""
    sys.path.insert(0, str(REPO))
    from bench.config_load import write_config

    path = write_config(tmp_path / "big.yaml", endpoints=3000)
    done, _ = check_config(path)
    assert done.returncode == 0, done.stderr
    assert "3000 endpoints" in done.stdout
