"""The OOM killer takes the job, not the worker; tini makes that exit code 137 (R-PID-2, R-NSJ-3).

cgroup v1: the worker and its job share one memory group limited to 200M, as a worker in a
memory-limited container would: when the job fills it, the kernel must pick the job.
cgroup v2: a job's tracking group leaves the worker's (it lives under orvanta/ at the
cgroup root), so the 200M limit is set on orvanta/, the parent of every job's group.
"""

from __future__ import annotations

import contextlib
import os
import secrets
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
from cli_helpers import CliRun, cannot_test, job_output, jobs_cgroup, kill_all

from runtime import cgroups

pytestmark = pytest.mark.integration

CAP_SYS_RESOURCE = 24
LIMIT = str(200 * 1024 * 1024)

HOG = """
chunks = []
while True:
    chunks.append(bytearray(10 * 1024 * 1024))
"""


@dataclass
class MemoryLimit:
    path: Path
    v2: bool

    def join(self) -> Callable[[], None] | None:
        """v1: the CLI's child enters the group before exec, so the worker and job live there;
        v2: nothing to join (the job's own group is below the limited one)."""
        if self.v2:
            return None
        procs = str(self.path / "cgroup.procs")

        def enter() -> None:
            with open(procs, "w") as f:
                f.write(str(os.getpid()))

        return enter

    def hit(self) -> int:
        """How often the limit was hit (v1 memory.failcnt, v2 memory.events' oom_kill)."""
        if not self.v2:
            return int((self.path / "memory.failcnt").read_text())
        events = dict(
            line.split() for line in (self.path / "memory.events").read_text().splitlines()
        )
        return int(events["oom_kill"])


@pytest.fixture
def memory_cgroup() -> Iterator[MemoryLimit]:
    if cgroups.is_v2():
        yield from _v2_limit()
        return
    root = cgroups.ROOT / "memory"
    if not root.is_dir():
        cannot_test(f"no cgroup v1 memory hierarchy at {root}")
    path = root / f"orvanta-test-{secrets.token_hex(4)}"
    try:
        path.mkdir()
    except OSError as exc:
        cannot_test(f"cannot create a memory cgroup under {root}: {exc}")
    try:
        (path / "memory.limit_in_bytes").write_text("200M")
        yield MemoryLimit(path, v2=False)
    finally:
        for _ in range(100):
            try:
                kill_all([int(p) for p in (path / "cgroup.procs").read_text().split()])
                path.rmdir()
                break
            except OSError:
                time.sleep(0.05)


def _v2_limit() -> Iterator[MemoryLimit]:
    path = jobs_cgroup()
    if "memory" not in (cgroups.ROOT / "cgroup.subtree_control").read_text().split():
        cannot_test(f"the memory controller is not enabled below {cgroups.ROOT}")
    try:
        path.mkdir(exist_ok=True)
        before = (path / "memory.max").read_text().strip()
        if before != "max" and int(before) <= int(LIMIT):
            before = ""  # a platform's own limit (uml-cgroup2's jobs_memory): keep it
        else:
            (path / "memory.max").write_text(LIMIT)
    except OSError as exc:
        cannot_test(f"cannot limit {path}/memory.max: {exc}")
    try:
        yield MemoryLimit(path, v2=True)
    finally:
        if before:
            with contextlib.suppress(OSError):
                (path / "memory.max").write_text(before)


def has_capability(bit: int) -> bool:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("CapEff:"):
            return bool(int(line.split()[1], 16) & (1 << bit))
    return False


@pytest.mark.req("R-PID-2", "R-NSJ-3", "R-CFG-3")
@pytest.mark.parametrize("backend", ["unshare"])
def test_oom_killed_job_exits_137_with_tini(
    run_job: Callable[..., CliRun], backend_env: dict[str, str], memory_cgroup: MemoryLimit
) -> None:
    before = memory_cgroup.hit()
    rc, result, stderr = run_job(HOG, env=backend_env, preexec_fn=memory_cgroup.join(), timeout=60)
    # the `orvanta run` process survived to print the record: the job was the victim
    assert result is not None, f"rc={rc}\n{stderr}"
    assert result["isolation"] == "unshare"
    assert result["exit_code"] == 137, result
    assert result["status"] == "failure"
    assert rc == 137
    assert "tini: found" in stderr
    assert memory_cgroup.hit() > before  # the limit was really hit


@pytest.mark.req("R-PID-2", "R-NSJ-3", "R-CFG-3")
@pytest.mark.parametrize("backend", ["unshare"])
def test_oom_killed_job_without_tini(
    run_job: Callable[..., CliRun], backend_env: dict[str, str], memory_cgroup: MemoryLimit
) -> None:
    env = {**backend_env, "UNSHARE_TINI_PATH": "/nonexistent/tini"}
    before = memory_cgroup.hit()
    rc, result, stderr = run_job(HOG, env=env, preexec_fn=memory_cgroup.join(), timeout=60)
    assert result is not None, f"rc={rc}\n{stderr}"
    assert result["isolation"] == "unshare"
    # without an init, unshare itself reports the killed PID 1 badly (measured: exit 1)
    assert result["exit_code"] != 137, result
    assert "sigprocmask" in result["stderr"]
    # and the worker warned about exactly this at start
    warning = [line for line in stderr.splitlines() if "tini: not available" in line]
    assert warning, stderr
    assert "/nonexistent/tini" in warning[0]
    assert "137" in warning[0]
    assert memory_cgroup.hit() > before


OOM_SCORES = """
import json, os
def score(pid):
    try:
        return int(open(f"/proc/{pid}/oom_score_adj").read())
    except OSError:
        return None
print(json.dumps({"job": score("self"), "parent": score(os.getppid()) if os.getppid() else None}))
"""


@pytest.mark.req("R-NSJ-3")
def test_job_volunteers_for_the_oom_killer(
    run_job: Callable[..., CliRun], backend: str, backend_env: dict[str, str]
) -> None:
    run = run_job(OOM_SCORES, env=backend_env)
    scores = job_output(run)
    assert scores["job"] == 1000
    if backend == "none":  # the parent is the worker itself
        if has_capability(CAP_SYS_RESOURCE):
            assert scores["parent"] == -900
        else:
            assert scores["parent"] != -900
            assert "cannot lower the worker's oom_score_adj" in run.stderr
            assert "CAP_SYS_RESOURCE" in run.stderr
