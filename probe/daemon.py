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
import json
import logging
import signal
import ssl
import sys
import threading
import time
from collections.abc import Awaitable, Callable, Iterable, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import Generic, TypeVar
from urllib.parse import urlsplit

from aiohttp import web
from aiohttp.typedefs import Middleware
from prometheus_client import CONTENT_TYPE_LATEST

from .archive import ArchiveWriter
from .config import ConfigError, load_config
from .control import ControlPoller, judged_alone
from .exporter import TextRenderer, make_registry
from .model import ProbeResult, SkipReason, VantageState, utcnow
from .results import Key, ResultStore, Snapshot
from .round import resolver_ids
from .scheduler import Scheduler
from .settings import AgentConfig, WebSettings
from .statuspage import render_status_page, results_json
from .verdict import (
    EndpointVerdict,
    Item,
    Observation,
    ServiceVerdict,
    judge_endpoint,
    judge_service,
    normalise,
)
from .verdict import (
    _as_control_vantage as as_control_vantage,
)

log = logging.getLogger("probe.daemon")
_T = TypeVar("_T")
EndpointKey = tuple[str, str]  # (service, endpoint name)

SHUTDOWN_GRACE_S = 3.0  # in-flight probes get this long before they are cancelled
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
        self.store = ResultStore(config.vantage)
        self.registry = make_registry(self.store, lambda: self.config.metrics)
        # What /metrics serves: the registry's exposition, re-formatting changed series only.
        self.exposition = TextRenderer(self.store, lambda: self.config.metrics)
        self.archive: ArchiveWriter | None = ArchiveWriter.from_settings(
            config.archive, config.vantage
        )
        self._archive_errors_before = 0  # write errors of archive writers replaced on reload
        self.scheduler: Scheduler | None = None
        self.store.set_config_reload(True, utcnow())
        self._stats_task: asyncio.Task[None] | None = None
        self._reload_lock = asyncio.Lock()
        self._queued_reload: asyncio.Future[str | None] | None = None
        self._stopping = False
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
        while True:
            await self._judge_wanted.wait()
            self._judge_wanted.clear()
            control, why_alone = self._control_now()
            role = self.config.vantage.role
            try:
                verdicts = await loop.run_in_executor(
                    self._judge_pool, self._judge, self.store, control, why_alone, role
                )
                self.store.set_verdicts(verdicts)
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
            await asyncio.sleep(1.0)

    async def reload(self) -> str | None:
        """Load the config file again; on error keep the running config. Returns the error.

        One reload at a time: a burst of SIGHUPs must not interleave two reloads, each
        starting a scheduler of its own (duplicate, overlapping rounds that never stop).
        Requests that arrive while a reload waits its turn share it: it reads the file
        after they were made.  So a storm costs at most two reloads, not one per signal.
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
            self._queued_reload = None  # from here on, a request may find a newer file
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
        _warn_restart_needed(self.config, new)
        history = {}
        if self.scheduler is not None:
            await self.scheduler.stop(SHUTDOWN_GRACE_S)
            history = self.scheduler.history
        old_control, self.config = self.config.control, new
        self.store.set_vantage(new.vantage)
        if new.control != old_control:  # unchanged: keep polling (and the results it has)
            if self.control is not None:
                await self.control.stop()
            self._start_control()
        await self._swap_archive(archive)
        configured = _still_configured(new)
        self.store.replace_targets(k for k in self.store.snapshot().results if configured(k))
        self._judge_soon()  # removed endpoints' verdicts go now, not after the next round
        # The old schedule's start times carry over: a reload never re-tests sooner than
        # min_spacing_s (a reload right after a round would otherwise re-run it at once).
        self.scheduler = Scheduler(new, self.on_results, self.on_vantage, history=history)
        self.scheduler.start()
        self.store.set_config_reload(True, utcnow())
        log.info("config reloaded", extra={"config": new.source})
        return None

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
        self._stopping = True
        for task in (self._stats_task, self._judge_task):
            if task is not None:
                task.cancel()
        async with self._reload_lock:  # a reload under way finishes (or gives up) first
            if self.scheduler is not None:
                await self.scheduler.stop(SHUTDOWN_GRACE_S)
            if self.control is not None:
                await self.control.stop()
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
            # The endpoints taken as dirty were not judged: judge everything next time.
            self._regime = (-1, None)
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
        services = set()
        for ep, results in latest.items():
            services.add(ep[0])
            of_service = self._verdicts.setdefault(ep[0], {})
            if results:
                others_ok = self._others_ok(ep)
                verdict = judge_endpoint(results, ctl.get(ep, []), others_ok=others_ok)
                if vantage_role == "control":
                    verdict = as_control_vantage(verdict, others_ok)
                of_service[ep] = verdict
            else:
                of_service.pop(ep, None)
        for service in services:
            of_service = self._verdicts[service]
            verdicts = [of_service[k] for k in sorted(of_service)]
            if verdicts:
                self._services[service] = (*verdicts, judge_service(verdicts))
            else:
                self._services.pop(service, None)
        return tuple(v for service in sorted(self._services) for v in self._services[service])


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
RENDER_CACHES = web.AppKey("render_caches", tuple)  # (metrics, api, page) for tests


def _password_ok(users: Mapping[str, str], header: str) -> bool:
    import bcrypt  # only needed when auth is configured

    with contextlib.suppress(binascii.Error, UnicodeDecodeError, ValueError):
        user, _, password = base64.b64decode(header[6:]).decode().partition(":")
        hashed = users.get(user)
        return bool(hashed and bcrypt.checkpw(password.encode(), hashed.encode()))
    return False


def _basic_auth(users: dict[str, str], pool: ThreadPoolExecutor) -> Middleware:
    @web.middleware
    async def check(request: web.Request, handler: Handler) -> web.StreamResponse:
        header = request.headers.get("Authorization", "")
        # bcrypt takes ~0.3 s at cost 12 (by design): in a thread, so that a scrape or a
        # stream of wrong passwords never stalls the loop the probes time themselves on.
        if header.startswith("Basic ") and await asyncio.get_running_loop().run_in_executor(
            pool, _password_ok, users, header
        ):
            return await handler(request)
        return web.Response(status=401, headers={"WWW-Authenticate": 'Basic realm="probe"'})

    return check


def build_app(agent: Agent) -> web.Application:
    web_settings: WebSettings = agent.config.web
    middlewares: list[Middleware] = []
    if web_settings.basic_auth_users:
        middlewares.append(_basic_auth(dict(web_settings.basic_auth_users), agent.auth_pool))
    app = web.Application(middlewares=middlewares)
    app.on_response_prepare.append(_security_headers)

    async def render(fn: Callable[..., _T], *args: object) -> _T:
        # Thousands of targets make a scrape take a second or more of pure CPU.
        return await asyncio.get_running_loop().run_in_executor(agent.render_pool, fn, *args)

    def version() -> int:
        return agent.reloads

    scrape = RenderCache(lambda: render(agent.exposition.render), version=version)
    api = RenderCache(lambda: render(_api_text, agent.store.snapshot()), version=version)
    page = RenderCache(
        lambda: render(render_status_page, agent.store.snapshot(), agent.config), version=version
    )
    app[RENDER_CACHES] = (scrape, api, page)

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

    async def api_results(_: web.Request) -> web.Response:
        text = await api.get()
        if text is None:
            return _busy()
        return web.Response(text=text, content_type="application/json")

    async def status_page(_: web.Request) -> web.Response:
        html = await page.get()
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
            return web.Response(status=400, text=f"reload rejected: {error}\n")
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


def _api_text(snapshot: Snapshot) -> str:
    return json.dumps(results_json(snapshot))


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

    def __init__(self, agent: Agent, config: AgentConfig) -> None:
        self._agent = agent
        self._config = config
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
        runner = web.AppRunner(build_app(self._agent), access_log=None)
        await runner.setup()
        try:
            # asyncio makes an IPv6 listener IPv6-only: for "[::]" (every address) listen on
            # every address of both families, as the docs promise, not on IPv6 alone.
            listen = self._config.listen
            host = None if listen.host == "::" else listen.host
            ssl_context = _server_ssl(self._config.web)
            site = web.TCPSite(runner, host, listen.port, ssl_context=ssl_context)
            await site.start()
        except OSError as exc:  # port taken, address not ours, unreadable TLS key (SSLError)
            self.error = exc
        self._ready.set()
        if self.error is None:
            await self._stop.wait()
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
    # The HTTP thread holds the GIL for at most this long when the probes' loop wants it.
    sys.setswitchinterval(GIL_SWITCH_INTERVAL_S)
    http = HTTPThread(agent, config)
    error = await http.start()
    if error is not None:
        log.error("cannot listen", extra={"listen": str(config.listen), "error": str(error)})
        await http.stop()
        await agent.stop()
        return 1
    log.info("listening", extra={"listen": str(config.listen), "config": config.source})
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
    await http.stop()  # first: no request may reach the render pools agent.stop() closes
    await agent.stop()
    log.info("stopped")
    return 0
