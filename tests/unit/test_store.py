"""The queue's stores on both databases: typed refusals, the schema, what the facade joins.

Each test runs on both databases (the `queue` and `database_url` fixtures, conftest.py).
"""

from __future__ import annotations

import inspect
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from conformance.service import ROOT
from runtime.database import Database, DuplicateKeyError, connect
from runtime.jobs import JobResult
from runtime.queue import JobQueue
from runtime.store.claims import ClaimStore
from runtime.store.errors import (
    Conflict,
    GroupExists,
    GroupNotFound,
    JobNotFound,
    NotFound,
)
from runtime.store.groups import GroupStore
from runtime.store.instance_settings import InstanceSettings
from runtime.store.jobs import JobStore
from runtime.store.workers import WorkerRegistry

STORES = (JobStore, ClaimStore, WorkerRegistry, GroupStore, InstanceSettings)


def test_missing_jobs_and_groups_are_not_found(queue: JobQueue) -> None:
    for refuse in (
        lambda: queue.cancel("nope"),
        lambda: queue.job("nope"),
        lambda: queue.wait("nope", 1),
    ):
        with pytest.raises(JobNotFound) as err:
            refuse()
        assert isinstance(err.value, NotFound) and str(err.value).startswith("no job 'nope'")
    for refuse in (lambda: queue.delete_group("g"), lambda: queue.rotate_group_token("g")):
        with pytest.raises(GroupNotFound, match=r"^no worker group 'g'$"):
            refuse()
    assert queue.get("nope") is None


def test_a_taken_group_name_is_a_conflict_and_keeps_the_first_token(queue: JobQueue) -> None:
    token = queue.create_group("g", ("a",))
    with pytest.raises(GroupExists, match=r"^worker group 'g' already exists$") as err:
        queue.create_group("g", ("b",))
    assert isinstance(err.value, Conflict) and not isinstance(err.value, NotFound)
    group = queue.group_for_token(token)
    assert group is not None and group.tags == ("a",)


def test_the_refusals_stay_what_older_callers_catch() -> None:
    """The CLI catches KeyError (missing) and ValueError (refused) and prints the message."""
    assert issubclass(NotFound, KeyError) and issubclass(Conflict, ValueError)
    assert not issubclass(NotFound, ValueError) and not issubclass(Conflict, KeyError)
    assert JobNotFound("x").args[0] == str(JobNotFound("x")) == "no job 'x'"


def test_both_databases_report_a_duplicate_key_alike(queue: JobQueue) -> None:
    db: Database = queue.db
    db.execute("INSERT INTO instance_settings (key, value) VALUES (?, ?)", ("k", "1"))
    with pytest.raises(DuplicateKeyError):
        db.execute("INSERT INTO instance_settings (key, value) VALUES (?, ?)", ("k", "2"))
    assert queue.setting("k") == "1"
    assert {"id", "tag", "workspace", "worker_group", "result"} <= db.columns("jobs")


def test_a_queue_of_an_older_release_is_migrated_in_place(
    database_url: str, tmp_path: Path
) -> None:
    """The first release's table: new columns, the claim's indexes, and its done jobs moved
    to the finished table, where they read as before."""
    old = connect(database_url, tmp_path)
    old.script(
        """CREATE TABLE jobs (id TEXT PRIMARY KEY, language TEXT NOT NULL, script TEXT NOT NULL,
           env TEXT NOT NULL DEFAULT '{}', timeout DOUBLE PRECISION,
           status TEXT NOT NULL DEFAULT 'queued', worker TEXT,
           attempts INTEGER NOT NULL DEFAULT 0, lease_until DOUBLE PRECISION,
           cancel INTEGER NOT NULL DEFAULT 0, created DOUBLE PRECISION NOT NULL,
           finished DOUBLE PRECISION, result TEXT);
           CREATE INDEX jobs_by_tag ON jobs (status, created);
           INSERT INTO jobs (id, language, script, created) VALUES ('old', 'bash', 'echo', 1)"""
    )
    old.execute(
        "INSERT INTO jobs (id, language, script, created, status, worker, attempts, finished, "
        "result) VALUES ('done', 'bash', 'echo', 0, 'done', 'w0', 1, ?, ?)",
        (
            time.time(),
            json.dumps(JobResult("done", "none", "success", 0, 0.1, "hi", "", []).to_dict()),
        ),
    )
    old.close()
    for _ in range(2):  # opening it again finds nothing left to add or move
        queue = JobQueue.open(database_url, tmp_path)
        assert queue.db.query("SELECT id FROM jobs") == [("old",)]
        assert queue.db.query("SELECT id, worker FROM finished_jobs") == [("done", "w0")]
        queue.close()
    queue = JobQueue.open(database_url, tmp_path)
    spec = queue.claim("w", 30)
    assert spec is not None and (spec.id, spec.workspace) == ("old", "default")
    assert queue.held_by_group("old", "g") is False  # claimed by a normal worker: no group
    done = queue.job("done")
    assert done.status == "done" and done.result is not None and done.result.stdout == "hi"
    assert queue.counts() == {"running": 1, "done": 1}
    assert queue.cancel("done") == "already done"
    queue.close()


@pytest.mark.req("R-JOB-5")
def test_a_released_job_is_queued_again_as_if_never_claimed(queue: JobQueue) -> None:
    """A worker's prefetch handed back: the next claim takes it, at its first attempt."""
    first, second = queue.submit("bash", "true\n"), queue.submit("bash", "true\n")
    claimed = queue.claim("w-a", 30)
    assert claimed is not None and claimed.id == first
    assert not queue.release(first, "w-b")  # not w-b's to hand back
    assert queue.release(first, "w-a")
    assert not queue.release(first, "w-a")  # once
    job = queue.get(first)
    assert job is not None
    assert (job.status, job.attempts, job.worker) == ("queued", 0, None)
    again = queue.claim("w-b", 30)
    assert again is not None and again.id == first  # still the oldest: ahead of `second`
    assert queue.complete(JobResult(first, "none", "success", 0, 0.0, "", "", []), "w-b")
    done = queue.get(first)
    assert done is not None and (done.attempts, done.worker) == (1, "w-b")
    assert second != first


def test_a_finished_job_moves_whole_and_once_in_one_statement_on_postgresql(
    queue: JobQueue, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A result (and a cancel of a queued job) moves the job to the finished table with every
    column it had; a second result changes nothing. On PostgreSQL that is one statement,
    one round trip: the queue thread's cost per job (runtime.store.schema.finish)."""
    ran, waiting = queue.submit("bash", "echo hi\n", env={"A": "b"}), queue.submit("bash", "x\n")
    claimed = queue.claim("w-a", 30)
    assert claimed is not None and claimed.id == ran
    statements: list[str] = []
    execute = queue.db.execute
    monkeypatch.setattr(
        queue.db, "execute", lambda sql, params=(): statements.append(sql) or execute(sql, params)
    )
    monkeypatch.setattr(queue, "_purged_at", time.time())  # no purge of old jobs in between
    result = JobResult(ran, "none", "success", 0, 0.5, "hi\n", "", ["isolation: none"])
    assert not queue.complete(result, "w-b")  # not w-b's job: nothing changes
    assert queue.complete(result, "w-a")
    assert not queue.complete(result, "w-a")  # once
    assert queue.cancel(waiting) == "canceled before it ran"
    # SQLite: an INSERT of the done row, and a DELETE where it matched
    writes = 4 if queue.db.kind == "postgresql" else 1 + 2 + 1 + 2
    assert len(statements) == writes, statements
    done = queue.job(ran)
    assert (done.status, done.worker, done.attempts) == ("done", "w-a", 1)
    assert done.result == result and done.finished is not None and done.finished >= done.created
    env = queue.db.query("SELECT env, script FROM finished_jobs WHERE id = ?", (ran,))
    assert [(json.loads(env[0][0]), env[0][1])] == [({"A": "b"}, "echo hi\n")]
    canceled = queue.job(waiting)
    assert canceled.status == "done" and canceled.attempts == 0
    assert canceled.result is not None and canceled.result.status == "canceled"
    hot = queue.db.query("SELECT COUNT(*) FROM jobs")[0][0]
    moved = queue.db.query("SELECT COUNT(*) FROM finished_jobs WHERE id IN (?, ?)", (ran, waiting))
    assert (hot, moved[0][0]) == (0, 2)


def test_a_result_and_the_next_claim_are_one_statement_on_postgresql(
    queue: JobQueue, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The worker's queue thread records a result and claims the next job in one round trip
    where the database can (runtime.pipeline `_send_and_claim`); SQLite answers None and
    the thread makes the two calls. A job is never claimed by the statement finishing it,
    even when its lease has lapsed."""

    def result(job_id: str) -> JobResult:
        return JobResult(job_id, "none", "success", 0, 0.1, "ok\n", "", [])

    first, second, third = (queue.submit("bash", "true\n") for _ in range(3))
    claimed = queue.claim("w-a", 30)
    assert claimed is not None and claimed.id == first
    if queue.db.kind == "sqlite":
        assert queue.complete_and_claim(result(first), "w-a", 30, ("default",)) is None
        return
    statements: list[str] = []
    query = queue.db.query
    monkeypatch.setattr(
        queue.db, "query", lambda sql, params=(): statements.append(sql) or query(sql, params)
    )
    monkeypatch.setattr(queue, "_purged_at", time.time())  # no purge of old jobs in between

    def both(job_id: str, worker: str) -> tuple[bool, str | None]:
        answer = queue.complete_and_claim(result(job_id), worker, 30, ("default",))
        assert answer is not None
        return answer[0], answer[1].id if answer[1] is not None else None

    assert both(first, "w-a") == (True, second)
    assert len(statements) == 1, statements
    done, running = queue.job(first), queue.job(second)
    assert done.status == "done" and done.result == result(first)
    assert (running.status, running.worker, running.attempts) == ("running", "w-a", 1)
    assert both(second, "w-b") == (False, third)  # not w-b's to answer: not recorded
    assert queue.job(second).status == "running"
    assert both(third, "w-b") == (True, None)
    # a lapsed lease: the statement that finishes the job does not claim it again, and
    # another lapsed one behind it (a dead worker's) is the one it takes
    orphan = queue.submit("bash", "true\n", tag="other")
    assert queue.claim("w-dead", 30, ("other",)) is not None
    assert queue.renew(second, "w-a", -2.0) and queue.renew(orphan, "w-dead", -1.0)
    answer = queue.complete_and_claim(result(second), "w-a", 30, ("default", "other"))
    assert answer is not None and answer[1] is not None
    assert (answer[0], answer[1].id) == (True, orphan)
    assert queue.job(second).status == "done" and queue.job(second).attempts == 1
    assert (queue.job(orphan).worker, queue.job(orphan).attempts) == ("w-a", 2)
    assert both(orphan, "w-a") == (True, None)
    assert queue.db.query("SELECT COUNT(*) FROM jobs")[0][0] == 0


@pytest.mark.req("R-JOB-3")
def test_a_job_canceled_while_claimed_ahead_is_not_handed_back(queue: JobQueue) -> None:
    job_id = queue.submit("bash", "true\n")
    assert queue.claim("w-a", 30) is not None
    assert queue.cancel(job_id) == "cancel requested"
    assert not queue.release(job_id, "w-a")  # queued again, it would run: the worker ends it
    job = queue.get(job_id)
    assert job is not None and job.status == "running"


def test_the_stores_method_names_are_disjoint() -> None:
    """JobQueue joins the stores by inheritance: a shared name would hide one silently."""
    seen: dict[str, str] = {}
    for store in STORES:
        for name, _ in inspect.getmembers(store, inspect.isfunction):
            if not name.startswith("_"):
                assert name not in seen, f"{store.__name__}.{name} hides {seen[name]}.{name}"
                seen[name] = store.__name__
    assert all(issubclass(JobQueue, store) for store in STORES)


@pytest.mark.req("R-AGT-1")
def test_the_agent_imports_the_standard_library_and_the_job_types_only() -> None:
    code = (
        "import sys, runtime.agent\n"
        "print(sorted(m for m in sys.modules if m.startswith('runtime')))\n"
        "print(sorted(m for m in ('fastapi', 'pydantic', 'psycopg', 'sqlite3') "
        "if m in sys.modules))\n"
    )
    out = subprocess.run(
        [sys.executable, "-c", code],
        cwd=ROOT,
        env={**os.environ, "PYTHONPATH": str(ROOT)},
        capture_output=True,
        text=True,
        check=True,
    ).stdout.splitlines()
    assert out == ["['runtime', 'runtime.agent', 'runtime.jobs']", "[]"]


@pytest.mark.req("R-SEL-7")
def test_a_claim_carries_the_live_job_isolation(queue: JobQueue) -> None:
    """Read in the claim's own statement: live for each job, with no query of its own."""
    for _ in range(3):
        queue.submit("bash", "true\n")
    first = queue.claim("w", 30.0)
    assert first is not None and first.job_isolation_read and first.job_isolation is None
    queue.set_setting("job_isolation", "nsjail_sandboxing")
    second = queue.claim("w", 30.0)
    assert second is not None and second.job_isolation == "nsjail_sandboxing"
    queue.set_setting("job_isolation", None)
    third = queue.claim("w", 30.0)
    assert third is not None and third.job_isolation_read and third.job_isolation is None
