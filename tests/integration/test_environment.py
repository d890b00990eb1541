"""What a job can learn about the worker: environment, /proc, memory (R-JOB-1, R-TBL-*)."""

from __future__ import annotations

from collections.abc import Callable

import pytest
from cli_helpers import CliRun, job_output

pytestmark = pytest.mark.integration

OWN_ENV = """
import json, os
print(json.dumps(dict(os.environ)))
"""

# Reads what a curious job would read. It reports canary tokens it finds (of any test run:
# it does not know ours), never its own memory or environment.
SNOOP = r"""
import json, os, re

TOKEN = re.compile(rb"ORVANTA_CANARY_[0-9a-f]{16}")
me = os.getpid()


def read(path):
    try:
        with open(path, "rb") as f:
            return f.read()
    except OSError:
        return b""


def tokens(data):
    return sorted({m.decode() for m in TOKEN.findall(data)})


def stack_tokens(pid):
    for line in read(f"/proc/{pid}/maps").decode(errors="replace").splitlines():
        if line.endswith("[stack]"):
            start, end = (int(x, 16) for x in line.split()[0].split("-"))
            try:
                with open(f"/proc/{pid}/mem", "rb") as mem:
                    mem.seek(start)
                    return tokens(mem.read(end - start))
            except (OSError, ValueError, OverflowError):
                return []
    return []


ppid = os.getppid()
pids = sorted(int(p) for p in os.listdir("/proc") if p.isdigit())
others = [p for p in pids if p != me]
report = {
    "ppid": ppid,
    "proc_pids": pids,
    "parent_environ": tokens(read(f"/proc/{ppid}/environ")) if ppid else [],
    "pid1_environ": tokens(read("/proc/1/environ")) if me != 1 else [],
    "environ_hits": {p: t for p in others if (t := tokens(read(f"/proc/{p}/environ")))},
    "memory_hits": {p: t for p in others if (t := stack_tokens(p))},
}
print(json.dumps(report))
"""


@pytest.mark.req("R-JOB-1")
def test_job_environment_is_an_allow_list(
    run_job: Callable[..., CliRun], backend: str, backend_env: dict[str, str], canary: str
) -> None:
    run = run_job(OWN_ENV, env=backend_env, args=["--env", "MY_VAR=hello"])
    env = job_output(run)
    assert run.result is not None and run.result["isolation"] == backend
    assert "DATABASE_URL" not in env
    assert "ORVANTA_WORKER_TOKEN" not in env
    assert "ORVANTA_STATE_DIR" not in env
    assert not [k for k, v in env.items() if canary in k or canary in v]
    assert env["MY_VAR"] == "hello"  # the job's own variable does pass
    assert env["ORVANTA_JOB_ID"] == run.result["job_id"]
    assert {"PATH", "HOME"} <= set(env)
    assert set(env) <= {"PATH", "HOME", "LANG", "LC_CTYPE", "ORVANTA_JOB_ID", "MY_VAR"}, env


@pytest.mark.req("R-TBL-ENV", "R-TBL-PROC", "R-TBL-MEM")
@pytest.mark.parametrize("backend", ["none"])
def test_without_isolation_the_worker_is_exposed(
    run_job: Callable[..., CliRun], backend_env: dict[str, str], canary: str
) -> None:
    """The positive control: the snooping job does find the secret when nothing isolates it."""
    report = job_output(run_job(SNOOP, env=backend_env))
    ppid = str(report["ppid"])
    assert canary in report["parent_environ"]
    assert canary in report["environ_hits"][ppid]
    assert canary in report["memory_hits"][ppid]
    assert report["ppid"] in report["proc_pids"]
    assert len(report["proc_pids"]) > 5  # the host's processes


@pytest.mark.req("R-TBL-ENV", "R-TBL-PROC", "R-TBL-MEM", "R-JOB-1")
@pytest.mark.parametrize("backend", ["unshare", "nsjail"])
def test_isolation_hides_the_worker(
    run_job: Callable[..., CliRun], backend: str, backend_env: dict[str, str]
) -> None:
    run = run_job(SNOOP, env=backend_env)
    report = job_output(run)
    assert run.result is not None and run.result["isolation"] == backend
    assert report["parent_environ"] == []
    assert report["pid1_environ"] == []
    assert report["environ_hits"] == {}
    assert report["memory_hits"] == {}
    # only the job's own namespace: its init (tini / the jailed process) and the job
    assert 1 <= len(report["proc_pids"]) <= 3, report["proc_pids"]
    assert max(report["proc_pids"]) <= 3, report["proc_pids"]


@pytest.mark.req("R-PID-NOPROC", "R-CFG-2")
@pytest.mark.parametrize("backend", ["unshare"])
def test_without_mount_proc_host_processes_stay_visible(
    run_job: Callable[..., CliRun], backend_env: dict[str, str]
) -> None:
    """The page's warning, checked: a PID namespace without --mount-proc hides nothing in /proc."""
    flags = {"UNSHARE_ISOLATION_FLAGS": "--user --map-root-user --pid --fork"}
    run = run_job(SNOOP, env={**backend_env, **flags})
    report = job_output(run)
    assert run.result is not None and run.result["isolation"] == "unshare"
    assert len(report["proc_pids"]) > 5
    assert max(report["proc_pids"]) > 3
