"""The human status page and the `/api/results` JSON, both read from one store snapshot.

Self-contained HTML (inline CSS, no scripts or external assets) so it works on
an offline vantage and in any browser: the service x endpoint x probe matrix,
coloured by outcome, with failure strings as evidence and last-change times.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field
from datetime import datetime
from html import escape
from typing import Any

from . import __version__
from .config.settings import AgentConfig
from .control import without_userinfo
from .model import ProbeResult
from .records import api_result_record, iso_z, verdict_record
from .results import Snapshot

REFRESH_S = 30


def results_json(snapshot: Snapshot, trusted: bool = True) -> dict[str, Any]:
    """The ``/api/results`` document.  Untrusted (a remote client without auth), each
    control's URL and poll error are null: they name internal hosts and what failed there."""
    state = snapshot.vantage_state
    vantage_state = state.state if state else "unknown"
    return {
        "software_version": __version__,
        "vantage": {
            "name": snapshot.vantage.name,
            "country": snapshot.vantage.country,
            "asn": snapshot.vantage.asn,
            "role": snapshot.vantage.role,
            "state": vantage_state,
            "ipv6": state.ipv6 if state else None,
            "checked_at": iso_z(state.t) if state else None,
        },
        "results": [
            api_result_record(r, snapshot.vantage.name, vantage_state, snapshot.changed_at.get(k))
            for k, r in sorted(snapshot.results.items())
        ],
        "verdicts": [verdict_record(v) for v in snapshot.verdicts],
        "controls": [_control_record(c, trusted) for c in snapshot.controls],
    }


def _control_record(c: Any, trusted: bool) -> dict[str, Any]:
    url, error = (without_userinfo(c.url), c.error) if trusted else (None, None)
    return {"url": url, "up": c.up, "newest": iso_z(c.newest), "error": error}


@dataclass
class _Cell:
    counts: Counter[str] = field(default_factory=Counter)
    failures: Counter[str] = field(default_factory=Counter)
    changed: datetime | None = None

    def add(self, result: ProbeResult, changed: datetime | None) -> None:
        self.counts[result.status] += 1
        if result.failure:
            self.failures[str(result.failure_kind)] += 1
        if changed and (self.changed is None or changed > self.changed):
            self.changed = changed

    @property
    def css(self) -> str:
        ok, failed = self.counts["ok"], self.counts["failed"]
        if failed and ok:
            return "partial"
        if failed:
            return "failed"
        return "ok" if ok else "skipped"

    def html(self) -> str:
        total = sum(self.counts.values())
        lines = [f"<b>{self.counts['ok']}/{total - self.counts['skipped']} ok</b>"]
        if self.counts["skipped"]:
            lines.append(f"{self.counts['skipped']} skipped")
        lines += [f"{escape(f)} &times;{n}" for f, n in sorted(self.failures.items())]
        if self.changed:
            lines.append(f"<small>since {escape(iso_z(self.changed) or '')}</small>")
        return "<br>".join(lines)


_CSS = """
body{font:14px system-ui,sans-serif;margin:1.5em;color:#222}
table{border-collapse:collapse}td,th{border:1px solid #ccc;padding:4px 8px;vertical-align:top}
th{background:#f3f3f3;text-align:left}.ok{background:#d8f5d0}.failed{background:#f8c8c4}
.partial{background:#fde6b0}.skipped{background:#e6e6e6;color:#666}.banner{margin-bottom:1em}
.offline{color:#a00;font-weight:bold}small{color:#555}
"""


def _matrix(snapshot: Snapshot) -> tuple[list[str], dict[tuple[str, str], dict[str, _Cell]]]:
    probes: list[str] = []
    rows: dict[tuple[str, str], dict[str, _Cell]] = {}
    for key, result in sorted(snapshot.results.items()):
        t = result.target
        if t.probe not in probes:
            probes.append(t.probe)
        row = rows.setdefault((t.service, t.endpoint.name), {})
        row.setdefault(t.probe, _Cell()).add(result, snapshot.changed_at.get(key))
    return probes, rows


def _verdicts_by_endpoint(snapshot: Snapshot) -> dict[tuple[str, str | None], Any]:
    return {(v.service, v.endpoint): v for v in snapshot.verdicts}


def _banner(snapshot: Snapshot, config: AgentConfig, trusted: bool) -> str:
    v, state = snapshot.vantage, snapshot.vantage_state
    if state is None:
        status = "first check pending"
    elif state.allowlist:
        status = (
            f"<span class=offline>ALLOWLIST REGIME</span> (checked {iso_z(state.t)}): only "
            "domestic controls answer; failures read allowlist_regime"
        )
    elif state.online:
        status = f"online, IPv6 {'yes' if state.ipv6 else 'no'} (checked {iso_z(state.t)})"
    else:
        status = f"<span class=offline>OFFLINE</span> (checked {iso_z(state.t)}): nothing measured"
    return (
        f"<div class=banner><b>Vantage {escape(v.name)}</b> "
        f"({escape(v.country)}, {escape(v.asn)}, role {escape(v.role)}): {status}<br>"
        f"{_controls_line(snapshot, trusted)}"
        f"<small>config {escape(config.source) if trusted else '(path hidden)'} · "
        f"probe {escape(__version__)} · "
        f"page refreshes every {REFRESH_S} s</small></div>"
    )


def _controls_line(snapshot: Snapshot, trusted: bool) -> str:
    """A test vantage's control vantages: usable, or why not (verdicts are judged alone).

    A control's URL names a host and port the operator may keep private (an internal
    address, a VPN name), and its poll error says what failed there: an untrusted client
    sees each control's number and state only."""
    parts = []
    for n, c in enumerate(snapshot.controls, 1):
        state = "usable" if c.up else "<span class=offline>not usable</span>"
        if not trusted:
            parts.append(f"#{n} {state}")
            continue
        why = f": {escape(c.error)}" if not c.up and c.error else ""
        parts.append(f"{escape(without_userinfo(c.url))} {state}{why}")
    if not parts:
        return ""
    hidden = "" if trusted else " <small>(URLs and errors: loopback or authenticated)</small>"
    return f"Control: {' · '.join(parts)}{hidden}<br>"


def render_status_page(snapshot: Snapshot, config: AgentConfig, trusted: bool = True) -> str:
    """The page; ``trusted=False`` (a remote client without authentication) leaves out
    the config file's path and the control vantages' URLs and poll errors."""
    probes, rows = _matrix(snapshot)
    verdicts = _verdicts_by_endpoint(snapshot)
    head = "".join(f"<th>{escape(p)}</th>" for p in probes)
    body = []
    for (service, endpoint), cells in rows.items():
        verdict = verdicts.get((service, endpoint))
        verdict_html = escape(verdict.verdict) if verdict else "&mdash;"
        tds = "".join(
            f"<td class={cells[p].css}>{cells[p].html()}</td>" if p in cells else "<td></td>"
            for p in probes
        )
        body.append(
            f"<tr><td>{escape(service)}</td><td>{escape(endpoint)}</td>"
            f"<td>{verdict_html}</td>{tds}</tr>"
        )
    if not body:
        body.append(f"<tr><td colspan={3 + len(probes)}>no measurements yet</td></tr>")
    return (
        "<!doctype html><html><head><meta charset=utf-8>"
        f"<meta http-equiv=refresh content={REFRESH_S}>"
        "<title>probe: messenger reachability</title>"
        f"<style>{_CSS}</style></head><body>"
        "<h1>Messenger reachability</h1>"
        f"{_banner(snapshot, config, trusted)}"
        "<table id=matrix><thead><tr><th>service</th><th>endpoint</th><th>verdict</th>"
        f"{head}</tr></thead><tbody>{''.join(body)}</tbody></table>"
        "<p><small>Cells count addresses x ports (or resolvers for dns). "
        "Raw data: <a href=/api/results>/api/results</a> · <a href=/metrics>/metrics</a>"
        "</small></p></body></html>"
    )
