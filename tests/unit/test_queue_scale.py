"""The queue at scale, on both databases: finished jobs leave the hot table, claims take
the oldest job of their tags through indexes, and finished jobs go after the retention."""

from __future__ import annotations

import contextlib
import json
import os
import subprocess
import sys
import time
from pathlib import Path

from conformance.service import ROOT, postgres_unavailable, scratch_postgres
from runtime.jobs import JobResult
from runtime.queue import JobQueue
from runtime.store.claims import claim_query


def result(job_id: str, stdout: str = "") -> JobResult:
    return JobResult(job_id, "none", "success", 0, 0.0, stdout, "", [])


def submitted(queue: JobQueue, *tags: str) -> list[str]:
    """Jobs of these tags, in this order of age (the clock may not tick between submits)."""
    ids = [queue.submit("bash", "true", tag=tag) for tag in tags]
    for age, job_id in enumerate(ids):
        queue.db.execute("UPDATE jobs SET created=? WHERE id=?", (1000.0 + age, job_id))
    return ids


def test_a_finished_job_leaves_the_hot_table_and_reads_as_before(queue: JobQueue) -> None:
    done, canceled, waiting = submitted(queue, "default", "default", "default")
    spec = queue.claim("w", 30)
    assert spec is not None and spec.id == done
    assert queue.complete(result(done, "out"), "w")
    assert not queue.complete(result(done), "w")  # recorded once
    assert queue.cancel(canceled) == "canceled before it ran"
    hot = {row[0] for row in queue.db.query("SELECT id FROM jobs")}
    moved = {row[0] for row in queue.db.query("SELECT id FROM finished_jobs")}
    assert hot == {waiting} and moved == {done, canceled}
    job = queue.job(done)
    assert job.status == "done" and job.result is not None and job.result.stdout == "out"
    assert queue.held_by_group(done, "g") is False and queue.cancel_requested(done) is False
    assert queue.counts() == {"queued": 1, "done": 2}
    assert [j.id for j in queue.jobs()] == [waiting, canceled, done]
    assert [j.id for j in queue.jobs("done", limit=1)] == [canceled]
    assert [j.id for j in queue.jobs("queued")] == [waiting]
    assert queue.wait(done, 1).status == "done"


def test_a_multi_tag_worker_takes_the_oldest_job_across_its_tags(queue: JobQueue) -> None:
    order = submitted(queue, "a", "b", "other", "b", "a")
    taken = []
    while (spec := queue.claim("w", 30, ("a", "b", "a"))) is not None:
        taken.append(spec.id)
    assert taken == [order[0], order[1], order[3], order[4]]


def test_a_lapsed_lease_is_taken_before_any_queued_job(queue: JobQueue) -> None:
    first, second = submitted(queue, "default", "default")
    lapsed = queue.claim("dead", -1.0)  # its lease ran out at once
    assert lapsed is not None and lapsed.id == first
    spec = queue.claim("alive", 30)
    assert spec is not None and spec.id == first
    assert not queue.complete(result(first), "dead") and queue.complete(result(first), "alive")
    assert queue.job(first).attempts == 2
    spec = queue.claim("alive", 30)
    assert spec is not None and spec.id == second


def test_finished_jobs_are_dropped_after_the_retention(database_url: str, tmp_path: Path) -> None:
    queue = JobQueue.open(database_url, tmp_path, retention=0.2)
    old, new = submitted(queue, "default", "default")
    for job_id in (old, new):
        spec = queue.claim("w", 30)
        assert spec is not None and spec.id == job_id
        assert queue.complete(result(job_id), "w")
        time.sleep(0.3)  # past the retention, and past the pause between purges
    assert queue.get(old) is None and queue.job(new).status == "done"
    queue.close()


def test_the_sqlite_claim_walks_indexes_and_sorts_only_its_candidates(tmp_path: Path) -> None:
    queue = JobQueue.in_state_dir(tmp_path)
    sql = claim_query(2, queue.db.skip_locked)
    select = sql[sql.index("(SELECT id FROM (") + 1 : sql.index("RETURNING")].strip()[:-1]
    plan = [
        row[-1] for row in queue.db.query(f"EXPLAIN QUERY PLAN {select}", (0, "a", "b", "a", "b"))
    ]
    searches = [step for step in plan if step.startswith(("SEARCH jobs", "SCAN jobs"))]
    assert searches == [
        "SEARCH jobs USING INDEX jobs_leased (lease_until<?)",
        "SEARCH jobs USING INDEX jobs_queued (tag=?)",
        "SEARCH jobs USING INDEX jobs_queued (tag=?)",
    ], plan
    queue.close()


def test_bench_queue_measures_every_row_on_both_databases(tmp_path: Path) -> None:
    """`orvanta bench --queue`, tiny: the JSON rows and the README table."""
    out = tmp_path / "queue.json"
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    env.pop("DATABASE_URL", None)
    sizes = ["--queue-small", "20", "--queue-backlog", "300", "--queue-finished", "500"]
    argv = [sys.executable, "-m", "runtime.cli", "bench", "--queue", *sizes]
    postgres = scratch_postgres() if postgres_unavailable() is None else contextlib.nullcontext()
    with postgres as url:
        if url:
            env["DATABASE_URL"] = url
        proc = subprocess.run(
            [*argv, "--queue-sample", "10", "--json", str(out), "--markdown"],
            cwd=ROOT,
            env=env,
            capture_output=True,
            text=True,
            timeout=120,
            check=False,
        )
    assert proc.returncode == 0, proc.stderr
    rows = json.loads(out.read_text())["queue"]
    databases = ["sqlite"] + (["postgresql"] if url else [])
    assert [(r["database"], r["queued"], r["finished"]) for r in rows] == [
        (db, queued, finished)
        for db in databases
        for queued, finished in ((20, 0), (300, 0), (20, 500))
    ]
    assert all(r["jobs"] == 10 and r["ms_per_job"] > 0 for r in rows)
    assert "| sqlite | 300 | 0 |" in proc.stdout
