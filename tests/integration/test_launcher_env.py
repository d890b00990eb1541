"""A job's variables never reach the launchers that run as root outside the sandbox.

The attack (issue: jail escape through LD_PRELOAD): a job asks for LD_PRELOAD=<a library>,
and the dynamic loader loads it into nsjail, unshare or tini, as host root, before any
namespace exists. glibc's libpcprofile.so stands in for the planted library: its
constructor creates the file PCPROFILE_OUTPUT names, in whatever process loads it. The
file goes to a directory only host root may write, so only a process running as host
root can make it: under `none` that is the job itself (the positive control); under
unshare and nsjail it could only be a launcher. These tests build the JobSpec directly,
past the submission checks that refuse LD_* names: the launchers must hold even if that
list misses a name.
"""

from __future__ import annotations

import concurrent.futures
import glob
import json
import shutil
from pathlib import Path

import psutil
import pytest
from cli_helpers import BACKEND_ENV, tool_missing

from runtime.executor import JobRunner
from runtime.jobs import JobSpec
from runtime.settings import Settings
from runtime.startup import probe_host

pytestmark = pytest.mark.integration

SHOW_ENV = """import json, os
print(json.dumps({k: os.environ.get(k) for k in ("LD_PRELOAD", "PCPROFILE_OUTPUT", "MINE")}))
"""


def pcprofile() -> Path:
    found = sorted(glob.glob("/usr/lib/*/libpcprofile.so") + glob.glob("/lib*/libpcprofile.so"))
    if not found:
        pytest.fail("glibc's libpcprofile.so is missing (package libc6): the attack needs it")
    return Path(found[0])


@pytest.mark.req("R-JOB-1", "R-SEL-6")
@pytest.mark.parametrize("backend", ["none", "unshare", "nsjail"])
def test_a_preloaded_library_reaches_only_the_job(
    tmp_path: Path, backend: str, request: pytest.FixtureRequest
) -> None:
    missing = tool_missing(backend)
    if missing:
        pytest.skip(f"{backend}: {missing}")
    planted = tmp_path / "planted"  # 0755 root: only a process that is host root writes here
    planted.mkdir(mode=0o755)
    shutil.copy(pcprofile(), planted / "lib.so")
    output = planted / "preloaded"
    env = {**BACKEND_ENV[backend], "ORVANTA_STATE_DIR": str(tmp_path / "state")}
    settings = Settings.from_env(env)
    runner = JobRunner(settings, probe_host(settings))
    request.addfinalizer(runner.close)  # the last teardown runs at the runner's next pause
    job_env = {"LD_PRELOAD": str(planted / "lib.so"), "PCPROFILE_OUTPUT": str(output), "MINE": "1"}
    result = runner.run(JobSpec("preload" + backend, "python3", SHOW_ENV, job_env, 30))
    assert result.status == "success", result
    assert result.isolation == backend
    seen = json.loads(result.stdout.splitlines()[-1])
    assert seen == job_env, "the job must still see its own variables"
    if backend == "none":  # no launcher: the job is the worker's child, and root
        assert output.exists(), "positive control: a root job loads its own library"
    else:
        assert not output.exists(), (
            f"a launcher running as host root loaded the job's library: {output} was created "
            f"(owner uid {output.stat().st_uid})"
        )


@pytest.mark.req("R-JOB-1")
@pytest.mark.parametrize("backend", ["unshare", "nsjail"])
def test_the_launchers_path_is_the_workers(
    tmp_path: Path, backend: str, request: pytest.FixtureRequest
) -> None:
    """A job's PATH pointing at programs it planted is never searched by a launcher."""
    missing = tool_missing(backend)
    if missing:
        pytest.skip(f"{backend}: {missing}")
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir(mode=0o755)
    ran = tmp_path / "ran"
    ran.mkdir(mode=0o755)
    for name in ("newuidmap", "newgidmap", "tini", "env", "unshare", "nsjail", "bash", "python3"):
        fake = bin_dir / name
        fake.write_text(f"#!/bin/sh\ntouch {ran}/{name}\nexit 1\n")
        fake.chmod(0o755)
    env = {**BACKEND_ENV[backend], "ORVANTA_STATE_DIR": str(tmp_path / "state")}
    settings = Settings.from_env(env)
    runner = JobRunner(settings, probe_host(settings))
    request.addfinalizer(runner.close)  # the last teardown runs at the runner's next pause
    job_path = f"{bin_dir}:/usr/bin:/bin"
    script = "echo $PATH\n"
    result = runner.run(JobSpec("path" + backend, "bash", script, {"PATH": job_path}, 30))
    assert result.status == "success", result
    assert result.stdout.strip() == job_path
    assert sorted(p.name for p in ran.iterdir()) == [], "a launcher ran a program of the job's"


WAIT_AND_SHOW = """import json, os, time
time.sleep(1.5)  # while the harness reads every command line
print(json.dumps(dict(os.environ)))
"""


@pytest.mark.req("R-JOB-1", "R-PID-1")
@pytest.mark.parametrize("backend", ["none", "unshare", "nsjail", "bwrap"])
def test_a_jobs_variables_are_on_no_command_line(
    tmp_path: Path, backend: str, request: pytest.FixtureRequest
) -> None:
    """Command lines are readable by every user of the host (`ps`), and by jobs whose /proc
    is the host's. While a job runs, no process's argv holds one of its values; the job
    still gets exactly its variables, whatever bytes they hold."""
    missing = tool_missing(backend)
    if missing:
        pytest.skip(f"{backend}: {missing}")
    secret = f"orvanta-argv-secret-{tmp_path.name}"
    env = {**BACKEND_ENV[backend], "ORVANTA_STATE_DIR": str(tmp_path / "state")}
    settings = Settings.from_env(env)
    runner = JobRunner(settings, probe_host(settings))
    request.addfinalizer(runner.close)  # the last teardown runs at the runner's next pause
    job_env = {"TOKEN": secret, "ODD": "a'b\"c\\d\nnext=line $HOME `x`", "EMPTY": ""}
    seen: set[str] = set()
    scans = 0
    with concurrent.futures.ThreadPoolExecutor(1) as pool:
        running = pool.submit(
            runner.run, JobSpec("argv" + backend, "python3", WAIT_AND_SHOW, job_env, 30)
        )
        while not running.done():
            for proc in psutil.process_iter(["cmdline"]):
                argv = " ".join(proc.info["cmdline"] or ())
                if secret in argv:
                    seen.add(f"{proc.pid}: {argv[:300]}")
            scans += 1
        result = running.result()
    assert result.status == "success", result
    assert scans > 3, "the job ended before its command lines could be read"
    assert not seen, f"a job's variable on a command line every host user can read: {seen}"
    shown = json.loads(result.stdout.splitlines()[-1])
    assert {k: shown.get(k) for k in job_env} == job_env
