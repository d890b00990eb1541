"""Nothing lost: 1,000 jobs, two workers, one of them killed -9 over and over."""

from __future__ import annotations

import contextlib
import json
import os
import random
import signal
import time
from collections import Counter
from collections.abc import Callable
from pathlib import Path

import pytest
from service_helpers import WorkerProcess

from runtime.queue import JobQueue

JOBS = 1000
DEADLINE = 600.0
FREEZER_JOBS = Path("/sys/fs/cgroup/freezer/orvanta")


@pytest.mark.slow
@pytest.mark.req("R-JOB-3")
def test_no_job_is_lost_or_answered_twice_while_a_worker_is_killed_repeatedly(
    database_url: str,
    spawn_worker: Callable[..., WorkerProcess],
    tmp_path: Path,
    record_property: Callable[[str, object], None],
) -> None:
    queue = JobQueue.open(database_url, tmp_path)
    executions = tmp_path / "executions.log"
    script = f'echo "$ORVANTA_JOB_ID" >> {executions}\necho "job $N"\n'
    expected = {queue.submit("bash", script, {"N": str(n)}): n for n in range(JOBS)}
    env = {"DATABASE_URL": database_url, "ORVANTA_LEASE_SECONDS": "1"}
    started = time.monotonic()
    spawn_worker("steady", env)
    victim = spawn_worker("victim-0", env)
    workers = [victim]
    kills = 0
    rng = random.Random(7)
    while queue.counts().get("done", 0) < JOBS:
        assert time.monotonic() - started < DEADLINE, f"not done in {DEADLINE:g}s: {queue.counts()}"
        time.sleep(rng.uniform(0.05, 0.3))
        os.kill(victim.proc.pid, signal.SIGKILL)
        victim.proc.wait()
        kills += 1
        victim = spawn_worker(f"victim-{kills}", env)
        workers.append(victim)
    elapsed = time.monotonic() - started

    jobs = {job_id: queue.get(job_id) for job_id in expected}
    wrong = {
        job_id: job
        for job_id, job in jobs.items()
        if job is None
        or job.result is None
        or job.result.status != "success"
        or job.result.stdout != f"job {expected[job_id]}\n"
    }
    assert not wrong, f"{len(wrong)} job(s) lost or wrong, e.g. {next(iter(wrong.items()))}"
    ran = Counter(executions.read_text().split())
    assert set(ran) == set(expected)  # every job ran, and nothing else did
    rerun = {job_id: n for job_id, n in ran.items() if n > 1}
    retried = {job_id for job_id, job in jobs.items() if job is not None and job.attempts > 1}
    assert set(rerun) <= retried  # only a job whose worker died mid-run ran again
    summary = {
        "database": queue.db.kind,
        "jobs": JOBS,
        "kills": kills,
        "seconds": round(elapsed, 1),
        "lost": 0,
        # a worker whose lease ran out while it worked has its late result refused, not doubled
        "late_results_refused": sum(w.output().count("result dropped") for w in workers),
        "claimed_again": len(retried),
        "ran_twice": len(rerun),
    }
    record_property("chaos", json.dumps(summary))
    print(f"\nchaos: {json.dumps(summary)}")
    queue.close()
    for job_id in expected:  # tracking groups of jobs whose worker died after their result
        with contextlib.suppress(OSError):
            (FREEZER_JOBS / f"job-{job_id}").rmdir()
