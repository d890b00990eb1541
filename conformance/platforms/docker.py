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
import subprocess
from pathlib import Path
from typing import Any

import docker

from conformance.canaries import Canaries
from conformance.image import worker_image
from conformance.platforms.host import kill_marked, survivors
from conformance.platforms.session import alive, session
from runtime.doctor import CAPS, cap_names

ENGINE_UNKNOWN = {"PERFMON", "BPF", "CHECKPOINT_RESTORE"}  # newer than Debian's docker.io
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


def host_capabilities() -> set[str]:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("CapBnd:"):
            return set(cap_names(line.split(":", 1)[1].strip()))
    return set()


class DockerPlatform:
    def __init__(self, options: dict[str, Any]) -> None:
        self.name = str(options.get("name", "docker"))
        self.options = options
        self.root: Path | None = None
        granted = host_capabilities()
        requested = list(options.get("cap_add", []))
        wanted = set(CAPS.values()) if "ALL" in requested else set(requested)
        self.not_granted = {c: "not in the host's bounding set" for c in wanted - granted}
        self.not_granted |= {c: "unknown to Docker 20.10" for c in wanted & ENGINE_UNKNOWN}
        self.cap_add = sorted(wanted & granted - ENGINE_UNKNOWN)
        self.client = docker.from_env()
        self.container_id: str | None = None

    def start(self, root: Path) -> None:
        """Create and start the container; on any failure nothing is left behind."""
        api = self.client.api
        opts = self.options
        security = [o for o in opts.get("security_opt", []) if o != "systempaths=unconfined"]
        host_config = api.create_host_config(
            network_mode="none",
            mem_limit=opts.get("mem_limit", "1g"),
            memswap_limit=opts.get("mem_limit", "1g"),
            pids_limit=int(opts.get("pids_limit", 512)),
            cap_add=self.cap_add or None,
            cap_drop=opts.get("cap_drop") or None,
            security_opt=security or None,
            binds={str(root): {"bind": str(root), "mode": "rw"}},
        )
        if "systempaths=unconfined" in opts.get("security_opt", []):
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
        """`orvanta worker` inside the container, holding an fd on the canary file like the host."""
        flags = [f"--env={k}={v}" for k, v in env.items()]
        command = 'exec 3<"$CANARY_FILE"; exec orvanta worker'
        with open(log_path, "ab") as log:
            return subprocess.Popen(
                ["docker", "exec", *flags, self.id, "sh", "-c", command],
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
        canaries.port = LISTENER_PORT
        canaries.abstract = name
        return LISTENER_PORT

    def probe_env(self) -> dict[str, str]:
        return {}  # the host's cgroups are not the container's: no victim group to give

    def cleanup(self, token: str) -> list[str]:
        """Inside the container, /tmp, /dev/shm and IPC go with it; processes by marker."""
        return kill_marked(token)

    def stop_workers(self) -> None:
        subprocess.run(
            ["docker", "exec", self.id, "pkill", "-TERM", "-f", "orvanta worker"],
            capture_output=True,
            check=False,
        )

    def survivors(self, marker: str) -> list[str]:
        return survivors(marker)  # the container's processes are visible from the host

    def facts(self) -> dict[str, Any]:
        return {
            "platform": self.name,
            "image": worker_image(),
            "options": {k: v for k, v in self.options.items() if k != "description"},
            "capabilities_added": self.cap_add,
            "capabilities_not_granted": self.not_granted,
        }

    def close(self) -> None:
        if self.container_id is not None:
            self.client.api.remove_container(self.container_id, force=True)
            self.container_id = None
        self.client.close()


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
