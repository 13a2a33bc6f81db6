"""One module per probe type, one signature (`base.ProbeFn`), one registry.

Like blackbox_exporter's ``Probers`` map: the config validator, the round runner
and the docs all read `PROBES`; adding a probe type means adding a module and a
line here.  `PARAMS` holds each probe's params validator (see `probe.probes.params`):
the config loader runs it on every probe spec at load time, and the probes that
take params parse them with the same function at run time, so both agree.
"""

from __future__ import annotations

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
