"""A Podman container of the same offline worker image; workers run inside it (R-PLT-8).

Rootful: podman as root. Rootless (`rootless: true`): podman run by the dedicated
user ROOTLESS_USER, whose subordinate ids scripts/setup writes to /etc/subuid and
/etc/subgid; the container's root is that user on the host, so the cell's directory
is handed to it before the container starts. The image comes from the local Docker
engine (`docker save | podman load`), never from a registry. Like the Docker driver:
network none, a memory and a pids limit, the `orvanta.session` label, the cell's
directory at the same path, and removal at the end. Podman's default RLIMIT_NPROC
and RLIMIT_NOFILE exceed what a host without SYS_RESOURCE grants, so both are
pinned to values it can.
"""

from __future__ import annotations

import fcntl
import functools
import os
import pwd
import resource
import shutil
import subprocess
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from conformance.canaries import Canaries
from conformance.image import CACHE, worker_image
from conformance.platforms.docker import (
    LISTENER,
    LISTENER_PORT,
    SESSION_LABEL,
    await_listener,
    kernel_facts,
)
from conformance.platforms.host import kill_marked, survivors
from conformance.platforms.session import alive, session
from conformance.platforms.spec import PlatformSpec, SpecError
from runtime.database import Database, connect

ROOTLESS_USER = "orvanta-podman"  # scripts/setup creates it, with subordinate ids
NPROC = 32768  # RLIMIT_NPROC podman may set here (its default is more than the host grants)


@dataclass(frozen=True)
class PodmanOptions:
    rootless: bool = False  # podman run by ROOTLESS_USER instead of root
    cap_add: tuple[str, ...] = ()  # as `podman run --cap-add`
    security_opt: tuple[str, ...] = ()  # as `podman run --security-opt`
    mem_limit: str = "1g"
    pids_limit: int = 512

    def __post_init__(self) -> None:
        if self.pids_limit < 1:
            raise SpecError("pids_limit", f"{self.pids_limit}: a worker needs at least 1 process")


class PodmanPlatform:
    Options = PodmanOptions

    def __init__(self, spec: PlatformSpec[PodmanOptions]) -> None:
        self.spec = spec
        self.rootless = spec.options.rootless
        self.container_id: str | None = None
        self.warnings: list[str] = []
        self._kernel: dict[str, str] | None = None

    # -- the run ---------------------------------------------------------------------------
    @classmethod
    def unavailable(cls) -> str | None:
        return podman_problem()

    @classmethod
    def prepare(cls) -> None:
        """Reap what dead sessions left, in root's and the rootless user's containers."""
        if podman_problem() is None:
            for rootless in stores():
                reap(rootless, dead_only=True)

    @classmethod
    def finish(cls) -> None:
        if podman_problem() is None:
            for rootless in stores():
                reap(rootless, dead_only=False)

    # -- one cell ----------------------------------------------------------------------------
    def start(self, root: Path) -> None:
        if self.rootless:
            user = rootless_user()
            if user is None:
                raise RuntimeError(
                    f"no user {ROOTLESS_USER} for rootless Podman: run scripts/setup"
                )
            for top, dirs, files in os.walk(root):  # the container's root is this user
                for name in (top, *(os.path.join(top, n) for n in (*dirs, *files))):
                    os.lchown(name, user.pw_uid, user.pw_gid)
        image = load_image(self.rootless)
        opts = self.spec.options
        nofile = resource.getrlimit(resource.RLIMIT_NOFILE)[1]
        argv = [
            "run",
            "-d",
            "--network=none",
            f"--memory={opts.mem_limit}",
            f"--memory-swap={opts.mem_limit}",
            f"--pids-limit={opts.pids_limit}",
            f"--ulimit=nofile={nofile}:{nofile}",
            f"--ulimit=nproc={NPROC}:{NPROC}",
            f"--label={SESSION_LABEL}={session()}",
            f"--volume={root}:{root}",
            *(f"--cap-add={c}" for c in opts.cap_add),
            *(f"--security-opt={o}" for o in opts.security_opt),
            image,
            "sleep",
            "infinity",
        ]
        proc = self._podman(argv)
        self.warnings = [w for w in proc.stderr.splitlines() if "not supported" in w]
        if proc.returncode != 0:
            self.close()
            raise RuntimeError(f"podman run failed ({self.spec.name}): {proc.stderr.strip()}")
        self.container_id = proc.stdout.strip().splitlines()[-1]

    @property
    def id(self) -> str:
        assert self.container_id is not None, "container not started"
        return self.container_id

    def spawn_worker(
        self, env: dict[str, str], log_path: Path, pass_fds: tuple[int, ...]
    ) -> subprocess.Popen[bytes]:
        """As the Docker driver: `--env NAME` takes each value from the client's environment,
        so the canary secret is on no command line."""
        names = [f"--env={k}" for k in env]
        command = 'exec 3<"$CANARY_FILE"; exec orvanta worker'
        with open(log_path, "ab") as log:
            return subprocess.Popen(
                [*podman_argv(self.rootless), "exec", *names, self.id, "sh", "-c", command],
                env={**os.environ, **env},
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                cwd="/",
            )

    def base_env(self) -> dict[str, str]:
        return {"PATH": "/usr/local/bin:/usr/bin:/bin", "LANG": "C.UTF-8"}

    def listen(self, canaries: Canaries) -> int:
        name = f"orvanta-canary-{self.id[:12]}"
        argv = ["exec", "-d", self.id, "python3", "-c", LISTENER, str(LISTENER_PORT), name]
        proc = self._podman(argv)
        if proc.returncode != 0:
            raise RuntimeError(f"canary listener did not start: {proc.stderr.strip()}")
        await_listener([*podman_argv(self.rootless), "exec", self.id], LISTENER_PORT, name)
        canaries.port = LISTENER_PORT
        canaries.abstract = name
        return LISTENER_PORT

    def probe_env(self) -> dict[str, str]:
        return {}

    def cleanup(self, token: str) -> list[str]:
        return kill_marked(token)  # runc: the container's processes are the host's

    def stop_workers(self) -> None:
        if self.container_id is not None:
            self._podman(["exec", self.id, "pkill", "-TERM", "-f", "orvanta worker"])

    def survivors(self, marker: str) -> list[str]:
        return survivors(marker)

    def facts(self) -> dict[str, Any]:
        if self._kernel is None and self.container_id is not None:
            self._kernel = kernel_facts([*podman_argv(self.rootless), "exec", self.id], "")
        user = rootless_user() if self.rootless else None
        return {
            **self.spec.facts(),
            **(self._kernel or {}),
            "engine": podman_version(),
            "as_user": user.pw_name if user else "root",
            "podman_warnings": self.warnings,
        }

    def queue_database(self, url: str | None, state_dir: Path) -> Database:
        return connect(url, state_dir)  # the workers' locks are the host's

    def close(self) -> None:
        if self.container_id is not None:
            self._podman(["rm", "-f", "-t", "0", self.container_id])
            self.container_id = None

    def _podman(self, argv: list[str]) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [*podman_argv(self.rootless), *argv],
            capture_output=True,
            text=True,
            check=False,
            cwd="/",
        )


def rootless_user() -> pwd.struct_passwd | None:
    try:
        return pwd.getpwnam(ROOTLESS_USER)
    except KeyError:
        return None


def stores() -> list[bool]:
    """Whose container stores exist here: root's, and the rootless user's if there is one."""
    return [False, True] if rootless_user() is not None else [False]


def podman_argv(rootless: bool) -> list[str]:
    """podman as root, or as the rootless user (its own runtime dir, no login)."""
    binary = shutil.which("podman") or "podman"
    user = rootless_user() if rootless else None
    if user is None:
        return [binary]
    return [
        shutil.which("runuser") or "/usr/sbin/runuser",  # sbin: on root's PATH, not always ours
        "-u",
        user.pw_name,
        "--",
        "env",
        f"HOME={user.pw_dir}",
        f"XDG_RUNTIME_DIR=/tmp/orvanta-podman-run-{user.pw_uid}",
        binary,
    ]


def load_image(rootless: bool) -> str:
    """The worker image in this podman store, loaded from Docker's (no registry): one loader."""
    tag = worker_image()
    name = f"localhost/{tag}"
    with open(CACHE / f"podman-load-{int(rootless)}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        exists = subprocess.run(
            [*podman_argv(rootless), "image", "exists", name], check=False, cwd="/"
        )
        if exists.returncode != 0:
            save = subprocess.Popen(["docker", "save", tag], stdout=subprocess.PIPE)
            load = subprocess.run(
                [*podman_argv(rootless), "load", "-q"],
                stdin=save.stdout,
                capture_output=True,
                text=True,
                check=False,
                cwd="/",
            )
            save.wait()
            if load.returncode != 0 or save.returncode != 0:
                raise RuntimeError(f"docker save {tag} | podman load failed: {load.stderr}")
    return name


@functools.cache
def podman_version() -> str:
    out = subprocess.run(["podman", "--version"], capture_output=True, text=True, check=False)
    return out.stdout.strip()


@functools.cache
def podman_problem() -> str | None:
    """None when podman and a Docker engine (the image's source) answer; else a skip reason."""
    from conformance.platforms.docker import engine_problem

    if shutil.which("podman") is None:
        return "no podman on PATH (scripts/setup installs it)"
    return engine_problem()


def reap(rootless: bool, dead_only: bool) -> None:
    listing = subprocess.run(
        [
            *podman_argv(rootless),
            "ps",
            "-a",
            "--filter",
            f"label={SESSION_LABEL}",
            "--format",
            f'{{{{.ID}}}} {{{{index .Labels "{SESSION_LABEL}"}}}}',
        ],
        capture_output=True,
        text=True,
        check=False,
        cwd="/",
    ).stdout.split("\n")
    doomed = []
    for line in filter(None, listing):
        container, _, owner = line.partition(" ")
        if (not dead_only and owner == session()) or (dead_only and not alive(owner)):
            doomed.append(container)
    if doomed:
        subprocess.run(
            [*podman_argv(rootless), "rm", "-f", "-t", "0", *doomed],
            capture_output=True,
            check=False,
            cwd="/",
        )
