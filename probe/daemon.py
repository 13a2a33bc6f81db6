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
import logging
import signal
import ssl
from collections.abc import Awaitable, Callable, Sequence

from aiohttp import web
from aiohttp.typedefs import Middleware
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from .archive import ArchiveWriter
from .config import ConfigError, load_config
from .exporter import make_registry
from .model import ProbeResult, VantageState, utcnow
from .results import ResultStore
from .scheduler import Scheduler
from .settings import AgentConfig, WebSettings
from .statuspage import render_status_page, results_json
from .verdict import judge_round

log = logging.getLogger("probe.daemon")

SHUTDOWN_GRACE_S = 3.0  # in-flight probes get this long before they are cancelled


class Agent:
    """Owns the store, archive and scheduler for one config; swaps them on reload."""

    def __init__(self, config: AgentConfig, config_path: str | None) -> None:
        self.config = config
        self.config_path = config_path
        self.store = ResultStore(config.vantage)
        self.registry = make_registry(self.store)
        self.archive: ArchiveWriter | None = ArchiveWriter.from_settings(
            config.archive, config.vantage
        )
        self.scheduler: Scheduler | None = None
        self.store.set_config_reload(True, utcnow())
        self._stats_task: asyncio.Task[None] | None = None

    # -- measurements ----------------------------------------------------------

    def on_results(self, results: Sequence[ProbeResult]) -> None:
        """Archive first (nothing observed is lost), then publish to the store."""
        if self.archive is not None:
            for result in results:
                self.archive.write(result)
        self.store.record_many(results)
        self._drop_stale(results)
        # verdicts are judged over every endpoint's latest results, so a service verdict
        # (e.g. partial: 2 of 5 DCs) always reflects all of its endpoints
        self.store.set_verdicts(judge_round(self.store.snapshot().results.values()))

    def _drop_stale(self, results: Sequence[ProbeResult]) -> None:
        """An endpoint's round replaces its previous round: addresses DNS stopped returning go."""
        endpoints = {(r.target.service, r.target.endpoint.name) for r in results}
        fresh = {r.target.key() for r in results}
        keys = self.store.snapshot().results.keys()
        stale = [k for k in keys if k[:2] in endpoints and k not in fresh]
        if stale:
            self.store.replace_targets(k for k in keys if k not in set(stale))

    def on_vantage(self, state: VantageState) -> None:
        self.store.record_vantage(state)

    # -- lifecycle -------------------------------------------------------------

    def start(self) -> None:
        self.scheduler = Scheduler(self.config, self.on_results, self.on_vantage)
        self.scheduler.start()
        self._stats_task = asyncio.create_task(self._publish_stats())

    async def _publish_stats(self) -> None:
        while True:
            if self.scheduler is not None:
                self.store.set_agent_stats(
                    schedule_lag_s=self.scheduler.stats.last_lag_s,
                    in_flight=self.scheduler.in_flight,
                )
            await asyncio.sleep(1.0)

    async def reload(self) -> str | None:
        """Load the config file again; on error keep the running config. Returns the error."""
        try:
            new = load_config(self.config_path)
        except ConfigError as exc:
            self.store.set_config_reload(False, utcnow())
            log.error(
                "config reload rejected; keeping the running config", extra={"error": str(exc)}
            )
            return str(exc)
        if self.scheduler is not None:
            await self.scheduler.stop(SHUTDOWN_GRACE_S)
        self.config = new
        self.store.set_vantage(new.vantage)
        if self.archive is not None:
            self.archive.vantage = new.vantage
        keys = {k for k in self.store.snapshot().results if _configured(new, k)}
        self.store.replace_targets(keys)
        self.scheduler = Scheduler(new, self.on_results, self.on_vantage)
        self.scheduler.start()
        self.store.set_config_reload(True, utcnow())
        log.info("config reloaded", extra={"config": new.source})
        return None

    async def stop(self) -> None:
        if self._stats_task is not None:
            self._stats_task.cancel()
        if self.scheduler is not None:
            await self.scheduler.stop(SHUTDOWN_GRACE_S)
        if self.archive is not None:
            self.archive.close()


def _configured(config: AgentConfig, key: tuple[str, ...]) -> bool:
    return any(
        (ep.service, ep.name) == tuple(key[:2]) for svc in config.services for ep in svc.endpoints
    )


# -- HTTP ----------------------------------------------------------------------

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


def _basic_auth(users: dict[str, str]) -> Middleware:
    import bcrypt  # only needed when auth is configured

    @web.middleware
    async def check(request: web.Request, handler: Handler) -> web.StreamResponse:
        header = request.headers.get("Authorization", "")
        if header.startswith("Basic "):
            with contextlib.suppress(binascii.Error, UnicodeDecodeError, ValueError):
                user, _, password = base64.b64decode(header[6:]).decode().partition(":")
                hashed = users.get(user)
                if hashed and bcrypt.checkpw(password.encode(), hashed.encode()):
                    return await handler(request)
        return web.Response(status=401, headers={"WWW-Authenticate": 'Basic realm="probe"'})

    return check


def build_app(agent: Agent) -> web.Application:
    web_settings: WebSettings = agent.config.web
    middlewares: list[Middleware] = []
    if web_settings.basic_auth_users:
        middlewares.append(_basic_auth(dict(web_settings.basic_auth_users)))
    app = web.Application(middlewares=middlewares)

    async def metrics(_: web.Request) -> web.Response:
        body = generate_latest(agent.registry)
        return web.Response(body=body, headers={"Content-Type": CONTENT_TYPE_LATEST})

    async def healthz(_: web.Request) -> web.Response:
        return web.Response(text="ok\n")

    async def ready(_: web.Request) -> web.Response:
        if agent.store.snapshot().vantage_state is None:
            return web.Response(status=503, text="not ready: first vantage check pending\n")
        return web.Response(text="ready\n")

    async def api_results(_: web.Request) -> web.Response:
        return web.json_response(results_json(agent.store.snapshot()))

    async def status_page(_: web.Request) -> web.Response:
        html = render_status_page(agent.store.snapshot(), agent.config)
        return web.Response(text=html, content_type="text/html")

    async def reload(_: web.Request) -> web.Response:
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


def _server_ssl(settings: WebSettings) -> ssl.SSLContext | None:
    if not settings.tls_cert_file:
        return None
    ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    ctx.load_cert_chain(settings.tls_cert_file, settings.tls_key_file)
    return ctx


async def serve(config: AgentConfig, config_path: str | None) -> int:
    """Run until SIGTERM/SIGINT; SIGHUP reloads.  Returns the process exit code."""
    agent = Agent(config, config_path)
    runner = web.AppRunner(build_app(agent), access_log=None)
    await runner.setup()
    site = web.TCPSite(
        runner, config.listen.host, config.listen.port, ssl_context=_server_ssl(config.web)
    )
    await site.start()
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
