"""Aggregation: attempts -> path -> endpoint -> service -> round.

How an endpoint is judged
-------------------------
1. ``ipv6_unavailable`` skips are dropped (never counted); only ``vantage_offline``
   skips -> ``vantage_offline``.
2. DNS results (every resolver, swaps included) give one DNS finding (`dns`).
3. Every other result belongs to a *path*: (l4, address, port).  On a path, each
   probe's first run and its repeats are *attempts*; swap results (``tls/neutral_sni``,
   ``quic_vn/swap``, ``stun/random_udp``) are only consulted by the rules.  A failed
   attempt is judged by the rule for what failed (`rules`), with the control vantage's
   result for the same probe/address/port when there is one; the attempts of one probe
   must agree before they accuse anyone.
4. Endpoint: DNS tampering wins; otherwise blocked paths next to working paths of the
   same kind (tcp or udp) -> ``partial`` with the blocked fraction; all blocked -> the
   dominant blocking verdict; none blocked -> ``ok``, ``endpoint_down`` or
   ``inconclusive``.

A service is ``partial`` as soon as some endpoints are blocked and others work --
never OONI's "ok if any endpoint works".  On a control vantage a failure is never
censorship (`as_control_vantage`).
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterable, Sequence

from ..model import SkipReason
from .context import Context
from .dns import judge_dns
from .observations import Item, Observation, describe, normalise, same_failure
from .rules import judge_failure
from .udp_rules import sustained_loss
from .vocabulary import (
    BLOCKING,
    CERTAIN,
    FAIR,
    NONE,
    PRIORITY,
    STRONG,
    EndpointVerdict,
    Finding,
    ServiceVerdict,
    Verdict,
    distinct_lines,
    merge_evidence,
    strongest,
)

# --------------------------------------------------------------------------- attempts, paths


def _judge_attempts(ctx: Context, attempts: Sequence[Observation]) -> Finding:
    """First run and repeats of one probe on one path; censors are inconsistent, so a
    disagreement is reported (and lowers confidence), never averaged away."""
    failed = [a for a in attempts if not a.ok]
    passed = [a for a in attempts if a.ok]
    if not failed:
        lossy = sustained_loss(ctx, attempts)
        return lossy or Finding(Verdict.OK, CERTAIN, tuple(describe(a) for a in attempts))
    findings = [judge_failure(ctx, a) for a in failed]
    finding = strongest(findings)
    if passed:
        # Agreement before accusation: a failure the repeat does not reproduce is what
        # loss or congestion produce as well, so it accuses no one (docs/verdicts.md).
        note = f"{len(failed)} of {len(attempts)} attempts failed: not reproduced"
        note += f" ({describe(passed[0])})"
        if finding.blocking:
            return Finding(Verdict.INCONCLUSIVE, NONE, (*finding.evidence, note))
        return Finding(Verdict.OK, FAIR, (*finding.evidence, note))
    if len(failed) == 1:
        return finding
    same = all(same_failure(a, failed[0]) for a in failed)
    if same and finding.blocking and any(f.verdict != finding.verdict for f in findings):
        # e.g. the first handshake got no server byte and the repeat's did: not reproduced
        note = f"{len(failed)} of {len(attempts)} attempts failed, judged differently"
        return Finding(Verdict.INCONCLUSIVE, NONE, (*finding.evidence, note))
    if same:
        return finding.stronger(f"{len(failed)} of {len(attempts)} attempts failed the same way")
    note = f"{len(failed)} of {len(attempts)} attempts failed, in different ways"
    if finding.blocking:  # the repeat does not reproduce the failure class: no accusation
        return Finding(Verdict.INCONCLUSIVE, NONE, (*finding.evidence, note))
    return Finding(finding.verdict, finding.confidence, (*finding.evidence, note))


def _judge_path(ctx: Context, path: Sequence[Observation]) -> Finding | None:
    """None for a path holding only swap results: they are consulted, not judged."""
    groups: dict[str, list[Observation]] = {}
    for o in path:
        if o.is_attempt:
            groups.setdefault(o.base, []).append(o)
    if not groups:
        return None
    return strongest([_judge_attempts(ctx, attempts) for attempts in groups.values()])


# --------------------------------------------------------------------------- endpoint


def _one_endpoint(items: Sequence[Observation]) -> tuple[str, str]:
    keys = {(o.service, o.endpoint) for o in items}
    if len(keys) != 1:
        raise ValueError(f"judge_endpoint wants the results of one endpoint, got {sorted(keys)}")
    return keys.pop()


def judge_endpoint(
    results: Iterable[Item],
    control: Iterable[Item] | None = None,
    *,
    others_ok: bool = False,
) -> EndpointVerdict:
    """Judge one endpoint from all its results (first runs, swaps and repeats, any rounds).

    ``control``: the same endpoint's results from a control vantage (others are ignored).
    ``others_ok``: other endpoints work from this vantage; without a control this is
    what lets a connect failure count as a (low-confidence) block at all.
    """
    obs = normalise(results)
    if not obs:
        raise ValueError("judge_endpoint needs at least one result")
    service, endpoint = _one_endpoint(obs)
    counted = [o for o in obs if o.skipped != SkipReason.IPV6_UNAVAILABLE]
    measured = [o for o in counted if o.skipped is None]
    if not measured:
        if counted:  # every remaining result is a vantage_offline skip
            why = "the offline gate reached no control target: nothing was measured"
            return EndpointVerdict(service, endpoint, Verdict.VANTAGE_OFFLINE, 1.0, (why,))
        why = "nothing measured: every target is IPv6 and this vantage has no IPv6"
        return EndpointVerdict(service, endpoint, Verdict.INCONCLUSIVE, 0.0, (why,))
    ctl = tuple(
        c
        for c in normalise(control or ())
        if (c.service, c.endpoint) == (service, endpoint) and c.skipped is None
    )
    ctx = Context(tuple(measured), ctl, others_ok)
    return _under_allowlist(_endpoint_verdict(service, endpoint, ctx), measured)


def _endpoint_verdict(service: str, endpoint: str, ctx: Context) -> EndpointVerdict:
    paths: dict[tuple[str, str, int | None], list[Observation]] = {}
    for o in ctx.results:
        if o.base != "dns":
            paths.setdefault(o.path, []).append(o)
    judged = {k: f for k, p in paths.items() if (f := _judge_path(ctx, p)) is not None}
    findings = list(judged.values())
    dns = judge_dns(ctx)

    def verdict(f: Finding, fraction: float | None = None) -> EndpointVerdict:
        conf = round(max(0.0, min(1.0, f.confidence)), 2)
        return EndpointVerdict(
            service, endpoint, f.verdict, conf, distinct_lines(f.evidence), fraction
        )

    if dns is not None and (dns.verdict == Verdict.DNS_TAMPERING or not findings):
        # A DNS lie stops an ordinary client first; path findings are kept as evidence.
        return verdict(Finding(dns.verdict, dns.confidence, merge_evidence(dns, findings)))
    if not findings:
        return verdict(Finding(Verdict.INCONCLUSIVE, 0.0, ("only swap results",)))
    blocked = [(k, f) for k, f in judged.items() if f.blocking]
    passed = [(k, f) for k, f in judged.items() if f.verdict == Verdict.OK]
    if {k[0] for k, _ in blocked} & {k[0] for k, _ in passed}:
        # Some paths of a kind (tcp or udp) work and others of the same kind do not.
        # A whole kind failing next to another that works (QUIC filtered, TLS fine)
        # is that kind's filter, not partial blocking: it falls through to below.
        total = len(blocked) + len(passed)
        worst = strongest([f for _, f in blocked])
        summary = f"{len(blocked)} of {total} paths blocked ({worst.verdict})"
        summary += _blocked_family([k for k, _ in blocked], [k for k, _ in passed])
        confidence = sum(f.confidence for _, f in blocked) / len(blocked)
        evidence = distinct_lines([summary, *(e for _, f in blocked + passed for e in f.evidence)])
        return verdict(
            Finding(Verdict.PARTIAL, confidence, evidence), round(len(blocked) / total, 3)
        )
    best = strongest(findings)
    extra = dns.evidence if dns is not None else ()
    return verdict(Finding(best.verdict, best.confidence, (*best.evidence, *extra)))


# --------------------------------------------------------------------------- allowlist

ALLOWLIST_FLAG = "vantage_allowlist"  # set by the round on every result (FIELD.md B10)
# What the regime does not explain: a resolver's lie is an act of its own.
_NOT_THE_REGIME = frozenset({Verdict.OK, Verdict.DNS_TAMPERING})


def _under_allowlist(v: EndpointVerdict, measured: Sequence[Observation]) -> EndpointVerdict:
    """On a vantage where only domestic controls answer, a failing endpoint is the
    regime's doing, not a block of that service: ``allowlist_regime``, with what the
    rules would have said kept as evidence.  A working endpoint is allowlisted: ``ok``."""
    if v.verdict in _NOT_THE_REGIME or not any(ALLOWLIST_FLAG in o.flags for o in measured):
        return v
    why = (
        "allowlist regime: only domestic controls answer from this vantage (FIELD.md B10)",
        f"the rules alone would say {v.verdict} {v.confidence:.2f}",
    )
    return EndpointVerdict(
        v.service, v.endpoint, Verdict.ALLOWLIST_REGIME, STRONG, distinct_lines([*why, *v.evidence])
    )


def _allowlist_service(
    service: str, measured: Sequence[EndpointVerdict], evidence: tuple[str, ...]
) -> ServiceVerdict | None:
    """Any endpoint failing under the regime makes the service's state the regime's."""
    regime = [v for v in measured if v.verdict == Verdict.ALLOWLIST_REGIME]
    if not regime:
        return None
    return ServiceVerdict(
        service, Verdict.ALLOWLIST_REGIME, _mean(v.confidence for v in regime), evidence
    )


def _family(path: tuple[str, str, int | None]) -> str:
    return "IPv6" if ":" in path[1] else "IPv4"


def _blocked_family(
    blocked: Sequence[tuple[str, str, int | None]], passed: Sequence[tuple[str, str, int | None]]
) -> str:
    """``: only IPv6 is blocked, IPv4 works`` when the split follows the address family
    (a censor, or a broken IPv6 path, that treats the families apart), else nothing."""
    down, up = {_family(k) for k in blocked}, {_family(k) for k in passed}
    if len(down) == 1 and len(up) == 1 and down != up:
        return f": only {down.pop()} is blocked, {up.pop()} works"
    return ""


# --------------------------------------------------------------------------- service


def _share(v: EndpointVerdict) -> float:
    """How much of an endpoint is blocked: 1 for a block, its fraction for partial."""
    if v.verdict == Verdict.PARTIAL:
        return v.blocked_fraction if v.blocked_fraction is not None else 0.5
    return 1.0 if v.verdict in BLOCKING else 0.0


def _mean(values: Iterable[float]) -> float:
    values = list(values)
    return round(sum(values) / len(values), 2) if values else 0.0


def judge_service(endpoint_verdicts: Sequence[EndpointVerdict]) -> ServiceVerdict:
    """All endpoints agree -> that verdict; blocked next to working -> ``partial`` with the
    fraction of blocked endpoints (a partial endpoint counts with its own fraction);
    down and inconclusive endpoints are left out of the fraction."""
    if not endpoint_verdicts:
        raise ValueError("judge_service needs at least one endpoint verdict")
    service = endpoint_verdicts[0].service
    evidence = distinct_lines(
        f"{v.endpoint}: {v.verdict} {v.confidence:.2f}"
        + (f" blocked {v.blocked_fraction:.2f}" if v.blocked_fraction is not None else "")
        for v in endpoint_verdicts
    )
    measured = [v for v in endpoint_verdicts if v.verdict != Verdict.VANTAGE_OFFLINE]
    if not measured:
        return ServiceVerdict(service, Verdict.VANTAGE_OFFLINE, 1.0, evidence)
    regime = _allowlist_service(service, measured, evidence)
    if regime is not None:
        return regime
    kinds = {v.verdict for v in measured}
    blocked = [v for v in measured if v.verdict in BLOCKING or v.verdict == Verdict.PARTIAL]
    passed = [v for v in measured if v.verdict == Verdict.OK]
    if len(kinds) == 1:
        (only,) = kinds
        fraction = _mean(_share(v) for v in measured) if only == Verdict.PARTIAL else None
        return ServiceVerdict(
            service, only, _mean(v.confidence for v in measured), evidence, fraction
        )
    if blocked and (passed or Verdict.PARTIAL in kinds):
        judged = blocked + passed
        fraction = round(sum(_share(v) for v in judged) / len(judged), 3)
        return ServiceVerdict(
            service, Verdict.PARTIAL, _mean(v.confidence for v in judged), evidence, fraction
        )
    if blocked:
        counts = Counter(v.verdict for v in blocked)
        top = min(counts, key=lambda k: (-counts[k], PRIORITY.index(k)))
        # down or inconclusive endpoints next to blocked ones: name the block, but the
        # confidence says how much of the service shows it (as for ``ok`` below)
        confidence = _mean(v.confidence for v in blocked if v.verdict == top)
        confidence *= len(blocked) / len(measured)
        return ServiceVerdict(service, top, round(confidence, 2), evidence)
    if passed:
        # down or inconclusive endpoints next to working ones: the service works; the
        # confidence says how much of it could be seen
        confidence = _mean(v.confidence for v in passed) * len(passed) / len(measured)
        return ServiceVerdict(service, Verdict.OK, round(confidence, 2), evidence)
    if kinds == {Verdict.ENDPOINT_DOWN}:
        return ServiceVerdict(
            service, Verdict.ENDPOINT_DOWN, _mean(v.confidence for v in measured), evidence
        )
    return ServiceVerdict(service, Verdict.INCONCLUSIVE, NONE, evidence)


# --------------------------------------------------------------------------- round


def as_control_vantage(v: EndpointVerdict, others_ok: bool) -> EndpointVerdict:
    """On a control vantage a failure is never censorship: nothing censors a control
    (that is what makes it one), so what would read as a block is the endpoint being
    down, or, when nothing else works from here either, the control itself broken."""
    if v.verdict not in BLOCKING and v.verdict != Verdict.PARTIAL:
        return v
    if others_ok:
        verdict, confidence = Verdict.ENDPOINT_DOWN, FAIR
        why = "control vantage: a failure here means the endpoint is down, never censorship"
    else:
        verdict, confidence = Verdict.INCONCLUSIVE, NONE
        why = "control vantage and nothing else works from here: the control may be broken"
    return EndpointVerdict(
        v.service, v.endpoint, verdict, confidence, distinct_lines((why, *v.evidence))
    )


def judge_round(
    results: Iterable[Item],
    control: Iterable[Item] | None = None,
    *,
    vantage_role: str = "test",
) -> tuple[EndpointVerdict | ServiceVerdict, ...]:
    """Every endpoint's verdict, then its service's, service by service (sorted).

    Works on any set of results: one round, several rounds, or the lab's; ``control``
    is the control vantage's results for the same endpoints, in any accepted form.
    ``vantage_role`` ``control``: these results come from a control vantage, whose
    failures mean ``endpoint_down`` / ``inconclusive``, never a censorship verdict.
    """
    obs = normalise(results)
    ctl = [c for c in normalise(control or ()) if c.skipped is None]
    by_endpoint: dict[tuple[str, str], list[Observation]] = {}
    for o in obs:
        by_endpoint.setdefault((o.service, o.endpoint), []).append(o)
    # grouped once: a scan of every control result per endpoint is O(endpoints x results)
    ctl_by_endpoint: dict[tuple[str, str], list[Observation]] = {}
    for c in ctl:
        ctl_by_endpoint.setdefault((c.service, c.endpoint), []).append(c)
    # Which endpoints show this vantage can reach *something*: a success beyond DNS.
    reached = {(o.service, o.endpoint) for o in obs if o.ok and o.base != "dns"}
    out: list[EndpointVerdict | ServiceVerdict] = []
    services = sorted({s for s, _ in by_endpoint})
    for service in services:
        verdicts = [
            judge_endpoint(
                by_endpoint[key],
                ctl_by_endpoint.get(key, []),
                others_ok=bool(reached - {key}),
            )
            for key in sorted(k for k in by_endpoint if k[0] == service)
        ]
        if vantage_role == "control":
            verdicts = [
                as_control_vantage(v, bool(reached - {(v.service, v.endpoint)})) for v in verdicts
            ]
        out += verdicts
        out.append(judge_service(verdicts))
    return tuple(out)
