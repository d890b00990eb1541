"""The worker as child subreaper: a job's process that escapes its cgroup is still found.

With PR_SET_CHILD_SUBREAPER, a job's orphaned descendants (double-forked
daemons, setsid children) are re-parented to the worker instead of init. A
worker runs one job at a time, so after a job every child it has belongs to
the job just finished. Where no cgroup can be made (a read-only cgroupfs)
this is how the job's leftovers are killed; where one can, a process found
here has moved itself out of the job's cgroup, or frozen itself, and the job's
result says so (R-HOST-5) instead of claiming a clean end.
"""

from __future__ import annotations

import contextlib
import ctypes
import logging
import os
import signal
import subprocess
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

from runtime.cgroups import ROOT, is_v2, read_small

log = logging.getLogger("orvanta.reaper")

PR_SET_CHILD_SUBREAPER = 36
_is_subreaper = False


def become_subreaper() -> None:
    global _is_subreaper
    if _is_subreaper:
        return
    libc = ctypes.CDLL(None, use_errno=True)
    if libc.prctl(PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0) != 0:
        log.warning("prctl(PR_SET_CHILD_SUBREAPER) failed: %s", os.strerror(ctypes.get_errno()))
        return
    _is_subreaper = True


_helpers: set[int] = set()  # children the worker runs for itself (runtime.tidier), no job's
_helpers_lock = threading.Lock()


def run_helper(argv: list[str]) -> int:
    """Run a program of the worker's own to its end, from any thread: while it runs,
    kill_orphans knows it is no leftover of the job that is running meanwhile."""
    with _helpers_lock:
        proc = subprocess.Popen(argv, stdin=subprocess.DEVNULL)
        _helpers.add(proc.pid)
    try:
        return proc.wait()
    finally:
        with _helpers_lock:
            _helpers.discard(proc.pid)


def spawning() -> threading.Lock:
    """Held while the worker spawns a job: no helper starts inside the job's cgroup."""
    return _helpers_lock


def _job_children(spared: frozenset[int]) -> list[int]:
    with _helpers_lock:
        return [pid for pid in own_children() if pid not in spared and pid not in _helpers]


def own_children() -> list[int]:
    """This process's children, from /proc/self/task/*/children (a few small reads)."""
    children: list[int] = []
    try:
        tasks = os.listdir("/proc/self/task")
    except OSError:
        return children
    for tid in tasks:
        try:
            children += [int(pid) for pid in read_small(f"/proc/self/task/{tid}/children").split()]
        except OSError:
            continue
    return children


@dataclass
class Orphans:
    """What the worker found of a finished job among its own children."""

    outside_cgroup: bool  # the job had a cgroup: these left it
    killed: list[int] = field(default_factory=list)
    survived: list[int] = field(default_factory=list)

    def notes(self) -> list[str]:
        notes = []
        if self.killed and self.outside_cgroup:
            notes.append(
                f"found {len(self.killed)} process(es) of the job outside its cgroup after it "
                f"ended (pids {_pids(self.killed)}); killed them"
            )
        elif self.killed:
            notes.append(f"killed {len(self.killed)} leftover process(es) of the job")
        if self.survived:
            notes.append(
                f"error: {len(self.survived)} process(es) of the job survived it "
                f"(pids {_pids(self.survived)}): they could not be killed"
            )
        return notes


def kill_orphans(
    outside_cgroup: bool = False, spared: frozenset[int] = frozenset(), deadline: float = 5.0
) -> Orphans:
    """Kill and reap every child the worker inherited from the finished job; a frozen one is
    thawed first, since a frozen process cannot die. `spared`: children the process had
    before the job started (a test harness running jobs in-process has its own)."""
    orphans = Orphans(outside_cgroup)
    end = time.monotonic() + deadline
    pending = _job_children(spared)
    thawed: set[int] = set()
    while pending:
        for pid in pending:
            if pid not in orphans.killed and not _exited(pid):
                orphans.killed.append(pid)
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
            with contextlib.suppress(ChildProcessError):
                os.waitpid(pid, os.WNOHANG)
        pending = _job_children(spared)
        for pid in pending:
            if pid not in thawed:
                thawed.add(pid)
                _thaw(pid)
        if time.monotonic() > end:
            orphans.survived = pending
            break
        if pending:
            time.sleep(0.005)
    return orphans


def _exited(pid: int) -> bool:
    """Already dead and waiting to be reaped (a launcher's helper that ended with the job, as
    bwrap's init does): no survivor to report. Asked of the kernel without reaping it; a
    leader whose other threads still run is not waitable, so it counts as alive."""
    try:
        return os.waitid(os.P_PID, pid, os.WEXITED | os.WNOHANG | os.WNOWAIT) is not None
    except ChildProcessError:
        return True


def _thaw(pid: int) -> None:
    """Thaw the freezer group (v1) or the cgroup (v2) that holds `pid`. A v1 host's
    unified hierarchy, where there is one, is at `unified/`. Opened without O_CREAT: on v1
    /sys/fs/cgroup is a tmpfs, where a write to a path that is no group's file made a
    stray regular file."""
    try:
        lines = Path(f"/proc/{pid}/cgroup").read_text().splitlines()
    except OSError:
        return
    for line in lines:
        _, controllers, path = line.split(":", 2)
        if controllers == "":
            unified = ROOT if is_v2() else ROOT / "unified"
            target = unified / path.lstrip("/") / "cgroup.freeze"
            value = b"0"
        elif "freezer" in controllers.split(","):
            target = ROOT / "freezer" / path.lstrip("/") / "freezer.state"
            value = b"THAWED"
        else:
            continue
        try:
            fd = os.open(target, os.O_WRONLY | os.O_CLOEXEC)
            try:
                os.write(fd, value)
            finally:
                os.close(fd)
            log.warning("thawed %s to kill process %d of a finished job", target.parent, pid)
        except OSError as exc:
            log.debug("cannot thaw %s: %s", target, exc)


def _pids(pids: list[int]) -> str:
    shown = ", ".join(str(p) for p in pids[:10])
    return shown + (f" and {len(pids) - 10} more" if len(pids) > 10 else "")
