"""Control vantages for `probe run`: poll control agents' ``/api/results``, bounded.

A test vantage's verdicts mean most next to what an uncensored *control* vantage saw on
the same endpoints (`probe.verdict` tells a block from an outage with it).  This module
fetches the control agents named in the config's ``control:`` section (never a URL from a
request) every ``poll_interval_s`` and keeps, per control, its latest *usable* document.
`ControlPoller.fresh` hands the verdict engine every control measurement no older than
``max_age_s``; without any, the daemon judges alone and says so (`judged_alone`).

A control is usable only when it can vouch for its results: its document parses, its own
offline gate says ``online``, and it reached something (at least one non-DNS success).  An
offline, broken or unreachable control therefore contributes nothing, so it can never turn
a failure here into ``endpoint_down``.

Bounds against a hostile or broken peer: one fetch (redirects and body included) takes at
most ``timeout_s``; the body is read up to ``max_bytes`` and no further; a compressed body
is refused (a small gzip bomb would expand past any limit before it was counted);
redirects are followed only within the same scheme, host and port; no proxy settings from
the environment, no cookies.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import json
import logging
import ssl
import time
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Any
from urllib.parse import urljoin, urlsplit, urlunsplit

from .classify import classify
from .config.settings import ControlSettings
from .model import Operation
from .records import RecordFields, is_result_record, read_result_record
from .verdict.observations import Observation, from_fields
from .verdict.vocabulary import EndpointVerdict, ServiceVerdict

if TYPE_CHECKING:
    import aiohttp

__all__ = [
    "ControlError",
    "ControlPoller",
    "ControlStatus",
    "Document",
    "fetch",
    "judged_alone",
    "parse_document",
    "without_userinfo",
]

log = logging.getLogger("probe.control")

MAX_REDIRECTS = 3
_REDIRECTS = frozenset({301, 302, 303, 307, 308})
_CHUNK = 64 * 1024


class ControlError(Exception):
    """A control's document could not be fetched or is unusable (one short line, no
    text from the peer in it: it ends up in evidence lines and logs)."""


@dataclass(frozen=True)
class Document:
    """The usable part of one control agent's ``/api/results``."""

    vantage: str  # the control's own name (for logs only: it is the peer's text)
    observations: tuple[tuple[datetime, Observation], ...]  # (measured at, result)

    @property
    def newest(self) -> datetime:
        return max(t for t, _ in self.observations)


@dataclass(frozen=True)
class ControlStatus:
    """What the exporter and ``/api/results`` say about one configured control."""

    url: str
    up: bool  # the latest poll gave a usable document
    checked_at: datetime | None = None  # the latest poll finished
    newest: datetime | None = None  # newest measurement of the latest usable document
    error: str | None = None  # why the latest poll gave nothing usable

    def age_s(self, now: float) -> float | None:
        """Seconds since the newest usable measurement (never negative: clock skew)."""
        return None if self.newest is None else max(0.0, now - self.newest.timestamp())


# -- one document ------------------------------------------------------------------------


def _measured_at(record: RecordFields, received: datetime) -> datetime:
    """When a control result was measured, never later than when we received it: a
    control whose clock runs ahead (or a hostile one) must not keep its last document
    "fresh" past max_age_s after it stops answering."""
    return min(record.measured_at(), received)


def _observations(
    records: Iterable[Mapping[str, Any]], received: datetime
) -> tuple[tuple[datetime, Observation], ...]:
    """The measured results of a document, each with when it was measured."""
    out = []
    for record in records:
        if not is_result_record(record):
            continue
        fields = read_result_record(record)
        if fields.skipped is None:
            out.append((_measured_at(fields, received), from_fields(fields)))
    return tuple(out)


def parse_document(body: bytes, received: datetime | None = None) -> Document:
    """A control agent's ``/api/results`` (`probe.statuspage.results_json`), checked for
    usability.  Skipped results are left out (they measured nothing).  ``received``
    (default: now) caps every measurement time."""
    received = received or datetime.now(UTC)
    try:
        payload = json.loads(body)
        vantage = payload["vantage"]
        state = vantage.get("state")
        observations = _observations(payload["results"], received)
    # RecursionError: JSON nested past the parser's depth; OverflowError: a number such
    # as 1e400 where an integer belongs
    except (ValueError, KeyError, TypeError, AttributeError, RecursionError, OverflowError) as exc:
        raise ControlError(f"not a /api/results document ({type(exc).__name__})") from None
    if state != "online":
        raise ControlError("the control vantage is not online by its own offline gate")
    if not any(o.ok and o.base != "dns" for _, o in observations):
        raise ControlError("the control vantage reached nothing: treated as broken")
    return Document(str(vantage.get("name", ""))[:64], observations)


# -- one fetch ---------------------------------------------------------------------------


def without_userinfo(url: str) -> str:
    """``url`` without ``user:password@``: what the status page, ``/api/results``, the
    metrics and the log may show of a control URL.  The loader already refuses
    credentials in a URL; this keeps them out of every output even if one slips in."""
    parts = urlsplit(url)
    if "@" not in parts.netloc:
        return url
    return urlunsplit(parts._replace(netloc=parts.netloc.rpartition("@")[2]))


def _origin(url: str) -> tuple[str, str | None, int | None]:
    parts = urlsplit(url)
    return parts.scheme, parts.hostname, parts.port


def client_ssl(settings: ControlSettings) -> ssl.SSLContext:
    return ssl.create_default_context(cafile=settings.ca_file)


async def fetch(
    session: aiohttp.ClientSession,
    url: str,
    settings: ControlSettings,
    ssl_context: ssl.SSLContext | bool = True,
) -> bytes:
    """GET ``url``: the body, bounded in time and size, redirects only to the same origin."""
    import aiohttp

    auth = aiohttp.BasicAuth(*settings.basic_auth) if settings.basic_auth else None
    current = url
    async with asyncio.timeout(settings.timeout_s):
        for _ in range(MAX_REDIRECTS + 1):
            async with session.get(
                current,
                allow_redirects=False,
                auth=auth,
                ssl=ssl_context if urlsplit(current).scheme == "https" else False,
                headers={"Accept": "application/json", "Accept-Encoding": "identity"},
            ) as response:
                if response.status in _REDIRECTS:
                    target = urljoin(current, response.headers.get("Location", ""))
                    if _origin(target) != _origin(url):
                        raise ControlError("redirect to another host refused")
                    current = target
                    continue
                if response.status == 403 and await _refuses_the_name(response):
                    raise ControlError(_NAME_REFUSED)
                if response.status != 200:
                    raise ControlError(f"HTTP status {response.status}")
                return await _bounded_body(response, settings.max_bytes)
    raise ControlError(f"more than {MAX_REDIRECTS} redirects")


# The start of the 403 body a probe agent sends for a Host it does not answer to
# (probe.daemon._host_check).  Compared, never quoted: the peer's text stays out of errors.
_HOST_REFUSED = b"host not allowed"
# The URL is shown next to the error (status page, log), so the name need not be repeated.
_NAME_REFUSED = (
    "HTTP status 403: add this URL's host name to web.allowed_hosts in the control's config"
)


async def _refuses_the_name(response: aiohttp.ClientResponse) -> bool:
    """Whether a 403 is a control agent refusing the URL's host name (DNS-rebinding
    defence): every name it is reached by must be in its ``web.allowed_hosts``."""
    head = b""
    while len(head) < len(_HOST_REFUSED):  # at most one pass per byte; the fetch is timed
        chunk = await response.content.read(len(_HOST_REFUSED) - len(head))
        if not chunk:
            break
        head += chunk
    return head == _HOST_REFUSED


async def _bounded_body(response: aiohttp.ClientResponse, limit: int) -> bytes:
    if response.headers.get("Content-Encoding", "identity").lower() != "identity":
        raise ControlError("compressed response refused")
    too_big = ControlError(f"response larger than max_bytes ({limit})")
    if response.content_length is not None and response.content_length > limit:
        raise too_big
    body = bytearray()
    async for chunk in response.content.iter_chunked(_CHUNK):
        body += chunk
        if len(body) > limit:
            raise too_big
    return bytes(body)


# -- the poller --------------------------------------------------------------------------


class ControlPoller:
    """Polls every configured control; ``on_update`` is called after each poll round.

    Per control it keeps the latest usable `Document` (a failed poll does not erase it:
    its measurements stay valid until they are older than ``max_age_s``).
    """

    def __init__(self, settings: ControlSettings, on_update: Callable[[], None]) -> None:
        self.settings = settings
        self.on_update = on_update
        self._documents: dict[str, Document] = {}
        self._statuses: dict[str, ControlStatus] = {
            u: ControlStatus(without_userinfo(u), False) for u in settings.urls
        }
        self._task: asyncio.Task[None] | None = None

    def start(self) -> None:
        self._task = asyncio.create_task(self._loop(), name="control poller")

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
            self._task = None

    def statuses(self) -> tuple[ControlStatus, ...]:
        return tuple(self._statuses[u] for u in self.settings.urls)

    def fresh(self, now: float | None = None) -> list[Observation]:
        """Every usable control measurement no older than ``max_age_s``."""
        oldest = (time.time() if now is None else now) - self.settings.max_age_s
        return [
            o
            for document in self._documents.values()
            for t, o in document.observations
            if t.timestamp() >= oldest
        ]

    def why_alone(self) -> str:
        """Why no fresh control result is there (for the evidence line)."""
        reasons = []
        for status in self.statuses():
            if status.error is not None:
                reasons.append(status.error)
            elif status.checked_at is None:
                reasons.append("not polled yet")
            else:
                reasons.append(f"results older than max_age_s ({self.settings.max_age_s:g})")
        return "; ".join(dict.fromkeys(reasons))

    async def _loop(self) -> None:
        import aiohttp

        context = client_ssl(self.settings)
        async with aiohttp.ClientSession(
            trust_env=False,  # never a proxy from the environment
            cookie_jar=aiohttp.DummyCookieJar(),
            auto_decompress=False,
            timeout=aiohttp.ClientTimeout(total=self.settings.timeout_s),
        ) as session:
            while True:
                await asyncio.gather(*(self._poll(session, u, context) for u in self.settings.urls))
                try:
                    self.on_update()
                except Exception:  # publishing must not stop the polling
                    log.exception("publishing control results failed")
                await asyncio.sleep(self.settings.poll_interval_s)

    async def _poll(
        self, session: aiohttp.ClientSession, url: str, context: ssl.SSLContext
    ) -> None:
        previous = self._statuses[url]
        shown = previous.url  # the URL without credentials
        try:
            body = await fetch(session, url, self.settings, context)
            document = await asyncio.to_thread(parse_document, body)
        except ControlError as exc:
            error = str(exc)
        except Exception as exc:  # network errors: the closed failure vocabulary
            error = str(classify(exc, Operation.READ))
        else:
            self._documents[url] = document
            self._statuses[url] = ControlStatus(shown, True, _now(), document.newest)
            if not previous.up:
                log.info("control vantage usable", extra={"control": shown})
            return
        kept = self._documents.get(url)
        self._statuses[url] = ControlStatus(
            shown, False, _now(), kept.newest if kept else None, error[:120]
        )
        if previous.up or previous.checked_at is None:
            log.warning("control vantage not usable", extra={"control": shown, "error": error})


def _now() -> datetime:
    return datetime.now(UTC)


def judged_alone(
    verdicts: Iterable[EndpointVerdict | ServiceVerdict], why: str
) -> tuple[EndpointVerdict | ServiceVerdict, ...]:
    """Every verdict with one more evidence line: judged without a control, and why."""
    note = f"judged without a control vantage: {why}" if why else "judged without a control"
    return tuple(dataclasses.replace(v, evidence=(*v.evidence, note)) for v in verdicts)
