"""`probe run`: the long-running agent.

Wiring only: the scheduler measures, the store keeps the latest results, the
archive keeps every measurement, the exporter and status page read the store.
The HTTP server never takes a target from a request: targets come only from
the config file, so the agent cannot be turned into a scanner of arbitrary hosts.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import contextlib
import dataclasses
import hashlib
import ipaddress
import json
import logging
import os
import resource
import signal
import ssl
import sys
import threading
import time
from collections.abc import Awaitable, Callable, Iterable, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import Generic, TypeVar, cast
from urllib.parse import urlsplit

from aiohttp import web
from aiohttp.typedefs import Middleware
from prometheus_client import CONTENT_TYPE_LATEST

from .agent_config import load_config
from .archive import ArchiveWriter
from .config.loader import ConfigError
from .config.settings import AgentConfig, WebSettings
from .control import ControlPoller, judged_alone
from .exporter import TextRenderer, make_registry
from .model import ProbeResult, SkipReason, VantageState, utcnow
from .results import Key, ResultStore, Snapshot
from .round import resolver_ids
from .scheduler import Scheduler
from .statuspage import render_status_page, results_json
from .verdict.aggregate import as_control_vantage, judge_endpoint, judge_service
from .verdict.observations import Item, Observation, normalise
from .verdict.vocabulary import EndpointVerdict, ServiceVerdict
from .weblimits import Refusals, per_client

log = logging.getLogger("probe.daemon")
_T = TypeVar("_T")
EndpointKey = tuple[str, str]  # (service, endpoint name)

SHUTDOWN_GRACE_S = 3.0  # at shutdown, in-flight probes get this long before they are cancelled
# At most one reload per this many seconds: requests in between share the next one.  A
# reload never cancels a measurement, but it re-reads and re-validates the whole config.
RELOAD_MIN_INTERVAL_S = 1.0
# Verdicts are judged for the endpoints whose results changed (`IncrementalJudge`), at
# most once a second: the endpoint rounds that finished meanwhile share one pass.
JUDGE_INTERVAL_S = 1.0
# A scrape, the status page and /api/results are rendered at most once per this long and
# shared by every request meanwhile: a flood of scrapers costs one render a second, not
# one each, so the loop and the GIL stay with the probes timing themselves (issue 11).
RENDER_CACHE_S = 1.0
# Requests allowed to wait (for a render in progress, or for their turn); beyond that,
# 503 at once: an unbounded queue of waiting requests is a flood's lever.
RENDER_WAITERS = 64
# Responses per second per path, however many clients ask: even a cached body costs the
# HTTP thread (and so the GIL) a fraction of a millisecond per request, and 50 looping
# scrapers took it hundreds of times a second.  Prometheus scrapes every 15-60 s.
RESPONSES_PER_S = 10.0


class Agent:
    """Owns the store, archive and scheduler for one config; swaps them on reload.

    Everything heavy (verdicts over all results, rendering a scrape or the status page,
    bcrypt) runs in worker threads: probes time their phases on the event loop, so a
    stalled loop would show up as fake latency or fake timeouts.
    """

    def __init__(self, config: AgentConfig, config_path: str | None) -> None:
        self.config = config
        self.config_path = config_path
        self.store = ResultStore(
            config.vantage, series_latency=config.metrics.per_target_histograms
        )
        self.registry = make_registry(self.store, lambda: self.config.metrics)
        # What /metrics serves: the registry's exposition, re-formatting changed series only.
        self.exposition = TextRenderer(self.store, lambda: self.config.metrics)
        self.archive: ArchiveWriter | None = ArchiveWriter.from_settings(
            config.archive, config.vantage
        )
        self._archive_errors_before = 0  # write errors of archive writers replaced on reload
        self.http_refusals = Refusals()  # HTTP connections closed on accept (weblimits)
        self.scheduler: Scheduler | None = None
        self.store.set_config_reload(True, utcnow())
        self._stats_task: asyncio.Task[None] | None = None
        self._reload_lock = asyncio.Lock()
        self._queued_reload: asyncio.Future[str | None] | None = None
        self._last_reload = float("-inf")  # monotonic time the latest reload started
        self._stopping = False
        self._configured = _still_configured(config)
        self.reloads = 0  # reload attempts finished: cached renders older than one are stale
        # The probes' loop: the one this agent is built on (start() confirms it), so a reload
        # requested on the HTTP thread's loop always runs here, even before start().
        self.loop: asyncio.AbstractEventLoop | None = _running_loop()
        self._judge_wanted = asyncio.Event()
        self._judge_task: asyncio.Task[None] | None = None
        # One thread each: a flood of scrapes or of wrong passwords queues there and can
        # take neither the loop nor the default executor (the system resolver's threads).
        self.render_pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="render")
        self.auth_pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="auth")
        self._judge_pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="verdicts")
        self._judge = IncrementalJudge()
        self.control: ControlPoller | None = None

    # -- measurements ----------------------------------------------------------

    def on_results(self, results: Sequence[ProbeResult]) -> None:
        """Archive first (nothing observed is lost), then publish to the store."""
        results = self._offline_onto_known_targets(results)
        if self.archive is not None:
            for result in results:
                self.archive.write(result)
        # O(this round): the round replaces the endpoint's previous one, and addresses DNS
        # stopped returning go in the same step.
        self.store.record_round(results)
        self._judge_soon()

    def _offline_onto_known_targets(self, results: Sequence[ProbeResult]) -> Sequence[ProbeResult]:
        """An offline round skips the targets the endpoint was last measured on.

        Offline, nothing is resolved, so a hostname endpoint's round has placeholder
        targets without addresses.  Recorded as they are, they would replace (and so
        erase) the real targets with their state, "failing since" time and counters.
        """
        if not results or any(r.skipped is not SkipReason.VANTAGE_OFFLINE for r in results):
            return results
        target = results[0].target
        known = [
            r.target for r in self.store.endpoint_results(target.service, target.endpoint.name)
        ]
        if not known:
            return results  # never measured yet: the placeholders are all there is
        return [dataclasses.replace(results[0], target=t) for t in known]

    def _judge_soon(self) -> None:
        self._judge_wanted.set()
        if self._judge_task is None or self._judge_task.done():
            self._judge_task = asyncio.create_task(self._judge_loop(), name="verdicts")

    async def _judge_loop(self) -> None:
        """Verdicts over every endpoint's latest results, so a service verdict (e.g. partial:
        2 of 5 DCs) always reflects all of its endpoints; in a thread, at most once a second."""
        loop = asyncio.get_running_loop()
        published: tuple[EndpointVerdict | ServiceVerdict, ...] | None = None
        while True:
            await self._judge_wanted.wait()
            self._judge_wanted.clear()
            control, why_alone = self._control_now()
            role = self.config.vantage.role
            try:
                verdicts = await loop.run_in_executor(
                    self._judge_pool, self._judge, self.store, control, why_alone, role
                )
                if verdicts is not published:  # the same tuple: nothing changed
                    self.store.set_verdicts(verdicts)
                    published = verdicts
            except Exception:  # a verdict bug must not stop the agent measuring
                log.exception("judging verdicts failed")
            await asyncio.sleep(JUDGE_INTERVAL_S)

    def _control_now(self) -> tuple[list[Observation] | None, str | None]:
        """The fresh control results to judge with, or None and why there are none
        (None, None: no control configured, nothing to say)."""
        if self.control is None:
            return None, None
        fresh = self.control.fresh()
        return (fresh, None) if fresh else (None, self.control.why_alone())

    def on_vantage(self, state: VantageState) -> None:
        self.store.record_vantage(state)

    def on_control(self) -> None:
        """A control poll finished: publish its state and judge again with what it gave."""
        if self.control is not None:
            self.store.set_controls(self.control.statuses())
        self._judge_soon()

    def _start_control(self) -> None:
        settings = self.config.control
        self.control = ControlPoller(settings, self.on_control) if settings else None
        self.store.set_controls(self.control.statuses() if self.control else ())
        if self.control is not None:
            self.control.start()

    # -- lifecycle -------------------------------------------------------------

    def start(self) -> None:
        self.loop = asyncio.get_running_loop()
        self.scheduler = Scheduler(self.config, self.on_results, self.on_vantage)
        self.scheduler.start()
        self._start_control()
        self._stats_task = asyncio.create_task(self._publish_stats())

    async def _publish_stats(self) -> None:
        refused: tuple[tuple[str, int], ...] = ()  # as last published: a swap only on change
        while True:
            if self.scheduler is not None:
                self.store.set_agent_stats(
                    schedule_lag_s=self.scheduler.stats.last_lag_s,
                    schedule_lag_quantiles=self.scheduler.stats.lag_quantiles(),
                    in_flight=self.scheduler.in_flight,
                )
            if self.archive is not None:
                self.store.set_agent_stats(
                    archive_write_errors=self._archive_errors_before + self.archive.write_errors
                )
            if (now_refused := self.http_refusals.counts()) != refused:
                refused = now_refused
                self.store.set_agent_stats(http_connections_refused=refused)
            await asyncio.sleep(1.0)

    async def reload(self) -> str | None:
        """Load the config file again; on error keep the running config. Returns the error.

        One reload at a time: a burst of SIGHUPs must not interleave two reloads, each
        starting a scheduler of its own (duplicate, overlapping rounds that never stop).
        Requests that arrive while a reload waits its turn share it: it reads the file
        after they were made.  Reloads start at most once per `RELOAD_MIN_INTERVAL_S`,
        so a storm costs one reload a second, not one per signal.
        """
        if self._queued_reload is None:
            self._queued_reload = asyncio.ensure_future(self._reload_in_turn())
        return await asyncio.shield(self._queued_reload)

    async def reload_from_any_loop(self) -> str | None:
        """`reload`, also from the HTTP server's own loop (`HTTPThread`): it runs on the
        probes' loop, where the scheduler lives."""
        if self.loop is None or self.loop is asyncio.get_running_loop():
            return await self.reload()
        future = asyncio.run_coroutine_threadsafe(self.reload(), self.loop)
        return await asyncio.wrap_future(future)

    async def _reload_in_turn(self) -> str | None:
        async with self._reload_lock:
            wait = self._last_reload + RELOAD_MIN_INTERVAL_S - asyncio.get_running_loop().time()
            if wait > 0:
                await asyncio.sleep(wait)  # requests meanwhile join this reload
            self._queued_reload = None  # from here on, a request may find a newer file
            self._last_reload = asyncio.get_running_loop().time()
            try:
                return await self._reload()
            finally:
                self.reloads += 1

    async def _reload(self) -> str | None:
        if self._stopping:  # a reload queued behind a SIGTERM must not start a schedule
            return "the agent is stopping"
        try:
            # Parsing and validating a big config takes a while: not on the probes' loop.
            new = await asyncio.to_thread(load_config, self.config_path)
            archive = self._archive_for(new)
        except (ConfigError, OSError) as exc:
            self.store.set_config_reload(False, utcnow())
            log.error(
                "config reload rejected; keeping the running config", extra={"error": str(exc)}
            )
            return str(exc)
        if new == self.config and archive is self.archive:
            # Nothing changed: the schedule, the store and the rounds in flight go on.
            self.store.set_config_reload(True, utcnow())
            log.info("config reloaded: unchanged", extra={"config": new.source})
            return None
        _warn_restart_needed(self.config, new)
        old_control, self.config = self.config.control, new
        self._configured = _still_configured(new)
        self.store.set_vantage(new.vantage)
        self.store.keep_series_latency(new.metrics.per_target_histograms)
        if new.control != old_control:  # unchanged: keep polling (and the results it has)
            if self.control is not None:
                await self.control.stop()
            self._start_control()
        await self._swap_archive(archive)
        configured = self._configured
        self.store.replace_targets(k for k in self.store.snapshot().results if configured(k))
        self._judge_soon()  # removed endpoints' verdicts go now, not after the next round
        self._replace_scheduler(new)
        self.store.set_config_reload(True, utcnow())
        log.info("config reloaded", extra={"config": new.source})
        return None

    def _on_late_results(self, results: Sequence[ProbeResult]) -> None:
        """A round that started before a reload and ended after it: the archive keeps all
        of it, the store only what the running config still has a place for."""
        kept: list[ProbeResult] = []
        gone: list[ProbeResult] = []
        for result in results:
            (kept if self._configured(result.target.key()) else gone).append(result)
        if self.archive is not None:
            for result in gone:  # observed, so archived; no longer exported
                self.archive.write(result)
        if kept:
            self.on_results(kept)

    def _replace_scheduler(self, new: AgentConfig) -> None:
        """The new config applies to what comes next; nothing in flight is cancelled.

        The old schedule's start times carry over (a reload never re-tests sooner than
        min_spacing_s), and so do its rounds still measuring: they finish and are
        published, and the same endpoint's next round waits for them."""
        old = self.scheduler
        if old is None:
            self.scheduler = Scheduler(new, self.on_results, self.on_vantage)
        else:
            runner = old.runner if old.can_share_runner(new) else None
            old.on_results = self._on_late_results
            self.scheduler = Scheduler(
                new,
                self.on_results,
                self.on_vantage,
                history=old.history,
                in_flight=old.retire(),
                state=old.vantage_state,
                runner=runner,
            )
        self.scheduler.start()

    def _archive_for(self, new: AgentConfig) -> ArchiveWriter | None:
        """The archive writer for ``new``: the running one unless ``archive:`` changed.
        Opening a new one first means an unusable directory rejects the reload."""
        if new.archive == self.config.archive:
            if self.archive is not None:
                self.archive.vantage = new.vantage
            return self.archive
        return ArchiveWriter.from_settings(new.archive, new.vantage)

    async def _swap_archive(self, archive: ArchiveWriter | None) -> None:
        old, self.archive = self.archive, archive
        if old is not None and old is not archive:
            self._archive_errors_before += old.write_errors
            # close() waits for a background gzip: not on the loop
            await asyncio.get_running_loop().run_in_executor(self.render_pool, old.close)

    async def stop(self) -> None:
        await self.stop_measuring()
        self.close()

    async def stop_measuring(self) -> None:
        """End the schedule (rounds in flight get `SHUTDOWN_GRACE_S`) and the background
        tasks; the HTTP side may still be answering meanwhile."""
        self._stopping = True
        for task in (self._stats_task, self._judge_task):
            if task is not None:
                task.cancel()
        async with self._reload_lock:  # a reload under way finishes (or gives up) first
            if self.scheduler is not None:
                await self.scheduler.stop(SHUTDOWN_GRACE_S)
            if self.control is not None:
                await self.control.stop()

    def close(self) -> None:
        """Close the archive and the worker threads: after the HTTP server has stopped,
        or requests still being answered would hit a shut-down pool."""
        if self.archive is not None:
            self.archive.close()
        for pool in (self.render_pool, self.auth_pool, self._judge_pool):
            pool.shutdown(wait=False, cancel_futures=True)


def _running_loop() -> asyncio.AbstractEventLoop | None:
    try:
        return asyncio.get_running_loop()
    except RuntimeError:  # built outside a loop (tests): start() sets it
        return None


class IncrementalJudge:
    """`judge_round` over a store's latest results, judging only what changed.

    An endpoint's verdict depends on its own results and on one fact about the others
    (whether any *other* endpoint was reached); a service's on its endpoints' verdicts.
    So a pass re-judges the endpoints the store marked dirty (new results, removed keys)
    and their services, and everything only when that fact changes for some endpoint.
    At 5,000 endpoints a full pass every second took a tenth of a core.  Runs in one
    worker thread at a time (the daemon's verdict pool): no lock of its own.
    """

    def __init__(self) -> None:
        self._verdicts: dict[str, dict[EndpointKey, EndpointVerdict]] = {}  # by service
        self._reached: set[EndpointKey] = set()  # endpoints with a success beyond DNS
        self._regime: tuple[int, EndpointKey | None] = (0, None)
        self._services: dict[str, tuple[EndpointVerdict | ServiceVerdict, ...]] = {}
        self._control: dict[EndpointKey, list[Observation]] = {}  # as last judged with
        self._role = "test"
        # The last tuple returned: the same object again when nothing changed, so the
        # caller can tell an unchanged pass from a changed one by identity.
        self._published: tuple[EndpointVerdict | ServiceVerdict, ...] | None = None

    def _others_ok(self, endpoint: EndpointKey) -> bool:
        return len(self._reached) > 1 or (len(self._reached) == 1 and endpoint not in self._reached)

    def __call__(
        self,
        store: ResultStore,
        control: Iterable[Item] | None = None,
        why_alone: str | None = None,
        vantage_role: str = "test",
    ) -> tuple[EndpointVerdict | ServiceVerdict, ...]:
        """What ``judge_round(latest results, control, vantage_role=...)`` gives, with
        ``judged_alone`` applied when ``why_alone`` says why there is no control."""
        try:
            verdicts = self._judge(store, control, vantage_role)
        except BaseException:
            # The endpoints taken as dirty were not judged: judge everything next time,
            # every service too (some endpoint verdicts may be stored, their service not).
            self._regime = (-1, None)
            self._services.clear()
            self._published = None
            raise
        return verdicts if why_alone is None else judged_alone(verdicts, why_alone)

    def _judge(
        self, store: ResultStore, control: Iterable[Item] | None, vantage_role: str
    ) -> tuple[EndpointVerdict | ServiceVerdict, ...]:
        dirty = store.take_dirty()
        ctl: dict[EndpointKey, list[Observation]] = {}
        for c in normalise(control or ()):
            if c.skipped is None:
                ctl.setdefault((c.service, c.endpoint), []).append(c)
        # An endpoint whose control results changed is judged again, like a dirty one.
        dirty |= {
            ep for ep in ctl.keys() | self._control.keys() if ctl.get(ep) != self._control.get(ep)
        }
        self._control = ctl
        if vantage_role != self._role:
            self._role = vantage_role
            self._regime = (-1, None)  # everything again
        latest = {ep: store.endpoint_results(*ep) for ep in dirty}
        for ep, results in latest.items():
            if any(r.ok and r.target.probe != "dns" for r in results):
                self._reached.add(ep)
            else:
                self._reached.discard(ep)
        single = next(iter(self._reached)) if len(self._reached) == 1 else None
        regime = (min(len(self._reached), 2), single)
        if regime != self._regime:  # others_ok changed for some endpoint: judge them all
            self._regime = regime
            for ep in store.endpoints():
                if ep not in latest:
                    latest[ep] = store.endpoint_results(*ep)
        services = set()  # whose endpoint verdicts changed: only they are judged again
        for ep, results in latest.items():
            of_service = self._verdicts.setdefault(ep[0], {})
            if results:
                others_ok = self._others_ok(ep)
                verdict = judge_endpoint(results, ctl.get(ep, []), others_ok=others_ok)
                if vantage_role == "control":
                    verdict = as_control_vantage(verdict, others_ok)
                # Most rounds give the verdict the endpoint already had (evidence carries
                # no times): then the service's verdict, a function of them, is unchanged
                # too, and judging 5,000 endpoints' service every second cost 3 % of a core.
                if of_service.get(ep) != verdict or ep[0] not in self._services:
                    of_service[ep] = verdict
                    services.add(ep[0])
            elif of_service.pop(ep, None) is not None or ep[0] not in self._services:
                services.add(ep[0])
        for service in services:
            of_service = self._verdicts[service]
            verdicts = [of_service[k] for k in sorted(of_service)]
            if verdicts:
                self._services[service] = (*verdicts, judge_service(verdicts))
            else:
                self._services.pop(service, None)
        if services or self._published is None:
            self._published = tuple(
                v for service in sorted(self._services) for v in self._services[service]
            )
        return self._published


def _still_configured(config: AgentConfig) -> Callable[[Key], bool]:
    """Whether a result key still has a place in ``config``: its endpoint, probe, port and
    (for DNS) resolver.  What a reload removed goes at once, not at the next round."""
    endpoints = {(ep.service, ep.name): ep for svc in config.services for ep in svc.endpoints}
    resolvers = set(resolver_ids(config.settings))

    def keep(key: Key) -> bool:
        service, name, label, where, port = key
        ep = endpoints.get((service, name))
        if ep is None:
            return False
        probe = label.split("/", 1)[0]  # a swap test or repeat belongs to its probe
        if probe == "dns":  # every hostname endpoint is resolved, asked for dns or not
            return not ep.is_ip_literal and where in resolvers
        return ep.spec(probe) is not None and (not port or int(port) in ep.ports_for(probe))

    return keep


def _warn_restart_needed(old: AgentConfig, new: AgentConfig) -> None:
    """The HTTP server and the log handler are set up once, at start."""
    changed = [
        key for key in ("listen", "web", "log_format") if getattr(old, key) != getattr(new, key)
    ]
    if changed:
        log.warning(
            "config reloaded, but these settings only apply after a restart",
            extra={"settings": ", ".join(changed)},
        )


# -- HTTP ----------------------------------------------------------------------


class RenderCache(Generic[_T]):
    """One render at a time, shared by every request that arrives while it runs, and
    reused for ``ttl_s`` after it; responses paced to ``rate`` a second, at most
    `RENDER_WAITERS` requests waiting.  ``render`` runs in the agent's render thread."""

    def __init__(
        self,
        render: Callable[[], Awaitable[_T]],
        ttl_s: float = RENDER_CACHE_S,
        version: Callable[[], int] = lambda: 0,
        rate: float = RESPONSES_PER_S,
    ):
        self._render = render
        self._spacing_s = 1.0 / rate
        self._next_slot = 0.0
        self._ttl_s = ttl_s
        self._version = version  # a change (a reload) makes the cached value stale at once
        self._value: tuple[float, int, _T] | None = None
        self._pending: asyncio.Future[_T] | None = None
        self._waiters = 0
        self.renders = 0  # how many renders ran (tests and benches read it)

    async def get(self) -> _T | None:
        """The cached or a fresh value, paced to ``rate`` a second; None when too many
        requests already wait."""
        if self._waiters >= RENDER_WAITERS:
            return None
        self._waiters += 1
        try:
            now = time.monotonic()
            slot = max(now, self._next_slot)
            self._next_slot = slot + self._spacing_s
            if slot > now:
                await asyncio.sleep(slot - now)
            return await self._fresh()
        finally:
            self._waiters -= 1

    async def _fresh(self) -> _T:
        if self._value is not None:
            at, version, value = self._value
            if time.monotonic() - at < self._ttl_s and version == self._version():
                return value
        if self._pending is None:
            self._pending = asyncio.ensure_future(self._run())
        # shield: one impatient client hanging up must not cancel everybody's render
        return await asyncio.shield(self._pending)

    async def _run(self) -> _T:
        try:
            version = self._version()
            value = await self._render()
            self.renders += 1
            self._value = (time.monotonic(), version, value)
            return value
        finally:
            self._pending = None


def _busy() -> web.Response:
    return web.Response(
        status=503, text="busy: too many requests waiting\n", headers={"Retry-After": "1"}
    )


Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]
RENDER_CACHES = web.AppKey("render_caches", tuple)  # every render cache, for tests


# A right password is remembered this long (as a hash of the header): a scrape every 15 s
# then costs one bcrypt a minute, and a flood of wrong passwords cannot delay it.
AUTH_CACHE_S = 60.0
AUTH_CACHE_SIZE = 256  # distinct right headers remembered; beyond, the cache starts over
# bcrypt checks waiting or running at once; beyond, 429 at once (a flood must not queue
# minutes of CPU ahead of the operator's own requests).
AUTH_MAX_PENDING = 4


def _bcrypt_cost(hashed: str) -> int:
    return int(hashed.split("$")[2])


class BasicAuth:
    """Basic auth against bcrypt hashes, in a worker thread, in constant time per user.

    An unknown user is checked against a dummy hash of the same cost as the real ones:
    otherwise a missing user answers in 1 ms and an existing one in 200 ms, and one request
    tells which users exist."""

    def __init__(self, users: Mapping[str, str], pool: ThreadPoolExecutor) -> None:
        import bcrypt  # only needed when auth is configured

        self.users = dict(users)
        self.pool = pool
        cost = max(_bcrypt_cost(h) for h in self.users.values())
        self._dummy = bcrypt.hashpw(os.urandom(16).hex().encode(), bcrypt.gensalt(cost)).decode()
        self._ok: dict[bytes, float] = {}  # sha256(header) -> monotonic expiry
        self._pending = 0

    def password_ok(self, header: str) -> bool:
        """In a worker thread: bcrypt always runs, for known and unknown users alike."""
        import bcrypt

        with contextlib.suppress(binascii.Error, UnicodeDecodeError, ValueError):
            user, _, password = base64.b64decode(header[6:], validate=True).decode().partition(":")
            hashed = self.users.get(user)
            matched = bcrypt.checkpw(password.encode(), (hashed or self._dummy).encode())
            return matched and hashed is not None
        return False

    async def check(self, header: str) -> bool | None:
        """True or False; None when too many checks are already waiting (answer 429)."""
        if not header.startswith("Basic "):
            return False
        key = hashlib.sha256(header.encode()).digest()
        now = time.monotonic()
        if self._ok.get(key, 0.0) > now:
            return True
        if self._pending >= AUTH_MAX_PENDING:
            return None
        self._pending += 1
        try:
            loop = asyncio.get_running_loop()
            ok = await loop.run_in_executor(self.pool, self.password_ok, header)
        finally:
            self._pending -= 1
        if ok:
            if len(self._ok) >= AUTH_CACHE_SIZE:
                self._ok.clear()
            self._ok[key] = time.monotonic() + AUTH_CACHE_S
        return ok


def _basic_auth(auth: BasicAuth) -> Middleware:
    @web.middleware
    async def check(request: web.Request, handler: Handler) -> web.StreamResponse:
        # bcrypt takes ~0.3 s at cost 12 (by design): in a thread, so that a scrape or a
        # stream of wrong passwords never stalls the loop the probes time themselves on.
        ok = await auth.check(request.headers.get("Authorization", ""))
        if ok:
            return await handler(request)
        if ok is None:
            return web.Response(
                status=429, text="too many requests\n", headers={"Retry-After": "1"}
            )
        return web.Response(status=401, headers={"WWW-Authenticate": 'Basic realm="probe"'})

    return check


# Host names a browser uses for this machine's loopback; any other Host must be configured.
LOOPBACK_HOSTS = frozenset({"localhost", "localhost.localdomain", "127.0.0.1", "::1"})


def allowed_hosts(config: AgentConfig) -> frozenset[str]:
    """Host names served besides IP addresses: loopback, the listen host (unless a
    wildcard), and ``web.allowed_hosts``.  Lower-case, IPs canonical, no port."""
    hosts = set(LOOPBACK_HOSTS) | set(config.web.allowed_hosts)
    if config.listen.host not in ("0.0.0.0", "::"):
        hosts.add(config.listen.host.lower())
    return frozenset(hosts)


def _host_name(value: str) -> str | None:
    """The host of a Host header or an Origin's netloc, lower-case, without port or
    brackets; None when it does not parse."""
    try:
        name = urlsplit(f"//{value}").hostname
    except ValueError:
        return None
    if name is None:
        return None
    with contextlib.suppress(ValueError):
        return str(ipaddress.ip_address(name))
    return name.lower()


def _host_allowed(name: str | None, hosts: frozenset[str]) -> bool:
    """A configured name, or any IP address: a page can only rebind a *name* (the Host a
    browser sends is the name in the page's URL); a page at http://192.0.2.1:9464/ is
    another origin than the agent's and cannot read its answers."""
    if name is None:
        return False
    if name in hosts:
        return True
    try:
        ipaddress.ip_address(name)
    except ValueError:
        return False
    return True


def _host_check(hosts: frozenset[str]) -> Middleware:
    """Refuse a request whose Host is not a name this agent answers to, on every path.

    A DNS-rebinding page (evil.example re-resolved to 127.0.0.1) makes the operator's
    browser send ``Host: evil.example:9464`` with the matching Origin: comparing one with
    the other proves nothing, comparing Host with the names the agent answers to does
    (and then the reload's Origin check holds too).  A request without Host (HTTP/1.0
    tools) comes from no browser and is served."""

    @web.middleware
    async def check(request: web.Request, handler: Handler) -> web.StreamResponse:
        host = request.headers.get("Host")
        if host is not None and not _host_allowed(_host_name(host), hosts):
            return web.Response(status=403, text="host not allowed (see web.allowed_hosts)\n")
        return await handler(request)

    return check


def build_app(agent: Agent) -> web.Application:
    web_settings: WebSettings = agent.config.web
    middlewares: list[Middleware] = [_host_check(allowed_hosts(agent.config))]
    if web_settings.basic_auth_users:
        middlewares.append(_basic_auth(BasicAuth(web_settings.basic_auth_users, agent.auth_pool)))
    app = web.Application(middlewares=middlewares)
    app.on_response_prepare.append(_security_headers)

    async def render(fn: Callable[..., _T], *args: object) -> _T:
        # Thousands of targets make a scrape take a second or more of pure CPU.
        try:
            return await asyncio.get_running_loop().run_in_executor(agent.render_pool, fn, *args)
        except RuntimeError:  # the pool is shut down: a request that came in at shutdown
            raise web.HTTPServiceUnavailable(text="shutting down\n") from None

    def trusted(request: web.Request) -> bool:
        """May see the config's path and a reload's error text: an authenticated user
        (with auth on, every request that gets here is one) or a loopback client."""
        return bool(web_settings.basic_auth_users) or _is_loopback(request.remote)

    def version() -> int:
        return agent.reloads

    scrape = RenderCache(lambda: render(agent.exposition.render), version=version)
    api = RenderCache(lambda: render(_api_text, agent.store.snapshot()), version=version)
    public_api = RenderCache(  # without the controls' URLs and errors
        lambda: render(_api_text, agent.store.snapshot(), False), version=version
    )
    page = RenderCache(
        lambda: render(render_status_page, agent.store.snapshot(), agent.config), version=version
    )
    # The same page without the config's path, for a remote client without auth.
    public_page = RenderCache(
        lambda: render(render_status_page, agent.store.snapshot(), agent.config, False),
        version=version,
    )
    app[RENDER_CACHES] = (scrape, api, public_api, page, public_page)

    async def metrics(_: web.Request) -> web.Response:
        body = await scrape.get()
        if body is None:
            return _busy()
        return web.Response(body=body, headers={"Content-Type": CONTENT_TYPE_LATEST})

    async def healthz(_: web.Request) -> web.Response:
        return web.Response(text="ok\n")

    async def ready(_: web.Request) -> web.Response:
        if agent.store.snapshot().vantage_state is None:
            return web.Response(status=503, text="not ready: first vantage check pending\n")
        return web.Response(text="ready\n")

    async def api_results(request: web.Request) -> web.Response:
        text = await (api if trusted(request) else public_api).get()
        if text is None:
            return _busy()
        return web.Response(text=text, content_type="application/json")

    async def status_page(request: web.Request) -> web.Response:
        html = await (page if trusted(request) else public_page).get()
        if html is None:
            return _busy()
        return web.Response(text=html, content_type="text/html")

    async def reload(request: web.Request) -> web.Response:
        # A web page in the operator's browser could POST here (a "simple" cross-site
        # request needs no preflight); browsers always send Origin on such a POST.
        origin = request.headers.get("Origin")
        if origin is not None and urlsplit(origin).netloc != request.host:
            return web.Response(status=403, text="cross-origin reload refused\n")
        error = await agent.reload_from_any_loop()
        if error:
            # The error names the config file (and quotes it): not for anyone on the network.
            detail = error if trusted(request) else "the reason is in the agent's log"
            return web.Response(status=400, text=f"reload rejected: {detail}\n")
        return web.Response(text="reloaded\n")

    app.router.add_get("/metrics", metrics)
    app.router.add_get("/healthz", healthz)
    app.router.add_get("/-/healthy", healthz)
    app.router.add_get("/-/ready", ready)
    app.router.add_get("/api/results", api_results)
    app.router.add_get("/", status_page)
    app.router.add_post("/-/reload", reload)
    return app


# The page shows data a censor controls (through names and failures) and needs no
# script: forbid scripts, plugins, framing and everything else but its inline style.
_PAGE_CSP = "default-src 'none'; style-src 'unsafe-inline'; frame-ancestors 'none'"


async def _security_headers(_: web.Request, response: web.StreamResponse) -> None:
    response.headers["X-Content-Type-Options"] = "nosniff"
    if response.content_type == "text/html":
        response.headers["Content-Security-Policy"] = _PAGE_CSP


def _is_loopback(remote: str | None) -> bool:
    try:
        return remote is not None and ipaddress.ip_address(remote).is_loopback
    except ValueError:
        return False  # a Unix socket peer or an unparsable name: not known to be local


def _api_text(snapshot: Snapshot, trusted: bool = True) -> str:
    return json.dumps(results_json(snapshot, trusted))


# HTTP connections open at once; beyond, a new one is closed as soon as it is accepted.
# 1,100 idle connections at nofile 1024 used to starve the probes of descriptors.
MAX_HTTP_CONNECTIONS = 128
# Idle time allowed before a request's headers are in, and between requests on a
# keep-alive connection (aiohttp's default keep-alive is an hour).
HTTP_IDLE_TIMEOUT_S = 5.0
HTTP_ACCEPT_BURST = 32


def raise_fd_limit() -> tuple[int, int]:
    """Raise the soft RLIMIT_NOFILE to the hard limit (no privilege needed); (soft, hard)."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft != hard:
        with contextlib.suppress(ValueError, OSError):
            resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
            soft = hard
    return soft, hard


class _Refused(asyncio.Protocol):
    """Stands in for a connection over the cap: closed at once, its descriptor freed."""

    def __init__(self, refusals: Refusals | None = None, limit: int = 0) -> None:
        self._refusals = refusals
        self._limit = limit

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        if self._refusals is not None:
            self._refusals.refused("global", transport.get_extra_info("peername"), self._limit)
        cast(asyncio.Transport, transport).abort()


def capped(
    server: web.Server, limit: int, refusals: Refusals | None = None
) -> Callable[[], asyncio.BaseProtocol]:
    """aiohttp's protocol factory, refusing connections beyond ``limit`` open ones."""

    def factory() -> asyncio.BaseProtocol:
        if len(server.connections) >= limit:
            return _Refused(refusals, limit)
        return server()

    return factory


async def _listen(
    runner: web.AppRunner, config: AgentConfig, fd_soft: int, refusals: Refusals | None = None
) -> asyncio.Server:
    """Listen with the connection cap (a quarter of the descriptors at most)."""
    assert runner.server is not None
    limit = max(8, min(MAX_HTTP_CONNECTIONS, fd_soft // 4))
    # asyncio makes an IPv6 listener IPv6-only: for "[::]" (every address) listen on
    # every address of both families, as the docs promise, not on IPv6 alone.
    host = None if config.listen.host == "::" else config.listen.host
    return await asyncio.get_running_loop().create_server(
        per_client(
            runner.server,
            capped(runner.server, limit, refusals),
            config.web.max_connections_per_client,
            refusals=refusals,
        ),
        host,
        config.listen.port,
        ssl=_server_ssl(config.web),
        # asyncio accepts up to `backlog` connections per wake-up before any is refused:
        # keep that burst of descriptors small too.
        backlog=HTTP_ACCEPT_BURST,
        reuse_address=True,
    )


def _server_ssl(settings: WebSettings) -> ssl.SSLContext | None:
    if not settings.tls_cert_file:
        return None
    ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    ctx.load_cert_chain(settings.tls_cert_file, settings.tls_key_file)
    return ctx


class HTTPThread:
    """The HTTP server on an event loop of its own, in a thread of its own.

    Probes time their phases on the probes' loop.  Served there too, a flood of requests
    (50 concurrent scrapers) kept that loop busy enough to add tens of milliseconds to
    every measured connect, even with renders cached.  Here the probes' loop never runs
    HTTP code; the two threads share only the GIL, which `serve` makes change hands
    every millisecond (Python's default is 5 ms).
    """

    def __init__(self, agent: Agent, config: AgentConfig, fd_soft: int) -> None:
        self._agent = agent
        self._config = config
        self._fd_soft = fd_soft
        self._ready = threading.Event()
        self._loop: asyncio.AbstractEventLoop | None = None
        self._stop: asyncio.Event | None = None
        self.error: BaseException | None = None
        self._thread = threading.Thread(target=asyncio.run, args=(self._main(),), name="http")

    async def start(self) -> BaseException | None:
        """Start serving; the error that prevented it (port taken, bad TLS key), else None."""
        self._thread.start()
        await asyncio.to_thread(self._ready.wait)
        return self.error

    async def _main(self) -> None:
        self._loop = asyncio.get_running_loop()
        self._stop = asyncio.Event()
        runner = web.AppRunner(
            build_app(self._agent),
            access_log=None,
            shutdown_timeout=SHUTDOWN_GRACE_S,
            keepalive_timeout=HTTP_IDLE_TIMEOUT_S,
        )
        await runner.setup()
        listener: asyncio.Server | None = None
        try:
            listener = await _listen(runner, self._config, self._fd_soft, self._agent.http_refusals)
        except OSError as exc:  # port taken, address not ours, unreadable TLS key (SSLError)
            self.error = exc
        self._ready.set()
        if listener is not None:
            await self._stop.wait()
            listener.close()
        await runner.cleanup()

    async def stop(self) -> None:
        if self._loop is not None and self._stop is not None:
            with contextlib.suppress(RuntimeError):  # its loop already ended
                self._loop.call_soon_threadsafe(self._stop.set)
        await asyncio.to_thread(self._thread.join, 10.0)


GIL_SWITCH_INTERVAL_S = 0.001


async def serve(config: AgentConfig, config_path: str | None) -> int:
    """Run until SIGTERM/SIGINT; SIGHUP reloads.  Returns the process exit code."""
    try:
        agent = Agent(config, config_path)
    except OSError as exc:  # e.g. the archive directory cannot be created
        log.error("cannot open the archive", extra={"error": str(exc)})
        return 1
    fd_soft, fd_hard = raise_fd_limit()
    # The HTTP thread holds the GIL for at most this long when the probes' loop wants it.
    sys.setswitchinterval(GIL_SWITCH_INTERVAL_S)
    http = HTTPThread(agent, config, fd_soft)
    error = await http.start()
    if error is not None:
        log.error("cannot listen", extra={"listen": str(config.listen), "error": str(error)})
        await http.stop()
        await agent.stop()
        return 1
    log.info(
        "listening",
        extra={
            "listen": str(config.listen),
            "config": config.source,
            "nofile": fd_soft,
            "nofile_hard": fd_hard,
        },
    )
    agent.start()

    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    loop.add_signal_handler(signal.SIGTERM, stop.set)
    loop.add_signal_handler(signal.SIGINT, stop.set)
    reloads: set[asyncio.Task[str | None]] = set()

    def on_hup() -> None:
        task = asyncio.create_task(agent.reload())
        reloads.add(task)
        task.add_done_callback(reloads.discard)

    loop.add_signal_handler(signal.SIGHUP, on_hup)
    await stop.wait()
    log.info("shutting down")
    # The HTTP server and the schedule wind down together; the pools they share (render,
    # auth) close only once no request can reach them.
    await asyncio.gather(http.stop(), agent.stop_measuring())
    agent.close()
    log.info("stopped")
    return 0
