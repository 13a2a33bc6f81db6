"""The agent's container image, built and run here with real container tools (buildah,
podman, runc) and nothing from a registry: the base is a Debian root made locally with
debootstrap (`scripts/container-base`), imported as an image, and the Dockerfile is built
on it with ``--build-arg BASE_IMAGE``, with no network at all (``--network none``): pip
installs the hash-pinned locks from a local wheel directory (``scripts/container-wheels``,
bind-mounted, ``--build-arg WHEELS``).  Both the base and the wheels are made by
``scripts/test``'s set-up, the only step that downloads; the test only looks them up and
skips (a failure under CI=true) when they are missing.

Everything podman and buildah keep (image store, run state, runc state, network config)
lives in one private work directory that is removed afterwards, so a run leaves the
machine as it found it.  Only two things are kept between runs, on purpose, under
``/var/cache/probe-ci`` (``PROBE_CI_CACHE``): the base root tarball (debootstrap takes
minutes), the wheel directory, and the last built images as archives keyed by a digest
of everything the build reads (Dockerfile, .dockerignore and the files it admits, the
base), so an unchanged tree skips the build the way a layer cache would.
``PROBE_IMAGE_REBUILD=1`` forces a build.  Other checkouts share the cache: each kind
keeps its few most recently used entries, never only its own.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import shutil
import subprocess
import tempfile
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from tests.agentproc import REPO

CACHE_DIR = Path(os.environ.get("PROBE_CI_CACHE", "/var/cache/probe-ci"))
TOOLS = ("buildah", "podman", "runc")
BUILD_TIMEOUT_S = 300  # the image build: about 40 s here
KEEP_IMAGES = 2  # cached image archives kept (other checkouts' trees share the cache)
# Paths podman/buildah create on their own unless told otherwise (Containers passes the
# flags that move them into the work directory): one appearing is a failure.
SYSTEM_PATHS = (
    Path("/run/libpod"),
    Path("/run/containers"),
    Path("/etc/cni/net.d/cni.lock"),
)
# Created whatever the flags, removed afterwards when a run created them: runc's state
# root (podman's exit-time cleanup calls runc without any --root we pass; empty once
# this store's containers are gone: an entry of one of them left in it is a failure;
# other runs' entries are theirs) and containers/image's blob-info cache file (no flag
# moves it) with the directories above it: /var/lib/containers is podman's default
# system storage, so only what this run added is removed, and a directory only if empty.
RUNC_ROOT = Path("/run/runc")
BLOB_CACHE = Path("/var/lib/containers/cache/blob-info-cache-v1.boltdb")
BLOB_DIRS = (BLOB_CACHE.parent, BLOB_CACHE.parent.parent)  # deepest first
# the ulimits this kernel needs (root lacks CAP_SYS_RESOURCE: docs/deploy.md)
RUN_FLAGS = (
    "--runtime",
    "runc",
    "--read-only",
    "--read-only-tmpfs=false",  # as compose's read_only: true (podman adds a /tmp tmpfs)
    "--cap-drop",
    "ALL",
    "--security-opt",
    "no-new-privileges",
    "--ulimit",
    "nofile=1024:1024",
    "--ulimit",
    "nproc=4096:4096",
)


class ContainerError(RuntimeError):
    """A container tool failed (its command and the tail of its output)."""


@dataclass
class Containers:
    """podman and buildah on a private store under ``workdir``."""

    workdir: Path = field(default_factory=lambda: Path(tempfile.mkdtemp(prefix="probe-ctr-")))

    def __post_init__(self) -> None:
        watched = (*SYSTEM_PATHS, RUNC_ROOT, BLOB_CACHE, *BLOB_DIRS)
        self._preexisting = {p for p in watched if p.exists()}
        for sub in ("tmp", "net"):
            (self.workdir / sub).mkdir(parents=True, exist_ok=True)

    def _store(self) -> list[str]:
        return [
            "--root",
            str(self.workdir / "storage"),
            "--runroot",
            str(self.workdir / "run"),
            "--storage-driver",
            "vfs",
        ]

    def podman_argv(self, *args: str) -> list[str]:
        return [
            "podman",
            *self._store(),
            "--tmpdir",
            str(self.workdir / "tmp"),
            "--events-backend",
            "none",
            "--network-config-dir",
            str(self.workdir / "net"),
            *args,
        ]

    def podman(
        self, *args: str, timeout_s: float = 60, check: bool = True
    ) -> subprocess.CompletedProcess[str]:
        return _run(self.podman_argv(*args), timeout_s, check)

    def buildah_argv(self, *args: str) -> list[str]:
        """buildah in a new, empty network namespace (only a down loopback): nothing it
        runs can reach anything.  (``bud --network none`` would say the same, but buildah
        refuses any network setting with ``--isolation chroot``.)"""
        return ["unshare", "--net", "buildah", *self._store(), *args]

    def buildah(self, *args: str, timeout_s: float = 60) -> subprocess.CompletedProcess[str]:
        return _run(self.buildah_argv(*args), timeout_s, True)

    def leftovers(self) -> list[str]:
        """System paths that appeared since this store was made (they should not)."""
        return [str(p) for p in SYSTEM_PATHS if p.exists() and p not in self._preexisting]

    def container_ids(self) -> list[str]:
        """Full ids of this store's containers (runc names its state entries by them)."""
        done = self.podman("ps", "--all", "--quiet", "--no-trunc", check=False)
        return done.stdout.split()

    def close(self) -> list[str]:
        """Remove every container (so nothing stays mounted or running), then the whole
        store with its images; returns the system paths that had appeared (and were
        removed too)."""
        ours: list[str] = []
        with contextlib.suppress(subprocess.TimeoutExpired):
            ours = self.container_ids()
            self.podman("rm", "--all", "--force", "--time", "0", check=False)
        for mount in reversed(_mounts_under(self.workdir)):
            subprocess.run(["umount", "-l", mount], check=False, timeout=10)
        shutil.rmtree(self.workdir, ignore_errors=True)
        self._remove_blob_cache()
        appeared = self.leftovers()
        # only this store's containers count: /run/runc may hold another run's
        appeared += [
            f"{RUNC_ROOT / cid} (runc state)" for cid in ours if (RUNC_ROOT / cid).exists()
        ]
        if RUNC_ROOT not in self._preexisting:
            with contextlib.suppress(OSError):  # not empty: another run's containers
                RUNC_ROOT.rmdir()
        for path in (Path(a.split(" ")[0]) for a in appeared):
            if path.is_dir():
                shutil.rmtree(path, ignore_errors=True)
            else:
                path.unlink(missing_ok=True)
        return appeared

    def _remove_blob_cache(self) -> None:
        """What this run added under /var/lib/containers, and nothing else."""
        if BLOB_CACHE not in self._preexisting:
            BLOB_CACHE.unlink(missing_ok=True)
        for directory in BLOB_DIRS:
            if directory not in self._preexisting:
                with contextlib.suppress(OSError):  # not empty: someone else's now
                    directory.rmdir()


def _run(argv: Sequence[str], timeout_s: float, check: bool) -> subprocess.CompletedProcess[str]:
    done = subprocess.run(list(argv), capture_output=True, text=True, timeout=timeout_s)
    if check and done.returncode != 0:
        tail = (done.stdout + done.stderr)[-3000:]
        raise ContainerError(f"{' '.join(argv[:8])} ...: exit {done.returncode}\n{tail}")
    return done


def _mounts_under(root: Path) -> list[str]:
    prefix = str(root)
    with open("/proc/self/mountinfo") as f:
        points = [line.split()[4] for line in f]
    return sorted(p for p in points if p.startswith(prefix))


class NotPrepared(Exception):
    """The base or the wheels are not in the cache: scripts/test's set-up makes them."""


def _cached(script: str) -> Path:
    """What ``scripts/SCRIPT --cached`` finds in the cache (it downloads nothing)."""
    argv = [str(REPO / "scripts" / script), "--cached", str(CACHE_DIR)]
    done = subprocess.run(argv, capture_output=True, text=True, timeout=30)
    if done.returncode != 0:
        raise NotPrepared(done.stderr.strip() or f"{script} --cached: exit {done.returncode}")
    return Path(done.stdout.strip().splitlines()[-1])


def base_tarball() -> Path:
    """The Debian + python3 root as a tar (made by scripts/container-base)."""
    return _cached("container-base")


def wheel_dir() -> Path:
    """The locks' wheels for the image's Python (made by scripts/container-wheels)."""
    return _cached("container-wheels")


def context_files() -> list[Path]:
    """The files the build reads: the Dockerfile and what .dockerignore admits (it is an
    allowlist: ``*`` then ``!path`` lines; tests/test_deploy.py keeps it that form)."""
    files = [REPO / "Dockerfile", REPO / ".dockerignore"]
    for line in (REPO / ".dockerignore").read_text().splitlines():
        if not line.startswith("!"):
            continue
        path = REPO / line[1:].strip().rstrip("/")
        if path.is_dir():
            files += [
                p
                for p in path.rglob("*")
                if p.is_file() and "__pycache__" not in p.parts and p.suffix != ".pyc"
            ]
        else:
            files.append(path)
    return sorted(set(files))


def context_digest(base: Path) -> str:
    h = hashlib.sha256(base.name.encode())
    for path in context_files():
        h.update(str(path.relative_to(REPO)).encode() + b"\0" + path.read_bytes() + b"\0")
    return h.hexdigest()[:16]


def build_image(c: Containers) -> str:
    """The agent image in ``c``'s store (loaded from the cache when the build inputs are
    unchanged, else built offline from the local base and wheels, and cached); its
    reference.  Raises NotPrepared when the base or the wheels are missing."""
    base, wheels = base_tarball(), wheel_dir()
    digest = context_digest(base)
    ref = f"localhost/probe:{digest}"
    cached = CACHE_DIR / f"probe-image-{digest}.tar"
    if cached.is_file() and os.environ.get("PROBE_IMAGE_REBUILD") != "1":
        # another checkout's run may prune the archive between the check and the load
        loaded = c.podman("load", "--quiet", "--input", str(cached), timeout_s=120, check=False)
        if loaded.returncode == 0:
            cached.touch()  # recently used: pruning keeps it
            return ref
    c.podman("import", "--quiet", str(base), "localhost/probe-base:ci", timeout_s=120)
    c.buildah(*build_argv(c, ref, wheels), timeout_s=BUILD_TIMEOUT_S)
    _cache_image(c, ref, cached)
    return ref


def build_argv(c: Containers, ref: str, wheels: Path) -> list[str]:
    """``buildah bud`` (run without a network: Containers.buildah_argv); pip reads the
    wheel directory, mounted read-only, and nothing else."""
    return [
        "bud",
        "--isolation",
        "chroot",
        "--format",
        "docker",  # HEALTHCHECK is a Docker-format field
        "--layers=false",
        "--cni-config-dir",
        str(c.workdir / "net"),
        "--volume",
        f"{wheels}:/wheels:ro",
        "--build-arg",
        "WHEELS=/wheels",
        "--build-arg",
        "BASE_IMAGE=localhost/probe-base:ci",
        "--tag",
        ref,
        str(REPO),
    ]


def _cache_image(c: Containers, ref: str, cached: Path) -> None:
    """Save this build's archive (atomically replaced: concurrent runs are safe) and keep
    the KEEP_IMAGES most recently used: another checkout's run may be loading one."""
    partial = cached.with_suffix(f".{os.getpid()}.partial")
    c.podman("save", "--quiet", "--format", "docker-archive", "--output", str(partial), ref)
    partial.replace(cached)
    archives = sorted(CACHE_DIR.glob("probe-image-*.tar"), key=_mtime, reverse=True)
    for old in archives[KEEP_IMAGES:]:
        old.unlink(missing_ok=True)


def _mtime(path: Path) -> float:
    try:
        return path.stat().st_mtime
    except FileNotFoundError:  # pruned meanwhile by a concurrent run
        return 0.0


@contextlib.contextmanager
def containers() -> Iterator[Containers]:
    c = Containers()
    try:
        yield c
    finally:
        appeared = c.close()
        if appeared:
            raise AssertionError(f"container tools left {appeared} behind (removed now)")
