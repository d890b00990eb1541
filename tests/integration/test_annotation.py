"""The `# sandbox` header and job_isolation=nsjail_sandboxing on real jobs (R-ANN-*, R-SEL-5)."""

from __future__ import annotations

import json
import os
import subprocess
import time
from collections.abc import Callable
from pathlib import Path

import pytest
from cli_helpers import CliRun, WorkerProcess, cli_command, wait_until

from runtime.queue import JobQueue

pytestmark = pytest.mark.integration

NO_NSJAIL = {"NSJAIL_PATH": "/nonexistent"}

# Leaves a trace on the host when it runs unsandboxed; prints who it ran as.
PYTHON_BODY = """
import os
try:
    open(os.environ["TRACE"], "w").write("ran")
except OSError:
    pass
print("uid", os.getuid())
"""
BASH_BODY = """
echo ran > "$TRACE" 2>/dev/null
echo uid "$(id -u)"
"""
SCRIPTS = {
    "python-hash-space": ("# sandbox\n" + PYTHON_BODY, ".py"),
    "python-after-shebang": ("#!/usr/bin/env python3\n#sandbox\n" + PYTHON_BODY, ".py"),
    "bash-hash-nospace": ("#!/bin/bash\n#sandbox\n" + BASH_BODY, ".sh"),
}


@pytest.mark.req("R-ANN-1", "R-ANN-3", "R-SEL-6")
@pytest.mark.parametrize(("script", "suffix"), SCRIPTS.values(), ids=SCRIPTS.keys())
def test_annotated_script_runs_in_nsjail_with_sandboxing_off(
    run_job: Callable[..., CliRun], tmp_path: Path, script: str, suffix: str
) -> None:
    trace = tmp_path / "trace.txt"
    rc, result, stderr = run_job(script, suffix=suffix, args=["--env", f"TRACE={trace}"])
    assert result is not None, stderr
    assert result["isolation"] == "nsjail"
    assert result["status"] == "success" and rc == 0, result
    assert "sandbox mode (nsjail)" in result["log"]
    assert result["stdout"] == "uid 1000\n"  # the jail's user, not root
    assert not trace.exists()  # the host path was out of its reach
    assert "isolation: none active" in stderr  # sandboxing was off globally


@pytest.mark.req("R-ANN-1", "R-ANN-3")
def test_unannotated_script_runs_as_configured(
    run_job: Callable[..., CliRun], tmp_path: Path
) -> None:
    """Control for the test above: the same body without the header is not sandboxed."""
    trace = tmp_path / "trace.txt"
    _rc, result, stderr = run_job(PYTHON_BODY, args=["--env", f"TRACE={trace}"])
    assert result is not None, stderr
    assert result["isolation"] == "none"
    assert "sandbox mode (nsjail)" not in result["log"]
    assert result["stdout"] == f"uid {os.getuid()}\n"
    assert trace.read_text() == "ran"


@pytest.mark.req("R-ANN-3", "R-SEL-1")
def test_global_nsjail_does_not_claim_sandbox_mode(run_job: Callable[..., CliRun]) -> None:
    _rc, result, stderr = run_job("print('x')\n", env={"DISABLE_NSJAIL": "false"})
    assert result is not None, stderr
    assert result["isolation"] == "nsjail"
    assert "sandbox mode (nsjail)" not in result["log"]


@pytest.mark.req("R-ANN-2")
@pytest.mark.parametrize("env", [{}, {"ENABLE_UNSHARE_PID": "true"}], ids=["none", "unshare"])
@pytest.mark.parametrize(("script", "suffix"), SCRIPTS.values(), ids=SCRIPTS.keys())
def test_annotated_script_without_nsjail_fails_and_never_runs(
    run_job: Callable[..., CliRun],
    tmp_path: Path,
    env: dict[str, str],
    script: str,
    suffix: str,
) -> None:
    trace = tmp_path / "trace.txt"
    rc, result, stderr = run_job(
        script, suffix=suffix, env={**env, **NO_NSJAIL}, args=["--env", f"TRACE={trace}"]
    )
    assert result is not None, stderr
    assert result["status"] == "error"
    assert result["exit_code"] is None
    assert rc == 1
    assert "sandbox annotation" in result["stderr"]
    assert "nsjail is not available" in result["stderr"]
    assert "NSJAIL_PATH=/nonexistent" in result["stderr"]  # why it is not available
    assert any(line.startswith("error: ") for line in result["log"])
    assert result["stdout"] == ""
    assert not trace.exists()  # the script did not run, sandboxed or not


@pytest.mark.req("R-SEL-5", "R-CFG-6")
def test_job_isolation_without_nsjail_fails_the_job_not_the_start(
    run_job: Callable[..., CliRun], tmp_path: Path
) -> None:
    trace = tmp_path / "trace.txt"
    rc, result, stderr = run_job(
        PYTHON_BODY,
        env={"JOB_ISOLATION": "nsjail_sandboxing", **NO_NSJAIL},
        args=["--env", f"TRACE={trace}"],
    )
    assert rc == 1  # not EXIT_STARTUP: the worker started
    assert result is not None, stderr
    assert result["status"] == "error"
    assert "job_isolation=nsjail_sandboxing" in result["stderr"]
    assert "not available" in result["stderr"]
    assert "every job on this worker will fail" in stderr  # logged at start
    assert not trace.exists()


@pytest.mark.req("R-SEL-5", "R-CFG-6")
def test_worker_with_job_isolation_and_no_nsjail_keeps_running(
    start_worker: Callable[..., WorkerProcess],
    write_script: Callable[..., Path],
    base_env: dict[str, str],
    tmp_path: Path,
) -> None:
    env = {"JOB_ISOLATION": "nsjail_sandboxing", **NO_NSJAIL}
    worker = start_worker("no-nsjail", env)
    trace = tmp_path / "trace.txt"
    script = write_script(PYTHON_BODY)
    ids = []
    for _ in range(2):
        out = subprocess.run(
            cli_command("submit", str(script), "--env", f"TRACE={trace}"),
            env=base_env,
            capture_output=True,
            text=True,
            check=True,
        )
        ids.append(out.stdout.strip())
    queue = JobQueue.in_state_dir(Path(base_env["ORVANTA_STATE_DIR"]))
    try:
        for job_id in ids:
            job = queue.wait(job_id, 20)
            assert job.result is not None
            assert job.result.status == "error"
            assert "job_isolation=nsjail_sandboxing" in job.result.stderr
    finally:
        queue.close()
    assert not trace.exists()
    wait_until(lambda: worker.output().count("error exit=None") >= 2, 5, "both jobs logged")
    assert worker.proc.poll() is None, worker.output()  # the worker itself keeps running


# -- the header fails closed (issue: a near miss ran the job without isolation) -------------
# Forms that once ran under no isolation, or were never tried: now each runs under nsjail.
LENIENT = {
    "byte-order-mark": ("\ufeff# sandbox\n" + PYTHON_BODY, ".py"),
    "two-spaces": ("#  sandbox\n" + PYTHON_BODY, ".py"),
    "capitalised-after-shebang": ("#!/usr/bin/env python3\n# Sandbox\n" + PYTHON_BODY, ".py"),
    "upper-case-tab": ("#\tSANDBOX\n" + PYTHON_BODY, ".py"),
    "crlf": (("#!/usr/bin/env python3\n# sandbox  \n" + PYTHON_BODY).replace("\n", "\r\n"), ".py"),
    "leading-blank-lines": ("\n\n#sandbox\n" + PYTHON_BODY, ".py"),
    "bash-upper-case": ("#!/bin/bash\n# SANDBOX\n" + BASH_BODY, ".sh"),
    "bash-slashes-two-spaces": ("#!/bin/bash\n//  sandbox\n" + BASH_BODY, ".sh"),
    "with-a-lenient-volume": ("# Volume:  cache\n#  Sandbox\n" + PYTHON_BODY, ".py"),
}

# Look like the annotation but are none: refused with the line, never run unisolated.
NEAR_MISSES = {
    "sandbox-colon-yes": ("#!/usr/bin/env python3\n# sandbox: yes\n", 2),
    "sandbx": ("# sandbx\n", 1),
    "sand-box": ("\n# sand box\n", 2),
    "volumes": ("# volumes: x\n", 1),
    "sandboxed": ("# job: export\n# sandboxed\n", 2),
    "double-hash": ("## sandbox\n", 1),
}


@pytest.mark.req("R-ANN-1", "R-ANN-3", "R-SEL-6")
@pytest.mark.parametrize(("script", "suffix"), LENIENT.values(), ids=LENIENT.keys())
def test_every_lenient_form_runs_in_nsjail_with_sandboxing_off(
    run_job: Callable[..., CliRun], tmp_path: Path, script: str, suffix: str
) -> None:
    trace = tmp_path / "trace.txt"
    rc, result, stderr = run_job(script, suffix=suffix, args=["--env", f"TRACE={trace}"])
    assert result is not None, stderr
    assert result["isolation"] == "nsjail", result
    assert result["status"] == "success" and rc == 0, result
    assert "sandbox mode (nsjail)" in result["log"]
    assert result["stdout"] == "uid 1000\n", result  # the jail's user, not root
    assert not trace.exists()  # the host path was out of its reach
    assert "isolation: none active" in stderr  # sandboxing was off globally


@pytest.mark.req("R-ANN-1", "R-ANN-2")
@pytest.mark.parametrize(("header", "line"), NEAR_MISSES.values(), ids=NEAR_MISSES.keys())
@pytest.mark.parametrize("command", ["run", "submit"])
def test_a_near_miss_is_refused_with_its_line_and_never_runs(
    run_cli: Callable[..., CliRun],
    write_script: Callable[..., Path],
    state_dir: Path,
    tmp_path: Path,
    command: str,
    header: str,
    line: int,
) -> None:
    trace = tmp_path / "trace.txt"
    path = write_script(header + PYTHON_BODY)
    rc, result, stderr = run_cli(command, str(path), "--env", f"TRACE={trace}")
    offending = header.split("\n")[line - 1]
    assert rc == 2 and result is None, stderr
    assert stderr.startswith(f"orvanta: script line {line}: {offending!r} looks like"), stderr
    assert "accepted annotations: '# sandbox', '#sandbox', '// sandbox'" in stderr
    assert "Traceback" not in stderr
    assert "isolation:" not in stderr  # refused before a worker even started
    assert not trace.exists()
    assert not (state_dir / "queue.sqlite3").exists()  # nothing was queued


@pytest.mark.req("R-ANN-1", "R-ANN-2")
def test_a_near_miss_that_reached_the_queue_anyway_fails_on_the_worker(
    start_worker: Callable[..., WorkerProcess], state_dir: Path, tmp_path: Path
) -> None:
    """A job queued before this check existed (or written to the database directly)."""
    start_worker("fail-closed")
    trace = tmp_path / "trace.txt"
    queue = JobQueue.in_state_dir(state_dir)
    try:
        queue.db.execute(
            "INSERT INTO jobs (id, language, script, env, created) VALUES (?,?,?,?,?)",
            (
                "nearmiss00000001",
                "python3",
                "# Sandbox: please\n" + PYTHON_BODY,
                json.dumps({"TRACE": str(trace)}),
                time.time(),
            ),
        )
        job = queue.wait("nearmiss00000001", 30)
    finally:
        queue.close()
    assert job.result is not None
    assert job.result.status == "error" and job.result.stdout == "", job.result
    assert "script line 1: '# Sandbox: please' looks like a header annotation" in job.result.stderr
    assert not trace.exists()
