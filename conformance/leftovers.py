"""What a killed run left on this host, found by its name and its ledger, removed by the next run.

A run that ends normally removes everything itself (`CellSession.close`, the fixtures).
A run killed with SIGKILL runs no teardown:
- its host workers keep polling their queue;
- its neighbour's files and IPC objects stay in /tmp, /dev/shm and the kernel;
- its cells dir and victim cgroups stay too.

So each cell writes down the workers it starts, the probe tokens it hands out, the jobs
it submits and its victim cgroup (`note`, into a ledger in its own dir). Run dirs carry
their run's id in their names (`conformance.platforms.session.owned_prefix`), and so do
victim cgroups, for a reader's sake.

The next run reaps every run that is dead (`reap_dead_runs`), after its containers and
guests are gone:
- it stops the workers of all of them at once, by pid and start time: SIGTERM, again until
  they exit (the second stops the running job, and the worker removes its mounts and
  cgroups), then SIGKILL;
- it kills and removes what is left of the jobs' cgroups (a worker that had to be killed);
- it removes what each token may have left (`cleanup_host`);
- it removes the victim cgroups, then the dir.
"""

from __future__ import annotations

import contextlib
import logging
import os
import re
import stat
import time
from collections.abc import Callable
from pathlib import Path

import psutil

from conformance.platforms.host import CGROUP_ROOT, VICTIM, cleanup_host, remove_cgroup
from conformance.platforms.session import alive, dead_owned
from runtime.jobdir import remove_tree

log = logging.getLogger("orvanta.conformance")

CELLS_DIR = "orvanta-cells-"  # a run's cells: `<tmp>/orvanta-cells-<pid>-<start>-<random>/`
LEDGER = "left-on-host"  # in each cell's dir: `worker <pid>:<start>`, `token <hex>`, `job <id>`,
# `victim <cgroup path>`
STOP_SECONDS = 15.0  # a worker's grace to remove its job's mounts and cgroups
AGAIN_SECONDS = 0.2  # between SIGTERMs: two pending at once would count as one


def note(cell_root: Path, kind: str, value: str) -> None:
    """Write down something this cell is about to leave on the host, before making it."""
    with open(cell_root / LEDGER, "a") as ledger:
        ledger.write(f"{kind} {value}\n")


def reap_dead_runs() -> list[str]:
    """Remove what runs that are no longer alive left: their workers, their jobs' cgroups,
    the files and IPC objects of their tokens, their victim cgroups and their cells dirs.
    Only a dir and ledger this user owns (never through a symlink) are read, and only
    entries of the exact shape this module writes are acted on: /tmp is everyone's."""
    removed: list[str] = []
    try:  # never the run's own failure: what cannot go now, the next run tries again
        dead = {run: _ledger(run) for run in dead_owned(CELLS_DIR) if _own(run, stat.S_ISDIR)}
        removed += _stop([w for entries in dead.values() for w in entries["worker"]])
        for run_dir, entries in dead.items():
            for job_id in entries["job"]:
                removed += _remove_job_groups(job_id)
            for token in entries["token"]:
                removed += cleanup_host(token, None)
            for victim in entries["victim"]:
                if Path(victim).is_dir():
                    remove_cgroup(Path(victim))
                    removed.append(victim)
            remove_tree(run_dir)
            removed.append(str(run_dir))
    except Exception:
        log.exception("removing what killed runs left failed; the next run tries again")
    if removed:
        log.warning("removed what killed runs left on this host: %s", removed)
    return removed


HEX_ID = re.compile(r"[0-9a-f]{16}")  # a probe token or a job id
SHAPES = {
    "worker": re.compile(r"\d+:\d+"),
    "token": HEX_ID,
    "job": HEX_ID,
    "victim": re.compile(rf"{re.escape(str(CGROUP_ROOT))}/(freezer/)?{VICTIM}[0-9a-f-]+"),
}


def _own(path: Path, kind: Callable[[int], bool]) -> bool:
    """`path` itself (not a link's target) is of `kind` and belongs to this user."""
    try:
        info = path.lstat()
    except OSError:
        return False
    return kind(info.st_mode) and info.st_uid == os.geteuid()


def _ledger(run_dir: Path) -> dict[str, list[str]]:
    """What the cells of a run wrote down, by kind; lines of any other shape are ignored."""
    found: dict[str, list[str]] = {kind: [] for kind in SHAPES}
    with contextlib.suppress(OSError):
        for cell in sorted(run_dir.iterdir()):
            ledger = cell / LEDGER
            if not (_own(cell, stat.S_ISDIR) and _own(ledger, stat.S_ISREG)):
                continue
            with contextlib.suppress(OSError):
                for line in ledger.read_text().splitlines():
                    kind, _, value = line.partition(" ")
                    if kind in SHAPES and SHAPES[kind].fullmatch(value):
                        found[kind].append(value)
    return found


def _stop(workers: list[str]) -> list[str]:
    """SIGTERM each worker that is still the process written down (its pid, its start time,
    a worker's command line) every AGAIN_SECONDS: the second stops its running job. What is
    left after STOP_SECONDS gets SIGKILL."""
    procs = []
    for owner in workers:
        if not alive(owner):
            continue
        with contextlib.suppress(psutil.Error):
            proc = psutil.Process(int(owner.partition(":")[0]))
            if {"runtime.cli", "worker"} <= set(proc.cmdline()):
                procs.append(proc)
    left = procs
    end = time.monotonic() + STOP_SECONDS
    while left and time.monotonic() < end:  # again and again: two pending at once are one
        for proc in left:
            with contextlib.suppress(psutil.Error):
                proc.terminate()
        time.sleep(AGAIN_SECONDS)
        left = [proc for proc in left if _running(proc)]
    for proc in left:
        with contextlib.suppress(psutil.Error):
            proc.kill()
    while left and time.monotonic() < end + STOP_SECONDS:
        time.sleep(AGAIN_SECONDS)
        left = [proc for proc in left if _running(proc)]
    return [f"worker {proc.pid}" for proc in procs]


def _running(proc: psutil.Process) -> bool:
    """Not ended: a killed run's worker is nobody's child here, and may stay a zombie (its
    new parent a subreaper that never waits for it), which psutil would wait for in vain."""
    try:
        return proc.is_running() and proc.status() != psutil.STATUS_ZOMBIE
    except psutil.Error:
        return False


def _remove_job_groups(job_id: str) -> list[str]:
    """A job's cgroups in every hierarchy (runtime.cgroups.job_group), their processes killed."""
    found = [CGROUP_ROOT / "orvanta" / f"job-{job_id}"]
    found += CGROUP_ROOT.glob(f"*/orvanta/job-{job_id}")
    removed = []
    for group in found:
        if group.is_dir():
            remove_cgroup(group)
            removed.append(str(group))
    return removed
