"""One module per probe type, one signature (`base.ProbeFn`), one registry.

Like blackbox_exporter's ``Probers`` map: the config validator, the round runner
and the docs all read `PROBES`; adding a probe type means adding a module and a
line here.
"""

from __future__ import annotations

from . import dns, mtproto, quic, quic_vn, stun, tcp, tls, transfer, whatsapp
from .base import ProbeFn

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
