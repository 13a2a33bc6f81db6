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
from collections.abc import Awaitable, Callable, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import TypeVar
from urllib.parse import urlsplit

from aiohttp import web
from aiohttp.typedefs import Middleware
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from .archive import ArchiveWriter
from .config import ConfigError, load_config
from .control import ControlPoller, judged_alone
from .exporter import make_registry
from .model import ProbeResult, SkipReason, VantageState, utcnow
from .results import Key, ResultStore, Snapshot
from .round import resolver_ids
from .scheduler import Scheduler
from .settings import AgentConfig, WebSettings
from .statuspage import render_status_page, results_json
from .verdict import EndpointVerdict, Observation, ServiceVerdict, judge_round

log = logging.getLogger("probe.daemon")
_T = TypeVar("_T")

SHUTDOWN_GRACE_S = 3.0  # in-flight probes get this long before they are cancelled
# Verdicts are judged over every latest result: O(all targets).  Judging after every
# endpoint round would be O(targets^2) per interval; coalesce to at most one per second.
JUDGE_INTERVAL_S = 1.0


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
        self.registry = make_registry(self.store)
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
        self._judge_wanted = asyncio.Event()
        self._judge_task: asyncio.Task[None] | None = None
        # One thread each: a flood of scrapes or of wrong passwords queues there and can
        # take neither the loop nor the default executor (the system resolver's threads).
        self.render_pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="render")
        self.auth_pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="auth")
        self._judge_pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="verdicts")
        self.control: ControlPoller | None = None

    # -- measurements ----------------------------------------------------------

    def on_results(self, results: Sequence[ProbeResult]) -> None:
        """Archive first (nothing observed is lost), then publish to the store."""
        results = self._offline_onto_known_targets(results)
        if self.archive is not None:
            for result in results:
                self.archive.write(result)
        self.store.record_many(results)
        self._drop_stale(results)
        self._judge_soon()

    def _offline_onto_known_targets(self, results: Sequence[ProbeResult]) -> Sequence[ProbeResult]:
        """An offline round skips the targets the endpoint was last measured on.

        Offline, nothing is resolved, so a hostname endpoint's round has placeholder
        targets without addresses.  Recorded as they are, they would replace (and so
        erase) the real targets with their state, "failing since" time and counters.
        """
        if not results or any(r.skipped is not SkipReason.VANTAGE_OFFLINE for r in results):
            return results
        endpoint = (results[0].target.service, results[0].target.endpoint.name)
        known = [r.target for k, r in self.store.snapshot().results.items() if k[:2] == endpoint]
        if not known:
            return results  # never measured yet: the placeholders are all there is
        return [dataclasses.replace(results[0], target=t) for t in known]

    def _drop_stale(self, results: Sequence[ProbeResult]) -> None:
        """An endpoint's round replaces its previous round: addresses DNS stopped returning go."""
        endpoints = {(r.target.service, r.target.endpoint.name) for r in results}
        fresh = {r.target.key() for r in results}
        keys = self.store.snapshot().results.keys()
        stale = {k for k in keys if k[:2] in endpoints and k not in fresh}
        if stale:
            self.store.replace_targets(k for k in keys if k not in stale)

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
            results = list(self.store.snapshot().results.values())
            control, why_alone = self._control_now()
            role = self.config.vantage.role
            try:
                verdicts = await loop.run_in_executor(
                    self._judge_pool, _judge, results, control, why_alone, role
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
        self.scheduler = Scheduler(self.config, self.on_results, self.on_vantage)
        self.scheduler.start()
        self._start_control()
        self._stats_task = asyncio.create_task(self._publish_stats())

    async def _publish_stats(self) -> None:
        while True:
            if self.scheduler is not None:
                self.store.set_agent_stats(
                    schedule_lag_s=self.scheduler.stats.last_lag_s,
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

    async def _reload_in_turn(self) -> str | None:
        async with self._reload_lock:
            self._queued_reload = None  # from here on, a request may find a newer file
            return await self._reload()

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


def _judge(
    results: Sequence[ProbeResult],
    control: Sequence[Observation] | None,
    why_alone: str | None,
    vantage_role: str,
) -> tuple[EndpointVerdict | ServiceVerdict, ...]:
    """Verdicts with the control's fresh results, or alone and saying so (``why_alone``)."""
    verdicts = judge_round(results, control=control, vantage_role=vantage_role)
    return verdicts if why_alone is None else judged_alone(verdicts, why_alone)


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

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


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

    async def metrics(_: web.Request) -> web.Response:
        body = await render(generate_latest, agent.registry)
        return web.Response(body=body, headers={"Content-Type": CONTENT_TYPE_LATEST})

    async def healthz(_: web.Request) -> web.Response:
        return web.Response(text="ok\n")

    async def ready(_: web.Request) -> web.Response:
        if agent.store.snapshot().vantage_state is None:
            return web.Response(status=503, text="not ready: first vantage check pending\n")
        return web.Response(text="ready\n")

    async def api_results(_: web.Request) -> web.Response:
        text = await render(_api_text, agent.store.snapshot())
        return web.Response(text=text, content_type="application/json")

    async def status_page(_: web.Request) -> web.Response:
        html = await render(render_status_page, agent.store.snapshot(), agent.config)
        return web.Response(text=html, content_type="text/html")

    async def reload(request: web.Request) -> web.Response:
        # A web page in the operator's browser could POST here (a "simple" cross-site
        # request needs no preflight); browsers always send Origin on such a POST.
        origin = request.headers.get("Origin")
        if origin is not None and urlsplit(origin).netloc != request.host:
            return web.Response(status=403, text="cross-origin reload refused\n")
        error = await agent.reload()
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


async def serve(config: AgentConfig, config_path: str | None) -> int:
    """Run until SIGTERM/SIGINT; SIGHUP reloads.  Returns the process exit code."""
    try:
        agent = Agent(config, config_path)
    except OSError as exc:  # e.g. the archive directory cannot be created
        log.error("cannot open the archive", extra={"error": str(exc)})
        return 1
    runner = web.AppRunner(build_app(agent), access_log=None)
    await runner.setup()
    try:
        # asyncio makes an IPv6 listener IPv6-only: for "[::]" (every address) listen on
        # every address of both families, as the docs promise, not on IPv6 alone.
        host = None if config.listen.host == "::" else config.listen.host
        site = web.TCPSite(runner, host, config.listen.port, ssl_context=_server_ssl(config.web))
        await site.start()
    except OSError as exc:  # port taken, address not ours, unreadable TLS key (ssl.SSLError)
        log.error("cannot listen", extra={"listen": str(config.listen), "error": str(exc)})
        await runner.cleanup()
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
    await agent.stop()
    await runner.cleanup()
    log.info("stopped")
    return 0
