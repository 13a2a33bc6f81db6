"""DNS judgements: one finding per endpoint from every resolver's answers.

Tampering is the system/UDP resolver lying (NXDOMAIN, no answer, a bogon, an answer
outside the service's prefixes, answers inconsistent with the clean ones) while DNS over
TCP, DoH or the control vantage answer properly, or differing replies to one query
(injection).
"""

from __future__ import annotations

from collections.abc import Sequence

from ..dnsjudge import disjoint, resolver_kind
from ..evidence import DnsEvidence
from ..model import Failure
from .context import Context
from .observations import Observation, describe, describe_control, dns_answers
from .vocabulary import CERTAIN, FAIR, GOOD, NONE, STRONG, Finding, Verdict, distinct_lines

_NEGATIVE_DNS = frozenset({Failure.DNS_NXDOMAIN, Failure.DNS_NO_ANSWER})
_CLEAN_RESOLVERS = frozenset({"tcp", "doh"})  # what a censor cannot (or hardly) rewrite
_DNS_MISMATCH = frozenset({"dns_udp_tcp_mismatch", "dns_doh_mismatch", "dns_system_mismatch"})


def _resolver_kind(o: Observation) -> str:
    return resolver_kind(o.resolver)


def _dns_lie(o: Observation, clean: Sequence[Observation]) -> tuple[str, float] | None:
    """What a system/UDP answer got wrong, and how sure we are, given clean answers."""
    kind = o.kind
    in_prefix = [c for c in clean if c.ok and "dns_answer_outside_prefixes" not in c.flags]
    if kind in _NEGATIVE_DNS:
        return (
            ("nxdomain" if kind == Failure.DNS_NXDOMAIN else "no answer", STRONG) if clean else None
        )
    if kind == Failure.DNS_BOGON:
        return ("bogon", CERTAIN if clean else FAIR)
    if not o.ok:
        return None
    if "dns_answer_outside_prefixes" in o.flags:
        return ("answer outside the service's prefixes", GOOD) if in_prefix else None
    mine = dns_answers(o)
    # Not compare_answer_sets: two answers inside the prefixes are a CDN's variation
    # there, but here a mismatch was already flagged and the question is only whether
    # this answer shares an address with any clean one.
    matches_none = all(disjoint(mine, dns_answers(c)) for c in in_prefix)
    if _DNS_MISMATCH & set(o.flags) and in_prefix and matches_none:
        return ("inconsistent with the clean resolvers", FAIR)
    return None


def _injection_note(injected: Sequence[Observation]) -> str | None:
    """``3 differing replies to one A query (…): injected``, from the kept replies: more
    than one forged reply means more than one injector (or one that repeats itself)."""
    best: tuple[int, str, list[str]] | None = None
    for o in injected:
        by_type: dict[str, list[str]] = {}
        replies = o.evidence.replies if isinstance(o.evidence, DnsEvidence) else None
        for reply in replies or ():
            if reply.answers:
                by_type.setdefault(reply.qtype or "?", []).append(",".join(reply.answers))
        for qtype, texts in by_type.items():
            distinct = list(dict.fromkeys(texts))
            if len(distinct) > 1 and (best is None or len(distinct) > best[0]):
                best = (len(distinct), qtype, distinct)
    if best is None:
        return None
    n, qtype, distinct = best
    shown = "; ".join(distinct[:4]) + (" …" if n > 4 else "")
    return f"{n} differing replies to one {qtype} query ({shown}): injected"


_RESOLVER_NAME = {"doh": "DoH", "tcp": "TCP"}


def _clean_note(clean: Sequence[Observation], control: Sequence[Observation]) -> str:
    """Which clean resolvers answered, and which of them lied too (a censor that also
    rewrites DNS over TCP leaves DoH as the only truthful path)."""
    answered = [o for o in clean if o.ok]
    names = sorted({_RESOLVER_NAME.get(_resolver_kind(o), _resolver_kind(o)) for o in answered})
    if any(o.ok for o in control):
        names.append("the control")
    note = f"; {' and '.join(names)} answer" if names else ""
    liars = [o for o in clean if not o.ok and _dns_lie(o, answered) is not None]
    if liars:
        kinds = sorted({_RESOLVER_NAME.get(_resolver_kind(o), _resolver_kind(o)) for o in liars})
        shown = ",".join(sorted(dns_answers(liars[0]))) or str(liars[0].failure)
        note += f"; {'/'.join(kinds)} lies too ({shown})"
    return note


def judge_dns(ctx: Context) -> Finding | None:
    dns = [o for o in ctx.results if o.base == "dns"]
    if not dns:
        return None
    suspect = [o for o in dns if _resolver_kind(o) not in _CLEAN_RESOLVERS]
    clean = [o for o in dns if _resolver_kind(o) in _CLEAN_RESOLVERS]
    control = [o for o in ctx.control if o.base == "dns"]
    answered = [o for o in clean + control if o.ok]
    evidence = [describe(o) for o in dns] + [describe_control(o) for o in control]
    injected = [o for o in dns if "dns_injection_suspected" in o.flags]
    if injected:
        why = _injection_note(injected) or "two differing replies to one query: injected"
        return Finding(Verdict.DNS_TAMPERING, STRONG, distinct_lines([*evidence, why]))
    lies = [(o, lie) for o in suspect if (lie := _dns_lie(o, answered)) is not None]
    if lies:
        what, confidence = max((lie for _, lie in lies), key=lambda lie: lie[1])
        why = f"{what} from the system/UDP resolver"
        why += _clean_note(clean, control) if answered else "; no clean resolver to compare"
        return Finding(Verdict.DNS_TAMPERING, confidence, distinct_lines([*evidence, why]))
    failed = [o for o in dns if not o.ok]
    if not failed:
        return Finding(Verdict.OK, CERTAIN, distinct_lines(evidence))
    if all(o.kind in _NEGATIVE_DNS for o in failed) and not answered and clean:
        why = "every resolver, DoH/TCP included, says the name has no address"
        return Finding(Verdict.ENDPOINT_DOWN, GOOD, distinct_lines([*evidence, why]))
    why = "resolver failures" if answered or clean else "no DoH/TCP resolver or control to compare"
    return Finding(Verdict.INCONCLUSIVE, NONE, distinct_lines([*evidence, why]))
