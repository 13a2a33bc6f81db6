"""Soak (issue 11 item 11), the short CI version of ``bench/soak.py``.

40 endpoints (ok, refused, dropped by nftables, silent UDP) probed every 2 s in an empty
network namespace, with 4 HTTP clients fetching back to back and a changed config reloaded
every 3 s, for 25 s.  RSS and descriptors must stay flat after warm-up, every endpoint
must have results (the dropped ones too: a reload never cancels them), the schedule lag
must stay bounded, and no request may fail.  A long run by hand: docs/security.md.
"""

from __future__ import annotations

import json
import subprocess
import sys

from tests.agentproc import REPO, needs_unshare
from tests.test_daemon import required_tool

DURATION_S = 25


@needs_unshare("for the soak's namespace")
def test_a_short_soak_stays_flat_and_measures_every_endpoint() -> None:
    required_tool("nft", package="nftables")
    done = subprocess.run(
        [sys.executable, "bench/soak.py", "--duration", str(DURATION_S), "--json"],
        capture_output=True,
        text=True,
        timeout=DURATION_S + 90,
        cwd=REPO,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    out = json.loads(done.stdout)
    assert out["endpoints_without_results"] == [], out
    # every kind kept being measured: 2 s interval -> about 12 rounds in 25 s
    assert all(n >= DURATION_S / 2 / 3 for n in out["attempts_min_by_kind"].values()), out
    assert set(out["attempts_min_by_kind"]) == {"ok", "refused", "dropped", "silent"}, out
    assert out["rss_kib_at_end"] - out["rss_kib_after_warmup"] < 8 * 1024, out
    assert out["fds_at_end"] - out["fds_after_warmup"] <= 8, out
    assert out["lag_s_max"] < 1.0, out
    assert out["http_errors"] == 0 and out["reload_errors"] == 0, out
    assert out["reloads"] >= DURATION_S // 3 - 1, out
