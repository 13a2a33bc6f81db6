"""The agent's container image, built and run here with real container tools (buildah,
podman, runc) and nothing from a registry: the base is a Debian root made locally with
debootstrap (`scripts/container-base`), imported as an image, and the Dockerfile is built
on it with ``--build-arg BASE_IMAGE``.

Everything podman and buildah keep (image store, run state, runc state, network config)
lives in one private work directory that is removed afterwards, so a run leaves the
machine as it found it.  Only two things are kept between runs, on purpose, under
``/var/cache/probe-ci`` (``PROBE_CI_CACHE``): the base root tarball (debootstrap takes
minutes) and the last built image as an archive keyed by a digest of everything the
build reads (Dockerfile, .dockerignore and the files it admits, the base), so an
unchanged tree skips the build the way a layer cache would.  ``PROBE_IMAGE_REBUILD=1``
forces a build.
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
TOOLS = ("debootstrap", "buildah", "podman", "runc")
BASE_TIMEOUT_S = 600  # debootstrap on a clean machine: about 2 minutes
BUILD_TIMEOUT_S = 300  # the image build: about 45 s here (downloads from PyPI)
# Paths podman/buildah create on their own unless told otherwise (Containers passes the
# flags that move them into the work directory): one appearing is a failure.
SYSTEM_PATHS = (
    Path("/run/libpod"),
    Path("/run/containers"),
    Path("/etc/cni/net.d/cni.lock"),
)
# Created whatever the flags, removed afterwards when a run created them: runc's state
# root (podman's exit-time cleanup calls runc without any --root we pass; empty once
# every container is gone: anything left in it is a failure) and containers/image's
# blob-info cache (no flag moves it).
RUNC_ROOT = Path("/run/runc")
BLOB_CACHE = Path("/var/lib/containers")
# the ulimits this kernel needs (root lacks CAP_SYS_RESOURCE: docs/deploy.md)
RUN_FLAGS = (
    "--runtime",
    "runc",
    "--read-only",
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
        self._preexisting = {p for p in (*SYSTEM_PATHS, RUNC_ROOT, BLOB_CACHE) if p.exists()}
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

    def buildah(self, *args: str, timeout_s: float = 60) -> subprocess.CompletedProcess[str]:
        return _run(["buildah", *self._store(), *args], timeout_s, True)

    def leftovers(self) -> list[str]:
        """System paths that appeared since this store was made (they should not)."""
        return [str(p) for p in SYSTEM_PATHS if p.exists() and p not in self._preexisting]

    def close(self) -> list[str]:
        """Remove every container (so nothing stays mounted or running), then the whole
        store with its images; returns the system paths that had appeared (and were
        removed too)."""
        with contextlib.suppress(subprocess.TimeoutExpired):
            self.podman("rm", "--all", "--force", "--time", "0", check=False)
        for mount in reversed(_mounts_under(self.workdir)):
            subprocess.run(["umount", "-l", mount], check=False, timeout=10)
        shutil.rmtree(self.workdir, ignore_errors=True)
        if BLOB_CACHE not in self._preexisting:
            shutil.rmtree(BLOB_CACHE, ignore_errors=True)
        appeared = self.leftovers()
        if RUNC_ROOT not in self._preexisting and RUNC_ROOT.exists():
            try:
                RUNC_ROOT.rmdir()
            except OSError:
                leftover = ", ".join(os.listdir(RUNC_ROOT))
                appeared.append(f"{RUNC_ROOT} (not empty: {leftover}; left in place)")
        for path in map(Path, appeared):
            if path.is_dir():
                shutil.rmtree(path, ignore_errors=True)
            else:
                path.unlink(missing_ok=True)
        return appeared


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


def base_tarball() -> Path:
    """The Debian + python3 root as a tar (built once, then cached)."""
    done = _run([str(REPO / "scripts" / "container-base"), str(CACHE_DIR)], BASE_TIMEOUT_S, True)
    return Path(done.stdout.strip().splitlines()[-1])


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
    unchanged, else built from the local base and cached); its reference."""
    base = base_tarball()
    digest = context_digest(base)
    ref = f"localhost/probe:{digest}"
    cached = CACHE_DIR / f"probe-image-{digest}.tar"
    if cached.is_file() and os.environ.get("PROBE_IMAGE_REBUILD") != "1":
        c.podman("load", "--quiet", "--input", str(cached), timeout_s=120)
        return ref
    c.podman("import", "--quiet", str(base), "localhost/probe-base:ci", timeout_s=120)
    c.buildah(
        "bud",
        "--isolation",
        "chroot",
        "--format",
        "docker",  # HEALTHCHECK is a Docker-format field
        "--layers=false",
        "--cni-config-dir",
        str(c.workdir / "net"),
        *_ca_secret(),
        "--build-arg",
        "BASE_IMAGE=localhost/probe-base:ci",
        "--tag",
        ref,
        str(REPO),
        timeout_s=BUILD_TIMEOUT_S,
    )
    _cache_image(c, ref, cached)
    return ref


def _ca_secret() -> list[str]:
    """This machine reaches PyPI through a TLS-intercepting proxy whose CA is in the
    system bundle: hand the bundle to pip in the build as a secret (never in a layer)."""
    bundle = Path("/etc/ssl/certs/ca-certificates.crt")
    return ["--secret", f"id=pip_ca,src={bundle}"] if bundle.is_file() else []


def _cache_image(c: Containers, ref: str, cached: Path) -> None:
    """Keep only this build's archive (atomically replaced: concurrent runs are safe)."""
    partial = cached.with_suffix(f".{os.getpid()}.partial")
    c.podman("save", "--quiet", "--format", "docker-archive", "--output", str(partial), ref)
    partial.replace(cached)
    for old in CACHE_DIR.glob("probe-image-*.tar"):
        if old != cached:
            old.unlink(missing_ok=True)


@contextlib.contextmanager
def containers() -> Iterator[Containers]:
    c = Containers()
    try:
        yield c
    finally:
        appeared = c.close()
        if appeared:
            raise AssertionError(f"container tools left {appeared} behind (removed now)")
