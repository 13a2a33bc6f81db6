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

The pieces, one module per seam (this module assembles them into `Lab`):

- `probe.lab.netns`: namespaces, links, addresses, commands run inside a namespace;
- `probe.lab.process`: helper processes and their JSON-lines protocol (both sides);
- `probe.lab.stale`: owner records and the removal of labs left by crashed runs;
- `probe.lab.censor`: the censor's behaviours (`Lab.censor`).
"""

from __future__ import annotations

import asyncio
import atexit
import contextlib
import json
import logging
import os
import secrets
import signal
import socket
import subprocess
import sys
import tempfile
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from types import TracebackType
from typing import Any, Self, TypeVar

from .censor import Censor
from .certs import CertificateAuthority
from .netns import (
    ADDR,
    CENSOR_CLIENT_IF,
    CENSOR_SERVER_IF,
    PREFIX,
    ROLES,
    SHORT,
    Addresses,
    LabError,
    Role,
    build_links,
    in_netns,
    lab_available,
    ns_argv,
    write_resolv_conf,
)
from .process import LabProcess, ProcResult, child_env, signal_group
from .stale import cleanup_stale, destroy, main, write_record

# The names this module exported before it was split stay importable from here.
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
    "ServeHandle",
    "cleanup_stale",
    "lab_available",
]

log = logging.getLogger(__name__)

T = TypeVar("T")


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
    _censor: Censor | None = field(init=False, default=None)
    _ca: CertificateAuthority | None = field(init=False, default=None)
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
        return f"{self.id}-{SHORT[role]}"

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
        write_record(self.id, self.namespaces, self.workdir)
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
        errors = destroy(self.id, self.namespaces, str(self.workdir))
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

    def _build(self) -> None:
        namespaces = {role: self.ns(role) for role in ROLES}
        build_links(namespaces, self.addr, self.services)
        write_resolv_conf(
            self.id, namespaces, self.resolver, self.control_resolver or self.resolver
        )

    # -- certificates

    @property
    def ca(self) -> CertificateAuthority:
        """The lab's throwaway CA, made on first use."""
        if self._ca is None:
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
        proc = LabProcess(name or f"{role}:{argv[-1]}", self.ns(role), argv, child_env())
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
                env=child_env(),
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
            env=child_env(),
            start_new_session=True,
        )
        try:
            async with asyncio.timeout(timeout_s):
                out, err = await proc.communicate()
        except BaseException:
            signal_group(proc.pid, signal.SIGKILL)
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
    def censor(self) -> Censor:
        """The censor acting in the censor namespace."""
        if self._censor is None:
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


if __name__ == "__main__":
    raise SystemExit(main())
