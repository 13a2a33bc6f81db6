"""One measurement round: offline gate, then DNS, then every other probe on every address.

Planning is pure (`plan_dns`, `plan_targets`); running is a bounded fan-out.
Addresses come not only from the system resolver but also from the other
resolvers (the DoH control above all) and the seeds' known-good addresses, so
that a DNS lie and an IP block are told apart, as OONI's web_connectivity does
with its test helper.
"""

from __future__ import annotations

import asyncio
import contextlib
import ipaddress
import logging
import time
from collections.abc import AsyncIterator, Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, replace
from datetime import datetime

from .classify import AGENT_RESOURCES
from .config.settings import AgentConfig, ProbeSettings, SwapSettings, Timeouts
from .dnsjudge import dns_consistency, suspect_bogon
from .evidence import DnsEvidence, TransferEvidence
from .gate import check_vantage
from .model import (
    Endpoint,
    ProbeResult,
    SkipReason,
    Target,
    Vantage,
    VantageState,
    _ip_version,
    utcnow,
)
from .probes import REGISTRY, tls
from .probes.base import ProbeFn, Recorder, default_operation, run_guarded
from .swaps import followups
from .verdict.aggregate import ALLOWLIST_FLAG, judge_round
from .verdict.vocabulary import EndpointVerdict, ServiceVerdict

log = logging.getLogger("probe.round")
Progress = Callable[[int, int], None]

MAX_ADDRESSES_PER_FAMILY = 4  # per endpoint: CDNs return many; a few show the pattern
_SOURCE_ORDER = ("literal", "system", "doh", "resolver", "seed")


@dataclass(frozen=True)
class RoundReport:
    vantage: Vantage
    state: VantageState
    results: tuple[ProbeResult, ...]
    started: datetime
    duration_s: float
    verdicts: tuple[EndpointVerdict | ServiceVerdict, ...] = ()


def resolver_ids(settings: ProbeSettings) -> list[str]:
    r = settings.resolvers
    ids = ["system"] if r.system else []
    ids += [f"udp:{hp}" for hp in r.udp]
    ids += [f"tcp:{hp}" for hp in r.tcp]
    if r.doh:
        ids.append(f"doh:{r.doh}")
    return ids


def plan_dns(endpoints: Iterable[Endpoint], settings: ProbeSettings) -> list[Target]:
    """DNS targets: every resolver for endpoints asking for `dns`, the first (the system
    resolver unless disabled) for the rest, whose addresses are needed anyway."""
    targets = []
    for ep in endpoints:
        if ep.is_ip_literal:
            continue
        every = resolver_ids(settings)
        # endpoints that do not ask for `dns` still need addresses: one resolver suffices
        ids = every if ep.spec("dns") else every[:1]
        targets += [Target(ep, "dns", resolver=rid) for rid in ids]
    return targets


def _source_of(resolver: str) -> str:
    kind = resolver.split(":", 1)[0]
    return {"system": "system", "doh": "doh"}.get(kind, "resolver")


def _usable(address: str, ep: Endpoint) -> bool:
    """A bogon answer (127.0.0.1 for whatsapp.net) is a DNS lie, not a place to connect to,
    unless the service itself lives there (a lab or test service declaring its prefixes)."""
    return not suspect_bogon(address, ep.prefixes)


def collect_addresses(ep: Endpoint, dns_results: Sequence[ProbeResult]) -> dict[str, str]:
    """address -> where it came from (its first source), capped per family.

    The sources take turns (literal, system, DoH, other resolvers, seed), so a system
    resolver returning many addresses cannot crowd out the DoH and seed (known-good)
    ones, which are exactly the ones that expose a DNS lie.
    """
    found: dict[str, str] = {}
    if ep.is_ip_literal:
        found[ep.host] = "literal"
    for result in dns_results:
        evidence = result.evidence
        found_here = evidence.addresses() if isinstance(evidence, DnsEvidence) else ()
        for address in found_here:
            if _usable(address, ep):
                found.setdefault(address, _source_of(result.target.resolver or ""))
    for address in ep.addresses:
        found.setdefault(address, "seed")
    # One pass sorts the addresses into (family, source) queues; the family comes from the
    # memoised parser (this ran ten list passes and two parses per address per round).
    by_kind: dict[tuple[int, str], list[str]] = {}
    for a, s in found.items():
        version = _ip_version(a) or ipaddress.ip_address(a).version  # not an IP: raises
        by_kind.setdefault((version, s), []).append(a)
    capped: dict[str, str] = {}
    for version in (4, 6):
        queues = [by_kind.get((version, source), []) for source in _SOURCE_ORDER]
        taken = 0
        while taken < MAX_ADDRESSES_PER_FAMILY and any(queues):  # each pass takes >= 1
            for queue in queues:
                if queue and taken < MAX_ADDRESSES_PER_FAMILY:
                    address = queue.pop(0)
                    capped[address] = found[address]
                    taken += 1
    return capped


def plan_targets(ep: Endpoint, addresses: Mapping[str, str]) -> list[Target]:
    return [
        Target(ep, spec.name, address, port, address_source=source)
        for spec in ep.probes
        if spec.name != "dns"
        for address, source in addresses.items()
        for port in (spec.ports if spec.ports is not None else ep.ports)
    ]


# The safety cap is this many times the probe's own budget, plus this much: a loaded
# event loop runs every timeout late, and a short budget is mostly scheduling.
DEADLINE_FACTOR = 2.0
DEADLINE_SLACK_S = 1.0


def probe_deadline(settings: ProbeSettings, target: Target) -> float:
    """A hard cap on one run, on top of the probe's own timeouts: a net against a bug.

    Built on the probe's budget (`probes.ProbeType.budget`: the longest a correct run
    of this probe with these params and settings can take), so a tcp connect is cut
    long before a 20-connection transfer would be.  A capped run loses all its
    evidence, so the net must never cut a correct one: hence the generous margin.
    """
    budget = REGISTRY[target.probe].budget_s(target, settings)
    return DEADLINE_FACTOR * budget + DEADLINE_SLACK_S


# Probes that saturate the path they measure: they run alone (see `Runner`).
EXCLUSIVE_PROBES = frozenset({"transfer"})
# Path-aware timeouts: once a transfer showed an address's path to be slow (throttled, or
# gaps it had to resume from), later probes to that address get their connect, handshake
# and application timeouts multiplied by this (the configured values are floors), for
# PATH_MEMORY_S.  A shaper's queue can still hold the transfer's tail when they start.
SLOW_PATH_STRETCH = 3.0
PATH_MEMORY_S = 900.0
SLOW_PATH_FLAG = "timeouts_stretched_slow_path"


def _shows_slow_path(result: ProbeResult) -> bool:
    if result.target.probe != "transfer":
        return False
    evidence = result.evidence
    connections = evidence.connections if isinstance(evidence, TransferEvidence) else ()
    gaps = any(c.long_gaps for c in connections)
    return (
        result.failure == "throttled"
        or gaps
        or "transfer_connection_failed_after_measured" in (result.flags)
    )


def stretched(timeouts: Timeouts, factor: float = SLOW_PATH_STRETCH) -> Timeouts:
    """Handshake-level timeouts times ``factor``; the transfer's own clocks are not
    touched (its stall confirm window is path-aware already)."""
    return replace(
        timeouts,
        connect_s=timeouts.connect_s * factor,
        tls_s=timeouts.tls_s * factor,
        quic_s=timeouts.quic_s * factor,
        udp_s=timeouts.udp_s * factor,
        app_s=timeouts.app_s * factor,
    )


class Lane:
    """An asyncio readers-writer lock, writer first: `shared()` runs alongside other shared
    holders, `exclusive()` alone.  A waiting writer holds new readers back, so a bulk
    transfer is never starved by a stream of handshakes."""

    def __init__(self) -> None:
        self._readers = 0
        self._writer = False
        self._writers_waiting = 0
        self._condition: asyncio.Condition | None = None  # made on first wait: most lanes
        # (one per destination in use) only ever see uncontended readers

    @property
    def _changed(self) -> asyncio.Condition:
        if self._condition is None:
            self._condition = asyncio.Condition()
        return self._condition

    @contextlib.asynccontextmanager
    async def shared(self) -> AsyncIterator[None]:
        await self.acquire_shared()
        try:
            yield
        finally:
            await self.release_shared()

    # acquire/release without a context manager: `Runner.one` runs them for every probe,
    # and the generator-based context manager cost more than the rest of the slot.
    async def acquire_shared(self) -> None:
        if not self._writer and not self._writers_waiting:
            # Nothing to wait for: the same as taking the free lock and a true predicate,
            # which never yield either (one loop, no await between check and count).
            self._readers += 1
            return
        async with self._changed:
            await self._changed.wait_for(lambda: not self._writer and not self._writers_waiting)
            self._readers += 1

    async def release_shared(self) -> None:
        self._readers -= 1
        if self._writers_waiting:  # only a waiting writer waits for readers to leave
            async with self._changed:
                self._changed.notify_all()

    @contextlib.asynccontextmanager
    async def exclusive(self) -> AsyncIterator[None]:
        async with self._changed:
            self._writers_waiting += 1
            try:
                await self._changed.wait_for(lambda: not self._writer and not self._readers)
            finally:
                self._writers_waiting -= 1
            self._writer = True
        try:
            yield
        finally:
            async with self._changed:
                self._writer = False
                self._changed.notify_all()


class Runner:
    """Runs targets with a global bound and a per-destination bound, counting progress.

    Bulk transfers (`EXCLUSIVE_PROBES`) have a lane of their own: one at a time per
    vantage, and alone on their destination.  On a shaped path, a download running next
    to another would starve it, and a handshake queued behind it would time out: either
    would be read as a freeze or a filter (docs/verdicts.md, "Congestion").
    """

    def __init__(
        self,
        settings: ProbeSettings,
        *,
        concurrency: int = 32,
        per_destination: int = 4,
        probes: Mapping[str, ProbeFn] | None = None,
        progress: Progress | None = None,
        swaps: SwapSettings | None = None,
    ) -> None:
        self.settings = settings
        self.swaps = swaps or SwapSettings()
        # what runs each probe type: the registry's, or a test's stand-ins
        self.probes = probes if probes is not None else {n: t.run for n, t in REGISTRY.items()}
        self.progress = progress
        self.limit = asyncio.Semaphore(concurrency)
        self.per_destination = per_destination
        # destination -> (its bound, runs holding or awaiting it); dropped when idle, since
        # the daemon's one Runner sees new addresses (CDN answers) for as long as it lives
        self._destinations: dict[str, tuple[asyncio.Semaphore, Lane, int]] = {}
        self._transfers = asyncio.Semaphore(1)
        self._slow_paths: dict[str, float] = {}  # address -> when a transfer found it slow
        self.in_flight = 0
        self.done = 0
        self.total = 0

    async def _in_slot(self, target: Target) -> ProbeResult:
        """Run ``target`` in its slot: the lane first (a transfer waits for the vantage's
        transfer lane, then for its destination to be idle), then the destination's bound,
        then the global one: a run queueing behind a busy (say, blackholed) destination
        must not sit on a global slot meanwhile.

        Plain ``async with`` blocks, no generator context manager and no exit stack: this
        runs for every probe, and those cost more CPU than the bounds themselves."""
        key = target.address or target.resolver or ""
        bound, lane, users = self._destinations.get(key) or (
            asyncio.Semaphore(self.per_destination),
            Lane(),
            0,
        )
        self._destinations[key] = (bound, lane, users + 1)
        try:
            if target.probe in EXCLUSIVE_PROBES:
                async with self._transfers, lane.exclusive(), bound, self.limit:
                    return await self._run(target)
            await lane.acquire_shared()
            try:
                async with bound, self.limit:
                    return await self._run(target)
            finally:
                await lane.release_shared()
        finally:
            bound, lane, users = self._destinations[key]
            if users == 1:
                del self._destinations[key]
            else:
                self._destinations[key] = (bound, lane, users - 1)

    def _settings_for(self, target: Target) -> ProbeSettings:
        """The configured settings, or stretched timeouts on a path known to be slow."""
        seen = self._slow_paths.get(target.address or "")
        if seen is None:
            return self.settings
        if time.monotonic() - seen > PATH_MEMORY_S:
            del self._slow_paths[target.address or ""]
            return self.settings
        return replace(self.settings, timeouts=stretched(self.settings.timeouts))

    async def _run(self, target: Target) -> ProbeResult:
        """One run, in its slot, under the safety cap."""
        self.in_flight += 1
        settings = self._settings_for(target)
        try:
            async with asyncio.timeout(probe_deadline(settings, target)):
                result = await run_guarded(self.probes[target.probe], target, settings)
        except TimeoutError:
            result = Recorder(target).fail_exc(TimeoutError(), default_operation(target))
        finally:
            self.in_flight -= 1
        if settings is not self.settings:
            result = replace(result, flags=(*result.flags, SLOW_PATH_FLAG))
        return result

    async def one(self, target: Target) -> ProbeResult:
        result = await self._in_slot(target)
        if result.failure == AGENT_RESOURCES:
            # Out of descriptors here (a flood of connections to the agent, say): the
            # target was not measured; a failure would blame it (and read as blocking).
            skipped = SkipReason.AGENT_RESOURCES
            result = replace(result, failure=None, failed_operation=None, skipped=skipped)
        if target.address and _shows_slow_path(result):
            self._slow_paths[target.address] = time.monotonic()
        self.done += 1
        if self.progress:
            self.progress(self.done, self.total)
        return result

    async def many(self, targets: Sequence[Target]) -> list[ProbeResult]:
        self.total += len(targets)
        # Most calls in a round have no target or one (an IP-literal endpoint's DNS pass and
        # follow-ups): no task and no gather for those, a measurable share of a probe's CPU.
        if not targets:
            return []
        if len(targets) == 1:
            return [await self.one(targets[0])]
        return list(await asyncio.gather(*(self.one(t) for t in targets)))


def _skipped(targets: Iterable[Target], reason: SkipReason) -> list[ProbeResult]:
    return [Recorder(t).skip(reason) for t in targets]


def _offline_plan(endpoints: Sequence[Endpoint], settings: ProbeSettings) -> list[Target]:
    targets = plan_dns(endpoints, settings)
    for ep in endpoints:
        addresses = collect_addresses(ep, ())
        if addresses:
            targets += plan_targets(ep, addresses)
        else:  # nothing known without DNS: one placeholder per probe and port
            targets += [
                Target(ep, s.name, None, p)
                for s in ep.probes
                if s.name != "dns"
                for p in ep.ports_for(s.name)
            ]
    return targets


def _with_consistency_flags(dns_results: list[ProbeResult]) -> list[ProbeResult]:
    by_host: dict[tuple[str, str], list[ProbeResult]] = {}
    for r in dns_results:
        by_host.setdefault((r.target.service, r.target.endpoint.name), []).append(r)
    out = []
    for group in by_host.values():
        flags = dns_consistency(group)
        out += [
            replace(r, flags=tuple(dict.fromkeys([*r.flags, *flags]))) if flags else r
            for r in group
        ]
    return out


async def measure_endpoint(ep: Endpoint, runner: Runner, state: VantageState) -> list[ProbeResult]:
    """DNS first, then every other probe on every address found, IPv6 only where it works.

    Each pass is followed by its swap tests and repeats (`probe.swaps`).  DNS swaps run
    before the addresses are collected, so an address only DoH knows is probed too.
    """
    if not state.online:
        return _skipped(_offline_plan([ep], runner.settings), SkipReason.VANTAGE_OFFLINE)
    dns_results = await runner.many(plan_dns([ep], runner.settings))
    dns_results += await runner.many(
        followups(dns_results, resolvers=resolver_ids(runner.settings))
    )
    dns_results = _with_consistency_flags(dns_results)
    planned = plan_targets(ep, collect_addresses(ep, dns_results))
    no_v6 = [t for t in planned if t.family == "ipv6" and not state.ipv6]
    runnable = [t for t in planned if t not in no_v6]
    results = await runner.many(runnable)
    neutral = runner.swaps.neutral_for(ep.service)
    results += await runner.many(followups(results, neutral_sni=neutral))
    return _regime(state, dns_results + results + _skipped(no_v6, SkipReason.IPV6_UNAVAILABLE))


def _regime(state: VantageState, results: list[ProbeResult]) -> list[ProbeResult]:
    """Under an allowlist regime every result says so (flag ``vantage_allowlist``): the
    verdict engine, which sees results and not the gate, then judges failures as the
    regime's, also when the results come back through JSON (a control, /api/results)."""
    if not state.allowlist:
        return results
    return [replace(r, flags=(*r.flags, ALLOWLIST_FLAG)) for r in results]


def all_endpoints(config: AgentConfig) -> list[Endpoint]:
    return [ep for svc in config.services for ep in svc.endpoints]


# The gate's connect waits at least this long: past the SYN retransmissions at 1 s and
# 3 s, so a lossy uplink is not taken for an offline one (a dead one fails at once, or
# costs these seconds once per round).
GATE_CONNECT_FLOOR_S = 3.5


async def warm_tls_contexts(config: AgentConfig) -> None:
    """Build the TLS client contexts the config uses, in a thread, before any TLS probe
    starts: built on the loop they stalled (and so slowed, as measured) every probe
    started alongside the first one."""
    alpns = [
        tls.TLSParams.of(spec).alpn
        for ep in all_endpoints(config)
        if (spec := ep.spec("tls")) is not None
    ]
    try:
        await asyncio.to_thread(tls.warm_contexts, config.tls.ca_file, alpns)
    except Exception:  # an unreadable CA file: the probes report it, one by one
        log.exception("building TLS contexts failed")


async def check_config_vantage(config: AgentConfig) -> VantageState:
    controls = [ep for ep in all_endpoints(config) if ep.role == "control"]
    timeout = max(min(config.timeouts.connect_s, 5.0), GATE_CONNECT_FLOOR_S)
    return await check_vantage(controls, timeout)


async def run_round(
    config: AgentConfig,
    *,
    progress: Progress | None = None,
    probes: Mapping[str, ProbeFn] | None = None,
) -> RoundReport:
    """The gate, then every endpoint concurrently (within the configured bounds)."""
    started, t0 = utcnow(), time.monotonic()
    state = await check_config_vantage(config)
    await warm_tls_contexts(config)
    runner = Runner(
        config.settings,
        concurrency=config.schedule.concurrency,
        per_destination=config.schedule.per_destination,
        probes=probes,
        progress=progress,
        swaps=config.swaps,
    )
    per_endpoint = await asyncio.gather(
        *(measure_endpoint(ep, runner, state) for ep in all_endpoints(config))
    )
    results = [r for batch in per_endpoint for r in batch]
    results.sort(key=lambda r: r.target.key())
    return RoundReport(
        config.vantage,
        state,
        tuple(results),
        started,
        time.monotonic() - t0,
        verdicts=judge_round(results, vantage_role=config.vantage.role),
    )
