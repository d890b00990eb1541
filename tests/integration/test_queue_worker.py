"""A long-lived `orvanta worker` pulling from the SQLite queue (R-JOB-1, R-JOB-3, R-JOB-5).

Jobs are queued with `orvanta submit`; the tests read the queue file directly to wait for
results and to see what a killed worker left behind.
"""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from cli_helpers import (
    DAEMON,
    CliRun,
    WorkerProcess,
    cli_command,
    processes_with,
    remove_job_cgroup,
    wait_until,
)

from runtime.jobdir import AHEAD
from runtime.jobs import QueuedJob
from runtime.queue import JobQueue
from runtime.settings import Settings

pytestmark = pytest.mark.integration

FIND_MARKER = """
import json, os
marker = os.environ["MARKER"].encode()
found = []
for p in os.listdir("/proc"):
    if p.isdigit() and int(p) != os.getpid():
        try:
            if marker in open(f"/proc/{p}/cmdline", "rb").read():
                found.append(int(p))
        except OSError:
            pass
env = dict(os.environ)
print(json.dumps({"found": found, "database_url": "DATABASE_URL" in env}))
"""

LONG = """
import subprocess, time
subprocess.Popen(["sh", "-c", "sleep 300; : {marker}"])
print("started", flush=True)
time.sleep({seconds})
print("finished")
"""


def job_dirs_left(jobs_root: Path, within: float = 5.0) -> list[str]:
    """The job dirs of finished jobs still there once the worker's tidier had `within`
    seconds (it removes them behind the next job's start); the one it made ahead for the
    next job is no job's."""
    deadline = time.monotonic() + within
    while True:
        left = sorted(n for n in os.listdir(jobs_root) if not n.startswith(AHEAD))
        if not left or time.monotonic() > deadline:
            return left
        time.sleep(0.05)


@pytest.fixture
def queue(state_dir: Path) -> Iterator[JobQueue]:
    q = JobQueue.in_state_dir(state_dir)
    yield q
    q.close()


@pytest.fixture
def submit(base_env: dict[str, str], write_script: Callable[..., Path]) -> Callable[..., str]:
    """submit(script text, *args) -> the job id `orvanta submit` printed."""

    def run(script: str, *args: str, suffix: str = ".py") -> str:
        path = write_script(script, suffix)
        out = subprocess.run(
            cli_command("submit", str(path), *args),
            env=base_env,
            capture_output=True,
            text=True,
            timeout=30,
            check=False,
        )
        assert out.returncode == 0, out.stderr
        job_id = out.stdout.strip()
        assert re.fullmatch(r"[0-9a-f]{16}", job_id), out.stdout
        return job_id

    return run


def wait_status(queue: JobQueue, job_id: str, status: str, timeout: float = 20) -> QueuedJob:
    def check() -> QueuedJob | None:
        job = queue.get(job_id)
        return job if job is not None and job.status == status else None

    found: QueuedJob = wait_until(check, timeout, f"job {job_id} to be {status}")
    return found


def worker_of(queue: JobQueue, job_id: str) -> str:
    job = queue.get(job_id)
    assert job is not None
    return str(job.worker)


@pytest.mark.req("R-JOB-3", "R-JOB-1", "R-JOB-5")
def test_worker_runs_queued_jobs_one_after_another_each_starting_clean(
    start_worker: Callable[..., WorkerProcess],
    submit: Callable[..., str],
    run_cli: Callable[..., CliRun],
    write_script: Callable[..., Path],
    queue: JobQueue,
    state_dir: Path,
    marker: str,
) -> None:
    # queued before any worker runs: they wait for one
    daemon = submit(DAEMON.format(marker=marker), suffix=".sh")
    snoop = submit(FIND_MARKER, "--env", f"MARKER={marker}")
    plain = submit("print('third')\n")
    assert queue.counts() == {"queued": 3}

    worker = start_worker("w-main")
    results = {job_id: queue.wait(job_id, 30) for job_id in (daemon, snoop, plain)}
    for job in results.values():
        assert job.result is not None and job.result.status == "success", job
        assert job.attempts == 1
        assert job.result.isolation == "none"
    daemon_result, snoop_result = results[daemon].result, results[snoop].result
    assert daemon_result is not None and snoop_result is not None
    assert daemon_result.stdout == "DAEMON-UP\n"
    # the next job found nothing of the previous one's daemon, with nothing hiding it
    assert json.loads(snoop_result.stdout) == {"found": [], "database_url": False}
    assert results[plain].result is not None and results[plain].result.stdout == "third\n"

    # submit --wait --json: the same record, printed by the submitting side
    rc, record, stderr = run_cli(
        "submit", str(write_script("print('waited')\n")), "--wait", "--json"
    )
    assert rc == 0, stderr
    assert record is not None
    assert record["status"] == "success" and record["stdout"] == "waited\n"
    assert record["isolation"] == "none"
    assert queue.counts() == {"done": 4}
    assert processes_with(marker) == []
    assert job_dirs_left(Settings(state_dir=state_dir).job_root) == []
    assert worker.proc.poll() is None


@pytest.mark.req("R-JOB-3", "R-JOB-4")
def test_submit_wait_reports_the_job_exit_code(
    start_worker: Callable[..., WorkerProcess],
    run_cli: Callable[..., CliRun],
    write_script: Callable[..., Path],
) -> None:
    start_worker("w-exit")
    rc, record, stderr = run_cli(
        "submit", str(write_script("import sys\nsys.exit(3)\n")), "--wait", "--json"
    )
    assert rc == 3, stderr
    assert record is not None and record["status"] == "failure" and record["exit_code"] == 3


@pytest.mark.req("R-JOB-3")
def test_cancel_a_running_job_kills_all_of_it(
    start_worker: Callable[..., WorkerProcess],
    submit: Callable[..., str],
    run_cli: Callable[..., CliRun],
    queue: JobQueue,
    marker: str,
) -> None:
    start_worker("w-cancel")
    job_id = submit(LONG.format(marker=marker, seconds=30))
    wait_status(queue, job_id, "running")
    wait_until(lambda: processes_with(marker), 10, "the job's child to start")
    started = time.monotonic()
    rc, _record, stderr = run_cli("cancel", job_id)
    assert rc == 0, stderr
    job = queue.wait(job_id, 10)
    assert time.monotonic() - started < 5
    assert job.result is not None
    assert job.result.status == "canceled", job.result
    assert "canceled: every process of the job was killed" in job.result.log
    assert job.result.stdout == "started\n"
    assert processes_with(marker) == []


@pytest.mark.req("R-JOB-3")
def test_cancel_a_queued_job_means_it_never_runs(
    start_worker: Callable[..., WorkerProcess],
    submit: Callable[..., str],
    run_cli: Callable[..., CliRun],
    queue: JobQueue,
    tmp_path: Path,
) -> None:
    trace = tmp_path / "trace.txt"
    job_id = submit(f"open({str(trace)!r}, 'w').write('ran')\n")
    proc = subprocess.run(
        cli_command("cancel", job_id),
        env={"PATH": os.environ["PATH"], "ORVANTA_STATE_DIR": str(Path(queue.path).parent)},
        capture_output=True,
        text=True,
        check=False,
    )
    assert proc.stdout.strip() == f"{job_id}: canceled before it ran", proc.stderr
    after = submit("print('after')\n")
    start_worker("w-after-cancel")
    assert queue.wait(after, 20).status == "done"
    job = queue.get(job_id)
    assert job is not None and job.result is not None
    assert job.result.status == "canceled"
    assert job.attempts == 0
    assert not trace.exists()


@pytest.mark.req("R-JOB-5")
def test_a_job_claimed_ahead_never_waits_long_behind_a_long_one(
    start_worker: Callable[..., WorkerProcess], queue: JobQueue
) -> None:
    """A worker claims the next job while one runs (runtime.pipeline); behind a long job it
    hands that one back, so an idle worker runs it long before the long job ends."""
    start_worker("w-a")
    long_id = queue.submit("python3", "import time\ntime.sleep(4)\n")
    wait_status(queue, long_id, "running")
    quick = queue.submit("python3", "print('quick')\n")
    wait_status(queue, quick, "running", timeout=0.4)  # w-a claims it ahead, alone
    start_worker("w-b")
    done = queue.wait(quick, 20)
    assert done.result is not None and done.result.stdout == "quick\n"
    assert worker_of(queue, quick) == "w-b" and done.attempts == 1  # the hand-back undid one
    still = queue.get(long_id)
    assert still is not None and still.status == "running", "the quick job waited for it"
    assert queue.wait(long_id, 20).result is not None


@pytest.mark.req("R-JOB-5")
def test_a_stopping_worker_hands_back_the_job_it_claimed_ahead(
    start_worker: Callable[..., WorkerProcess], queue: JobQueue
) -> None:
    worker = start_worker("w-a")
    first = queue.submit("python3", "import time\ntime.sleep(1)\nprint('first')\n")
    wait_status(queue, first, "running")
    second = queue.submit("python3", "print('second')\n")
    wait_status(queue, second, "running", timeout=0.4)  # claimed ahead, behind `first`
    worker.proc.send_signal(signal.SIGTERM)  # the hold (0.5 s) or the stop hands it back
    assert worker.proc.wait(20) == 0, worker.output()
    done = queue.get(first)
    assert done is not None and done.result is not None and done.result.stdout == "first\n"
    back = queue.get(second)
    assert back is not None and (back.status, back.attempts, back.worker) == ("queued", 0, None)
    assert f"job {second}: handed back to the queue unstarted" in worker.output()


@pytest.mark.req("R-JOB-3")
def test_a_second_signal_stops_the_running_job_now_and_leaves_nothing(
    start_worker: Callable[..., WorkerProcess],
    queue: JobQueue,
    state_dir: Path,
    marker: str,
) -> None:
    """SIGTERM lets the running job finish; a second one stops it now: every process of it
    killed, its dir and cgroup gone, the worker exited. Its result is not recorded (a stop
    is not a cancel): it stays the worker's until its lease lapses and another runs it.
    Without it, a job as long as the harness's neighbour (15 min) kept its worker, and a
    worker killed after a grace left the job running with no worker at all."""
    worker = start_worker("w-a")
    job_id = queue.submit("python3", LONG.format(marker=marker, seconds=300))
    wait_status(queue, job_id, "running")
    wait_until(lambda: processes_with(marker), 20, "the job's child to start")
    worker.proc.send_signal(signal.SIGTERM)
    time.sleep(0.5)
    assert worker.proc.poll() is None and processes_with(marker), "the first stopped the job"
    worker.proc.send_signal(signal.SIGTERM)
    assert worker.proc.wait(20) == 0, worker.output()
    assert processes_with(marker) == []
    jobs_root = Settings(state_dir=state_dir).job_root
    assert job_dirs_left(jobs_root, within=0) == []
    assert not list(Path("/sys/fs/cgroup").glob(f"*/orvanta/job-{job_id}"))
    assert not Path(f"/sys/fs/cgroup/orvanta/job-{job_id}").exists()
    job = queue.get(job_id)
    assert job is not None and (job.status, job.result, job.attempts) == ("running", None, 1)
    assert "received again: stopping the running job now" in worker.output()
    assert f"job {job_id}: stopped with the worker and not recorded" in worker.output()


@pytest.mark.req("R-JOB-3")
def test_a_job_canceled_while_claimed_ahead_never_runs(
    start_worker: Callable[..., WorkerProcess], queue: JobQueue, tmp_path: Path
) -> None:
    """Claimed ahead, the job is "running" to the queue, so a cancel only flags it: the
    worker must record it canceled, never hand it back to run or start it."""
    trace = tmp_path / "ran.txt"
    start_worker("w-a")
    first = queue.submit("python3", "import time\ntime.sleep(1)\n")
    wait_status(queue, first, "running")
    second = queue.submit("python3", f"open({str(trace)!r}, 'w').write('ran')\n")
    wait_status(queue, second, "running", timeout=0.4)  # claimed ahead, behind `first`
    assert queue.cancel(second) == "cancel requested"
    done = queue.wait(second, 20)
    assert done.result is not None and done.result.status == "canceled", done.result
    assert queue.wait(first, 20).result is not None
    assert not trace.exists()


@pytest.fixture
def cleanup_job(state_dir: Path) -> Iterator[list[str]]:
    """Job ids whose tracking cgroup and tmpfs job dir a killed worker may have left behind
    (a retry of the job would remove them; these tests end before one)."""
    from runtime.jobdir import remove_tree

    ids: list[str] = []
    yield ids
    for job_id in ids:
        remove_job_cgroup(job_id)
        remove_tree(Settings(state_dir=state_dir).job_root / job_id)


def kill_worker_mid_job(
    start_worker: Callable[..., WorkerProcess],
    submit: Callable[..., str],
    queue: JobQueue,
    marker: str,
    seconds: float,
    env: dict[str, str] | None = None,
) -> str:
    worker = start_worker("w-a", env)
    job_id = submit(LONG.format(marker=marker, seconds=seconds))
    wait_status(queue, job_id, "running")
    wait_until(lambda: processes_with(marker), 10, "the job's child to start")
    worker.proc.send_signal(signal.SIGKILL)
    worker.proc.wait(5)
    return job_id


@pytest.mark.req("R-JOB-5")
def test_killed_worker_leaves_its_job_running_and_another_worker_serves_the_queue(
    start_worker: Callable[..., WorkerProcess],
    submit: Callable[..., str],
    queue: JobQueue,
    marker: str,
    cleanup_job: list[str],
) -> None:
    long_id = kill_worker_mid_job(start_worker, submit, queue, marker, seconds=30)
    cleanup_job.append(long_id)
    job = queue.get(long_id)
    assert job is not None
    assert (job.status, job.attempts, job.result) == ("running", 1, None)
    assert worker_of(queue, long_id) == "w-a"

    quick = submit("print('quick')\n")
    start_worker("w-b")  # default lease (30 s): the dead worker's job is not due yet
    done = queue.wait(quick, 20)
    assert done.result is not None and done.result.stdout == "quick\n"
    assert worker_of(queue, quick) == "w-b"
    still = queue.get(long_id)
    assert still is not None and still.status == "running" and still.attempts == 1


@pytest.mark.req("R-JOB-5", "R-JOB-3")
def test_job_of_a_killed_worker_is_run_again_after_its_lease(
    start_worker: Callable[..., WorkerProcess],
    submit: Callable[..., str],
    queue: JobQueue,
    marker: str,
    cleanup_job: list[str],
) -> None:
    lease = {"ORVANTA_LEASE_SECONDS": "1"}
    job_id = kill_worker_mid_job(start_worker, submit, queue, marker, seconds=1.5, env=lease)
    cleanup_job.append(job_id)
    start_worker("w-b", lease)
    job = queue.wait(job_id, 20)
    assert worker_of(queue, job_id) == "w-b"
    assert job.attempts == 2
    assert job.result is not None
    assert job.result.status == "success", job.result
    assert job.result.stdout == "started\nfinished\n"


WORKER_FDS = r"""
import json, os
def targets(pid):
    out = []
    for fd in os.listdir(f"/proc/{pid}/fd"):
        try:
            out.append(os.readlink(f"/proc/{pid}/fd/{fd}"))
        except OSError:
            pass
    return out
print(json.dumps({"self": sorted(os.listdir("/proc/self/fd"), key=int),
                  "parent": targets(os.getppid())}))
"""


@pytest.mark.req("R-JOB-2")
def test_worker_descriptors_do_not_reach_its_jobs(
    start_worker: Callable[..., WorkerProcess],
    submit: Callable[..., str],
    queue: JobQueue,
) -> None:
    start_worker("w-fds")
    job = queue.wait(submit(WORKER_FDS), 20)
    assert job.result is not None and job.result.status == "success", job.result
    report = json.loads(job.result.stdout)
    # control: the worker (the job's parent here) holds its queue database open
    assert any(t.endswith("queue.sqlite3") for t in report["parent"]), report["parent"]
    assert report["self"] == ["0", "1", "2", "3"]
