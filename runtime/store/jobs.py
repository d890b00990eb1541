"""Jobs as admins see them: submitted, listed, read and canceled (the jobs table)."""

from __future__ import annotations

import json
import time
import uuid
from typing import Any

from runtime.database import Database
from runtime.jobs import DEFAULT_TAG, DEFAULT_WORKSPACE, JobResult, QueuedJob
from runtime.store import Store
from runtime.store.errors import JobNotFound, check_name
from runtime.submission import validate_job

SCHEMA = """
CREATE TABLE IF NOT EXISTS jobs (
    id           TEXT PRIMARY KEY,
    language     TEXT NOT NULL,
    script       TEXT NOT NULL,
    env          TEXT NOT NULL DEFAULT '{}',
    timeout      DOUBLE PRECISION,
    tag          TEXT NOT NULL DEFAULT 'default',
    workspace    TEXT NOT NULL DEFAULT 'default',
    status       TEXT NOT NULL DEFAULT 'queued',
    worker       TEXT,
    worker_group TEXT,
    attempts     INTEGER NOT NULL DEFAULT 0,
    lease_until  DOUBLE PRECISION,
    cancel       INTEGER NOT NULL DEFAULT 0,
    created      DOUBLE PRECISION NOT NULL,
    finished     DOUBLE PRECISION,
    result       TEXT
)
"""
INDEXES = "CREATE INDEX IF NOT EXISTS jobs_by_tag ON jobs (status, tag, created)"
# Columns added since the first release: a queue file of an older worker gains them in place.
ADDED_COLUMNS = {
    "tag": "TEXT NOT NULL DEFAULT 'default'",
    "workspace": "TEXT NOT NULL DEFAULT 'default'",
    "worker_group": "TEXT",
}
JOB_COLUMNS = (
    "id, status, attempts, result, tag, workspace, worker, worker_group, created, finished"
)


def upgrade(db: Database) -> None:
    """Bring a jobs table of any release up to date; run inside `db.schema_transaction()`."""
    have = db.columns("jobs")
    for column, kind in ADDED_COLUMNS.items():
        if column not in have:
            db.execute(f"ALTER TABLE jobs ADD COLUMN {column} {kind}")
    db.execute(INDEXES)


def queued_job(row: tuple[Any, ...]) -> QueuedJob:
    """A row of JOB_COLUMNS as a record."""
    result = JobResult(**json.loads(row[3])) if row[3] else None
    return QueuedJob(row[0], row[1], row[2], result, *row[4:])


class JobStore(Store):
    def submit(
        self,
        language: str,
        script: str,
        env: dict[str, str] | None = None,
        timeout: float | None = None,
        tag: str = DEFAULT_TAG,
        workspace: str = DEFAULT_WORKSPACE,
    ) -> str:
        """Queue a job; SubmissionError (runtime.submission) or InvalidNameError refuse it."""
        validate_job(language, script, env or {})
        check_name("tag", tag)
        check_name("workspace", workspace)
        job_id = uuid.uuid4().hex[:16]
        self.db.execute(
            "INSERT INTO jobs (id, language, script, env, timeout, tag, workspace, created) "
            "VALUES (?,?,?,?,?,?,?,?)",
            (job_id, language, script, json.dumps(env or {}), timeout, tag, workspace, time.time()),
        )
        return job_id

    def get(self, job_id: str) -> QueuedJob | None:
        rows = self.db.query(f"SELECT {JOB_COLUMNS} FROM jobs WHERE id=?", (job_id,))
        return queued_job(rows[0]) if rows else None

    def job(self, job_id: str) -> QueuedJob:
        """Like `get`, for callers that must have the job: JobNotFound otherwise."""
        job = self.get(job_id)
        if job is None:
            raise JobNotFound(job_id)
        return job

    def jobs(self, status: str | None = None, limit: int = 100) -> list[QueuedJob]:
        """The newest jobs (of one status), in one query."""
        where, params = ("WHERE status=?", [status]) if status else ("", [])
        rows = self.db.query(
            f"SELECT {JOB_COLUMNS} FROM jobs {where} ORDER BY created DESC LIMIT ?",
            (*params, limit),
        )
        return [queued_job(row) for row in rows]

    def counts(self) -> dict[str, Any]:
        return dict(self.db.query("SELECT status, count(*) FROM jobs GROUP BY status"))

    def cancel(self, job_id: str) -> str:
        """Ask for a job to stop: a queued one never runs, a running one is killed by its worker.

        Each step is one conditional UPDATE, so a worker claiming the job meanwhile
        turns "never runs" into "killed while running", never into a lost result.
        """
        result = JobResult(job_id, "none", "canceled", None, 0.0, "", "", ["canceled"])
        if self.db.execute(
            "UPDATE jobs SET status='done', finished=?, result=? WHERE id=? AND status='queued'",
            (time.time(), json.dumps(result.to_dict()), job_id),
        ):
            return "canceled before it ran"
        if self.db.execute("UPDATE jobs SET cancel=1 WHERE id=? AND status='running'", (job_id,)):
            return "cancel requested"
        self.job(job_id)  # JobNotFound, or the job exists and is done
        return "already done"
