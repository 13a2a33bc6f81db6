"""One module per probe type, one signature (`base.ProbeFn`), one registry.

Like blackbox_exporter's ``Probers`` map: the config validator, the round runner
and the docs all read `PROBES`; adding a probe type means adding a module and a
line here.  `PARAMS` holds each probe's params validator (see `probe.probes.params`):
the config loader runs it on every probe spec at load time, and the probes that
take params parse them with the same function at run time, so both agree.
`EXTRA_TIME` lets the round runner's safety cap leave room for what params ask for.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

from ..config.settings import Timeouts
from . import dns, mtproto, quic, quic_vn, stun, tcp, tls, transfer, whatsapp
from .base import ProbeFn
from .params import ParamValidator, no_params

PROBES: dict[str, ProbeFn] = {
    "dns": dns.probe,
    "tcp": tcp.probe,
    "tls": tls.probe,
    "mtproto": mtproto.probe,
    "whatsapp": whatsapp.probe,
    "quic": quic.probe,
    "quic_vn": quic_vn.probe,
    "stun": stun.probe,
    "transfer": transfer.probe,
}

# Every key of PROBES, no other (tests/test_seeds.py checks it).  A validator returns
# the parsed params or raises `params.ParamError` naming the offending key.
PARAMS: dict[str, ParamValidator] = {
    "dns": no_params("dns"),  # the resolvers come from the config, not from params
    "tcp": tcp.parse_params,
    "tls": tls.parse_params,
    "mtproto": no_params("mtproto"),
    "whatsapp": whatsapp.parse_params,
    "quic": quic.parse_params,
    "quic_vn": quic_vn.parse_params,
    "stun": stun.StunParams.from_mapping,
    "transfer": transfer.parse_params,
}

ExtraTime = Callable[[Mapping[str, Any], Timeouts], float]

# Probes whose params can make a correct run outlast all of the shared timeouts (a tcp
# hold, a stun flow or control, a transfer over many connections): seconds the params
# add.  `probe.round.probe_deadline` adds them to its safety cap, which must never cut a
# correct run and turn its evidence into a bare timeout.  Raises `ParamError` like PARAMS.
EXTRA_TIME: dict[str, ExtraTime] = {
    "tcp": tcp.extra_time_s,
    "stun": stun.extra_time_s,
    "transfer": transfer.extra_time_s,
}
