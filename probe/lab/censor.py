"""Censor behaviours (FIELD.md §2, B1-B9) as small composable rules in the censor namespace.

The model is ooni/netem's ``Filter(direction, packet) -> policy``, done with the real
kernel instead of a userspace stack so the probes run unmodified: every behaviour is an
object with ``apply(censor)`` / ``remove(censor)`` that installs and removes its own
nftables table, iptables chain, tc qdisc or NFQUEUE handler in the lab's censor namespace
(`probe.lab.topology`).  Behaviours compose: each nftables behaviour is a table of its
own with a base chain on the forward hook (a drop in any of them is final), each
iptables behaviour a chain of its own jumped to from FORWARD, and connection marks are
one bit per behaviour, so two behaviours never clobber each other's state.

Directions: *up* is client -> server (packets entering the censor on ``cli0``), *down*
is server -> client (entering on ``srv0``).  The control vantage never crosses the
censor, so no behaviour can touch it.

    with Lab() as lab:
        lab.censor.apply(SNIFilter(["e1.whatsapp.net"]))
        with lab.censor.active(IPBlock([ADDR.service(2)], action="reset")):
            ...

Which tool for which behaviour, and why:

- nftables where it can say it (IP blocks, QUIC filter, byte freezes, loss, STUN
  classification, flow cut-offs): atomic ``nft -f`` of one table, removed with one
  ``delete table``; raw payload matches (``@th``), dynamic sets with timeouts and
  conntrack byte counters are all native.
- iptables (the nft-backed one) where nftables has no match: ``-m string`` for SNI and
  ClientHello shapes, ``-m u32`` for "first payload byte of a TCP segment" behind a
  variable TCP header, and ``-j NFQUEUE`` (this kernel lacks nft's ``queue`` statement).
- tc ``htb`` + ``pfifo`` for throttling (no netem, no fq here).
- NFQUEUE + a small Python handler (`probe.lab.nfq`) for what no rule can do: delaying
  packets and forging DNS answers on the path.
"""

from __future__ import annotations

import contextlib
import ipaddress
import itertools
import ssl
import sys
from abc import ABC, abstractmethod
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar, Literal, Protocol

from .netns import CENSOR_CLIENT_IF, CENSOR_SERVER_IF, LabError, Role, ns_argv, run
from .process import LabProcess

__all__ = [
    "Allowlist",
    "Behaviour",
    "ByteFreeze",
    "Censor",
    "DNSInjection",
    "Delay",
    "FlowCutoff",
    "IPBlock",
    "LabHost",
    "PostHandshakeStall",
    "QUICFilter",
    "RandomLoss",
    "SNIFilter",
    "StunBlackhole",
    "TLSFingerprintFilter",
    "TLSIntercept",
    "Throttle",
    "UDPBlock",
    "UDPReject",
    "client_hello_cipher_vector",
]

Direction = Literal["up", "down", "both"]
Action = Literal["reset", "drop"]
_IFACE = {"up": CENSOR_CLIENT_IF, "down": CENSOR_SERVER_IF}  # where packets ENTER the censor
_STUN_COOKIE = 0x2112A442
_MAX_MARK_BITS = 24  # ct mark bits handed out to behaviours (bits 0..23)


def _split(addresses: Sequence[str]) -> tuple[list[str], list[str]]:
    """Addresses (or prefixes) by family, validated."""
    v4: list[str] = []
    v6: list[str] = []
    for a in addresses:
        net = ipaddress.ip_network(a, strict=False)
        (v4 if net.version == 4 else v6).append(str(net) if net.num_addresses > 1 else a)
    return v4, v6


def _set(items: Sequence[str | int]) -> str:
    return "{ " + ", ".join(str(i) for i in items) + " }"


def _nft_peer(addresses: Sequence[str], direction: Literal["up", "down"]) -> list[str]:
    """nft match prefixes for "the server side of the packet is one of ``addresses``":
    the destination going up, the source coming down.  [""] matches every address."""
    if not addresses:
        return [""]
    v4, v6 = _split(addresses)
    side = "daddr" if direction == "up" else "saddr"
    out = []
    if v4:
        out.append(f"ip {side} {_set(v4)} ")
    if v6:
        out.append(f"ip6 {side} {_set(v6)} ")
    return out


def _nft_ports(proto: str, ports: Sequence[int], direction: Literal["up", "down"]) -> str:
    if not ports:
        return f"meta l4proto {proto} " if proto != "any" else ""
    side = "dport" if direction == "up" else "sport"
    return f"{proto} {side} {_set(ports)} "


def _directions(direction: Direction) -> list[Literal["up", "down"]]:
    return ["up", "down"] if direction == "both" else [direction]


# --- the censor -------------------------------------------------------------------------------


class LabHost(Protocol):
    """What a censor needs of its lab (`probe.lab.topology.Lab` is one): the censor does
    not import the lab, the lab imports the censor."""

    @property
    def workdir(self) -> Path: ...

    @property
    def ca_file(self) -> str: ...

    def ns(self, role: Role) -> str: ...

    def spawn(self, role: Role, argv: Sequence[str], name: str | None = None) -> LabProcess: ...

    def stop(self, proc: LabProcess) -> None: ...


class Censor:
    """Applies and removes behaviours in a lab's censor namespace (``lab.censor``)."""

    def __init__(self, lab: LabHost) -> None:
        self.lab = lab
        self.ns = lab.ns("censor")
        self.active_behaviours: list[Behaviour] = []
        self._serial = itertools.count(1)
        self._marks: set[int] = set()
        self._queues: set[int] = set()
        self._tc_devices: set[str] = set()

    # -- applying

    def apply(self, *behaviours: Behaviour) -> None:
        for b in behaviours:
            if b in self.active_behaviours:
                raise LabError(f"{b} is already applied")
            b.apply(self)
            self.active_behaviours.append(b)

    def remove(self, *behaviours: Behaviour) -> None:
        for b in behaviours:
            if b in self.active_behaviours:
                self.active_behaviours.remove(b)
                b.remove(self)

    def clear(self) -> None:
        """Remove every applied behaviour (newest first)."""
        self.remove(*reversed(self.active_behaviours))

    @contextlib.contextmanager
    def active(self, *behaviours: Behaviour) -> Iterator[None]:
        """Apply for the duration of a with block; removed also when the block fails."""
        applied: list[Behaviour] = []
        try:
            for b in behaviours:
                self.apply(b)
                applied.append(b)
            yield
        finally:
            self.remove(*reversed(applied))

    # -- resources behaviours share

    def name(self, stem: str) -> str:
        """A table/chain name unique in this censor (nft forbids some words, e.g. fwd)."""
        return f"{stem}_{next(self._serial)}"

    def mark_bit(self) -> int:
        for bit in range(_MAX_MARK_BITS):
            if bit not in self._marks:
                self._marks.add(bit)
                return 1 << bit
        raise LabError("out of conntrack mark bits")

    def free_mark(self, mark: int) -> None:
        self._marks.discard(mark.bit_length() - 1)

    def queue_num(self) -> int:
        num = next(n for n in itertools.count(1) if n not in self._queues)
        self._queues.add(num)
        return num

    def free_queue(self, num: int) -> None:
        self._queues.discard(num)

    def claim_tc(self, device: str) -> None:
        if device in self._tc_devices:
            raise LabError(f"{device} already has a root qdisc from another behaviour")
        self._tc_devices.add(device)

    def release_tc(self, device: str) -> None:
        self._tc_devices.discard(device)

    # -- tools, run inside the censor namespace

    def nft(self, script: str) -> str:
        return run(ns_argv(self.ns, ["nft", "-f", "-"]), input=script)

    def iptables(self, script4: str | None, script6: str | None) -> None:
        """Feed iptables-restore (v4) and ip6tables-restore (v6) with --noflush scripts."""
        for tool, script in (("iptables-restore", script4), ("ip6tables-restore", script6)):
            if script:
                run(ns_argv(self.ns, [tool, "--noflush", "-w"]), input=script)

    def tc(self, script: str, *, check: bool = True) -> str:
        return run(ns_argv(self.ns, ["tc", "-batch", "-"]), input=script, check=check)

    def flush_conntrack(self) -> None:
        """Forget every tracked flow in the censor (NAT is decided per new flow)."""
        run(ns_argv(self.ns, ["conntrack", "-F"]), check=False)

    def spawn(self, spec: dict[str, Any]) -> LabProcess:
        import json

        argv = [sys.executable, "-m", "probe.lab.nfq", json.dumps(spec)]
        return self.lab.spawn("censor", argv, name=f"nfq:{spec.get('mode')}")

    def ruleset(self) -> str:
        """Everything installed right now (nft, which also shows iptables-nft rules, and tc)."""
        out = run(ns_argv(self.ns, ["nft", "list", "ruleset"]))
        for dev in (CENSOR_CLIENT_IF, CENSOR_SERVER_IF):
            out += f"\n# tc {dev}\n" + run(ns_argv(self.ns, ["tc", "qdisc", "show", "dev", dev]))
        return out


# --- behaviour kinds --------------------------------------------------------------------------


class Behaviour(ABC):
    """A censor behaviour: ``id`` is its FIELD.md row (B1..B9; "net" for plain network
    conditions).  ``apply`` installs it in a censor, ``remove`` takes it out again."""

    id: ClassVar[str]

    @abstractmethod
    def apply(self, censor: Censor) -> None: ...

    @abstractmethod
    def remove(self, censor: Censor) -> None: ...

    def __str__(self) -> str:
        return f"{self.id} {type(self).__name__}"


class _MarkingBehaviour(Behaviour):
    """A behaviour that may hold conntrack mark bits while applied (freed on remove)."""

    _marks: list[int]

    def mark(self, censor: Censor) -> int:
        bit = censor.mark_bit()
        self._marks.append(bit)
        return bit

    def _free(self, censor: Censor) -> None:
        for bit in getattr(self, "_marks", []):
            censor.free_mark(bit)
        self._marks = []


class NftBehaviour(_MarkingBehaviour):
    """A behaviour that is one nftables table with a forward base chain (and sets)."""

    _table: str | None = None

    @abstractmethod
    def rules(self, censor: Censor) -> list[str]: ...

    def sets(self) -> list[str]:
        return []

    def apply(self, censor: Censor) -> None:
        self._marks = []
        name = censor.name(f"b{self.id[1:].lower()}" if self.id.startswith("B") else self.id)
        rules = self.rules(censor)
        body = "".join(f"  {s}\n" for s in self.sets())
        body += "  chain forward {\n    type filter hook forward priority filter; policy accept;\n"
        body += "".join(f"    {r}\n" for r in rules)
        body += "  }\n"
        try:
            censor.nft(f"table inet {name} {{\n{body}}}\n")
        except BaseException:
            self._free(censor)
            raise
        self._table = name

    def remove(self, censor: Censor) -> None:
        if self._table is not None:
            censor.nft(f"delete table inet {self._table}\n")
            self._table = None
        self._free(censor)


class IptBehaviour(_MarkingBehaviour):
    """A behaviour that is one iptables chain (v4 and v6) jumped to from FORWARD."""

    _chain: str | None = None

    @abstractmethod
    def rules(self, censor: Censor, chain: str, family: int) -> list[str]:
        """iptables-restore lines (``-A CHAIN ...``) for IPv4 (4) or IPv6 (6)."""

    def prepare(self, censor: Censor) -> None:
        """Allocate what the rules of both families share (connmark bits)."""

    def apply(self, censor: Censor) -> None:
        self._marks = []
        chain = censor.name(f"B{self.id[1:]}" if self.id.startswith("B") else self.id).upper()
        try:
            self.prepare(censor)
            scripts = [self._script(chain, self.rules(censor, chain, f)) for f in (4, 6)]
            censor.iptables(*scripts)
        except BaseException:
            with contextlib.suppress(LabError):
                self._delete(censor, chain)
            self._free(censor)
            raise
        self._chain = chain

    def remove(self, censor: Censor) -> None:
        if self._chain is not None:
            self._delete(censor, self._chain)
            self._chain = None
        self._free(censor)

    @staticmethod
    def _script(chain: str, rules: list[str]) -> str:
        return (
            f"*filter\n:{chain} - [0:0]\n"
            + "".join(r + "\n" for r in rules)
            + f"-A FORWARD -j {chain}\nCOMMIT\n"
        )

    @staticmethod
    def _delete(censor: Censor, chain: str) -> None:
        script = f"*filter\n-D FORWARD -j {chain}\n-F {chain}\n-X {chain}\nCOMMIT\n"
        censor.iptables(script, script)


@dataclass(eq=False)
class QueueBehaviour(IptBehaviour):
    """An iptables behaviour whose rules send packets to NFQUEUE, where a handler process
    (`probe.lab.nfq`, spawned in the censor namespace) decides their fate.  The queue
    number and the handler live exactly as long as the rules."""

    handler: LabProcess | None = field(default=None, init=False)
    _queue: int = field(default=0, init=False)

    @abstractmethod
    def handler_spec(self) -> dict[str, Any]:
        """The handler's spec for `probe.lab.nfq` (its ``mode`` and options; not the queue)."""

    def apply(self, censor: Censor) -> None:
        self._queue = censor.queue_num()
        try:
            self.handler = censor.spawn({**self.handler_spec(), "queue": self._queue})
            super().apply(censor)
        except BaseException:
            self._stop(censor)
            raise

    def remove(self, censor: Censor) -> None:
        try:
            super().remove(censor)
        finally:
            self._stop(censor)

    def _stop(self, censor: Censor) -> None:
        if self.handler is not None:
            censor.lab.stop(self.handler)
            self.handler = None
        censor.free_queue(self._queue)


def _ipt_peer(
    addresses: Sequence[str], family: int, direction: Literal["up", "down"]
) -> str | None:
    """iptables match for the server side (``-d`` going up, ``-s`` coming down); None when
    ``addresses`` has none of this family (the rule must then not be written at all)."""
    if not addresses:
        return ""
    v4, v6 = _split(addresses)
    chosen = v4 if family == 4 else v6
    if not chosen:
        return None
    flag = "-d" if direction == "up" else "-s"
    return f"{flag} {','.join(chosen)} "


def _ipt_ports(ports: Sequence[int], direction: Literal["up", "down"]) -> str:
    if not ports:
        return ""
    side = "--dports" if direction == "up" else "--sports"
    return f"-m multiport {side} {','.join(str(p) for p in ports)} "


# --- B1 -------------------------------------------------------------------------------------


@dataclass(eq=False)
class DNSInjection(QueueBehaviour):
    """B1, on-path injector: UDP DNS queries crossing the censor go to an NFQUEUE handler
    (`probe.lab.nfq` ``dnsinject``) that answers scripted names itself, spoofing the
    resolver's address, and then lets the query continue (``drop_query=False``: the real
    answer arrives second, a race) or drops it.

    ``answers`` are rules in the `probe.lab.serve` DNS rule format, e.g.
    ``[{"name": "g.whatsapp.net", "type": "A", "answer": {"kind": "answer",
    "addresses": ["10.10.34.35"]}}]``.  A lying *resolver* needs no censor at all: script
    the lab DNS server's own answer table (NXDOMAIN over UDP only, bogons, races).
    """

    id: ClassVar[str] = "B1"
    answers: Sequence[dict[str, Any]] = ()
    resolvers: Sequence[str] = ()  # only queries to these resolvers; empty = any
    drop_query: bool = False
    port: int = 53

    def handler_spec(self) -> dict[str, Any]:
        return {"mode": "dnsinject", "rules": list(self.answers), "drop_query": self.drop_query}

    def rules(self, censor: Censor, chain: str, family: int) -> list[str]:
        peer = _ipt_peer(self.resolvers, family, "up")
        if peer is None:
            return []
        return [
            f"-A {chain} -i {CENSOR_CLIENT_IF} -p udp --dport {self.port} {peer}"
            f"-j NFQUEUE --queue-num {self._queue}"
        ]

    def stats(self) -> dict[str, Any]:
        """The handler's counters: packets seen, queries matched, replies injected."""
        if self.handler is None:
            raise LabError("not applied")
        return self.handler.command({"cmd": "stats"})


# --- B2 -------------------------------------------------------------------------------------


@dataclass(eq=False)
class IPBlock(NftBehaviour):
    """B2, IP block (nftables).  ``action="drop"``: packets to ``addresses`` vanish (the
    client's connect times out).  ``action="reset"``: a TCP SYN is answered by the censor
    with ``reject with tcp reset`` (the client gets ECONNREFUSED at once); non-TCP packets
    are dropped.  ``ports`` / ``protocol`` narrow it (empty ports = all)."""

    id: ClassVar[str] = "B2"
    addresses: Sequence[str] = ()
    action: Action = "drop"
    ports: Sequence[int] = ()
    protocol: Literal["tcp", "udp", "any"] = "any"

    def __post_init__(self) -> None:
        if not self.addresses:
            raise ValueError("an IP block needs addresses (blocking everything is B10)")
        if self.ports and self.protocol == "any":
            raise ValueError("ports need protocol tcp or udp")

    def rules(self, censor: Censor) -> list[str]:
        out = []
        for peer in _nft_peer(self.addresses, "up"):
            match = (
                f"iifname {CENSOR_CLIENT_IF} {peer}{_nft_ports(self.protocol, self.ports, 'up')}"
            )
            if self.action == "reset" and self.protocol in ("tcp", "any"):
                out.append(f"{match}meta l4proto tcp counter reject with tcp reset")
            out.append(f"{match}counter drop")
        return out


@dataclass(eq=False)
class Allowlist(NftBehaviour):
    """B10, allowlist regime (regional shutdowns): every packet from the client to an
    address outside ``allowed`` is dropped, IPv4 and IPv6 alike (a family with no allowed
    address is cut off entirely).  Only the "domestic" destinations answer."""

    id: ClassVar[str] = "B10"
    allowed: Sequence[str] = ()

    def __post_init__(self) -> None:
        if not self.allowed:
            raise ValueError("an allowlist needs allowed addresses (else it is an outage)")
        _split(self.allowed)  # validates

    def rules(self, censor: Censor) -> list[str]:
        v4, v6 = _split(self.allowed)
        up = f"iifname {CENSOR_CLIENT_IF} "
        return [
            f"{up}meta nfproto ipv4 ip daddr != {_set(v4)} counter drop"
            if v4
            else f"{up}meta nfproto ipv4 counter drop",
            f"{up}meta nfproto ipv6 ip6 daddr != {_set(v6)} counter drop"
            if v6
            else f"{up}meta nfproto ipv6 counter drop",
        ]


@dataclass(eq=False)
class UDPBlock(IPBlock):
    """B9, call blocking by address: every UDP packet to ``addresses`` (optionally only
    ``ports``) is dropped; the client sees silence.  TCP to the same addresses passes."""

    id: ClassVar[str] = "B9"
    protocol: Literal["tcp", "udp", "any"] = "udp"


# ICMP(v6) reject codes nft knows (``reject with icmp type X`` / ``icmpv6 type X``), the
# ones a censor plausibly sends for UDP it blocks
ICMP_REJECTS = frozenset({"host-unreachable", "net-unreachable", "admin-prohibited"})
ICMPV6_REJECTS = frozenset({"addr-unreachable", "no-route", "admin-prohibited"})
_ICMP_RATE = ("net.ipv4.icmp_ratelimit", "net.ipv6.icmp.ratelimit")  # per namespace


@dataclass(eq=False)
class UDPReject(NftBehaviour):
    """B9 by rejection: UDP to ``addresses`` (optionally only ``ports``) is answered by
    the censor with an ICMP error instead of vanishing (``reject with icmp type
    host-unreachable`` / ``icmpv6 type addr-unreachable``, or ``admin-prohibited``).
    The ICMP error comes from the censor's own address; TCP to the same addresses passes."""

    id: ClassVar[str] = "B9"
    addresses: Sequence[str] = ()
    ports: Sequence[int] = ()
    icmp: str = "host-unreachable"
    icmpv6: str = "addr-unreachable"
    _saved: dict[str, str] = field(default_factory=dict)  # the rate limits it lifted

    def __post_init__(self) -> None:
        if not self.addresses:
            raise ValueError("a UDP reject needs addresses")
        if self.icmp not in ICMP_REJECTS or self.icmpv6 not in ICMPV6_REJECTS:
            raise ValueError(f"unknown ICMP reject {self.icmp!r} / {self.icmpv6!r}")

    def apply(self, censor: Censor) -> None:
        # Linux rate-limits the ICMP errors it sends per destination (a burst of 6, then
        # one per icmp_ratelimit ms): the next scenario within seconds would meet silence.
        # The lab's censor answers every datagram (a probe reads the first error anyway).
        self._saved = {k: run(ns_argv(censor.ns, ["sysctl", "-n", k])).strip() for k in _ICMP_RATE}
        for key in _ICMP_RATE:
            run(ns_argv(censor.ns, ["sysctl", "-qw", f"{key}=0"]))
        super().apply(censor)

    def remove(self, censor: Censor) -> None:
        super().remove(censor)
        for key, value in self._saved.items():
            run(ns_argv(censor.ns, ["sysctl", "-qw", f"{key}={value}"]), check=False)

    def rules(self, censor: Censor) -> list[str]:
        out = []
        ports = _nft_ports("udp", self.ports, "up")
        for peer in _nft_peer(self.addresses, "up"):
            reject = (
                f"icmpv6 type {self.icmpv6}"
                if peer.startswith("ip6")
                else (f"icmp type {self.icmp}")
            )
            out.append(f"iifname {CENSOR_CLIENT_IF} {peer}{ports}counter reject with {reject}")
        return out


# --- B3 / B4 --------------------------------------------------------------------------------


@dataclass(eq=False)
class SNIFilter(IptBehaviour):
    """B3, SNI filter: ``iptables -m string --algo bm`` finds a server name in a client
    packet to ``ports``.  ``action="reset"``: that packet (the ClientHello) is dropped and
    the client gets a TCP RST (``REJECT --reject-with tcp-reset``).  ``action="drop"``:
    the connection is marked (CONNMARK bit) and every later packet of it, both ways, is
    dropped (silence after the ClientHello).  ``addresses`` (empty = any) narrows it to
    connections towards those servers, as a censor aims a filter at a service's prefixes.

    Matches per packet, like the string match itself: a ClientHello split across
    segments slips through (real TSPU reassembles; this one does not)."""

    id: ClassVar[str] = "B3"
    names: Sequence[str] = ()
    action: Action = "reset"
    ports: Sequence[int] = (443,)
    addresses: Sequence[str] = ()

    def __post_init__(self) -> None:
        _split(self.addresses)  # validates
        if not self.names:
            raise ValueError("an SNI filter needs names")
        for name in self.names:
            if not name or '"' in name or len(name) > 128:
                raise ValueError(f"bad server name {name!r}")

    def prepare(self, censor: Censor) -> None:
        self._bit = self.mark(censor) if self.action == "drop" else 0

    def matches(self) -> list[str]:
        """The iptables match clauses that identify a blocked ClientHello, one per rule."""
        return [f'-m string --algo bm --string "{n}" ' for n in self.names]

    def rules(self, censor: Censor, chain: str, family: int) -> list[str]:
        peer = _ipt_peer(self.addresses, family, "up")
        if peer is None:
            return []  # no address of this family: nothing to filter
        up = f"-A {chain} -i {CENSOR_CLIENT_IF} -p tcp {_ipt_ports(self.ports, 'up')}{peer}"
        if self.action == "reset":
            return [f"{up}{m}-j REJECT --reject-with tcp-reset" for m in self.matches()]
        bit = self._bit
        return [
            *(f"{up}{m}-j CONNMARK --or-mark {bit:#x}" for m in self.matches()),
            f"-A {chain} -m connmark --mark {bit:#x}/{bit:#x} -j DROP",
        ]


@dataclass(eq=False)
class TLSIntercept(Behaviour):
    """TLS interception (a MITM box with its own CA; Kazakhstan 2019): TCP connections to
    ``addresses``:``ports`` crossing the censor are redirected (nft ``redirect`` in the
    NAT prerouting hook) to an interceptor process in the censor namespace
    (`probe.lab.intercept`).  A ClientHello naming one of ``names`` gets a forged chain
    for that name (leaf + the interceptor's CA, named ``issuer``), and the plaintext is
    relayed over TLS to the real server; any other ClientHello passes through untouched.
    The control vantage never crosses the censor, so it sees the real certificate.

    The conntrack table is flushed after the redirect goes in (and after it comes out):
    NAT is decided on a connection's first packet, so a flow already tracked would keep
    its old fate."""

    id: ClassVar[str] = "mitm"
    names: Sequence[str] = ()
    addresses: Sequence[str] = ()
    ports: Sequence[int] = (443,)
    issuer: str = "Lab Interceptor CA"
    port: int = 8443  # the interceptor's listening port inside the censor namespace
    handler: LabProcess | None = field(default=None, init=False)
    ca_file: str | None = field(default=None, init=False)  # the interceptor's CA (PEM)
    _table: str | None = field(default=None, init=False)

    def __post_init__(self) -> None:
        _split(self.addresses)  # validates
        if not self.names:
            raise ValueError("an interceptor needs names")

    def apply(self, censor: Censor) -> None:
        import json

        from .certs import CertificateAuthority

        ca = CertificateAuthority(self.issuer)
        name = censor.name("mitm")
        ca.issue(*self.names, chain=True).write(censor.lab.workdir, name)
        self.ca_file = str(ca.write_ca(censor.lab.workdir / f"{name}-ca.pem"))
        spec = {
            "port": self.port,
            "names": list(self.names),
            "cert": str(censor.lab.workdir / name),
            "upstream_ca": censor.lab.ca_file,
        }
        argv = [sys.executable, "-m", "probe.lab.intercept", json.dumps(spec)]
        self.handler = censor.lab.spawn("censor", argv, name="intercept")
        try:
            rules = "".join(
                f"    iifname {CENSOR_CLIENT_IF} {peer}{_nft_ports('tcp', self.ports, 'up')}"
                f"redirect to :{self.port}\n"
                for peer in _nft_peer(self.addresses, "up")
            )
            censor.nft(
                f"table inet {name} {{\n  chain pre {{\n    type nat hook prerouting "
                f"priority dstnat; policy accept;\n{rules}  }}\n}}\n"
            )
            self._table = name
            censor.flush_conntrack()
        except BaseException:
            self.remove(censor)
            raise

    def remove(self, censor: Censor) -> None:
        if self._table is not None:
            censor.nft(f"delete table inet {self._table}\n")
            self._table = None
            censor.flush_conntrack()
        if self.handler is not None:
            censor.lab.stop(self.handler)
            self.handler = None

    def stats(self) -> dict[str, Any]:
        """The interceptor's counters: intercepted, passed, upstream_errors."""
        if self.handler is None:
            raise LabError("not applied")
        return self.handler.command({"cmd": "stats"})


def client_hello_cipher_vector(ctx: ssl.SSLContext | None = None) -> bytes:
    """The cipher-suite vector (2-byte length + suites) of the ClientHello ``ctx`` sends
    (default: ``ssl.create_default_context()``, i.e. what the tls and transfer probes
    send).  It is a literal part of the JA3 fingerprint and sits in the first segment."""
    ctx = ctx or ssl.create_default_context()
    incoming, outgoing = ssl.MemoryBIO(), ssl.MemoryBIO()
    tls = ctx.wrap_bio(incoming, outgoing, server_hostname="fingerprint.invalid")
    with contextlib.suppress(ssl.SSLWantReadError):
        tls.do_handshake()
    record = outgoing.read()
    # record header (5) + handshake header (4) + legacy_version (2) + random (32)
    pos = 5 + 4 + 2 + 32
    pos += 1 + record[pos]  # session id
    length = int.from_bytes(record[pos : pos + 2], "big")
    return record[pos : pos + 2 + length]


@dataclass(eq=False)
class TLSFingerprintFilter(SNIFilter):
    """B4, ClientHello-shape filter: like `SNIFilter`, but the match is a byte pattern of
    the ClientHello itself (``-m string --hex-string``), by default the exact cipher-suite
    vector of Python's default client context, i.e. the probes' fingerprint.  A client
    offering other cipher suites (another JA3) passes with the same SNI; ``names`` (if
    given) must appear too.

    What it cannot do: compute JA3/JA4 (a hash over fields spread across the hello); it
    matches one literal run of bytes, which is how shape filters on a budget work."""

    id: ClassVar[str] = "B4"
    pattern: bytes = b""
    names: Sequence[str] = ()
    action: Action = "reset"

    def __post_init__(self) -> None:
        _split(self.addresses)  # validates
        if not self.pattern:
            self.pattern = client_hello_cipher_vector()
        if len(self.pattern) > 128:
            raise ValueError("the string match takes at most 128 bytes")
        for name in self.names:
            if not name or '"' in name:
                raise ValueError(f"bad server name {name!r}")

    def matches(self) -> list[str]:
        shape = f'-m string --algo bm --hex-string "|{self.pattern.hex()}|" '
        names = "".join(f'-m string --algo bm --string "{n}" ' for n in self.names)
        return [shape + names]


# --- B5 -------------------------------------------------------------------------------------


def _u32_first_payload_byte(family: int, value: int) -> str:
    """u32 test "the first byte of the TCP payload equals value" behind variable IP (v4) and
    TCP header lengths.  A segment without payload reads past its end and never matches."""
    if family == 4:
        return f'-m u32 --u32 "0>>22&0x3C@12>>26&0x3C@0>>24={value:#x}" '
    # fixed 40-byte IPv6 header (lab traffic has no extension headers)
    return f'-m u32 --u32 "52>>26&0x3C@40>>24={value:#x}" '


@dataclass(eq=False)
class PostHandshakeStall(IptBehaviour):
    """B5, post-handshake stall: the TLS handshake completes, then server -> client
    packets of the connection are dropped, no RST.

    Mechanism (iptables): a connection to ``ports`` (only those whose ClientHello carries
    one of ``names``, if given) gets CONNMARK bit A; the first client segment whose
    payload starts with an application_data record (byte 0x17, found with ``-m u32``
    behind the TCP options) sets bit B; from then on every server -> client packet of a
    B connection is dropped.  With TLS 1.3 the client's Finished travels behind a
    ChangeCipherSpec (0x14, middlebox compatibility, OpenSSL's default), so the first
    0x17-led segment is the first request; without that mode the client's Finished
    (already encrypted, 0x17) triggers it, which is still after the client's
    handshake is complete.  Per-segment, like the real thing without reassembly."""

    id: ClassVar[str] = "B5"
    names: Sequence[str] = ()
    addresses: Sequence[str] = ()
    ports: Sequence[int] = (443,)

    def prepare(self, censor: Censor) -> None:
        self._a, self._b = self.mark(censor), self.mark(censor)

    def rules(self, censor: Censor, chain: str, family: int) -> list[str]:
        peer = _ipt_peer(self.addresses, family, "up")
        down_peer = _ipt_peer(self.addresses, family, "down")
        if peer is None or down_peer is None:
            return []
        a, b = self._a, self._b
        up = f"-A {chain} -i {CENSOR_CLIENT_IF} -p tcp {_ipt_ports(self.ports, 'up')}{peer}"
        if self.names:
            candidates = [
                f'{up}-m string --algo bm --string "{n}" -j CONNMARK --or-mark {a:#x}'
                for n in self.names
            ]
        else:
            candidates = [f"{up}-m conntrack --ctstate NEW -j CONNMARK --or-mark {a:#x}"]
        return [
            *candidates,
            f"{up}-m connmark --mark {a:#x}/{a:#x} {_u32_first_payload_byte(family, 0x17)}"
            f"-j CONNMARK --or-mark {b:#x}",
            f"-A {chain} -i {CENSOR_SERVER_IF} -p tcp {_ipt_ports(self.ports, 'down')}"
            f"{down_peer}-m connmark --mark {b:#x}/{b:#x} -j DROP",
        ]


# --- B6 -------------------------------------------------------------------------------------


@dataclass(eq=False)
class Throttle(Behaviour):
    """B6, throttling: tc ``htb`` class at ``rate_kbit`` with a short ``pfifo`` leaf of
    ``queue_packets`` (tail drop, as the real throttler drops excess packets), on the
    client-facing veth for server -> client (``down``) and the server-facing veth for
    client -> server (``up``); ``u32`` filters send only traffic of ``addresses`` into the
    class, the rest is not shaped.  One Throttle per censor at a time (it owns the root
    qdiscs)."""

    id: ClassVar[str] = "B6"
    addresses: Sequence[str] = ()
    rate_kbit: int = 150
    direction: Direction = "both"
    queue_packets: int = 10
    burst_bytes: int = 3028  # two full-size packets

    def __post_init__(self) -> None:
        if not self.addresses:
            raise ValueError("a throttle needs addresses")
        if self.rate_kbit < 8 or self.queue_packets < 1:
            raise ValueError("rate_kbit >= 8 and queue_packets >= 1")
        _split(self.addresses)
        self._devices: list[str] = []

    def apply(self, censor: Censor) -> None:
        v4, v6 = _split(self.addresses)
        for direction in _directions(self.direction):
            # Shaping happens on egress: server -> client leaves through cli0.
            dev = CENSOR_CLIENT_IF if direction == "down" else CENSOR_SERVER_IF
            side = "src" if direction == "down" else "dst"
            censor.claim_tc(dev)
            self._devices.append(dev)
            rate = f"{self.rate_kbit}kbit"
            script = (
                f"qdisc add dev {dev} root handle 1: htb\n"
                f"class add dev {dev} parent 1: classid 1:10 htb rate {rate} ceil {rate}"
                f" burst {self.burst_bytes} cburst {self.burst_bytes} quantum 1514\n"
                f"qdisc add dev {dev} parent 1:10 handle 10: pfifo limit {self.queue_packets}\n"
            )
            for a in v4:
                script += (
                    f"filter add dev {dev} parent 1: protocol ip prio 1 u32"
                    f" match ip {side} {_cidr(a)} flowid 1:10\n"
                )
            for a in v6:
                script += (
                    f"filter add dev {dev} parent 1: protocol ipv6 prio 2 u32"
                    f" match ip6 {side} {_cidr(a)} flowid 1:10\n"
                )
            try:
                censor.tc(script)
            except BaseException:
                self.remove(censor)
                raise

    def remove(self, censor: Censor) -> None:
        for dev in self._devices:
            censor.tc(f"qdisc del dev {dev} root\n", check=False)
            censor.release_tc(dev)
        self._devices = []


def _cidr(address: str) -> str:
    net = ipaddress.ip_network(address, strict=False)
    return str(net)


# --- B7 -------------------------------------------------------------------------------------


@dataclass(eq=False)
class ByteFreeze(NftBehaviour):
    """B7, the "16-20 KB freeze": once a TCP connection to ``addresses``:``ports`` has
    carried ``after_bytes`` server -> client (conntrack's reply byte counter, IP headers
    included, so the client reads a little less TCP payload), every further server ->
    client packet is dropped: no FIN, no RST, the client's read times out.

    ``fraction`` < 1: only that share of connections is picked, at random, when the SYN
    crosses (``numgen random``), as TSPU freezes some connections and not others."""

    id: ClassVar[str] = "B7"
    addresses: Sequence[str] = ()
    ports: Sequence[int] = (443,)
    after_bytes: int = 16 * 1024
    fraction: float = 1.0

    def __post_init__(self) -> None:
        if self.after_bytes < 1 or not 0 < self.fraction <= 1:
            raise ValueError("after_bytes >= 1 and 0 < fraction <= 1")

    def rules(self, censor: Censor) -> list[str]:
        bit = self.mark(censor)
        pick = ""
        if self.fraction < 1:
            pick = f"numgen random mod 1000 < {round(self.fraction * 1000)} "
        out = []
        for peer in _nft_peer(self.addresses, "up"):
            out.append(
                f"iifname {CENSOR_CLIENT_IF} ct state new {peer}"
                f"{_nft_ports('tcp', self.ports, 'up')}{pick}ct mark set ct mark or {bit:#x}"
            )
        out.append(
            f"iifname {CENSOR_SERVER_IF} ct mark and {bit:#x} == {bit:#x} "
            f"ct reply bytes >= {self.after_bytes} counter drop"
        )
        return out


# --- B8 -------------------------------------------------------------------------------------


@dataclass(eq=False)
class QUICFilter(NftBehaviour):
    """B8, QUIC filter: drop client -> server UDP to ``ports`` whose payload is at least
    ``min_payload`` bytes and carries ``version`` at payload offset 1 (nft raw payload
    ``@th,72,32``: transport header + 8 bytes of UDP header + 1).  A datagram with another
    version (e.g. a version-negotiation probe's 0x?a?a?a?a) passes and is answered."""

    id: ClassVar[str] = "B8"
    addresses: Sequence[str] = ()
    ports: Sequence[int] = (443,)
    min_payload: int = 1001
    version: int = 0x00000001

    def rules(self, censor: Censor) -> list[str]:
        return [
            f"iifname {CENSOR_CLIENT_IF} {peer}{_nft_ports('udp', self.ports, 'up')}"
            f"udp length >= {self.min_payload + 8} @th,72,32 {self.version:#x} counter drop"
            for peer in _nft_peer(self.addresses, "up")
        ]


# --- B9 -------------------------------------------------------------------------------------


@dataclass(eq=False)
class RandomLoss(NftBehaviour):
    """B9 (or plain bad network), random loss: ``percent`` of the matching packets are
    dropped (nft ``numgen random mod 100``), independently per packet."""

    id: ClassVar[str] = "B9"
    percent: int = 30
    addresses: Sequence[str] = ()
    protocol: Literal["tcp", "udp", "any"] = "udp"
    direction: Direction = "both"

    def __post_init__(self) -> None:
        if not 0 < self.percent <= 100:
            raise ValueError("percent must be in 1..100")

    def rules(self, censor: Censor) -> list[str]:
        out = []
        for direction in _directions(self.direction):
            for peer in _nft_peer(self.addresses, direction):
                out.append(
                    f"iifname {_IFACE[direction]} {peer}{_nft_ports(self.protocol, (), direction)}"
                    f"numgen random mod 100 < {self.percent} counter drop"
                )
        return out


@dataclass(eq=False)
class StunBlackhole(NftBehaviour):
    """B9, first-packet classification: a client -> server UDP datagram carrying the STUN
    magic cookie 0x2112A442 at payload offset 4 (``@th,96,32``) puts (client, server,
    server port) into a dynamic nft set with a ``hold_s`` timeout; while there, every
    UDP packet between them on that port is dropped, both ways, whatever it carries and
    from whatever client port: the flow is blackholed for minutes.  UDP that is not
    STUN-shaped passes until a STUN packet is seen."""

    id: ClassVar[str] = "B9"
    addresses: Sequence[str] = ()
    ports: Sequence[int] = ()
    hold_s: float = 120.0

    def sets(self) -> list[str]:
        timeout = f"timeout {max(1, round(self.hold_s * 1000))}ms"
        return [
            f"set hole4 {{ typeof ip saddr . ip daddr . udp dport; flags timeout; {timeout};"
            " size 65535; }",
            f"set hole6 {{ typeof ip6 saddr . ip6 daddr . udp dport; flags timeout; {timeout};"
            " size 65535; }",
        ]

    def rules(self, censor: Censor) -> list[str]:
        up, down = f"iifname {CENSOR_CLIENT_IF} ", f"iifname {CENSOR_SERVER_IF} "
        classify = f"{_nft_ports('udp', self.ports, 'up')}@th,96,32 {_STUN_COOKIE:#x} "
        out = []
        for peer in _nft_peer(self.addresses, "up"):
            if not peer or peer.startswith("ip "):
                out.append(
                    f"{up}meta nfproto ipv4 {peer}{classify}"
                    "add @hole4 { ip saddr . ip daddr . udp dport } counter"
                )
            if not peer or peer.startswith("ip6 "):
                out.append(
                    f"{up}meta nfproto ipv6 {peer}{classify}"
                    "add @hole6 { ip6 saddr . ip6 daddr . udp dport } counter"
                )
        out += [
            f"{up}ip saddr . ip daddr . udp dport @hole4 counter drop",
            f"{down}ip daddr . ip saddr . udp sport @hole4 counter drop",
            f"{up}ip6 saddr . ip6 daddr . udp dport @hole6 counter drop",
            f"{down}ip6 daddr . ip6 saddr . udp sport @hole6 counter drop",
        ]
        return out


@dataclass(eq=False)
class FlowCutoff(NftBehaviour):
    """B9, cut a flow after ``after_s`` seconds: the first packet of a new connection
    (conntrack) to ``addresses``:``ports`` puts its conntrack id into two dynamic sets,
    ``seen`` (timeout ``remember_s``) and ``live`` (timeout ``after_s``); a packet whose
    connection is seen but no longer live is dropped, both ways.  No userspace, no
    per-packet cost; the flow's own packets do not refresh the timer."""

    id: ClassVar[str] = "B9"
    addresses: Sequence[str] = ()
    ports: Sequence[int] = ()
    protocol: Literal["tcp", "udp"] = "udp"
    after_s: float = 5.0
    remember_s: float = 600.0

    def __post_init__(self) -> None:
        if not 0 < self.after_s < self.remember_s:
            raise ValueError("0 < after_s < remember_s")

    def sets(self) -> list[str]:
        return [
            f"set seen {{ typeof ct id; flags timeout; timeout {round(self.remember_s)}s;"
            " size 65535; }",
            f"set live {{ typeof ct id; flags timeout; timeout {round(self.after_s * 1000)}ms;"
            " size 65535; }",
        ]

    def rules(self, censor: Censor) -> list[str]:
        out = [
            f"iifname {CENSOR_CLIENT_IF} ct state new {peer}"
            f"{_nft_ports(self.protocol, self.ports, 'up')}"
            "add @seen { ct id } add @live { ct id }"
            for peer in _nft_peer(self.addresses, "up")
        ]
        out.append("ct id @seen ct id != @live counter drop")
        return out


# --- network conditions -----------------------------------------------------------------------


@dataclass(eq=False)
class Delay(QueueBehaviour):
    """Added latency (no netem here): packets to/from ``addresses`` go through NFQUEUE to a
    handler (`probe.lab.nfq` ``delay``) that holds each ``ms`` milliseconds from the moment
    the censor received it.  Not a censor behaviour of its own: a slow path to compare
    against.  `synacks` says, per connection, the delay its SYN-ACK really got.
    ``realtime``: run the handler under SCHED_FIFO (its releases then keep time on a busy
    machine; it falls back to the normal policy where that is not allowed)."""

    id: ClassVar[str] = "net"
    ms: float = 100.0
    addresses: Sequence[str] = ()
    direction: Direction = "down"
    realtime: bool = True

    def handler_spec(self) -> dict[str, Any]:
        return {"mode": "delay", "delay_ms": self.ms, "realtime": self.realtime}

    def synacks(self) -> list[dict[str, Any]]:
        """The SYN-ACKs delayed since the last call, one record each: ``server``,
        ``server_port``, ``client``, ``client_port``, ``held_us`` (the delay it got, from
        the censor's kernel receiving it to the release), ``late_us`` (held - ``ms``),
        ``wait_us`` (how long it waited for the handler to read it), ``kernel_stamp``
        (false: the kernel gave no receive stamp, held counts from the handler reading
        it), ``verdict_us`` (the release call's duration: the bound on how much after
        its release the client saw it)."""
        if self.handler is None:
            raise LabError("delay is not applied")
        answer = self.handler.command({"cmd": "log"})
        return list(answer["synacks"])

    def rules(self, censor: Censor, chain: str, family: int) -> list[str]:
        out = []
        for direction in _directions(self.direction):
            peer = _ipt_peer(self.addresses, family, direction)
            if peer is not None:
                out.append(
                    f"-A {chain} -i {_IFACE[direction]} {peer}-j NFQUEUE --queue-num {self._queue}"
                )
        return out
