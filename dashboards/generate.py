"""The Grafana dashboards, as code: ``python -m dashboards.generate`` writes ``dashboards/*.json``
and ``docs/dashboards.md``; ``--check`` exits 1 if a committed file differs.

Built with grafana-foundation-sdk (Grafana's own builder library, generated from the same
schemas Grafana validates dashboards against).  Every panel is one `PanelSpec`: its query
expressions, unit, thresholds and a description that ends up both in the panel (Grafana's
"i" tooltip) and in docs/dashboards.md, so the two cannot drift apart.

Query rules (HELPERS.md contracts, docs/metrics.md):
- verdict series are filtered ``== 1``: the agent exports either only the current verdict
  (value 1) or the one-hot form (0 for every other value); both read the same;
- the phase-latency histogram is always aggregated
  ``sum by (le, service, probe, phase) (rate(probe_phase_latency_seconds_bucket[...]))``,
  so it works whether the agent keeps it per series or per (service, probe, phase);
- every selector carries ``vantage=~"$vantage"``: with one Prometheus per vantage the series
  have no ``vantage`` label and the default "All" (``.*``) matches the empty value; in a
  central Prometheus the label comes from the vantage's ``external_labels``;
- the data source is the ``datasource`` template variable, never ``${DS_PROMETHEUS}``
  (an import-time placeholder that file provisioning does not fill in).
"""

from __future__ import annotations

import argparse
import json
import re
import sys
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import yaml
from grafana_foundation_sdk.builders import (
    bargauge,
    stat,
    statetimeline,
    statushistory,
    table,
    text,
    timeseries,
)
from grafana_foundation_sdk.builders import dashboard as db
from grafana_foundation_sdk.builders import prometheus as prom
from grafana_foundation_sdk.cog.encoder import JSONEncoder
from grafana_foundation_sdk.models import dashboard as dm
from grafana_foundation_sdk.models import prometheus as pm
from grafana_foundation_sdk.models import text as tm

ROOT = Path(__file__).resolve().parents[1]
OUT_DIR = ROOT / "dashboards"
DOC = ROOT / "docs" / "dashboards.md"

DS = dm.DataSourceRef(type_val="prometheus", uid="${datasource}")
# The filters every per-target selector carries (template variables, see _variables).
V = 'vantage=~"$vantage"'
VS = f'{V}, service=~"$service"'
VSE = f'{VS}, endpoint=~"$endpoint"'
CENSORSHIP = (
    "dns_tampering|ip_blocking|tls_sni_filtering|tls_mitm|protocol_filtering|quic_filtering|"
    "udp_blocking|throttling|stall_after_bytes|partial"
)

Kind = Literal[
    "timeseries", "state-timeline", "status-history", "table", "stat", "bargauge", "text"
]


@dataclass(frozen=True)
class Query:
    expr: str
    legend: str = ""
    instant: bool = False  # tables and stats want the current value, not a range


@dataclass(frozen=True)
class PanelSpec:
    """One panel: what it shows (queries), how (kind, unit, thresholds), and why
    (description, also printed in docs/dashboards.md)."""

    id: int
    kind: Kind
    title: str
    description: str
    queries: tuple[Query, ...] = ()
    unit: str = ""
    # (value, color) steps above the base color; base first: ((None, "green"), (0.5, "red"))
    thresholds: tuple[tuple[float | None, str], ...] = ()
    mappings: dict[str, tuple[str, str]] = field(default_factory=dict)  # value -> (text, color)
    min: float | None = None
    max: float | None = None
    width: int = 12
    height: int = 8
    content: str = ""  # text panels (markdown)
    no_value: str = ""
    # table only: merge the queries' frames into one row per label set
    merge: bool = False
    # series whose display name matches a regexp get their own value mappings
    recolor: tuple[tuple[str, dict[str, tuple[str, str]]], ...] = ()


@dataclass(frozen=True)
class DashboardSpec:
    uid: str
    title: str
    description: str
    panels: tuple[PanelSpec, ...]
    endpoint_variable: bool = True

    @property
    def filename(self) -> str:
        return f"{self.uid}.json"


# --- the dashboards -------------------------------------------------------------------------

OK_FAILED = {"1": ("ok", "green"), "0": ("failed", "red")}
ONLINE = {"1": ("yes", "green"), "0": ("no", "red")}
HELD = {"1": ("held", "red")}
BLOCKED = {"1": ("blocked", "red")}
FAILING = {"1": ("failing", "red")}
GREEN_RED = ((None, "green"), (1, "red"))


def _quantile(q: float, selector: str) -> str:
    """A phase-latency quantile, aggregated the way that works before and after the
    agent aggregates the histogram per (service, probe, phase)."""
    return (
        f"histogram_quantile({q}, sum by (le, service, probe, phase) "
        f"(rate(probe_phase_latency_seconds_bucket{{{selector}}}[$__rate_interval])))"
    )


OVERVIEW = DashboardSpec(
    uid="probe-overview",
    title="Messenger reachability: overview",
    description="Per vantage and service: current verdicts, the probe grid, blocked fraction, "
    "cross-vantage evidence and the vantages' own state.",
    endpoint_variable=False,
    panels=(
        PanelSpec(
            1,
            "table",
            "Service verdicts now",
            "The current verdict of every service per vantage and its confidence (0-1). A "
            "service reads `partial` when some of its endpoints are blocked. Verdicts are "
            "evidence for one vantage only; compare with the control vantage before calling "
            "anything censorship.",
            (
                Query(f"probe_service_verdict{{{VS}}} == 1", "{{verdict}}", instant=True),
                Query(f"probe_service_verdict_confidence{{{VS}}}", "confidence", instant=True),
            ),
            unit="none",
            merge=True,
            width=12,
        ),
        PanelSpec(
            2,
            "table",
            "Endpoints with a censorship verdict",
            "Endpoints whose current verdict is a censorship verdict (recording rule "
            "`probe:censorship_verdict`; the same series the EndpointBlocked alert watches). "
            "Empty is good. `endpoint_down`, `inconclusive` and `vantage_offline` never "
            "appear here.",
            (
                Query(f"probe:censorship_verdict{{{VS}}}", instant=True),
                Query(
                    f"probe_verdict_confidence{{{VS}}} and on (vantage, service, endpoint) "
                    f"probe:censorship_verdict{{{VS}}}",
                    instant=True,
                ),
            ),
            unit="none",
            merge=True,
            no_value="none blocked",
            width=12,
        ),
        PanelSpec(
            3,
            "status-history",
            "Probe grid: service / endpoint / probe",
            "Every series' latest result (`probe_success`): green ok, red failed. One row per "
            "service, endpoint, probe (swap tests such as `tls/neutral_sni` are rows of their "
            "own), port and address family. Skipped series (vantage offline, no IPv6) have no "
            "row: a skip is not a failure.",
            (
                Query(
                    f"probe_success{{{VS}}}",
                    "{{service}}/{{endpoint}} {{probe}} {{port}} {{ip_family}}",
                ),
            ),
            mappings=OK_FAILED,
            width=24,
            height=12,
        ),
        PanelSpec(
            4,
            "timeseries",
            "Blocked fraction per service",
            "Share of a service's judged endpoints whose verdict is a censorship verdict "
            "(recording rule `probe:service_blocked_fraction`). Endpoints that are down "
            "everywhere, inconclusive or skipped count as not blocked.",
            (Query(f"probe:service_blocked_fraction{{{VS}}}", "{{vantage}} {{service}}"),),
            unit="percentunit",
            thresholds=((None, "green"), (0.01, "orange"), (0.5, "red")),
            min=0,
            max=1,
        ),
        PanelSpec(
            5,
            "stat",
            "Blocked here, fine at the control",
            "Endpoints a test vantage judges blocked while a control vantage (role `control` "
            "in `probe_vantage_info`) reads them `ok` (recording rule "
            "`probe:blocked_here_fine_at_control`, alert BlockedHereFineAtControl). Needs a "
            "central Prometheus that sees both vantages; 0 without a control vantage.",
            (Query(f"count(probe:blocked_here_fine_at_control{{{VS}}})", instant=True),),
            unit="none",
            thresholds=GREEN_RED,
            no_value="0",
            width=6,
        ),
        PanelSpec(
            6,
            "state-timeline",
            "Vantage online and IPv6",
            "The offline gate of each vantage: online (a control target answered this round) "
            "and IPv6 (an IPv6 connect to a control target worked). While a vantage is "
            "offline nothing is measured and nothing counts as blocked.",
            (
                Query(f"probe_vantage_online{{{V}}}", "{{vantage}} online"),
                Query(f"probe_vantage_ipv6{{{V}}}", "{{vantage}} IPv6"),
            ),
            mappings=ONLINE,
            width=18,
        ),
    ),
)

SERVICE = DashboardSpec(
    uid="probe-service",
    title="Messenger reachability: service drill-down",
    description="One service: verdicts per endpoint over time, failure kinds per probe, when "
    "each state began, latency per phase.",
    panels=(
        PanelSpec(
            1,
            "state-timeline",
            "Endpoint verdicts over time",
            "One row per endpoint and verdict it held; a bar shows when the endpoint held it: "
            "green `ok`, blue the verdicts that are not censorship (`endpoint_down`, "
            "`inconclusive`, `vantage_offline`), red every censorship verdict. "
            "A censorship verdict that lasts less than two probe intervals does not page "
            "(see docs/runbooks.md).",
            (Query(f"probe_verdict{{{VSE}}} == 1", "{{endpoint}}: {{verdict}}"),),
            mappings=HELD,
            recolor=(
                (".*: ok$", {"1": ("ok", "green")}),
                (".*: (endpoint_down|inconclusive|vantage_offline)$", {"1": ("held", "blue")}),
            ),
            width=24,
        ),
        PanelSpec(
            2,
            "state-timeline",
            "Failure kinds per probe",
            "While a series fails, its failure string (closed vocabulary, docs/failures.md) "
            "and the operation that failed (`probe_failure_info`). A change from "
            "`connection_reset` to `generic_timeout_error` is a change of censor behaviour.",
            (
                Query(
                    f"probe_failure_info{{{VSE}}} == 1",
                    "{{endpoint}} {{probe}} {{port}}: {{failure}} ({{failed_operation}})",
                ),
            ),
            mappings=HELD,
            width=24,
        ),
        PanelSpec(
            3,
            "table",
            "When each state began",
            "Per series, when it last changed state (ok, or failed with a given failure "
            "kind; `probe_state_change_timestamp_seconds`). Skips change nothing.",
            (Query(f"probe_state_change_timestamp_seconds{{{VSE}}} * 1000", instant=True),),
            unit="dateTimeAsIso",
            width=24,
        ),
        PanelSpec(
            4,
            "timeseries",
            "Latency per phase (median, successful probes)",
            "Median duration of each phase of successful probes, per probe "
            "(`probe_phase_latency_seconds`). Throttling shows as a shift of the handshake "
            "and transfer phases; failed phases are not in the histogram (their time is a "
            "timeout or a time to RST).",
            (Query(_quantile(0.5, VS), "{{service}} {{probe}} {{phase}}"),),
            unit="s",
            thresholds=((None, "green"), (1, "orange"), (5, "red")),
        ),
        PanelSpec(
            5,
            "timeseries",
            "Last phase durations",
            "Each phase of the latest result per series (`probe_phase_duration_seconds`); a "
            "failed phase shows its time to failure (time to RST, or the timeout).",
            (
                Query(
                    f"probe_phase_duration_seconds{{{VSE}}}",
                    "{{endpoint}} {{probe}} {{port}} {{phase}}",
                ),
            ),
            unit="s",
            thresholds=((None, "green"), (1, "orange"), (5, "red")),
        ),
    ),
)

CALLS = DashboardSpec(
    uid="probe-calls",
    title="Messenger reachability: calls",
    description="Call relays: STUN reachability, relay blocking, round trips, flow loss, "
    "jitter and cut-off, failure kinds.",
    panels=(
        PanelSpec(
            1,
            "status-history",
            "Relay reachability (STUN)",
            "Latest STUN result per relay, port and variant: `stun` is a Binding request (any "
            "well-formed answer, even 401, proves the path both ways); `stun/random_udp` is "
            "random UDP to the same port (a relay may ignore it). Flow mode (call-like "
            "packets) fails with `udp_no_response` at `read` when the flow is cut off.",
            (
                Query(
                    f'probe_success{{{VSE}, probe=~"stun(/.*)?"}}',
                    "{{service}}/{{endpoint}} {{probe}} {{port}}",
                ),
            ),
            mappings=OK_FAILED,
            width=24,
        ),
        PanelSpec(
            2,
            "table",
            "Blocked relays",
            "Relays whose verdict is a censorship verdict while their STUN probe fails "
            "(recording rule `probe:relay_blocked`, alert CallRelaysUnreachable).",
            (Query(f"probe:relay_blocked{{{VSE}}}", instant=True),),
            mappings=BLOCKED,
            no_value="none blocked",
        ),
        PanelSpec(
            3,
            "timeseries",
            "STUN round trip (median)",
            "Median duration of the STUN exchange of successful probes (phases `stun`, "
            "`reflector`, `flow`).",
            (
                Query(
                    _quantile(0.5, f'{VS}, phase=~"stun|reflector|flow"'), "{{service}} {{phase}}"
                ),
            ),
            unit="s",
            thresholds=((None, "green"), (0.3, "orange"), (1, "red")),
        ),
        PanelSpec(
            4,
            "bargauge",
            "STUN failures by kind",
            "Failed STUN probes in the selected range by failure kind "
            "(`probe_failures_total`): `udp_no_response` is silence (a drop, or a cut-off "
            "flow), `host_unreachable` an ICMP answer.",
            (
                Query(
                    f"sum by (endpoint, failure) (increase(probe_failures_total{{{VSE}, "
                    f'probe=~"stun(/.*)?"}}[$__range]))',
                    "{{endpoint}} {{failure}}",
                    instant=True,
                ),
            ),
            unit="none",
            thresholds=GREEN_RED,
        ),
        PanelSpec(
            6,
            "timeseries",
            "Flow loss",
            "Share of the packets of the latest call-like flow (`stun` with `mode: flow`: "
            "STUN-shaped packets at a call's rate) that got no answer "
            "(`probe_flow_loss_ratio`). Random loss shows as a fraction; a cut-off flow as a "
            "large share together with *Flow cut-off*.",
            (
                Query(
                    f"probe_flow_loss_ratio{{{VSE}}}",
                    "{{service}}/{{endpoint}} {{port}}",
                ),
            ),
            unit="percentunit",
            thresholds=((None, "green"), (0.05, "orange"), (0.3, "red")),
            min=0,
            max=1,
            width=8,
        ),
        PanelSpec(
            7,
            "timeseries",
            "Flow jitter",
            "RFC 3550 interarrival jitter of the latest flow's round trips "
            "(`probe_flow_jitter_seconds`).",
            (
                Query(
                    f"probe_flow_jitter_seconds{{{VSE}}}",
                    "{{service}}/{{endpoint}} {{port}}",
                ),
            ),
            unit="s",
            thresholds=((None, "green"), (0.03, "orange"), (0.1, "red")),
            width=8,
        ),
        PanelSpec(
            8,
            "timeseries",
            "Flow cut-off",
            "When the latest flow was cut off: seconds into the flow after which answers "
            "stopped for good (`probe_flow_cutoff_seconds`, present only for cut-off flows). "
            "A censor that lets the first seconds of a call through and then blackholes it "
            "shows here at a steady value.",
            (
                Query(
                    f"probe_flow_cutoff_seconds{{{VSE}}}",
                    "{{service}}/{{endpoint}} {{port}}",
                ),
            ),
            unit="s",
            thresholds=((None, "red"),),
            no_value="no cut-off",
            width=8,
        ),
        PanelSpec(
            5,
            "text",
            "What this cannot prove",
            "What relay-path measurements do not tell.",
            content=(
                "**Relay-path reachability, not call quality.** A STUN answer proves that UDP "
                "reaches this relay and comes back. It does not prove which relays a real "
                "call gets (they are chosen per call), that TURN allocation works, or how a "
                "call sounds. Silence alone proves nothing: compare with the control vantage "
                "(Overview, *Blocked here, fine at the control*) and the random-UDP swap. "
                "Loss, jitter and cut-off above describe our own flow to one relay, not a "
                "call; every flow's full details are in the archive: "
                "`probe archive --service whatsapp --failed`. "
                "See docs/probes/stun.md and docs/runbooks.md#callrelaysunreachable."
            ),
            width=24,
            height=5,
        ),
    ),
)

TAMPERING = DashboardSpec(
    uid="probe-tampering",
    title="Messenger reachability: DNS and TLS tampering",
    description="DNS answers per resolver, TLS/QUIC handshake failures and the swap tests "
    "that tell a filter from an outage.",
    panels=(
        PanelSpec(
            1,
            "status-history",
            "DNS per resolver",
            "Latest DNS result per name and resolver (`system`, `udp:`, `tcp:`, `doh:`). A "
            "name failing over UDP while TCP or DoH answers is the DNS-tampering signature.",
            (Query(f'probe_success{{{VSE}, probe="dns"}}', "{{endpoint}} {{resolver}}"),),
            mappings=OK_FAILED,
            width=24,
        ),
        PanelSpec(
            2,
            "table",
            "DNS failures now",
            "Failing DNS series with the failure (`dns_nxdomain_error`, `dns_bogon_error` "
            "for an answer outside the service's prefixes or a private address, ...).",
            (Query(f'probe_failure_info{{{VSE}, probe="dns"}} == 1', instant=True),),
            mappings=FAILING,
            no_value="none",
        ),
        PanelSpec(
            3,
            "timeseries",
            "DNS lookup time",
            "Duration of the latest lookup per name and resolver "
            "(`probe_dns_lookup_time_seconds`).",
            (Query(f"probe_dns_lookup_time_seconds{{{VSE}}}", "{{endpoint}} {{resolver}}"),),
            unit="s",
            thresholds=((None, "green"), (0.5, "orange"), (2, "red")),
        ),
        PanelSpec(
            4,
            "table",
            "TLS and QUIC handshake failures now",
            "Failing TLS/QUIC series with failure and operation: `connection_reset` in "
            "`tls_handshake` after the ClientHello is the SNI-filter signature, "
            "`ssl_unknown_authority` a possible interception (check the archived "
            "certificate).",
            (
                Query(
                    f'probe_failure_info{{{VSE}, probe=~"(tls|quic|quic_vn)(/.*)?"}} == 1',
                    instant=True,
                ),
            ),
            mappings=FAILING,
            no_value="none",
        ),
        PanelSpec(
            5,
            "status-history",
            "Swap tests",
            "Variants run next to the real probe: `tls/neutral_sni` (same address, another "
            "SNI), `quic_vn` (a version-negotiation packet next to QUIC v1), "
            "`stun/random_udp`, repeats. The real probe failing while its swap works is what "
            "separates a filter from an outage.",
            (
                Query(
                    f'probe_success{{{VSE}, probe=~".+/.+|quic_vn"}}',
                    "{{endpoint}} {{probe}} {{port}}",
                ),
            ),
            mappings=OK_FAILED,
            width=24,
        ),
        PanelSpec(
            6,
            "table",
            "Tampering verdicts",
            "Endpoints judged `dns_tampering`, `tls_sni_filtering`, `tls_mitm`, "
            "`protocol_filtering` or `quic_filtering` (alert DNSTampering for the first).",
            (
                Query(
                    f'probe:censorship_verdict{{{VSE}, verdict=~"dns_tampering|tls_sni_filtering|'
                    f'tls_mitm|protocol_filtering|quic_filtering"}}',
                    instant=True,
                ),
            ),
            mappings=BLOCKED,
            no_value="none",
        ),
        PanelSpec(
            7,
            "timeseries",
            "Handshake latency (median)",
            "Median TLS and QUIC handshake time of successful probes; an SNI-specific "
            "slowdown shows here before it turns into timeouts.",
            (Query(_quantile(0.5, f'{VS}, phase=~"tls|quic_handshake"'), "{{service}} {{probe}}"),),
            unit="s",
            thresholds=((None, "green"), (1, "orange"), (3, "red")),
        ),
    ),
)

THROUGHPUT = DashboardSpec(
    uid="probe-throughput",
    title="Messenger reachability: throughput and stalls",
    description="Transfer probes: throttling and the byte-count freeze.",
    panels=(
        PanelSpec(
            1,
            "status-history",
            "Transfers",
            "Latest transfer result per endpoint (HTTPS GET over fresh connections).",
            (
                Query(
                    f'probe_success{{{VSE}, probe=~"transfer(/.*)?"}}',
                    "{{endpoint}} {{probe}} {{port}}",
                ),
            ),
            mappings=OK_FAILED,
            width=24,
        ),
        PanelSpec(
            2,
            "table",
            "Stalls and throttling now",
            "Series failing with `stall_after_bytes` (a flow that stops after some bytes "
            "with no FIN or RST: the 16-20 KB freeze, or a post-handshake stall) or "
            "`throttled` (throughput under the configured floor).",
            (
                Query(
                    f'probe_failure_info{{{VSE}, failure=~"stall_after_bytes|throttled"}} == 1',
                    instant=True,
                ),
            ),
            mappings=FAILING,
            no_value="none",
        ),
        PanelSpec(
            3,
            "timeseries",
            "Transfer duration",
            "Duration of the transfer phase of the latest result; a throttled transfer takes "
            "longer, a stalled one runs into the stall timeout.",
            (
                Query(
                    f'probe_phase_duration_seconds{{{VSE}, phase="transfer"}}',
                    "{{endpoint}} {{probe}}",
                ),
            ),
            unit="s",
            thresholds=((None, "green"), (5, "orange"), (10, "red")),
        ),
        PanelSpec(
            4,
            "timeseries",
            "Transfer and first-byte latency (median)",
            "Median transfer and first-byte time of successful transfers; throttling shifts "
            "the distribution before transfers start failing.",
            (
                Query(
                    _quantile(0.5, f'{VS}, probe=~"transfer(/.*)?", phase=~"transfer|first_byte"'),
                    "{{service}} {{phase}}",
                ),
            ),
            unit="s",
            thresholds=((None, "green"), (2, "orange"), (8, "red")),
        ),
        PanelSpec(
            5,
            "table",
            "Throttling and stall verdicts",
            "Endpoints judged `throttling` or `stall_after_bytes` (alert ThrottlingOrStalls).",
            (
                Query(
                    f'probe:censorship_verdict{{{VSE}, verdict=~"throttling|stall_after_bytes"}}',
                    instant=True,
                ),
            ),
            mappings=BLOCKED,
            no_value="none",
        ),
        PanelSpec(
            6,
            "timeseries",
            "Stalls and throttled transfers per interval",
            "How many transfer attempts stalled or were throttled (`probe_failures_total`).",
            (
                Query(
                    f"sum by (endpoint, failure) (increase(probe_failures_total{{{VSE}, "
                    f'failure=~"stall_after_bytes|throttled"}}[$__rate_interval]))',
                    "{{endpoint}} {{failure}}",
                ),
            ),
            unit="none",
            thresholds=GREEN_RED,
        ),
    ),
)

AGENT = DashboardSpec(
    uid="probe-agent",
    title="Messenger reachability: agent health",
    description="Is the agent itself healthy: scraped, on schedule, archiving, config "
    "applied, control vantage fresh.",
    endpoint_variable=False,
    panels=(
        PanelSpec(
            1,
            "state-timeline",
            "Agent scraped",
            "Prometheus' own `up` for every target that exposes `probe_vantage_info` (recording "
            "rule `probe:agent_up`; alert AgentDown).",
            (Query(f"probe:agent_up{{{V}}}", "{{vantage}} {{instance}}"),),
            mappings={"1": ("up", "green"), "0": ("down", "red")},
            width=24,
            height=5,
        ),
        PanelSpec(
            2,
            "timeseries",
            "Schedule lag",
            "How late the scheduler started its latest probe versus the planned time "
            "(`probe_schedule_lag_seconds`). Lasting lag means too many targets for the "
            "concurrency bounds.",
            (Query(f"probe_schedule_lag_seconds{{{V}}}", "{{vantage}}"),),
            unit="s",
            thresholds=((None, "green"), (30, "orange"), (120, "red")),
        ),
        PanelSpec(
            3,
            "timeseries",
            "Probes in flight",
            "Probes running now (`probe_in_flight`), bounded by `schedule.concurrency`.",
            (Query(f"probe_in_flight{{{V}}}", "{{vantage}}"),),
            unit="none",
        ),
        PanelSpec(
            4,
            "timeseries",
            "Archive write errors",
            "Measurements that could not be appended to the archive "
            "(`probe_archive_write_errors_total`; alert ArchiveWriteErrors). Absent when the "
            "archive is disabled.",
            (
                Query(
                    f"increase(probe_archive_write_errors_total{{{V}}}[$__rate_interval])",
                    "{{vantage}}",
                ),
            ),
            unit="none",
            thresholds=GREEN_RED,
        ),
        PanelSpec(
            5,
            "state-timeline",
            "Config reloads",
            "Whether the last config (re)load succeeded (`probe_config_last_reload_successful`; "
            "alert ConfigReloadFailed). A failed reload keeps the old config running.",
            (Query(f"probe_config_last_reload_successful{{{V}}}", "{{vantage}}"),),
            mappings={"1": ("ok", "green"), "0": ("failed", "red")},
        ),
        PanelSpec(
            6,
            "stat",
            "Last successful config load",
            "When the config was last (re)loaded successfully.",
            (
                Query(
                    f"probe_config_last_reload_success_timestamp_seconds{{{V}}} * 1000",
                    "{{vantage}}",
                    instant=True,
                ),
            ),
            unit="dateTimeFromNow",
        ),
        PanelSpec(
            7,
            "timeseries",
            "Scrape duration",
            "How long Prometheus takes to scrape the agent (`scrape_duration_seconds`); the "
            "agent never probes on scrape, so this stays small.",
            (
                Query(
                    f"scrape_duration_seconds{{{V}}} and on (job, instance) probe_vantage_info",
                    "{{vantage}} {{instance}}",
                ),
            ),
            unit="s",
            thresholds=((None, "green"), (1, "orange"), (5, "red")),
        ),
        PanelSpec(
            8,
            "timeseries",
            "Probes per second",
            "Probes run per second (`probe_attempts_total`, skips excluded).",
            (
                Query(
                    f"sum by (vantage) (rate(probe_attempts_total{{{V}}}[$__rate_interval]))",
                    "{{vantage}}",
                ),
            ),
            unit="ops",
        ),
        PanelSpec(
            9,
            "state-timeline",
            "Control vantage reachable",
            "Whether this test vantage got fresh results from each configured control "
            "vantage (`probe_control_up`). Without a control the verdict engine judges alone "
            "and says so in the evidence.",
            (Query(f"probe_control_up{{{V}}}", "{{vantage}} {{control}}"),),
            mappings={"1": ("up", "green"), "0": ("down", "red")},
        ),
        PanelSpec(
            10,
            "timeseries",
            "Control results age",
            "Age of the freshest control results the verdict engine may use "
            "(`probe_control_age_seconds`); older than the configured maximum means judging "
            "alone.",
            (Query(f"probe_control_age_seconds{{{V}}}", "{{vantage}} {{control}}"),),
            unit="s",
            thresholds=((None, "green"), (600, "orange"), (1800, "red")),
        ),
    ),
)

DASHBOARDS: tuple[DashboardSpec, ...] = (OVERVIEW, SERVICE, CALLS, TAMPERING, THROUGHPUT, AGENT)


# --- building ------------------------------------------------------------------------------


def _variables(spec: DashboardSpec) -> list[Any]:
    """datasource, vantage, service (and endpoint): multi-select with an "All" of ``.*``,
    which also matches series without the label (a single-vantage Prometheus)."""
    out: list[Any] = [
        db.DatasourceVariable("datasource").label("Data source").type("prometheus"),
    ]

    def query(name: str, label: str, q: str) -> Any:
        return (
            db.QueryVariable(name)
            .label(label)
            .datasource(DS)
            .query(q)
            .refresh(dm.VariableRefresh.ON_TIME_RANGE_CHANGED)
            .sort(dm.VariableSort.ALPHABETICAL_ASC)
            .multi(True)
            .include_all(True)
            .all_value(".*")
            .current(dm.VariableOption(selected=True, text=["All"], value=["$__all"]))
        )

    out.append(query("vantage", "Vantage", "label_values(probe_vantage_info, vantage)"))
    out.append(query("service", "Service", f"label_values(probe_verdict{{{V}}}, service)"))
    if spec.endpoint_variable:
        out.append(query("endpoint", "Endpoint", f"label_values(probe_verdict{{{VS}}}, endpoint)"))
    return out


def _target(q: Query, ref: str) -> Any:
    t = prom.Dataquery().expr(q.expr).ref_id(ref).datasource(DS)
    t = t.instant().format(pm.PromQueryFormat.TABLE) if q.instant else t.range()
    return t.legend_format(q.legend) if q.legend else t


_BUILDERS: dict[str, Any] = {
    "timeseries": timeseries.Panel,
    "state-timeline": statetimeline.Panel,
    "status-history": statushistory.Panel,
    "table": table.Panel,
    "stat": stat.Panel,
    "bargauge": bargauge.Panel,
    "text": text.Panel,
}


def _panel(p: PanelSpec, y: int, x: int) -> Any:
    b = _BUILDERS[p.kind]().id(p.id).title(p.title).description(p.description)
    b = b.grid_pos(dm.GridPos(h=p.height, w=p.width, x=x, y=y))
    if p.kind == "text":
        return b.mode(tm.TextMode.MARKDOWN).content(p.content)
    b = b.datasource(DS)
    for i, q in enumerate(p.queries):
        b = b.with_target(_target(q, chr(ord("A") + i)))
    if p.unit:
        b = b.unit(p.unit)
    if p.min is not None:
        b = b.min(p.min)
    if p.max is not None:
        b = b.max(p.max)
    if p.no_value:
        b = b.no_value(p.no_value)
    steps = p.thresholds or ((None, "green"),)
    b = b.thresholds(
        db.ThresholdsConfig()
        .mode(dm.ThresholdsMode.ABSOLUTE)
        .steps([dm.Threshold(value=v, color=c) for v, c in steps])
    )
    if p.mappings:
        b = b.mappings([_value_map(p.mappings)])
    for regexp, mapping in p.recolor:
        b = b.override_by_regexp(
            regexp,
            [dm.DynamicConfigValue(id_val="mappings", value=[_value_map(mapping).to_json()])],
        )
    if p.merge:
        b = b.with_transformation(dm.DataTransformerConfig(id_val="merge", options={}))
    return b


def _value_map(mapping: dict[str, tuple[str, str]]) -> dm.ValueMap:
    return dm.ValueMap(
        options={
            value: dm.ValueMappingResult(text=label, color=color, index=i)
            for i, (value, (label, color)) in enumerate(mapping.items())
        }
    )


def build(spec: DashboardSpec) -> dict[str, Any]:
    """The dashboard as a JSON-ready dict (what Grafana provisions)."""
    d = (
        db.Dashboard(spec.title)
        .uid(spec.uid)
        .description(spec.description)
        .tags(["probe", "censorship"])
        .editable()
        .time("now-6h", "now")
        .refresh("1m")
        .timezone("utc")
        .tooltip(dm.DashboardCursorSync.CROSSHAIR)
        .link(
            db.DashboardLink("Probe dashboards")
            .type(dm.DashboardLinkType.DASHBOARDS)
            .tags(["probe"])
            .as_dropdown(True)
            .include_vars(True)
            .keep_time(True)
        )
    )
    # Grafana's own annotations and alert events, as Grafana itself writes them (an empty
    # annotations object is not a list Grafana can add them to)
    d = d.annotation(
        db.AnnotationQuery()
        .name("Annotations & Alerts")
        .datasource(dm.DataSourceRef(type_val="grafana", uid="-- Grafana --"))
        .enable(True)
        .hide(True)
        .icon_color("rgba(0, 211, 255, 1)")
        .type("dashboard")
        .built_in(1)
    )
    for v in _variables(spec):
        d = d.with_variable(v)
    x = y = row_h = 0
    for p in spec.panels:
        if x + p.width > 24:
            x, y, row_h = 0, y + row_h, 0
        d = d.with_panel(_panel(p, y, x))
        x, row_h = x + p.width, max(row_h, p.height)
    data: dict[str, Any] = json.loads(json.dumps(d.build(), cls=JSONEncoder))
    return data


def render(spec: DashboardSpec) -> str:
    return json.dumps(build(spec), indent=2, sort_keys=True, ensure_ascii=False) + "\n"


# --- docs/dashboards.md --------------------------------------------------------------------

_DOC_HEAD = """# Dashboards

Generated, with this file, by `python -m dashboards.generate` from
[dashboards/generate.py](../dashboards/generate.py) (grafana-foundation-sdk); do not edit
either by hand. Import the JSON files or provision the `dashboards/` directory
(Grafana's file provider). Every dashboard has a `datasource` variable (pick your
Prometheus) and `vantage` / `service` (/ `endpoint`) variables whose "All" is `.*`, which
also matches a single-vantage Prometheus where series carry no `vantage` label.
Recording rules named `probe:...` come from [configs/alerts.yml](../configs/alerts.yml):
load it into the Prometheus the dashboards read. Alerts link to their panel
(`dashboard` annotation, `viewPanel=ID`); docs/runbooks.md explains each alert.

How they are checked (tests/test_dashboards.py, no Grafana server needed):

- **Every query returns data.** A real Prometheus (scrape interval 1 s, these rules
  loaded) scrapes `probe run` as a test vantage behind the lab's censor and as a control
  vantage, while the censor goes through a clean network, then a DNS lie, an RST block of
  two DCs, the 16 KB byte freeze and a call-flow cut-off at once, then an SNI filter.
  Every panel query, variable query and recording rule (variables substituted: one
  vantage, `.*` for the others) must return data in that window. The test vantage polls
  the control's `/api/results` (its `control:` section), so the control panels have data
  too.
- **Schema.** grafana-foundation-sdk is generated (by Grafana's `cog`) from the schemas
  Grafana publishes per version: the dashboard kind and each panel plugin's options and
  field config. The wheel carries them as typed model classes, not as a schema file, so
  each dashboard is decoded into those models (panel options by plugin type, queries as
  Prometheus queries) and checked against them: no key the schema does not know, every
  value of the schema's type, enum or literal. The pinned SDK targets Grafana 11.6
  (`schemaVersion` 41).
- **Regenerating gives the same bytes** (JSON and this file).
"""


def _alert_links() -> dict[tuple[str, int], list[str]]:
    """(dashboard uid, panel id) -> the alerts whose `dashboard` annotation opens it."""
    links: dict[tuple[str, int], list[str]] = {}
    rules = yaml.safe_load((ROOT / "configs" / "alerts.yml").read_text(encoding="utf-8"))
    for group in rules["groups"]:
        for rule in group["rules"]:
            url = rule.get("annotations", {}).get("dashboard")
            m = re.search(r"/d/([\w-]+)\?.*viewPanel=(\d+)", url or "")
            if m:
                links.setdefault((m[1], int(m[2])), []).append(rule["alert"])
    return links


def render_doc() -> str:
    out = [_DOC_HEAD]
    links = _alert_links()
    for spec in DASHBOARDS:
        out.append(f"\n## {spec.title} (`{spec.filename}`, uid `{spec.uid}`)\n\n")
        out.append(f"{spec.description}\n")
        for p in spec.panels:
            unit = f", unit `{p.unit}`" if p.unit else ""
            out.append(f"\n**{p.id}. {p.title}** ({p.kind}{unit}). {p.description}\n")
            alerts = links.get((spec.uid, p.id))
            if alerts:
                names = ", ".join(f"[{a}](runbooks.md#{a.lower()})" for a in alerts)
                out.append(f"Alerts that link here: {names}.\n")
            for q in p.queries:
                out.append(f"\n```promql\n{q.expr}\n```\n")
    return "".join(out)


def outputs() -> dict[Path, str]:
    """Every generated file and its content."""
    files = {OUT_DIR / spec.filename: render(spec) for spec in DASHBOARDS}
    files[DOC] = render_doc()
    return files


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m dashboards.generate")
    parser.add_argument("--check", action="store_true", help="exit 1 if a file is out of date")
    args = parser.parse_args(argv)
    stale = []
    for path, content in outputs().items():
        current = path.read_text(encoding="utf-8") if path.exists() else None
        if current == content:
            continue
        if args.check:
            stale.append(str(path.relative_to(ROOT)))
        else:
            path.write_text(content, encoding="utf-8")
            print(f"wrote {path.relative_to(ROOT)}")
    if stale:
        print("out of date (run python -m dashboards.generate): " + ", ".join(stale))
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
