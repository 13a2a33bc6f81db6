"""What every probe module shares: the signature and a result recorder with phase timings.

Every probe is ``async def probe(target: Target, settings: ProbeSettings) -> ProbeResult``
and never raises on a network failure: it returns a failed result whose
failure string comes from `probe.classify`.
"""

from __future__ import annotations

import time
from collections.abc import Awaitable, Callable, Iterator
from contextlib import contextmanager
from typing import Any

from ..classify import Classified, classify
from ..config.settings import ProbeSettings
from ..model import Operation, ProbeResult, SkipReason, Target, freeze, utcnow

ProbeFn = Callable[[Target, ProbeSettings], Awaitable[ProbeResult]]


class Recorder:
    """Collects phase timings, evidence and flags while a probe runs, then builds its result."""

    def __init__(self, target: Target) -> None:
        self.target = target
        self.t = utcnow()
        self._start = time.monotonic()
        self.phases: dict[str, float] = {}
        self.details: dict[str, Any] = {}
        self.flags: list[str] = []

    @contextmanager
    def phase(self, name: str) -> Iterator[None]:
        """Time a phase (resolve, connect, tls, first_byte, ...) on the monotonic clock.

        The phase is recorded also when it fails: how long a blocked handshake
        took before the reset or timeout is evidence too.
        """
        start = time.monotonic()
        try:
            yield
        finally:
            self.phases[name] = time.monotonic() - start

    def elapsed(self) -> float:
        return time.monotonic() - self._start

    def flag(self, name: str) -> None:
        if name not in self.flags:
            self.flags.append(name)

    def _result(self, ok: bool, **kw: Any) -> ProbeResult:
        return ProbeResult(
            target=self.target,
            ok=ok,
            t=self.t,
            duration_s=self.elapsed(),
            phases=freeze(self.phases),
            details=freeze(self.details),
            flags=tuple(self.flags),
            **kw,
        )

    def ok(self, **details: Any) -> ProbeResult:
        self.details.update(details)
        return self._result(True)

    def fail(self, failure: str | Classified, operation: Operation, **details: Any) -> ProbeResult:
        self.details.update(details)
        return self._result(False, failure=str(failure), failed_operation=operation)

    def fail_exc(self, exc: BaseException, operation: Operation, **details: Any) -> ProbeResult:
        return self.fail(classify(exc, operation), operation, **details)

    def skip(self, reason: SkipReason) -> ProbeResult:
        return self._result(False, skipped=reason)


def default_operation(target: Target) -> Operation:
    """The failed operation for a probe ended from outside (a bug, the runner's cap)."""
    return Operation.RESOLVE if target.probe == "dns" else Operation.READ


async def run_guarded(fn: ProbeFn, target: Target, settings: ProbeSettings) -> ProbeResult:
    """Run a probe; a bug that escapes it becomes a classified result, not a dead agent."""
    recorder = Recorder(target)
    try:
        return await fn(target, settings)
    except Exception as exc:  # the agent must keep going whatever a peer sends
        op = default_operation(target)
        return recorder.fail_exc(exc, op, internal_error=type(exc).__name__)
