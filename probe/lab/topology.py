"""The censorship lab's network: four network namespaces wired with veth pairs.

::

    client --- censor --- servers --- control
     up0    cli0    srv0   cen0  ctl0    srv0

- ``client``: the vantage under test.  Its only route goes through ``censor``.
- ``censor``: a router (IPv4 and IPv6 forwarding on) where `probe.lab.censor` puts its
  nftables / iptables / tc rules and NFQUEUE handlers.  ``cli0`` faces the client,
  ``srv0`` faces the servers.
- ``servers``: every lab service address lives on its loopback (10.200.100.0/24 and
  fd00:200:100::/64); servers from `probe.lab.servers` bind there (`Lab.serve`).
- ``control``: an uncensored vantage wired straight to ``servers``: its packets never
  cross the censor, so whatever the censor does, the control sees the real service.

Nothing in the lab has a link to the root namespace and no namespace has a route to
anything but lab prefixes, so no packet of the lab can reach a real address.  Each
namespace gets its own ``/etc/netns/NS/resolv.conf`` (``ip netns exec`` mounts it over
``/etc/resolv.conf``), pointing at the lab resolver address.

Why subprocesses (``ip netns exec NS python -m ...``) run the servers and the probes,
not ``setns()`` threads in the test process: a process entered by ``ip netns exec`` also
gets the namespace's resolv.conf (a thread does not: the mount namespace is per
process), asyncio's getaddrinfo executor threads would stay in the root namespace, and a
crashed server cannot take the test process with it.  A ``setns()`` thread is used for
one thing only: creating a plain socket inside a namespace (`Lab.socket`), which
then works in this process's event loop like any other socket.

Every lab has a unique id (``PREFIX`` + random suffix); its namespaces are ``ID-cli``,
``ID-cen``, ``ID-srv`` and ``ID-ctl``.  Interface names are fixed (they only exist inside
the lab's own namespaces).  A record in ``/run/probe-lab/ID.json`` names the owning
process; `cleanup_stale` removes labs whose owner is gone (crashed runs) and is run
at the start of every lab.
"""

from __future__ import annotations

import asyncio
import atexit
import contextlib
import ctypes
import importlib.util
import json
import logging
import os
import secrets
import select
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from types import TracebackType
from typing import Any, Literal, Self, TypeVar

__all__ = [
    "ADDR",
    "CENSOR_CLIENT_IF",
    "CENSOR_SERVER_IF",
    "PREFIX",
    "Addresses",
    "Lab",
    "LabError",
    "LabProcess",
    "ProcResult",
    "Role",
    "cleanup_stale",
    "lab_available",
]

log = logging.getLogger(__name__)

PREFIX = "plab"
RECORD_DIR = Path("/run/probe-lab")
NETNS_RUN_DIR = Path("/run/netns")
ETC_NETNS = Path("/etc/netns")

Role = Literal["client", "censor", "servers", "control"]
ROLES: tuple[Role, ...] = ("client", "censor", "servers", "control")
_SHORT: Mapping[Role, str] = {"client": "cli", "censor": "cen", "servers": "srv", "control": "ctl"}

# Interface names inside the namespaces (never in the root namespace, so fixed names are safe).
CLIENT_IF = "up0"  # client -> censor
CENSOR_CLIENT_IF = "cli0"  # censor, facing the client: its egress is server -> client
CENSOR_SERVER_IF = "srv0"  # censor, facing the servers: its egress is client -> server
SERVERS_CENSOR_IF = "cen0"
SERVERS_CONTROL_IF = "ctl0"
CONTROL_IF = "srv0"

_CLONE_NEWNET = 0x40000000
_CMD_TIMEOUT_S = 10.0  # one ip/nft/iptables/tc invocation; they take milliseconds
_READY_TIMEOUT_S = 15.0  # a helper process importing aioquic on a loaded 2-core machine
_STOP_GRACE_S = 2.0
_MAX_LINE = 1 << 20  # a control line from a helper process; anything longer is a bug
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
            timeout=_CMD_TIMEOUT_S,
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
    thread.join(_CMD_TIMEOUT_S)
    if errors:
        raise errors[0]
    if not box:
        raise LabError(f"in_netns({ns}): no result within {_CMD_TIMEOUT_S} s")
    return box[0]


@dataclass(frozen=True)
class ProcResult:
    argv: tuple[str, ...]
    returncode: int
    stdout: str
    stderr: str

    def json_lines(self) -> list[dict[str, Any]]:
        """stdout parsed as JSON Lines (blank lines ignored)."""
        return [json.loads(line) for line in self.stdout.splitlines() if line.strip()]


class LabProcess:
    """A long-running helper inside a namespace that prints one JSON ready line on stdout
    and then answers one JSON line per JSON command written to its stdin.

    Its stdin is a pipe from us: if this process dies, the helper reads EOF and exits.
    """

    def __init__(self, name: str, ns: str, argv: Sequence[str], env: Mapping[str, str]) -> None:
        self.name = name
        self.ns = ns
        self.argv = tuple(argv)
        self._lock = threading.Lock()
        # A file, never a pipe: a chatty helper cannot block on a full pipe.  Closed in stop().
        self._stderr = tempfile.TemporaryFile()  # noqa: SIM115
        self.popen = subprocess.Popen(
            ns_argv(ns, argv),
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=self._stderr,
            env=dict(env),
            start_new_session=True,  # its own process group: stop() reaches its children
        )
        self.ready: dict[str, Any] = {}

    def wait_ready(self, timeout_s: float = _READY_TIMEOUT_S) -> dict[str, Any]:
        line = self._read_line(timeout_s)
        try:
            ready = json.loads(line)
        except ValueError as exc:
            raise LabError(f"{self.name}: bad ready line {line[:200]!r}{self._tail()}") from exc
        if not isinstance(ready, dict) or "error" in ready:
            raise LabError(f"{self.name}: failed to start: {ready}{self._tail()}")
        self.ready = ready
        return ready

    def command(self, cmd: Mapping[str, Any], timeout_s: float = 5.0) -> dict[str, Any]:
        """Send one JSON command and return the helper's JSON answer."""
        with self._lock:
            if self.popen.stdin is None or self.popen.poll() is not None:
                raise LabError(f"{self.name}: not running{self._tail()}")
            try:
                self.popen.stdin.write(json.dumps(cmd).encode() + b"\n")
                self.popen.stdin.flush()
            except OSError as exc:
                raise LabError(f"{self.name}: {exc}{self._tail()}") from exc
            try:
                answer = json.loads(self._read_line(timeout_s))
            except (LabError, ValueError):
                # A late answer would be taken for the answer to the next command: a
                # helper that missed its deadline is not asked again.
                self.stop()
                raise
        if not isinstance(answer, dict):
            raise LabError(f"{self.name}: answer is not an object: {answer!r}")
        if "error" in answer:
            raise LabError(f"{self.name}: {answer['error']}")
        return answer

    def _read_line(self, timeout_s: float) -> str:
        stdout = self.popen.stdout
        assert stdout is not None
        fd = stdout.fileno()
        buf = b""
        deadline = time.monotonic() + timeout_s
        while not buf.endswith(b"\n"):
            left = deadline - time.monotonic()
            if left <= 0:
                raise LabError(f"{self.name}: no answer within {timeout_s} s{self._tail()}")
            ready, _, _ = select.select([fd], [], [], left)
            if not ready:
                continue
            chunk = os.read(fd, 65536)  # unbuffered: select() must see what is left
            if not chunk:
                raise LabError(f"{self.name}: exited (code {self.popen.poll()}){self._tail()}")
            buf += chunk
            if len(buf) > _MAX_LINE:
                raise LabError(f"{self.name}: answer longer than {_MAX_LINE} bytes")
        return buf.decode()

    def _tail(self) -> str:
        with contextlib.suppress(OSError, ValueError):  # ValueError: already closed
            self._stderr.seek(0, os.SEEK_END)
            size = self._stderr.tell()
            self._stderr.seek(max(0, size - 2000))
            text = self._stderr.read().decode(errors="replace").strip()
            if text:
                return f"\n--- {self.name} stderr ---\n{text}"
        return ""

    @property
    def stderr(self) -> str:
        with contextlib.suppress(OSError, ValueError):
            self._stderr.seek(0)
            return self._stderr.read().decode(errors="replace")
        return ""

    def stop(self) -> None:
        """SIGTERM its process group, SIGKILL after a grace period; idempotent."""
        if self.popen.poll() is None:
            with contextlib.suppress(OSError):
                if self.popen.stdin is not None:
                    self.popen.stdin.close()  # EOF: helpers exit on their own
            _signal_group(self.popen.pid, signal.SIGTERM)
            try:
                self.popen.wait(_STOP_GRACE_S)
            except subprocess.TimeoutExpired:
                _signal_group(self.popen.pid, signal.SIGKILL)
                with contextlib.suppress(subprocess.TimeoutExpired):
                    self.popen.wait(_STOP_GRACE_S)
        for stream in (self.popen.stdin, self.popen.stdout):
            with contextlib.suppress(OSError, ValueError):
                if stream is not None:
                    stream.close()
        self._stderr.close()


def _signal_group(pid: int, sig: int) -> None:
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(pid, sig)


# --- owner records and stale labs -----------------------------------------------------------


def _start_time(pid: int) -> str | None:
    """The process's start time in clock ticks (field 22 of /proc/PID/stat): with the
    pid it identifies a process even after the pid number is reused."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    return stat.rsplit(")", 1)[1].split()[19]


def _owner_alive(record: Mapping[str, Any]) -> bool:
    pid = record.get("pid")
    return isinstance(pid, int) and _start_time(pid) == record.get("start")


def _lab_namespaces(prefix: str) -> dict[str, list[str]]:
    """Lab id -> its namespaces, for every namespace named PREFIX*-{cli,cen,srv,ctl}."""
    labs: dict[str, list[str]] = {}
    try:
        names = os.listdir(NETNS_RUN_DIR)
    except FileNotFoundError:
        names = []
    shorts = tuple(f"-{s}" for s in _SHORT.values())
    for name in names:
        if name.startswith(prefix) and name.endswith(shorts):
            labs.setdefault(name.rsplit("-", 1)[0], []).append(name)
    for record in RECORD_DIR.glob(f"{prefix}*.json") if RECORD_DIR.is_dir() else ():
        labs.setdefault(record.stem, [])
    return labs


def _destroy(lab_id: str, namespaces: Iterable[str], workdir: str | None = None) -> list[str]:
    """Kill what runs in the namespaces, delete them and their files; errors as text."""
    errors: list[str] = []
    namespaces = list(namespaces)
    for ns in namespaces:
        if not (NETNS_RUN_DIR / ns).exists():
            continue
        pids = run(["ip", "netns", "pids", ns], check=False).split()
        for pid in pids:
            with contextlib.suppress(ProcessLookupError, ValueError):
                os.kill(int(pid), signal.SIGKILL)
    existing = [ns for ns in namespaces if (NETNS_RUN_DIR / ns).exists()]
    if existing:
        try:
            run(
                ["ip", "-force", "-batch", "-"], input="".join(f"netns del {n}\n" for n in existing)
            )
        except LabError as exc:
            errors.append(str(exc))
    for ns in namespaces:
        shutil.rmtree(ETC_NETNS / ns, ignore_errors=True)
        if (NETNS_RUN_DIR / ns).exists():
            errors.append(f"namespace {ns} still exists")
    if workdir:
        shutil.rmtree(workdir, ignore_errors=True)
    with contextlib.suppress(FileNotFoundError):
        (RECORD_DIR / f"{lab_id}.json").unlink()
    return errors


def cleanup_stale(prefix: str = PREFIX, *, force: bool = False) -> list[str]:
    """Remove labs left behind by crashed runs: those whose owner process is gone
    (``force``: every lab with ``prefix``, also live ones).  Returns the lab ids removed."""
    removed = []
    for lab_id, namespaces in sorted(_lab_namespaces(prefix).items()):
        record_path = RECORD_DIR / f"{lab_id}.json"
        try:
            record = json.loads(record_path.read_text())
        except (OSError, ValueError):
            record = {}
        if not force and record and _owner_alive(record):
            continue
        if not force and not record and _young(namespaces):
            continue  # a lab being created right now writes its record first; be safe anyway
        all_ns = sorted(set(namespaces) | set(record.get("namespaces", [])))
        errors = _destroy(lab_id, all_ns, record.get("workdir"))
        for error in errors:
            log.warning("cleanup of %s: %s", lab_id, error)
        removed.append(lab_id)
    return removed


def _young(namespaces: Iterable[str], age_s: float = 60.0) -> bool:
    now = time.time()
    for ns in namespaces:
        with contextlib.suppress(OSError):
            if now - (NETNS_RUN_DIR / ns).stat().st_mtime < age_s:
                return True
    return False


# --- the lab ----------------------------------------------------------------------------------

_OPEN_LABS: set[Lab] = set()


def _close_open_labs() -> None:
    for lab in list(_OPEN_LABS):
        lab.close()


atexit.register(_close_open_labs)


@dataclass(eq=False)
class Lab:
    """``with Lab() as lab:`` (or ``async with``) builds the four namespaces; leaving the
    block always tears everything down: helper processes, namespaces (and with them every
    rule, qdisc and interface), /etc/netns files, the record, the work directory.

    ``services``: service addresses 1..services (IPv4 and IPv6) on the servers' loopback,
    plus the resolver address ``ADDR.service(53)``.  ``resolver``: what the client's and the
    control's /etc/resolv.conf name (default: the lab resolver address).
    """

    prefix: str = PREFIX
    services: int = 16
    resolver: str = ADDR.resolver4
    control_resolver: str | None = None  # default: the same as ``resolver``
    addr: Addresses = field(default_factory=Addresses)
    id: str = field(init=False)
    workdir: Path = field(init=False)
    _procs: list[LabProcess] = field(init=False, default_factory=list)
    _open: bool = field(init=False, default=False)
    _censor: Any = field(init=False, default=None)
    _ca: Any = field(init=False, default=None)
    _issued: int = field(init=False, default=0)
    _probers: dict[str, LabProcess] = field(init=False, default_factory=dict)

    def __post_init__(self) -> None:
        if not 1 <= self.services <= 250:
            raise ValueError("services must be in 1..250")
        if len(self.prefix) > 8 or not self.prefix.isalnum():
            raise ValueError("prefix: 1-8 letters or digits")
        alphabet = "abcdefghijklmnopqrstuvwxyz0123456789"
        self.id = self.prefix + "".join(secrets.choice(alphabet) for _ in range(6))

    def ns(self, role: Role) -> str:
        """The namespace name of a role."""
        return f"{self.id}-{_SHORT[role]}"

    @property
    def namespaces(self) -> list[str]:
        return [self.ns(r) for r in ROLES]

    # -- lifecycle

    def start(self) -> Self:
        reason = lab_available()
        if reason is not None:
            raise LabError(reason)
        for stale in cleanup_stale(self.prefix):
            log.warning("removed stale lab %s", stale)
        self.workdir = Path(tempfile.mkdtemp(prefix=f"{self.id}-"))
        os.chmod(self.workdir, 0o755)  # helper processes read certificates from here
        self._write_record()
        self._open = True
        _OPEN_LABS.add(self)
        try:
            self._build()
        except BaseException:
            self.close()
            raise
        return self

    def close(self) -> None:
        """Tear everything down; safe to call twice, never raises for a missing piece."""
        if not self._open:
            return
        self._open = False
        _OPEN_LABS.discard(self)
        for proc in reversed(self._procs):
            with contextlib.suppress(Exception):
                proc.stop()
        self._procs.clear()
        self._probers.clear()
        errors = _destroy(self.id, self.namespaces, str(self.workdir))
        for error in errors:
            log.warning("teardown of %s: %s", self.id, error)

    def __enter__(self) -> Self:
        return self.start()

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()

    async def __aenter__(self) -> Self:
        return await asyncio.to_thread(self.start)

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        # Not in a thread: teardown must finish even when the task is being cancelled.
        self.close()

    def _write_record(self) -> None:
        RECORD_DIR.mkdir(mode=0o755, exist_ok=True)
        record = {
            "pid": os.getpid(),
            "start": _start_time(os.getpid()),
            "namespaces": self.namespaces,
            "workdir": str(self.workdir),
            "created": time.time(),
        }
        (RECORD_DIR / f"{self.id}.json").write_text(json.dumps(record))

    def _build(self) -> None:
        cli, cen, srv, ctl = self.namespaces
        # Each veth end is created directly inside its namespace: nothing ever appears in
        # the root namespace, so fixed interface names cannot collide between labs.
        pairs = (
            (CLIENT_IF, cli, CENSOR_CLIENT_IF, cen),
            (CENSOR_SERVER_IF, cen, SERVERS_CENSOR_IF, srv),
            (SERVERS_CONTROL_IF, srv, CONTROL_IF, ctl),
        )
        script = "".join(f"netns add {n}\n" for n in self.namespaces)
        script += "".join(
            f"link add {a} netns {ns_a} type veth peer name {b} netns {ns_b}\n"
            for a, ns_a, b, ns_b in pairs
        )
        run(["ip", "-batch", "-"], input=script)
        for ns in self.namespaces:
            in_netns(ns, _no_dad)  # before any link comes up
        for role, script in self._scripts().items():
            run(["ip", "-n", self.ns(role), "-batch", "-"], input=script)
        in_netns(cen, _enable_forwarding)
        self._write_resolv_conf()

    def _scripts(self) -> dict[Role, str]:
        a = self.addr

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
        indexes = [*range(1, self.services + 1), a.resolver_index]
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

    def _write_resolv_conf(self) -> None:
        # Every namespace gets one, not only the vantages: a process in the censor or the
        # servers namespace must never fall back to the host's resolver either.
        control = self.control_resolver or self.resolver
        for role in ROLES:
            directory = ETC_NETNS / self.ns(role)
            directory.mkdir(parents=True, exist_ok=True)
            server = control if role == "control" else self.resolver
            (directory / "resolv.conf").write_text(
                f"# probe lab {self.id}\nnameserver {server}\noptions timeout:2 attempts:1\n"
            )

    # -- certificates

    @property
    def ca(self) -> Any:
        """The lab's throwaway CA (`probe.lab.certs.CertificateAuthority`), made on first use."""
        if self._ca is None:
            from .certs import CertificateAuthority

            self._ca = CertificateAuthority("probe lab CA " + self.id)
            self._ca.write_ca(self.workdir / "ca.pem")
        return self._ca

    @property
    def ca_file(self) -> str:
        """Path of the lab CA certificate (PEM), for ``settings.tls.ca_file``."""
        _ = self.ca
        return str(self.workdir / "ca.pem")

    def issue(self, *names: str, expired: bool = False) -> str:
        """Issue a leaf for ``names`` from the lab CA; returns the file stem that
        `probe.lab.serve` specs take as ``cert`` (STEM.crt / STEM.key)."""
        self._issued += 1
        stem = self.workdir / f"leaf{self._issued}"
        self.ca.issue(*names, expired=expired).write(self.workdir, stem.name)
        return str(stem)

    # -- processes

    def spawn(self, role: Role, argv: Sequence[str], name: str | None = None) -> LabProcess:
        """Start a helper (JSON ready line, JSON commands on stdin) inside ``role``'s
        namespace; it is stopped at teardown at the latest."""
        self._require_open()
        proc = LabProcess(name or f"{role}:{argv[-1]}", self.ns(role), argv, _child_env())
        self._procs.append(proc)
        try:
            proc.wait_ready()
        except BaseException:
            self.stop(proc)
            raise
        return proc

    def stop(self, proc: LabProcess) -> None:
        proc.stop()
        with contextlib.suppress(ValueError):
            self._procs.remove(proc)

    def serve(self, specs: Sequence[Mapping[str, Any]], role: Role = "servers") -> ServeHandle:
        """Start servers from `probe.lab.servers` in one process inside ``role``'s namespace.

        ``specs``: see `probe.lab.serve` (``{"kind": "tls", "host": ..., "port": 443, ...}``).
        """
        spec = json.dumps({"servers": list(specs)})
        proc = self.spawn(role, [sys.executable, "-m", "probe.lab.serve", spec], name="serve")
        return ServeHandle(self, proc)

    def exec(self, role: Role, argv: Sequence[str], timeout_s: float = 60.0) -> ProcResult:
        """Run a command to completion inside ``role``'s namespace (e.g. ``probe once``)."""
        self._require_open()
        try:
            done = subprocess.run(
                ns_argv(self.ns(role), argv),
                capture_output=True,
                text=True,
                timeout=timeout_s,
                env=_child_env(),
                check=False,
            )
        except subprocess.TimeoutExpired as exc:
            raise LabError(f"{argv[0]} in {role}: no exit within {timeout_s} s") from exc
        return ProcResult(tuple(argv), done.returncode, done.stdout, done.stderr)

    async def aexec(self, role: Role, argv: Sequence[str], timeout_s: float = 60.0) -> ProcResult:
        """`exec` for asyncio code: many of them can run at once."""
        self._require_open()
        proc = await asyncio.create_subprocess_exec(
            *ns_argv(self.ns(role), argv),
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.PIPE,
            env=_child_env(),
            start_new_session=True,
        )
        try:
            async with asyncio.timeout(timeout_s):
                out, err = await proc.communicate()
        except BaseException:
            _signal_group(proc.pid, signal.SIGKILL)
            with contextlib.suppress(ProcessLookupError):
                await proc.wait()
            raise
        assert proc.returncode is not None
        return ProcResult(tuple(argv), proc.returncode, out.decode(), err.decode())

    def probe(self, role: Role, job: Mapping[str, Any], timeout_s: float = 60.0) -> dict[str, Any]:
        """Run one real probe (`probe.lab.runprobe` job) in ``role``'s namespace; its record."""
        return self.probe_many(role, [job], timeout_s)[0]

    def probe_many(
        self, role: Role, jobs: Sequence[Mapping[str, Any]], timeout_s: float = 60.0
    ) -> list[dict[str, Any]]:
        """Run several probes at once in ``role``'s namespace, through one long-lived
        prober process per role (started on first use); their records, in order."""
        prober = self._probers.get(role)
        if prober is None or prober.popen.poll() is not None:
            argv = [sys.executable, "-m", "probe.lab.runprobe", "--serve"]
            prober = self._probers[role] = self.spawn(role, argv, name=f"prober:{role}")
        jobs = [self._with_ca(job) for job in jobs]
        records = prober.command({"cmd": "probe", "jobs": jobs}, timeout_s)["records"]
        return [dict(r) for r in records]

    async def aprobe(
        self, role: Role, job: Mapping[str, Any], timeout_s: float = 60.0
    ) -> dict[str, Any]:
        """`probe` for asyncio code (runs in a worker thread; one call per role at a time)."""
        return await asyncio.to_thread(self.probe, role, job, timeout_s)

    def _with_ca(self, job: Mapping[str, Any]) -> dict[str, Any]:
        job = dict(job)
        if self._ca is not None:
            job.setdefault("ca_file", self.ca_file)
        return job

    def socket(
        self, role: Role, family: socket.AddressFamily, kind: socket.SocketKind
    ) -> socket.socket:
        """A new socket living in ``role``'s namespace, usable from this process."""
        self._require_open()
        return in_netns(self.ns(role), lambda: socket.socket(family, kind))

    def in_ns(self, role: Role, fn: Callable[[], T]) -> T:
        """Run ``fn`` in a thread inside ``role``'s network namespace (see `in_netns`)."""
        self._require_open()
        return in_netns(self.ns(role), fn)

    @property
    def censor(self) -> Any:
        """The censor (`probe.lab.censor.Censor`) acting in the censor namespace."""
        if self._censor is None:
            from .censor import Censor

            self._censor = Censor(self)
        return self._censor

    def _require_open(self) -> None:
        if not self._open:
            raise LabError(f"lab {self.id} is not running")


class ServeHandle:
    """A running `probe.lab.serve` process: bound ports, live counters, DNS re-scripting."""

    def __init__(self, lab: Lab, proc: LabProcess) -> None:
        self.lab = lab
        self.proc = proc
        self.servers: dict[str, dict[str, Any]] = {s["name"]: s for s in proc.ready["servers"]}

    def port(self, name: str) -> int:
        return int(self.servers[name]["port"])

    def stats(self) -> dict[str, dict[str, Any]]:
        """Counters of every server (connections, ClientHellos, datagrams, queries ...)."""
        return dict(self.proc.command({"cmd": "stats"})["stats"])

    def dns(self, server: str, rules: Sequence[Mapping[str, Any]], *, reset: bool = False) -> None:
        """Re-script a running DNS/DoH server's answer table (rule format: `probe.lab.serve`)."""
        self.proc.command({"cmd": "dns", "server": server, "rules": list(rules), "reset": reset})

    def stop(self) -> None:
        self.lab.stop(self.proc)


def _child_env() -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("http_", "HTTP", "https_"))}
    # The helpers import `probe` from wherever this process found it.
    root = str(Path(__file__).resolve().parents[2])
    env["PYTHONPATH"] = os.pathsep.join(p for p in (root, env.get("PYTHONPATH")) if p)
    env["PYTHONUNBUFFERED"] = "1"
    return env


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


def _main(argv: Sequence[str] | None = None) -> int:
    import argparse

    parser = argparse.ArgumentParser(
        prog="python -m probe.lab.topology",
        description="Remove censorship labs left behind by crashed runs.",
    )
    parser.add_argument("command", choices=["cleanup", "list"])
    parser.add_argument("--prefix", default=PREFIX)
    parser.add_argument("--force", action="store_true", help="also remove labs whose owner lives")
    args = parser.parse_args(argv)
    if args.command == "list":
        for lab_id, namespaces in sorted(_lab_namespaces(args.prefix).items()):
            print(lab_id, " ".join(sorted(namespaces)))
        return 0
    for lab_id in cleanup_stale(args.prefix, force=args.force):
        print(f"removed {lab_id}")
    return 0


if __name__ == "__main__":
    raise SystemExit(_main())
