"""``probe lab demo``: watch the agent classify each censor behaviour, live.

Builds one lab (`probe.lab.scenarios.ScenarioLab`), runs the scenario catalogue (or the
``--only`` ones) and prints, as each scenario finishes, its rows of the table: the
endpoints and services the scenario is about (expected or observed not ``ok``), one row
for all the others, the mechanism behind it and any failure string that did not match.
Progress ("running B3_sni_filter ...") goes to stderr.  Exit 0 if every scenario matched
its expectations, 1 if one did not, 2 if the lab cannot run here (not root, tools
missing) or a scenario name is unknown.  ``--repeat N`` runs each scenario N times in a
row (the stability runs of docs/lab.md) and ends with a tally: passes per scenario and
every verdict observed for the endpoints it is about.

``probe lab cleanup [--force]`` removes labs left behind by crashed runs.
"""

from __future__ import annotations

import sys
import time
from collections.abc import Sequence
from typing import TextIO

from .scenarios import (
    CATALOGUE,
    ENDPOINTS,
    SERVICES,
    Outcome,
    Scenario,
    ScenarioLab,
    by_name,
    check,
)
from .topology import LabError, cleanup_stale, lab_available

__all__ = ["cleanup", "demo", "rows"]

COLUMNS = ("scenario", "behaviour", "endpoint", "expected", "observed", "result")
WIDTHS = (24, 11, 18, 19, 19, 6)


def _line(cells: Sequence[str]) -> str:
    return "  ".join(c.ljust(w) for c, w in zip(cells, WIDTHS, strict=True)).rstrip()


def header() -> list[str]:
    return [_line(COLUMNS), _line(["-" * w for w in WIDTHS])]


def _observed(outcome: Outcome, key: str) -> str:
    seen = [str(o) if (o := r.observed(key)) is not None else "(none)" for r in outcome.rounds]
    return " | ".join(dict.fromkeys(seen))  # rounds that agree are shown once


def rows(scenario: Scenario, outcome: Outcome, problems: Sequence[str]) -> list[str]:
    """The scenario's block of the table."""
    lines: list[str] = []
    quiet: list[str] = []
    first = True
    for key in (*ENDPOINTS, *SERVICES):
        expected = scenario.expected(key)
        observed = _observed(outcome, key)
        if expected.verdict == "ok" and observed == "ok":
            quiet.append(key)
            continue
        label = key if "/" in key else f"{key} (service)"
        verdict_ok = not any(p.split(": ", 1)[-1].startswith(f"{key}: ") for p in problems)
        cells = [
            scenario.name if first else "",
            scenario.behaviour if first else "",
            label,
            str(expected),
            observed,
            "PASS" if verdict_ok else "FAIL",
        ]
        lines.append(_line(cells))
        first = False
    if quiet:
        cells = [
            scenario.name if first else "",
            scenario.behaviour if first else "",
            f"{len(quiet)} others" if lines else f"all {len(quiet)}",
            "ok",
            "ok",
            "PASS",
        ]
        lines.append(_line(cells))
    rounds = f", {len(outcome.rounds)} rounds" if len(outcome.rounds) > 1 else ""
    lines.append(f"    mechanism: {scenario.mechanism} ({outcome.duration_s:.1f} s{rounds})")
    if scenario.note:
        lines.append(f"    note: {scenario.note}")
    lines += [f"    MISMATCH {p}" for p in problems]
    verdict = "FAIL" if problems else "PASS"
    lines.append(f"    => {verdict}")
    return lines


def tally(scenario: Scenario, outcomes: Sequence[Outcome], passes: int) -> str:
    """One line per scenario of a repeated run: passes, and each verdict seen how often
    for the endpoints that are not plainly ok."""
    seen: dict[str, dict[str, int]] = {}
    for outcome in outcomes:
        for rnd in outcome.rounds:
            for key in (*ENDPOINTS, *SERVICES):
                observed = rnd.observed(key)
                text = observed.verdict if observed is not None else "(none)"
                if text == "ok" and scenario.expected(key).verdict == "ok":
                    continue
                counts = seen.setdefault(key, {})
                counts[text] = counts.get(text, 0) + 1
    details = "; ".join(
        f"{key}: " + ", ".join(f"{v} x{n}" for v, n in counts.items())
        for key, counts in seen.items()
    )
    return f"{scenario.name}: {passes}/{len(outcomes)} as expected" + (
        f" ({details})" if details else ""
    )


def demo(
    only: Sequence[str] = (),
    out: TextIO | None = None,
    err: TextIO | None = None,
    *,
    repeat: int = 1,
) -> int:
    out = out or sys.stdout
    err = err or sys.stderr
    try:
        scenarios = [by_name(n) for n in only] if only else list(CATALOGUE)
    except KeyError as exc:
        err.write(f"probe: lab demo: {exc.args[0]}\n")
        return 2
    reason = lab_available()
    if reason is not None:
        err.write(f"probe: lab demo: {reason}\n")
        return 2
    started = time.monotonic()
    passed = 0
    runs: dict[str, tuple[list[Outcome], list[int]]] = {}
    err.write("building the lab (4 network namespaces) and starting its servers ...\n")
    try:
        with ScenarioLab() as runner:
            for line in header():
                out.write(line + "\n")
            out.flush()
            for i, scenario in enumerate(scenarios, 1):
                for n in range(1, repeat + 1):
                    run = f" (run {n}/{repeat})" if repeat > 1 else ""
                    err.write(
                        f"[{i}/{len(scenarios)}] {scenario.name}{run}: {scenario.description}\n"
                    )
                    err.flush()
                    outcome = runner.run(scenario)
                    problems = check(scenario, outcome)
                    passed += not problems
                    outcomes, ok = runs.setdefault(scenario.name, ([], [0]))
                    outcomes.append(outcome)
                    ok[0] += not problems
                    for line in rows(scenario, outcome, problems):
                        out.write(line + "\n")
                    out.flush()
    except LabError as exc:
        err.write(f"probe: lab demo: {exc}\n")
        return 1
    elapsed = time.monotonic() - started
    total = len(scenarios) * repeat
    if repeat > 1:
        out.write("\n")
        for scenario in scenarios:
            outcomes, ok = runs[scenario.name]
            out.write(tally(scenario, outcomes, ok[0]) + "\n")
        out.write(f"\n{passed} of {total} scenario runs as expected in {elapsed:.0f} s\n")
    else:
        out.write(f"\n{passed} of {total} scenarios as expected in {elapsed:.0f} s\n")
    return 0 if passed == total else 1


def cleanup(force: bool = False, out: TextIO | None = None, err: TextIO | None = None) -> int:
    out = out or sys.stdout
    err = err or sys.stderr
    reason = lab_available()
    if reason is not None:
        err.write(f"probe: lab cleanup: {reason}\n")
        return 2
    removed = cleanup_stale(force=force)
    for lab_id in removed:
        out.write(f"removed {lab_id}\n")
    if not removed:
        out.write("no stale lab\n")
    return 0
