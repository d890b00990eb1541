"""What a killed run left on this host, found by its name and its ledger, removed by the next run.

A run that ends normally removes everything itself (`CellSession.close`, the fixtures).
A run killed with SIGKILL runs no teardown:
- its host workers keep polling their queue;
- its neighbour's files and IPC objects stay in /tmp, /dev/shm and the kernel;
- its cells dir and victim cgroups stay too.

So each cell writes down the workers it starts, the probe tokens it hands out and the
jobs it submits (`note`, into a ledger in its own dir). Run dirs and victim cgroups carry
their run's id in their names (`conformance.platforms.session.owned_prefix`).

The next run reaps every run that is dead (`reap_dead_runs`), after its containers and
guests are gone:
- it stops the workers, by pid and start time: SIGTERM twice (the second stops the running
  job as a cancel does, and the worker removes its mounts and cgroups), then SIGKILL;
- it kills and removes what is left of the jobs' cgroups (a worker that had to be killed);
- it removes what each token may have left (`cleanup_host`);
- it removes the victim cgroups, then the dir.
"""

from __future__ import annotations

import contextlib
import logging
import time
from pathlib import Path

import psutil

from conformance.platforms.host import CGROUP_ROOT, VICTIM, cleanup_host, remove_cgroup
from conformance.platforms.session import alive, dead_owned
from runtime.jobdir import remove_tree

log = logging.getLogger("orvanta.conformance")

CELLS_DIR = "orvanta-cells-"  # a run's cells: `<tmp>/orvanta-cells-<pid>-<start>-<random>/`
LEDGER = "left-on-host"  # in each cell's dir: `worker <pid>:<start>`, `token <hex>`, `job <id>`
STOP_SECONDS = 15.0  # a worker's grace to remove its job's mounts and cgroups
AGAIN_SECONDS = 0.2  # between the two SIGTERMs: two pending at once would count as one


def note(cell_root: Path, kind: str, value: str) -> None:
    """Write down something this cell is about to leave on the host, before making it."""
    with open(cell_root / LEDGER, "a") as ledger:
        ledger.write(f"{kind} {value}\n")


def reap_dead_runs() -> list[str]:
    """Remove what runs that are no longer alive left: their workers, the files and IPC
    objects of their tokens, their victim cgroups and their cells dirs. Returns what went."""
    removed: list[str] = []
    for run_dir in dead_owned(CELLS_DIR):
        workers, tokens, jobs = _ledger(run_dir)
        removed += _stop(workers)
        for job_id in jobs:
            removed += _remove_job_groups(job_id)
        for token in tokens:
            removed += cleanup_host(token, None)
        remove_tree(run_dir)
        removed.append(str(run_dir))
    for base in (CGROUP_ROOT, CGROUP_ROOT / "freezer"):
        for group in dead_owned(VICTIM, base) if base.is_dir() else []:
            remove_cgroup(group)
            removed.append(str(group))
    if removed:
        log.warning("removed what killed runs left on this host: %s", removed)
    return removed


def _ledger(run_dir: Path) -> tuple[list[str], list[str], list[str]]:
    """The workers (`pid:start`), tokens and job ids the cells of a run wrote down."""
    workers: list[str] = []
    tokens: list[str] = []
    jobs: list[str] = []
    for ledger in sorted(run_dir.glob(f"*/{LEDGER}")):
        with contextlib.suppress(OSError):
            for line in ledger.read_text().splitlines():
                kind, _, value = line.partition(" ")
                if kind == "worker":
                    workers.append(value)
                elif kind == "token" and value.isalnum():  # it becomes part of glob patterns
                    tokens.append(value)
                elif kind == "job" and value.isalnum():  # and of a cgroup's path
                    jobs.append(value)
    return workers, tokens, jobs


def _stop(workers: list[str]) -> list[str]:
    """TERM each worker that is still the process written down, wait, then KILL the rest."""
    procs = []
    for owner in workers:
        pid = owner.partition(":")[0]
        if alive(owner):
            with contextlib.suppress(psutil.Error):
                procs.append(psutil.Process(int(pid)))
    for _ in range(2):
        for proc in procs:
            with contextlib.suppress(psutil.Error):
                proc.terminate()
        time.sleep(AGAIN_SECONDS if procs else 0)
    _, left = psutil.wait_procs(procs, timeout=STOP_SECONDS)
    for proc in left:
        with contextlib.suppress(psutil.Error):
            proc.kill()
    psutil.wait_procs(left, timeout=STOP_SECONDS)
    return [f"worker {proc.pid}" for proc in procs]


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
