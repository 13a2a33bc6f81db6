"""The lab's network namespaces and the links between them (`probe.lab.topology` has the
picture): names, the address plan, interface names, running ``ip``/``nft``/``tc`` commands
inside a namespace, and wiring four empty namespaces into the lab's chain.

Nothing here knows about helper processes (`probe.lab.process`), owner records
(`probe.lab.stale`) or the censor (`probe.lab.censor`); they all build on this module.
"""

from __future__ import annotations

import contextlib
import ctypes
import importlib.util
import os
import shutil
import subprocess
import threading
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Literal, TypeVar

__all__ = [
    "ADDR",
    "CENSOR_CLIENT_IF",
    "CENSOR_SERVER_IF",
    "ETC_NETNS",
    "NETNS_RUN_DIR",
    "PREFIX",
    "ROLES",
    "SHORT",
    "Addresses",
    "LabError",
    "Role",
    "build_links",
    "in_netns",
    "lab_available",
    "ns_argv",
    "run",
    "write_resolv_conf",
]

PREFIX = "plab"
NETNS_RUN_DIR = Path("/run/netns")
ETC_NETNS = Path("/etc/netns")

Role = Literal["client", "censor", "servers", "control"]
ROLES: tuple[Role, ...] = ("client", "censor", "servers", "control")
SHORT: Mapping[Role, str] = {"client": "cli", "censor": "cen", "servers": "srv", "control": "ctl"}

# Interface names inside the namespaces (never in the root namespace, so fixed names are safe).
CLIENT_IF = "up0"  # client -> censor
CENSOR_CLIENT_IF = "cli0"  # censor, facing the client: its egress is server -> client
CENSOR_SERVER_IF = "srv0"  # censor, facing the servers: its egress is client -> server
SERVERS_CENSOR_IF = "cen0"
SERVERS_CONTROL_IF = "ctl0"
CONTROL_IF = "srv0"

_CLONE_NEWNET = 0x40000000
CMD_TIMEOUT_S = 10.0  # one ip/nft/iptables/tc invocation; they take milliseconds
T = TypeVar("T")


class LabError(RuntimeError):
    """Setting up or driving the lab failed (a command failed, a helper did not start)."""


@dataclass(frozen=True)
class Addresses:
    """The lab's address plan: RFC 1918 and ULA only, identical in every lab (namespaces
    keep labs apart).  Service addresses: ``service(i)`` / ``service6(i)``."""

    client4: str = "10.200.1.2"
    client6: str = "fd00:200:1::2"
    censor_client4: str = "10.200.1.1"  # the client's gateway
    censor_client6: str = "fd00:200:1::1"
    censor_server4: str = "10.200.2.1"
    censor_server6: str = "fd00:200:2::1"
    servers_censor4: str = "10.200.2.2"
    servers_censor6: str = "fd00:200:2::2"
    servers_control4: str = "10.200.3.1"  # the control's gateway
    servers_control6: str = "fd00:200:3::1"
    control4: str = "10.200.3.2"
    control6: str = "fd00:200:3::2"
    services4: str = "10.200.100.0/24"
    services6: str = "fd00:200:100::/64"
    resolver_index: int = 53  # service(53) is where the lab DNS server is expected

    def service(self, index: int) -> str:
        """IPv4 service address ``index`` (1..254)."""
        if not 1 <= index <= 254:
            raise ValueError(f"service index must be in 1..254, got {index}")
        return f"10.200.100.{index}"

    def service6(self, index: int) -> str:
        """IPv6 service address ``index`` (1..254)."""
        if not 1 <= index <= 254:
            raise ValueError(f"service index must be in 1..254, got {index}")
        return f"fd00:200:100::{index:x}"

    @property
    def resolver4(self) -> str:
        return self.service(self.resolver_index)

    @property
    def resolver6(self) -> str:
        return self.service6(self.resolver_index)

    def of(self, role: Role, family: int = 4) -> str:
        """The address a vantage's traffic comes from (client or control)."""
        table = {
            ("client", 4): self.client4,
            ("client", 6): self.client6,
            ("control", 4): self.control4,
            ("control", 6): self.control6,
        }
        try:
            return table[(role, family)]
        except KeyError:
            raise ValueError(f"no source address for {role}/ipv{family}") from None


ADDR = Addresses()


def lab_available() -> str | None:
    """None if this process can build a lab, else why not (a skip reason)."""
    if os.geteuid() != 0:
        return "the censorship lab needs root (network namespaces, nftables, tc)"
    for tool in ("ip", "nft", "iptables-restore", "ip6tables-restore", "tc"):
        if shutil.which(tool) is None:
            return f"{tool} not installed (apt-get install iproute2 nftables iptables)"
    if not Path("/proc/self/ns/net").exists():
        return "this kernel has no network namespaces"
    if importlib.util.find_spec("netfilterqueue") is None:
        # the NFQUEUE handlers (delays, freezes, injection) would fail one scenario in
        return (
            "the lab needs the netfilterqueue module: pip install '.[lab]' "
            "(it builds against Debian's libnetfilter-queue-dev: "
            "apt-get install libnetfilter-queue-dev build-essential python3-dev)"
        )
    return None


# --- running commands -----------------------------------------------------------------------


def run(argv: Sequence[str], *, input: str | None = None, check: bool = True) -> str:
    """Run a short command (ip, nft, iptables, tc) with a timeout; stdout, or LabError."""
    try:
        done = subprocess.run(
            list(argv),
            input=input,
            capture_output=True,
            text=True,
            timeout=CMD_TIMEOUT_S,
            check=False,
        )
    except (OSError, subprocess.TimeoutExpired) as exc:
        raise LabError(f"{argv[0]}: {exc}") from exc
    if check and done.returncode != 0:
        script = f"\n--- input ---\n{input}" if input else ""
        raise LabError(f"{' '.join(argv)}: exit {done.returncode}: {done.stderr.strip()}{script}")
    return done.stdout


def ns_argv(ns: str, argv: Sequence[str]) -> list[str]:
    return ["ip", "netns", "exec", ns, *argv]


_libc: ctypes.CDLL | None = None


def _setns(ns: str) -> None:
    global _libc
    if _libc is None:
        _libc = ctypes.CDLL(None, use_errno=True)
    fd = os.open(NETNS_RUN_DIR / ns, os.O_RDONLY | os.O_CLOEXEC)
    try:
        if _libc.setns(fd, _CLONE_NEWNET) != 0:
            err = ctypes.get_errno()
            raise OSError(err, f"setns({ns}): {os.strerror(err)}")
    finally:
        os.close(fd)


def in_netns(ns: str, fn: Callable[[], T]) -> T:
    """Call ``fn`` in a short-lived thread that entered network namespace ``ns``.

    Only the network namespace changes (no resolv.conf, no mount namespace), and only
    for that thread: use it for sockets and /proc/sys/net, nothing that resolves names.
    """
    box: list[T] = []
    errors: list[BaseException] = []

    def body() -> None:
        try:
            _setns(ns)
            box.append(fn())
        except BaseException as exc:  # handed to the caller's thread
            errors.append(exc)

    thread = threading.Thread(target=body, name=f"netns-{ns}", daemon=True)
    thread.start()
    thread.join(CMD_TIMEOUT_S)
    if errors:
        raise errors[0]
    if not box:
        raise LabError(f"in_netns({ns}): no result within {CMD_TIMEOUT_S} s")
    return box[0]


# --- wiring the namespaces -------------------------------------------------------------------


def build_links(namespaces: Mapping[Role, str], addr: Addresses, services: int) -> None:
    """Create the four namespaces, the veth pairs between them, their addresses and
    routes, and turn the censor into a router."""
    cli, cen, srv, ctl = (namespaces[r] for r in ROLES)
    # Each veth end is created directly inside its namespace: nothing ever appears in
    # the root namespace, so fixed interface names cannot collide between labs.
    pairs = (
        (CLIENT_IF, cli, CENSOR_CLIENT_IF, cen),
        (CENSOR_SERVER_IF, cen, SERVERS_CENSOR_IF, srv),
        (SERVERS_CONTROL_IF, srv, CONTROL_IF, ctl),
    )
    script = "".join(f"netns add {namespaces[r]}\n" for r in ROLES)
    script += "".join(
        f"link add {a} netns {ns_a} type veth peer name {b} netns {ns_b}\n"
        for a, ns_a, b, ns_b in pairs
    )
    run(["ip", "-batch", "-"], input=script)
    for role in ROLES:
        in_netns(namespaces[role], _no_dad)  # before any link comes up
    for role, script in _link_scripts(addr, services).items():
        run(["ip", "-n", namespaces[role], "-batch", "-"], input=script)
    in_netns(cen, _enable_forwarding)


def _link_scripts(a: Addresses, services: int) -> dict[Role, str]:
    def up(dev: str) -> str:
        # gso_max_segs 1: the sender segments before the veth, so the censor's rules see
        # MTU-sized packets as on a wire (string matches, byte counts, tc rates).
        return f"link set {dev} up gso_max_segs 1\n"

    lo = "link set lo up\n"
    client = (
        lo
        + up(CLIENT_IF)
        + f"addr add {a.client4}/24 dev {CLIENT_IF}\n"
        + f"addr add {a.client6}/64 dev {CLIENT_IF} nodad\n"
        + f"route add default via {a.censor_client4}\n"
        + f"route add default via {a.censor_client6}\n"
    )
    censor = (
        lo
        + up(CENSOR_CLIENT_IF)
        + up(CENSOR_SERVER_IF)
        + f"addr add {a.censor_client4}/24 dev {CENSOR_CLIENT_IF}\n"
        + f"addr add {a.censor_client6}/64 dev {CENSOR_CLIENT_IF} nodad\n"
        + f"addr add {a.censor_server4}/24 dev {CENSOR_SERVER_IF}\n"
        + f"addr add {a.censor_server6}/64 dev {CENSOR_SERVER_IF} nodad\n"
        + f"route add {a.services4} via {a.servers_censor4}\n"
        + f"route add {a.services6} via {a.servers_censor6}\n"
    )
    indexes = [*range(1, services + 1), a.resolver_index]
    servers = (
        lo
        + up(SERVERS_CENSOR_IF)
        + up(SERVERS_CONTROL_IF)
        + f"addr add {a.servers_censor4}/24 dev {SERVERS_CENSOR_IF}\n"
        + f"addr add {a.servers_censor6}/64 dev {SERVERS_CENSOR_IF} nodad\n"
        + f"addr add {a.servers_control4}/24 dev {SERVERS_CONTROL_IF}\n"
        + f"addr add {a.servers_control6}/64 dev {SERVERS_CONTROL_IF} nodad\n"
        + "".join(f"addr add {a.service(i)}/32 dev lo\n" for i in sorted(set(indexes)))
        + "".join(f"addr add {a.service6(i)}/128 dev lo nodad\n" for i in sorted(set(indexes)))
        + f"route add {a.client4.rsplit('.', 1)[0]}.0/24 via {a.censor_server4}\n"
        + f"route add {a.client6.rsplit(':', 1)[0]}:/64 via {a.censor_server6}\n"
    )
    control = (
        lo
        + up(CONTROL_IF)
        + f"addr add {a.control4}/24 dev {CONTROL_IF}\n"
        + f"addr add {a.control6}/64 dev {CONTROL_IF} nodad\n"
        + f"route add default via {a.servers_control4}\n"
        + f"route add default via {a.servers_control6}\n"
    )
    return {"client": client, "censor": censor, "servers": servers, "control": control}


def write_resolv_conf(
    lab_id: str, namespaces: Mapping[Role, str], resolver: str, control_resolver: str
) -> None:
    """``/etc/netns/NS/resolv.conf`` for every namespace (``ip netns exec`` mounts it)."""
    # Every namespace gets one, not only the vantages: a process in the censor or the
    # servers namespace must never fall back to the host's resolver either.
    for role in ROLES:
        directory = ETC_NETNS / namespaces[role]
        directory.mkdir(parents=True, exist_ok=True)
        server = control_resolver if role == "control" else resolver
        (directory / "resolv.conf").write_text(
            f"# probe lab {lab_id}\nnameserver {server}\noptions timeout:2 attempts:1\n"
        )


def _no_dad() -> None:
    # Duplicate address detection keeps a new IPv6 address (link-local ones included,
    # which neighbour discovery needs) tentative for a second or more; the lab's links
    # are point-to-point veths with nothing to collide with.  Runs inside the namespace.
    conf = Path("/proc/sys/net/ipv6/conf")
    for entry in conf.iterdir():
        with contextlib.suppress(OSError):
            (entry / "accept_dad").write_text("0")


def _enable_forwarding() -> None:
    # Runs in a thread that entered the censor namespace: /proc/sys/net is per namespace.
    for path, value in (
        ("/proc/sys/net/ipv4/ip_forward", "1"),
        ("/proc/sys/net/ipv6/conf/all/forwarding", "1"),
        ("/proc/sys/net/netfilter/nf_conntrack_acct", "1"),  # byte counters for B7
    ):
        with contextlib.suppress(FileNotFoundError):  # conntrack sysctls appear lazily
            Path(path).write_text(value)
