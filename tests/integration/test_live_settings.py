"""job_isolation changes reach running workers without a restart, and never crash them (R-SEL-7)."""

from __future__ import annotations

import subprocess
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from cli_helpers import WorkerProcess, cli_command, wait_until

from runtime.queue import JobQueue

pytestmark = pytest.mark.integration

WHOAMI = "import os; print(os.getuid(), len([p for p in os.listdir('/proc') if p.isdigit()]))\n"


@pytest.fixture
def queue(state_dir: Path) -> Iterator[JobQueue]:
    q = JobQueue.in_state_dir(state_dir)
    yield q
    q.close()


def run_on_worker(queue: JobQueue, script: str) -> dict[str, object]:
    job = queue.wait(queue.submit("python3", script), 60)
    assert job.result is not None
    return job.result.to_dict()


def settings_cli(base_env: dict[str, str], *args: str) -> str:
    out = subprocess.run(
        cli_command("settings", "job_isolation", *args),
        env=base_env,
        capture_output=True,
        text=True,
        timeout=30,
        check=False,
    )
    assert out.returncode == 0, out.stderr
    return out.stdout.strip()


@pytest.mark.req("R-SEL-7", "R-CFG-6", "R-SEL-1")
def test_job_isolation_change_applies_to_the_next_job(
    start_worker: Callable[..., WorkerProcess], queue: JobQueue, base_env: dict[str, str]
) -> None:
    worker = start_worker("live")
    assert run_on_worker(queue, WHOAMI)["isolation"] == "none"

    assert settings_cli(base_env, "nsjail_sandboxing") == "job_isolation=nsjail_sandboxing"
    result = run_on_worker(queue, WHOAMI)
    assert result["isolation"] == "nsjail", result
    assert result["stdout"] == "1000 1\n"  # jailed uid, alone in its PID namespace

    settings_cli(base_env, "--unset")
    assert run_on_worker(queue, WHOAMI)["isolation"] == "none"
    assert worker.proc.poll() is None
    assert "job_isolation is now nsjail_sandboxing" in worker.output()


@pytest.mark.req("R-SEL-7", "R-SEL-5")
def test_unusable_job_isolation_is_logged_and_never_crashes_the_worker(
    start_worker: Callable[..., WorkerProcess], queue: JobQueue
) -> None:
    worker = start_worker("no-nsjail", {"NSJAIL_PATH": "/nonexistent/nsjail"})
    queue.set_setting("job_isolation", "bogus")  # written around the CLI's validation
    assert run_on_worker(queue, WHOAMI)["status"] == "success"
    wait_until(lambda: "job_isolation='bogus' is not valid" in worker.output(), 10, "the error")

    queue.set_setting("job_isolation", "nsjail_sandboxing")
    result = run_on_worker(queue, WHOAMI)
    assert result["status"] == "error" and "nsjail is not available" in str(result["stderr"])
    assert "its jobs fail until nsjail is installed" in worker.output()
    assert worker.proc.poll() is None, worker.output()


@pytest.mark.req("R-CFG-7")
def test_settings_command_refuses_unknown_values(base_env: dict[str, str]) -> None:
    out = subprocess.run(
        cli_command("settings", "job_isolation", "maybe"),
        env=base_env,
        capture_output=True,
        text=True,
        timeout=30,
        check=False,
    )
    assert out.returncode == 2
    assert (
        "job_isolation='maybe' is not valid; accepted values: none, nsjail_sandboxing" in out.stderr
    )
