"""Nothing of a job outlives it: processes, directory, deadline, output (R-JOB-3..5)."""

from __future__ import annotations

import json
import math
import re
import time
from collections.abc import Callable
from pathlib import Path

import pytest
from cli_helpers import (
    DAEMON,
    PRINT_NSJAIL_CGROUPS,
    CliRun,
    job_cgroup,
    nsjail_cgroup_dirs,
    processes_with,
    tidy_cgroups,
)

pytestmark = pytest.mark.integration

SLEEPER = (
    PRINT_NSJAIL_CGROUPS
    + """
import subprocess, time
subprocess.Popen(["sh", "-c", "sleep 300; : {marker}"])
print("started", flush=True)
time.sleep(30)
print("not reached")
"""
)


def jobs_root(state_dir: Path) -> Path:
    from runtime.settings import Settings

    return Settings(state_dir=state_dir).job_root


def jobs_left(state_dir: Path) -> list[str]:
    jobs = jobs_root(state_dir)
    assert jobs.is_dir(), f"{jobs} was never created"
    return sorted(p.name for p in jobs.iterdir())


@pytest.mark.req("R-JOB-3", "R-JOB-5")
def test_daemon_started_by_a_job_does_not_survive_it(
    run_job: Callable[..., CliRun],
    backend: str,
    backend_env: dict[str, str],
    marker: str,
    state_dir: Path,
) -> None:
    rc, result, stderr = run_job(DAEMON.format(marker=marker), env=backend_env, suffix=".sh")
    assert result is not None, stderr
    assert result["isolation"] == backend
    assert result["stdout"] == "DAEMON-UP\n", result  # it really ran
    assert result["status"] == "success" and rc == 0
    assert processes_with(marker) == []
    assert not job_cgroup(result["job_id"]).exists()
    assert jobs_left(state_dir) == []
    if backend == "none":
        # nothing else stopped the daemon: the worker found and killed it
        assert any(re.search(r"killed \d+ leftover process", line) for line in result["log"])


@pytest.mark.req("R-JOB-4", "R-JOB-3", "R-JOB-5")
def test_timeout_kills_the_whole_job(
    run_job: Callable[..., CliRun],
    backend: str,
    backend_env: dict[str, str],
    marker: str,
    state_dir: Path,
) -> None:
    started = time.monotonic()
    quick = run_job("print('quick')", env=backend_env, timeout=20)
    start_up = time.monotonic() - started  # the CLI's own start and end (seconds in a UML guest)
    assert quick.result is not None, quick
    # 1 s, or more where a bare job's start alone takes a good part of it (a loaded UML guest:
    # the sleeper's Python had not printed yet when its 1 s was up; it imports and forks too)
    timeout = max(1, math.ceil(8 * quick.result["duration"]))
    started = time.monotonic()
    rc, result, stderr = run_job(
        SLEEPER.format(marker=marker),
        env=backend_env,
        args=["--timeout", str(timeout)],
        timeout=20 + timeout,
    )
    elapsed = time.monotonic() - started
    assert result is not None, stderr
    tidy_cgroups(nsjail_cgroup_dirs(result["stderr"]))  # see test_nsjail_cgroups_are_removed
    assert result["isolation"] == backend
    assert result["status"] == "timeout", result
    assert result["stdout"] == "started\n"
    assert timeout <= result["duration"] < timeout + 4
    # nothing waits once the job is killed (a leftover holding the pipes, a thread)
    assert elapsed < start_up + result["duration"] + 2, (
        f"orvanta run took {elapsed:.1f}s for a {timeout}s timeout; a quick job's run "
        f"{start_up:.1f}s"
    )
    assert any(f"timed out after {timeout}s" in line for line in result["log"]), result["log"]
    assert rc != 0
    assert processes_with(marker) == []
    assert jobs_left(state_dir) == []


@pytest.mark.req("R-JOB-4")
@pytest.mark.parametrize("backend", ["none", "nsjail"])
def test_huge_output_is_truncated_with_a_note(
    run_job: Callable[..., CliRun], backend_env: dict[str, str]
) -> None:
    script = "import sys\nsys.stdout.write('x' * 5_000_000)\nsys.stderr.write('done')\n"
    rc, result, stderr = run_job(script, env={**backend_env, "ORVANTA_OUTPUT_LIMIT": "65536"})
    assert result is not None, stderr
    assert result["status"] == "success" and rc == 0
    kept, _, note = result["stdout"].partition("\n")
    assert kept == "x" * 65536
    assert note == f"[output truncated: {5_000_000 - 65536} more bytes dropped]\n"
    assert result["stderr"] == "done"
    assert f"stdout truncated at 65536 bytes ({5_000_000 - 65536} bytes dropped)" in result["log"]


@pytest.mark.req("R-JOB-4")
def test_output_under_the_limit_is_untouched(run_job: Callable[..., CliRun]) -> None:
    script = "print('y' * 1000)\n"
    _rc, result, stderr = run_job(script, env={"ORVANTA_OUTPUT_LIMIT": "65536"})
    assert result is not None, stderr
    assert result["stdout"] == "y" * 1000 + "\n"
    assert not any("truncated" in line for line in result["log"])


@pytest.mark.req("R-JOB-5")
def test_each_job_gets_its_own_directory_removed_afterwards(
    run_job: Callable[..., CliRun], backend: str, backend_env: dict[str, str], state_dir: Path
) -> None:
    script = """
import json, os
open("scratch.txt", "w").write("data")
print(json.dumps({"cwd": os.getcwd(), "files": sorted(os.listdir("."))}))
"""
    first = run_job(script, env=backend_env)
    second = run_job(script, env=backend_env)
    for run in (first, second):
        assert run.result is not None and run.result["status"] == "success", run
        data = json.loads(run.result["stdout"])
        assert data["files"] == ["main.py", "scratch.txt"]  # nothing from the other job
        if backend == "nsjail":
            assert data["cwd"] == "/job"
        else:
            assert data["cwd"] == str(jobs_root(state_dir) / run.result["job_id"] / "job")
    assert jobs_left(state_dir) == []


@pytest.mark.req("R-JOB-3", "R-JOB-4", "R-TBL-RES")
@pytest.mark.parametrize("backend", ["nsjail"])
@pytest.mark.parametrize(
    "how",
    [
        "exits",
        "times-out",
    ],
)
def test_nsjail_cgroups_are_removed(
    run_job: Callable[..., CliRun], backend_env: dict[str, str], how: str
) -> None:
    timeout = 20  # an ending job: never its limit, however slow the machine (a UML guest)
    if how == "times-out":  # 1 s, or 8x a bare job's run where that takes a good part of it
        quick = run_job(PRINT_NSJAIL_CGROUPS, env=backend_env, args=["--timeout", "20"])
        assert quick.result is not None, quick
        tidy_cgroups(nsjail_cgroup_dirs(quick.result["stderr"]))
        timeout = max(1, math.ceil(8 * quick.result["duration"]))
    script = PRINT_NSJAIL_CGROUPS + ("import time\ntime.sleep(30)\n" if how == "times-out" else "")
    _rc, result, stderr = run_job(
        script, env=backend_env, args=["--timeout", str(timeout)], timeout=20 + timeout
    )
    assert result is not None, stderr
    dirs = nsjail_cgroup_dirs(result["stderr"])
    try:
        assert result["status"] == ("timeout" if how == "times-out" else "success")
        assert dirs, result  # the job did live in nsjail's cgroups
        assert [d for d in dirs if d.exists()] == []
    finally:
        tidy_cgroups(dirs)


@pytest.mark.req("R-JOB-3")
def test_a_retry_after_a_reboot_clears_the_old_directory_and_runs(tmp_path: Path) -> None:
    """Cgroups reset, the state dir kept: the old attempt's directory must not fail the job."""
    from runtime.executor import JobRunner
    from runtime.jobs import JobSpec
    from runtime.settings import Settings
    from runtime.startup import probe_host

    settings = Settings.from_env({"ORVANTA_STATE_DIR": str(tmp_path / "state")})
    runner = JobRunner(settings, probe_host(settings))
    leftover = runner.jobs_dir / "rebootedjob00001" / "job"
    leftover.mkdir(parents=True)
    (leftover / "main.sh").write_text("old attempt\n")
    result = runner.run(JobSpec("rebootedjob00001", "bash", "echo fresh\n"))
    assert (result.status, result.stdout) == ("success", "fresh\n"), result
    assert any(line.startswith("retry: removed") for line in result.log), result.log
    runner.close()  # the teardown runs at the runner's next pause (runtime.tidier)
    assert not (runner.jobs_dir / "rebootedjob00001").exists()
