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
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import psutil

from conformance.canaries import Canaries
from conformance.matrix import ISOLATION_VARS
from conformance.platforms.session import owned_prefix
from conformance.platforms.spec import PlatformSpec
from runtime.database import Database, connect

USERNS_OFF = (
    "unshare",
    "--user",
    "--map-root-user",
    "--",
    "sh",
    "-c",
    'echo 0 > /proc/sys/user/max_user_namespaces && exec "$@"',
    "sh",
)  # the worker where user namespaces are off, as on Bottlerocket (R-PLT-5)


@dataclass(frozen=True)
class HostOptions:
    userns_off: bool = False  # the worker in a user namespace that may create none (R-PLT-5)


class HostPlatform:
    Options = HostOptions

    def __init__(self, spec: PlatformSpec[HostOptions]) -> None:
        self.spec = spec
        self.victim: Path | None = None
        self.prefix = USERNS_OFF if spec.options.userns_off else ()

    # -- the run: the host needs no set-up of its own --------------------------------------
    @classmethod
    def unavailable(cls) -> str | None:
        return None

    @classmethod
    def prepare(cls) -> None:
        pass

    @classmethod
    def finish(cls) -> None:
        pass

    # -- one cell ----------------------------------------------------------------------------
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
        wanted = own_status("CapEff", "CapBnd", "Seccomp", "NoNewPrivs")
        return {**self.spec.facts(), "kernel": platform.release(), **wanted}

    def queue_database(self, url: str | None, state_dir: Path) -> Database:
        return connect(url, state_dir)  # the workers' locks are the host's

    def close(self) -> None:
        if self.victim is not None:
            remove_cgroup(self.victim)
            self.victim = None


def own_status(*keys: str) -> dict[str, str]:
    """Fields of this process's /proc/self/status (capability masks, seccomp) that psutil
    does not read."""
    found = {}
    for line in Path("/proc/self/status").read_text().splitlines():
        key, _, value = line.partition(":")
        if key in keys:
            found[key] = value.strip()
    return found


def marked(marker: str) -> list[psutil.Process]:
    """Live processes whose argv holds marker, in any PID namespace (the host sees them all)."""
    me = os.getpid()
    return [
        proc
        for proc in psutil.process_iter(["cmdline"])
        if proc.pid != me and marker in " ".join(proc.info["cmdline"] or ())
    ]


def survivors(marker: str) -> list[str]:
    """`pid: command line` of each live process whose argv holds marker."""
    return [f"{proc.pid}: {' '.join(proc.info['cmdline'])}" for proc in marked(marker)]


def kill_marked(marker: str) -> list[str]:
    """SIGKILL every process whose argv holds `marker` (a probe's survivors). psutil checks
    that a pid still names the process it found, so a reused pid is never hit."""
    killed = []
    for proc in marked(marker):
        with contextlib.suppress(psutil.Error):
            proc.kill()
            killed.append(f"process {proc.pid}: {' '.join(proc.info['cmdline'])}")
    return killed


CGROUP_ROOT = Path("/sys/fs/cgroup")
VICTIM = "orvanta-victim-"  # `<VICTIM><pid>-<start>-<random>`: its run's (conformance.leftovers)


def make_victim_cgroup() -> Path | None:
    """A cgroup the harness owns, for probes to try to freeze, join or write (R-HOST-2)."""
    v2 = (CGROUP_ROOT / "cgroup.controllers").exists()
    base = CGROUP_ROOT if v2 else CGROUP_ROOT / "freezer"
    victim = base / f"{owned_prefix(VICTIM)}{secrets.token_hex(4)}"
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
        kill_members(path)
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
    ipcrm = shutil.which("ipcrm", path=f"{os.environ.get('PATH', '')}:/usr/bin:/bin") or "ipcrm"
    if subprocess.run([ipcrm, "-M", str(key)], capture_output=True, check=False).returncode == 0:
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
        removed += [f"pid {pid} in the victim cgroup" for pid in kill_members(victim)]
    return removed


def kill_members(group: Path) -> list[str]:
    """SIGKILL every process in a cgroup; returns their pids."""
    try:
        pids = (group / "cgroup.procs").read_text().split()
    except OSError:
        return []
    for pid in pids:
        with contextlib.suppress(ProcessLookupError):
            os.kill(int(pid), signal.SIGKILL)
    return pids


def mq_unlink(name: str) -> bool:
    """Remove a POSIX message queue by name (no /dev/mqueue needed); True if one was there."""
    import ctypes
    import ctypes.util

    lib = ctypes.CDLL(ctypes.util.find_library("rt") or "libc.so.6", use_errno=True)
    return bool(lib.mq_unlink(name.encode()) == 0)
