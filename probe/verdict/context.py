"""What a rule may consult about one endpoint, and the judgements made against the control.

`Context` holds one endpoint's measured results from this vantage and the control
vantage's results for the same endpoint; `control_for` picks the control's run that a
failure is compared with.  `by_control` is the shape most rules share: the control getting
through confirms the verdict, the control failing too makes it an outage, and without a
control the signature stands alone (or proves nothing).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from .observations import Observation, describe, describe_control, same_failure
from .vocabulary import FAIR, NONE, STRONG, Finding, Verdict

Passes = Callable[[Observation], bool]  # did the control get through (for this rule)?


def control_succeeded(c: Observation) -> bool:
    return c.ok


def control_connected(c: Observation) -> bool:
    # a failure without its operation (a trimmed control record) proves no connect
    return c.ok or c.failed_operation not in (None, "connect")


@dataclass(frozen=True)
class Context:
    """Everything the rules may consult for one endpoint."""

    results: tuple[Observation, ...]  # this endpoint, this vantage, measured
    control: tuple[Observation, ...]  # this endpoint, the control vantage, measured
    others_ok: bool  # another endpoint succeeded from this vantage (it is not dead)

    def swaps(self, base: str, variant: str, o: Observation) -> list[Observation]:
        """Swap results of ``base/variant`` on the same address and port as ``o``."""
        return [
            r
            for r in self.results
            if r.base == base
            and r.variant == variant
            and (r.address, r.port) == (o.address, o.port)
        ]

    def runs_at(self, base: str, o: Observation) -> list[Observation]:
        """Every run of probe ``base`` (first, repeat or swap) on ``o``'s address and port."""
        return [
            r for r in self.results if r.base == base and (r.address, r.port) == (o.address, o.port)
        ]

    def sibling_connects(self, o: Observation) -> bool:
        """Another address of this same endpoint accepts TCP from this vantage: the service
        is up and reachable here, so this address failing is not a dead vantage."""
        return any(r.connected and r.address != o.address for r in self.results)

    def tcp_connected(self, address: str | None) -> list[Observation]:
        return [r for r in self.results if r.address == address and r.connected]

    def control_for(self, o: Observation, prefer: Passes = control_succeeded) -> Observation | None:
        """The control's run of the same probe and port: the same address if it has one
        (seed addresses are probed from both vantages), else any address (hostname
        endpoints resolve differently per vantage); one that ``prefer``s is preferred,
        then one that failed like ``o`` (so the pick does not depend on input order)."""
        runs = [c for c in self.control if c.base == o.base and not c.variant and c.port == o.port]
        exact = [c for c in runs if c.address == o.address]
        pool = exact or runs
        for wanted in (prefer, lambda c: same_failure(o, c)):
            found = next((c for c in pool if wanted(c)), None)
            if found is not None:
                return found
        return pool[0] if pool else None


def endpoint_down(o: Observation, ctl: Observation) -> Finding:
    """The control fails too: the endpoint (or the service there) is down, not blocked."""
    confidence = STRONG if same_failure(o, ctl) else FAIR
    return Finding(Verdict.ENDPOINT_DOWN, confidence, (describe(o), describe_control(ctl)))


def inconclusive(o: Observation, why: str) -> Finding:
    return Finding(Verdict.INCONCLUSIVE, NONE, (describe(o), why))


def by_control(
    ctx: Context,
    o: Observation,
    verdict: Verdict,
    *,
    with_control: float,
    without: float | None,
    why: str,
    passes: Passes = control_succeeded,
) -> Finding:
    """The common shape: the control passing confirms ``verdict``; the control failing
    makes it an outage; no control leaves the signature alone (``without`` confidence,
    or inconclusive when the signature alone proves nothing)."""
    ctl = ctx.control_for(o, passes)
    if ctl is not None:
        if passes(ctl):
            return Finding(verdict, with_control, (describe(o), describe_control(ctl), why))
        return endpoint_down(o, ctl)
    if without is None:
        return inconclusive(o, f"{why}; no control vantage to tell censorship from an outage")
    return Finding(verdict, without, (describe(o), why))
