"""One module per probe type, one signature (`base.ProbeFn`), one registry entry each.

Like blackbox_exporter's ``Probers`` map, `REGISTRY` is the one place that knows the
probe types: the config loader (names, params), the round runner (run, time budget)
and the docs read it.  Adding a probe type means adding a module, its evidence class
(`probe.evidence`, which says its transport) and one `ProbeType` line here.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass
from types import MappingProxyType
from typing import Any, Generic, TypeVar

from .. import evidence as ev
from ..config.settings import ProbeSettings
from ..evidence import Evidence, Transport
from ..model import ProbeParams, ProbeSpec, Target
from . import dns, mtproto, quic, quic_vn, stun, tcp, tls, transfer, whatsapp
from .base import ProbeFn

__all__ = ["REGISTRY", "ProbeType"]

P = TypeVar("P", bound=ProbeParams)


@dataclass(frozen=True)
class ProbeType(Generic[P]):
    """Everything the rest of the agent knows about one probe type.

    ``params`` is its typed params class: ``params.parse`` turns a spec's params as
    written (plain YAML data) into it, raising `params.ParamError` naming the key; the
    config loader calls it once per spec.  ``budget`` is the longest a correct run can
    take with those params and settings (the sum of the timeouts it waits on, the time
    its params ask for): the round runner's safety cap (`probe.round.probe_deadline`)
    is built on it and must never cut a correct run.  ``evidence`` is the class its
    runs record what they saw in (`probe.evidence`), which also says its transport.
    """

    name: str
    run: ProbeFn
    params: type[P]
    evidence: type[Evidence]
    budget: Callable[[P, ProbeSettings], float]

    @property
    def transport(self) -> Transport:
        """What the probe's packets go over by default, as its evidence class says (one
        run's evidence may say otherwise: a ``stun`` over TCP, a ``dns`` via DoH)."""
        return self.evidence.TRANSPORT

    def parse(self, params: Mapping[str, Any], base: ProbeParams | None = None) -> P:
        """``params`` as written over ``base`` (None: the defaults); raises `ParamError`."""
        if base is not None and not isinstance(base, self.params):
            raise TypeError(f"{self.name}: base params are a {type(base).__name__}")
        return self.params.parse(params, base)

    def params_of(self, owner: Target | ProbeSpec) -> P:
        """The typed params a target runs with (a spec carries); defaults for None."""
        return self.params.of(owner)

    def budget_s(self, target: Target, settings: ProbeSettings) -> float:
        """``budget`` for this target's params and these (possibly stretched) settings."""
        return self.budget(self.params_of(target), settings)


def _entries(*types: ProbeType[Any]) -> Mapping[str, ProbeType[Any]]:
    return MappingProxyType({t.name: t for t in types})


REGISTRY: Mapping[str, ProbeType[Any]] = _entries(
    ProbeType("dns", dns.probe, dns.DnsParams, ev.DnsEvidence, dns.budget_s),
    ProbeType("tcp", tcp.probe, tcp.TcpParams, ev.TcpEvidence, tcp.budget_s),
    ProbeType("tls", tls.probe, tls.TLSParams, ev.TlsEvidence, tls.budget_s),
    ProbeType(
        "mtproto", mtproto.probe, mtproto.MtprotoParams, ev.MtprotoEvidence, mtproto.budget_s
    ),
    ProbeType(
        "whatsapp", whatsapp.probe, whatsapp.WhatsappParams, ev.WhatsappEvidence, whatsapp.budget_s
    ),
    ProbeType("quic", quic.probe, quic.QuicParams, ev.QuicEvidence, quic.budget_s),
    ProbeType("quic_vn", quic_vn.probe, quic_vn.QuicVnParams, ev.QuicVnEvidence, quic_vn.budget_s),
    ProbeType("stun", stun.probe, stun.StunParams, ev.StunEvidence, stun.budget_s),
    ProbeType(
        "transfer", transfer.probe, transfer.TransferParams, ev.TransferEvidence, transfer.budget_s
    ),
)
