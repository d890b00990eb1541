"""The OOM killer takes the job, not the worker; tini makes that exit code 137 (R-PID-2, R-NSJ-3).

The worker and its job share one cgroup v1 memory group limited to 200M, as a worker in a
memory-limited container would: when the job fills it, the kernel must pick the job.
"""

from __future__ import annotations

import os
import secrets
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from cli_helpers import CliRun, job_output, kill_all

pytestmark = pytest.mark.integration

MEMORY_ROOT = Path("/sys/fs/cgroup/memory")
CAP_SYS_RESOURCE = 24

HOG = """
chunks = []
while True:
    chunks.append(bytearray(10 * 1024 * 1024))
"""


@pytest.fixture
def memory_cgroup() -> Iterator[Path]:
    if not MEMORY_ROOT.is_dir():
        pytest.skip("no cgroup v1 memory hierarchy at /sys/fs/cgroup/memory")
    path = MEMORY_ROOT / f"orvanta-test-{secrets.token_hex(4)}"
    try:
        path.mkdir()
    except OSError as exc:
        pytest.skip(f"cannot create a memory cgroup under {MEMORY_ROOT}: {exc}")
    try:
        (path / "memory.limit_in_bytes").write_text("200M")
        yield path
    finally:
        for _ in range(100):
            try:
                kill_all([int(p) for p in (path / "cgroup.procs").read_text().split()])
                path.rmdir()
                break
            except OSError:
                time.sleep(0.05)


def join(cgroup: Path) -> Callable[[], None]:
    procs = str(cgroup / "cgroup.procs")

    def enter() -> None:  # in the CLI's child before exec: the worker and its job live here
        with open(procs, "w") as f:
            f.write(str(os.getpid()))

    return enter


def has_capability(bit: int) -> bool:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("CapEff:"):
            return bool(int(line.split()[1], 16) & (1 << bit))
    return False


@pytest.mark.req("R-PID-2", "R-NSJ-3", "R-CFG-3")
@pytest.mark.parametrize("backend", ["unshare"])
def test_oom_killed_job_exits_137_with_tini(
    run_job: Callable[..., CliRun], backend_env: dict[str, str], memory_cgroup: Path
) -> None:
    rc, result, stderr = run_job(HOG, env=backend_env, preexec_fn=join(memory_cgroup), timeout=60)
    # the `orvanta run` process survived to print the record: the job was the victim
    assert result is not None, f"rc={rc}\n{stderr}"
    assert result["isolation"] == "unshare"
    assert result["exit_code"] == 137, result
    assert result["status"] == "failure"
    assert rc == 137
    assert "tini: found" in stderr
    assert int((memory_cgroup / "memory.failcnt").read_text()) > 0  # the limit was really hit


@pytest.mark.req("R-PID-2", "R-NSJ-3", "R-CFG-3")
@pytest.mark.parametrize("backend", ["unshare"])
def test_oom_killed_job_without_tini(
    run_job: Callable[..., CliRun], backend_env: dict[str, str], memory_cgroup: Path
) -> None:
    env = {**backend_env, "UNSHARE_TINI_PATH": "/nonexistent/tini"}
    rc, result, stderr = run_job(HOG, env=env, preexec_fn=join(memory_cgroup), timeout=60)
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
    assert int((memory_cgroup / "memory.failcnt").read_text()) > 0


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
