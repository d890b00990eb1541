"""A Docker container with the privileges a matrix platform names; workers run inside it.

The container comes from the locally built worker image (conformance/image.py),
created through the docker SDK's low-level API (testcontainers cannot unmask /proc:
`systempaths=unconfined` is a CLI-side option the high-level APIs reject) with
network_mode "none", a memory and a pids limit, always, and the label
`orvanta.session` so that leftovers can be reaped. The cell's directory is
bind-mounted at the same path, so the harness reaches the worker's queue and
canaries as on the host. A capability the host cannot grant (this machine's
bounding set lacks SYS_RESOURCE, so `--privileged` itself fails) is dropped
from the request and recorded in the platform's facts.
"""

from __future__ import annotations

import functools
import json
import os
import platform
import re
import shutil
import subprocess
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from conformance.canaries import Canaries
from conformance.image import worker_image
from conformance.platforms.host import kill_marked, own_status, survivors
from conformance.platforms.queue_relay import RelayDatabase
from conformance.platforms.session import alive, session
from conformance.platforms.spec import PlatformSpec, SpecError
from runtime.database import Database, connect
from runtime.doctor import CAPS, cap_names

ENGINE_UNKNOWN = {"PERFMON", "BPF", "CHECKPOINT_RESTORE"}  # newer than Debian's docker.io
SECURITY_OPTS = ("seccomp", "apparmor", "systempaths", "no-new-privileges", "label")
SESSION_LABEL = "orvanta.session"
LISTENER_PORT = 47047
LISTENER = """
import socket, sys, threading
tcp = socket.create_server(("127.0.0.1", int(sys.argv[1])))
unix = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
unix.bind("\\0" + sys.argv[2])
unix.listen(8)
def serve(s):
    while True:
        c, _ = s.accept()
        c.sendall(b"ORVANTA_CANARY listener\\n")
        c.close()
threading.Thread(target=serve, args=(unix,), daemon=True).start()
serve(tcp)
"""
# The control for canary_tcp and abstract_socket, run beside LISTENER: both of its sockets
# greet. `exec -d` returns before the listener binds, and one that never came up would read
# as a network that holds.
LISTENER_CHECK = """
import socket, sys, time
port, name, seconds = int(sys.argv[1]), sys.argv[2], float(sys.argv[3])
def greets(family, address):
    s = socket.socket(family, socket.SOCK_STREAM)
    s.settimeout(2)
    try:
        s.connect(address)
        return s.recv(64).startswith(b"ORVANTA_CANARY")
    except OSError:
        return False
    finally:
        s.close()
end = time.monotonic() + seconds
while not (greets(socket.AF_INET, ("127.0.0.1", port)) and greets(socket.AF_UNIX, "\\0" + name)):
    if time.monotonic() > end:
        sys.exit(f"nothing greets on 127.0.0.1:{port} and @{name} after {seconds:g}s")
    time.sleep(0.05)
"""
LISTENER_WAIT = 20.0  # seconds for the listener to answer


def await_listener(
    exec_prefix: list[str], port: int, name: str, seconds: float = LISTENER_WAIT
) -> None:
    """Return once the canary listener LISTENER started (`exec_prefix` runs a command beside
    it) greets on both sockets; RuntimeError, which fails the cell, otherwise."""
    try:
        proc = subprocess.run(
            [*exec_prefix, "python3", "-c", LISTENER_CHECK, str(port), name, str(seconds)],
            capture_output=True,
            text=True,
            timeout=seconds + 60,
            check=False,
            cwd="/",  # a rootless podman's user may not enter ours
        )
    except subprocess.TimeoutExpired as exc:
        raise RuntimeError(f"the canary listener does not answer: its check hung ({exc})") from exc
    if proc.returncode != 0:
        said = (proc.stderr or proc.stdout).strip()[-500:]
        raise RuntimeError(f"the canary listener does not answer: {said}")


@dataclass(frozen=True)
class DockerOptions:
    cap_add: tuple[str, ...] = ()  # names without CAP_, or ALL: what the host can grant of them
    cap_drop: tuple[str, ...] = ()
    security_opt: tuple[str, ...] = ()  # as `docker run --security-opt`
    mem_limit: str = "1g"  # also the memory+swap limit
    pids_limit: int = 512
    runtime: str = ""  # as `docker run --runtime` (runsc: gVisor); empty: the engine's default

    def __post_init__(self) -> None:
        for key in ("cap_add", "cap_drop"):
            bad = [c for c in getattr(self, key) if c not in (*CAPS.values(), "ALL")]
            if bad:
                raise SpecError(
                    key, f"{bad[0]!r} is no capability: write SYS_ADMIN (no CAP_), or ALL"
                )
        for opt in self.security_opt:
            if opt.partition("=")[0] not in SECURITY_OPTS:
                raise SpecError(
                    "security_opt", f"{opt!r}: start it with one of {', '.join(SECURITY_OPTS)}"
                )
        if not re.fullmatch(r"[1-9][0-9]*[kmg]", self.mem_limit):
            raise SpecError("mem_limit", f"{self.mem_limit!r}: write a size like 256m or 1g")
        if self.pids_limit < 1:
            raise SpecError("pids_limit", f"{self.pids_limit}: a worker needs at least 1 process")
        if not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9_.-]*|", self.runtime):
            raise SpecError(
                "runtime", f"{self.runtime!r}: name a runtime of `docker info`, like runsc"
            )


def host_capabilities() -> set[str]:
    return set(cap_names(own_status("CapBnd").get("CapBnd", "0")))


class DockerPlatform:
    Options = DockerOptions

    def __init__(self, spec: PlatformSpec[DockerOptions]) -> None:
        import docker  # the SDK only where a container platform runs

        self.spec = spec
        self.root: Path | None = None
        granted = host_capabilities()
        requested = spec.options.cap_add
        wanted = set(CAPS.values()) if "ALL" in requested else set(requested)
        self.not_granted = {c: "not in the host's bounding set" for c in wanted - granted}
        self.not_granted |= {c: "unknown to Docker 20.10" for c in wanted & ENGINE_UNKNOWN}
        self.cap_add = sorted(wanted & granted - ENGINE_UNKNOWN)
        self.client = docker.from_env()
        self.container_id: str | None = None
        self._kernel: dict[str, str] | None = None

    # -- the run: no container of this session outlives it ----------------------------------
    @classmethod
    def unavailable(cls) -> str | None:
        return engine_problem()

    @classmethod
    def prepare(cls) -> None:
        """Reap containers that dead sessions left behind."""
        if engine_problem() is None:
            reap(dead_only=True)

    @classmethod
    def finish(cls) -> None:
        """Reap this session's containers, even after Ctrl-C."""
        if engine_problem() is None:
            reap(dead_only=False)

    # -- one cell ----------------------------------------------------------------------------
    def start(self, root: Path) -> None:
        """Create and start the container; on any failure nothing is left behind."""
        api = self.client.api
        opts = self.spec.options
        if opts.runtime and opts.runtime not in runtimes():
            raise RuntimeError(
                f"platform {self.spec.name}: runtime {opts.runtime!r} is not registered with "
                f"the Docker engine (it has {', '.join(sorted(runtimes()))}): run scripts/setup"
            )
        security = [o for o in opts.security_opt if o != "systempaths=unconfined"]
        host_config = api.create_host_config(
            network_mode="none",
            mem_limit=opts.mem_limit,
            memswap_limit=opts.mem_limit,
            pids_limit=opts.pids_limit,
            cap_add=self.cap_add or None,
            cap_drop=list(opts.cap_drop) or None,
            security_opt=security or None,
            binds={str(root): {"bind": str(root), "mode": "rw"}},
            runtime=opts.runtime or None,
        )
        if "systempaths=unconfined" in opts.security_opt:
            host_config["MaskedPaths"] = []
            host_config["ReadonlyPaths"] = []
        created = api.create_container(
            worker_image(), host_config=host_config, labels={SESSION_LABEL: session()}
        )
        self.container_id = str(created["Id"])
        try:
            api.start(self.container_id)
        except Exception:
            self.close()
            raise

    @property
    def id(self) -> str:
        assert self.container_id is not None, "container not started"
        return self.container_id

    def spawn_worker(
        self, env: dict[str, str], log_path: Path, pass_fds: tuple[int, ...]
    ) -> subprocess.Popen[bytes]:
        """`orvanta worker` inside the container, holding an fd on the canary file like the host.

        `docker exec -e NAME` (no value) takes the value from the client's own environment:
        the canary secret travels there, readable by root only, never on a command line.
        """
        names = [f"--env={k}" for k in env]
        command = 'exec 3<"$CANARY_FILE"; exec orvanta worker'
        with open(log_path, "ab") as log:
            return subprocess.Popen(
                [docker_cli(), "exec", *names, self.id, "sh", "-c", command],
                env={**os.environ, **env},
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
            )

    def base_env(self) -> dict[str, str]:
        return {"PATH": "/usr/local/bin:/usr/bin:/bin", "LANG": "C.UTF-8"}

    def listen(self, canaries: Canaries) -> int:
        """The canary listeners (TCP, abstract unix) inside the container's network namespace."""
        name = f"orvanta-canary-{self.id[:12]}"
        subprocess.run(
            ["docker", "exec", "-d", self.id, "python3", "-c", LISTENER, str(LISTENER_PORT), name],
            check=True,
            capture_output=True,
        )
        await_listener([docker_cli(), "exec", self.id], LISTENER_PORT, name)
        canaries.port = LISTENER_PORT
        canaries.abstract = name
        return LISTENER_PORT

    def probe_env(self) -> dict[str, str]:
        return {}  # the host's cgroups are not the container's: no victim group to give

    def cleanup(self, token: str) -> list[str]:
        """Inside the container, /tmp, /dev/shm and IPC go with it; processes by marker."""
        if self.spec.options.runtime:  # a sandbox's processes are not the host's
            return [f"process {line}" for line in self._inside(token, kill=True)]
        return kill_marked(token)

    def stop_workers(self) -> None:
        subprocess.run(
            ["docker", "exec", self.id, "pkill", "-TERM", "-f", "orvanta worker"],
            capture_output=True,
            check=False,
        )

    def survivors(self, marker: str) -> list[str]:
        if self.spec.options.runtime:  # gVisor: the jobs run in its kernel, not the host's
            return self._inside(marker)
        return survivors(marker)  # the container's processes are visible from the host

    @property
    def kernel(self) -> dict[str, str]:
        """Which kernel the cell's jobs ran on: the host's, or a sandbox's own (gVisor)."""
        if self._kernel is None and self.container_id is not None:
            self._kernel = kernel_facts([docker_cli(), "exec", self.id], self.spec.options.runtime)
        return self._kernel or {}

    def _inside(self, marker: str, kill: bool = False) -> list[str]:
        """`pid: command line` of the container's processes whose argv holds marker, as its
        own ps sees them (SIGKILLed first when kill)."""
        return marked_inside([docker_cli(), "exec", self.id], marker, kill)

    def facts(self) -> dict[str, Any]:
        return {
            **self.spec.facts(),
            **self.kernel,
            "image": worker_image(),
            "capabilities_added": self.cap_add,
            "capabilities_not_granted": self.not_granted,
        }

    def queue_database(self, url: str | None, state_dir: Path) -> Database:
        """The cell's queue; under a sandbox runtime (`runtime:`, runsc in matrix.yaml: a
        kernel of its own), through a relay there, under the workers' own file locks
        (conformance.platforms.queue_relay). The same test as `survivors` and `cleanup`."""
        if url or not self.spec.options.runtime:
            return connect(url, state_dir)
        return RelayDatabase(
            [docker_cli(), "exec", "-i", self.id, "python3"],
            state_dir / "queue.sqlite3",
            state_dir.parent / "queue-relay.log",
            f"a relay in the {self.spec.options.runtime} container {self.id[:12]}",
        )

    def close(self) -> None:
        if self.container_id is not None:
            self.client.api.remove_container(self.container_id, force=True)
            self.container_id = None
        self.client.close()


def kernel_facts(exec_prefix: list[str], runtime: str) -> dict[str, str]:
    """`kernel`: what `uname -r` says inside the container, and whose kernel that is."""
    inside = subprocess.run(
        [*exec_prefix, "uname", "-r"], capture_output=True, text=True, check=False
    ).stdout.strip()
    host = platform.release()
    if inside == host:
        whose = "the host's"
    elif runtime == "runsc":
        version = subprocess.run(
            ["runsc", "--version"], capture_output=True, text=True, check=False
        ).stdout.split("\n")[0]
        whose = f"gVisor's Sentry, a user-space kernel: {version or 'runsc'}"
    else:
        whose = f"not the host's: runtime {runtime or 'default'}"
    return {"kernel": f"{inside or 'unknown'} ({whose})", "host_kernel": host}


def marked_inside(exec_prefix: list[str], marker: str, kill: bool) -> list[str]:
    """`pid: command line` of processes whose argv holds marker, as `ps` in the container
    lists them (SIGKILLed first when kill). For sandboxes whose processes the host cannot see."""
    listing = subprocess.run(
        [*exec_prefix, "ps", "-eo", "pid=,args="], capture_output=True, text=True, check=False
    ).stdout
    found = []
    for line in listing.splitlines():
        pid, _, args = line.strip().partition(" ")
        if marker in args:
            found.append(f"{pid}: {args}")
    if kill and found:
        pids = [entry.partition(":")[0] for entry in found]
        subprocess.run([*exec_prefix, "kill", "-KILL", *pids], capture_output=True, check=False)
    return found


def runtimes() -> set[str]:
    """The runtimes the engine has registered (runc, runsc...)."""
    info = subprocess.run(
        ["docker", "info", "--format", "{{json .Runtimes}}"],
        capture_output=True,
        text=True,
        check=False,
    )
    try:
        return set(json.loads(info.stdout or "{}"))
    except ValueError:
        return set()


def docker_cli() -> str:
    """Found on this process's PATH, not on the worker environment's that the client gets."""
    return shutil.which("docker") or "docker"


@functools.cache
def engine_problem() -> str | None:
    """None when a Docker engine answers; otherwise what is wrong (a skip reason)."""
    try:
        proc = subprocess.run(
            ["docker", "info", "--format", "{{.ServerVersion}}"],
            capture_output=True,
            text=True,
            timeout=30,
            check=False,
        )
    except (OSError, subprocess.TimeoutExpired) as exc:
        return f"no Docker engine: {exc} (scripts/setup installs docker.io and starts dockerd)"
    if proc.returncode != 0:
        return f"no Docker engine answers: {proc.stderr.strip()[:300]} (run scripts/setup)"
    return None


def reap(dead_only: bool) -> None:
    """Remove this session's containers, or (dead_only) those of sessions no longer running."""
    listing = subprocess.run(
        [
            "docker",
            "ps",
            "-a",
            "--filter",
            f"label={SESSION_LABEL}",
            "--format",
            f'{{{{.ID}}}} {{{{.Label "{SESSION_LABEL}"}}}}',
        ],
        capture_output=True,
        text=True,
        check=False,
    ).stdout.split("\n")
    doomed = []
    for line in filter(None, listing):
        container, _, owner = line.partition(" ")
        if (not dead_only and owner == session()) or (dead_only and not alive(owner)):
            doomed.append(container)
    if doomed:
        subprocess.run(["docker", "rm", "-f", *doomed], capture_output=True, check=False)
