"""The machine itself: workers are local processes started the way an operator would.

Option `userns_off: true` starts the worker inside a user namespace made for it
whose user.max_user_namespaces is 0, as on Bottlerocket (R-PLT-5): the worker
cannot create user namespaces, and the host's own limit is never touched.
"""

from __future__ import annotations

import contextlib
import glob
import os
import platform
import secrets
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from conformance.canaries import Canaries
from conformance.matrix import ISOLATION_VARS


class HostPlatform:
    name = "host"

    def __init__(self, options: dict[str, Any]) -> None:
        self.options = options
        self.victim: Path | None = None
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
        self.victim = make_victim_cgroup()

    def probe_env(self) -> dict[str, str]:
        return {"CANARY_CGROUP": str(self.victim)} if self.victim else {}

    def cleanup(self, token: str) -> list[str]:
        return cleanup_host(token, self.victim)

    def base_env(self) -> dict[str, str]:
        """What an operator's shell hands the worker, minus every isolation setting."""
        drop = (*ISOLATION_VARS, "DATABASE_URL")
        return {k: v for k, v in os.environ.items() if k not in drop}

    def listen(self, canaries: Canaries) -> int:
        canaries.listen_abstract()
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
        if self.victim is not None:
            remove_cgroup(self.victim)
            self.victim = None


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


def kill_marked(marker: str) -> list[str]:
    """SIGKILL every process whose argv holds `marker` (a probe's survivors, by pid)."""
    killed = []
    for line in survivors(marker):
        pid = int(line.split(":", 1)[0])
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.kill(pid, signal.SIGKILL)
            killed.append(f"process {line}")
    return killed


CGROUP_ROOT = Path("/sys/fs/cgroup")


def make_victim_cgroup() -> Path | None:
    """A cgroup the harness owns, for probes to try to freeze, join or write (R-HOST-2)."""
    v2 = (CGROUP_ROOT / "cgroup.controllers").exists()
    base = CGROUP_ROOT if v2 else CGROUP_ROOT / "freezer"
    victim = base / f"orvanta-victim-{secrets.token_hex(4)}"
    try:
        victim.mkdir()
    except OSError:
        return None  # cgroups are not writable here: the probes fall back to the worker's group
    return victim


def remove_cgroup(group: Path) -> None:
    """Thaw, empty and remove a cgroup and everything below it (deepest first)."""
    groups = sorted((Path(top) for top, _, _ in os.walk(group)), key=lambda p: -len(p.parts))
    for path in groups:
        for name, value in (("freezer.state", "THAWED"), ("cgroup.freeze", "0")):
            with contextlib.suppress(OSError):
                (path / name).write_text(value)
        with contextlib.suppress(OSError):
            for pid in (path / "cgroup.procs").read_text().split():
                with contextlib.suppress(ProcessLookupError):
                    os.kill(int(pid), signal.SIGKILL)
    for path in groups:
        for _ in range(100):
            try:
                path.rmdir()
                break
            except FileNotFoundError:
                break
            except OSError:
                time.sleep(0.02)


def cleanup_host(token: str, victim: Path | None) -> list[str]:
    """What probe `token` may have left on this host: files, IPC, cgroups, processes."""
    removed = kill_marked(token)
    for pattern in (
        f"/tmp/orvanta-*-{token}*",
        f"/var/tmp/orvanta-*-{token}*",
        f"/dev/shm/orvanta-*-{token}*",
        f"/dev/mqueue/orvanta-*-{token}*",
    ):
        for path in glob.glob(pattern):
            if os.path.isdir(path) and not os.path.islink(path):
                shutil.rmtree(path, ignore_errors=True)
            else:
                with contextlib.suppress(OSError):
                    os.unlink(path)
            removed.append(path)
    if mq_unlink(f"/orvanta-leftover-{token}") or mq_unlink(f"/orvanta-neighbour-{token}"):
        removed.append(f"POSIX message queue of {token}")
    key = int(token[:7], 16) | 0x4F000000  # the SysV key leftover_sysv derives from its token
    if subprocess.run(["ipcrm", "-M", str(key)], capture_output=True, check=False).returncode == 0:
        removed.append(f"SysV shm key {key:#x}")
    # at the top, or below a job's own group where a runtime under test failed to remove it
    places = [
        f"{CGROUP_ROOT}/*/orvanta-probe-{token}",
        f"{CGROUP_ROOT}/orvanta-probe-{token}",
        f"{CGROUP_ROOT}/*/orvanta/job-*/orvanta-probe-{token}",
        f"{CGROUP_ROOT}/orvanta/job-*/orvanta-probe-{token}",
    ]
    if victim is not None:
        places.append(f"{victim}/orvanta-probe-{token}")
    for pattern in places:
        for path in glob.glob(pattern):
            remove_cgroup(Path(path))
            removed.append(path)
    if victim is not None:  # a probe that joined the victim group: gone with its job
        with contextlib.suppress(OSError):
            for pid in (victim / "cgroup.procs").read_text().split():
                with contextlib.suppress(ProcessLookupError):
                    os.kill(int(pid), signal.SIGKILL)
                removed.append(f"pid {pid} in the victim cgroup")
    return removed


def mq_unlink(name: str) -> bool:
    """Remove a POSIX message queue by name (no /dev/mqueue needed); True if one was there."""
    import ctypes
    import ctypes.util

    lib = ctypes.CDLL(ctypes.util.find_library("rt") or "libc.so.6", use_errno=True)
    return bool(lib.mq_unlink(name.encode()) == 0)
