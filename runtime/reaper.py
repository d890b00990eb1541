"""Fallback cleanup where no cgroup can be made: the worker as child subreaper.

With PR_SET_CHILD_SUBREAPER, a job's orphaned descendants (double-forked
daemons, setsid children) are re-parented to the worker instead of init, so
after a job the worker can find them as its own children and kill them. A
worker runs one job at a time, so every such child belongs to the job just
finished.
"""

from __future__ import annotations

import contextlib
import ctypes
import logging
import os
import signal
import time

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


def own_children() -> list[int]:
    me = os.getpid()
    children = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat", "rb") as f:
                stat = f.read()
        except OSError:
            continue
        # the comm field may hold spaces and parentheses: ppid follows the last ')'
        fields = stat[stat.rfind(b")") + 2 :].split()
        if int(fields[1]) == me:
            children.append(int(entry))
    return children


def kill_orphans(deadline: float = 5.0) -> int:
    """Kill and reap every child the worker inherited from the finished job."""
    killed = 0
    end = time.monotonic() + deadline
    while time.monotonic() < end:
        children = own_children()
        if not children:
            break
        for pid in children:
            try:
                os.kill(pid, signal.SIGKILL)
                killed += 1
            except ProcessLookupError:
                pass
            with contextlib.suppress(ChildProcessError):
                os.waitpid(pid, 0)
    return killed
