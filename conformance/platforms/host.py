"""The machine itself: workers are local processes started the way an operator would.

Option `userns_off: true` starts the worker inside a user namespace made for it
whose user.max_user_namespaces is 0, as on Bottlerocket (R-PLT-5): the worker
cannot create user namespaces, and the host's own limit is never touched.
"""

from __future__ import annotations

import os
import platform
import subprocess
import sys
from pathlib import Path
from typing import Any

from conformance.canaries import Canaries
from conformance.matrix import ISOLATION_VARS


class HostPlatform:
    name = "host"

    def __init__(self, options: dict[str, Any]) -> None:
        self.options = options
        self.prefix: list[str] = []
        if options.get("userns_off"):
            self.prefix = [
                "unshare",
                "--user",
                "--map-root-user",
                "--",
                "sh",
                "-c",
                'echo 0 > /proc/sys/user/max_user_namespaces && exec "$@"',
                "sh",
            ]

    def spawn_worker(
        self, env: dict[str, str], log_path: Path, pass_fds: tuple[int, ...]
    ) -> subprocess.Popen[bytes]:
        with open(log_path, "ab") as log:
            return subprocess.Popen(
                [*self.prefix, sys.executable, "-m", "runtime.cli", "worker"],
                env=env,
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                pass_fds=pass_fds,
                start_new_session=True,
            )

    def survivors(self, marker: str) -> list[str]:
        return survivors(marker)

    def start(self, root: Path) -> None:
        pass

    def base_env(self) -> dict[str, str]:
        """What an operator's shell hands the worker, minus every isolation setting."""
        drop = (*ISOLATION_VARS, "DATABASE_URL")
        return {k: v for k, v in os.environ.items() if k not in drop}

    def listen(self, canaries: Canaries) -> int:
        return canaries.listen()

    def stop_workers(self) -> None:
        pass

    def facts(self) -> dict[str, Any]:
        status = Path("/proc/self/status").read_text().splitlines()
        wanted = ("CapEff", "CapBnd", "Seccomp", "NoNewPrivs")
        return {
            "platform": self.name,
            "options": self.options,
            "kernel": platform.release(),
            **{
                line.split(":")[0]: line.split(":")[1].strip()
                for line in status
                if line.split(":")[0] in wanted
            },
        }

    def close(self) -> None:
        pass


def survivors(marker: str) -> list[str]:
    """Command lines of live processes whose argv contains marker (any PID namespace's,
    since the host sees them all)."""
    found = []
    needle = marker.encode()
    for entry in os.listdir("/proc"):
        if not entry.isdigit() or int(entry) == os.getpid():
            continue
        try:
            with open(f"/proc/{entry}/cmdline", "rb") as f:
                cmdline = f.read()
        except OSError:
            continue
        if needle in cmdline:
            args = cmdline.replace(b"\0", b" ").decode(errors="replace")
            found.append(f"{entry}: {args}")
    return found
