"""Jobs as admins see them: submitted, listed, read and canceled, in either job table."""

from __future__ import annotations

import json
import time
import uuid
from typing import Any

from runtime.jobs import DEFAULT_TAG, DEFAULT_WORKSPACE, JobResult, QueuedJob
from runtime.store import Store
from runtime.store.errors import JobNotFound, check_name
from runtime.store.finished import by_id
from runtime.store.schema import FINISHED, HOT
from runtime.submission import validate_job

JOB_COLUMNS = (
    "id, status, attempts, result, tag, workspace, worker, worker_group, created, finished"
)


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
            f"INSERT INTO {HOT} (id, language, script, env, timeout, tag, workspace, created) "
            "VALUES (?,?,?,?,?,?,?,?)",
            (job_id, language, script, json.dumps(env or {}), timeout, tag, workspace, time.time()),
        )
        return job_id

    def get(self, job_id: str) -> QueuedJob | None:
        rows = self.db.query(by_id(JOB_COLUMNS), (job_id, job_id))
        return queued_job(rows[0]) if rows else None

    def job(self, job_id: str) -> QueuedJob:
        """Like `get`, for callers that must have the job: JobNotFound otherwise."""
        job = self.get(job_id)
        if job is None:
            raise JobNotFound(job_id)
        return job

    def jobs(self, status: str | None = None, limit: int = 100) -> list[QueuedJob]:
        """The newest jobs (of one status), in one query: the newest of each table, merged."""
        where, params = ("WHERE status=?", [status]) if status else ("", [])
        tables = (HOT, FINISHED) if status in (None, "done") else (HOT,)
        newest = " UNION ALL ".join(
            f"SELECT * FROM (SELECT {JOB_COLUMNS} FROM {table} {where} "
            f"ORDER BY created DESC LIMIT ?) AS newest_{table}"
            for table in tables
        )
        rows = self.db.query(
            f"SELECT * FROM ({newest}) AS newest ORDER BY created DESC LIMIT ?",
            (*[p for _ in tables for p in (*params, limit)], limit),
        )
        return [queued_job(row) for row in rows]

    def counts(self) -> dict[str, Any]:
        counts: dict[str, Any] = dict(
            self.db.query(f"SELECT status, count(*) FROM {HOT} GROUP BY status")
        )
        ((done,),) = self.db.query(f"SELECT count(*) FROM {FINISHED}")
        if done:
            counts["done"] = counts.get("done", 0) + done
        return counts

    def cancel(self, job_id: str) -> str:
        """Ask for a job to stop: a queued one never runs, a running one is killed by its worker.

        Each step is one conditional UPDATE, so a worker claiming the job meanwhile
        turns "never runs" into "killed while running", never into a lost result.
        """
        result = JobResult(job_id, "none", "canceled", None, 0.0, "", "", ["canceled"])
        if self._finish(job_id, "status='queued'", (), json.dumps(result.to_dict())):
            return "canceled before it ran"
        if self.db.execute(f"UPDATE {HOT} SET cancel=1 WHERE id=? AND status='running'", (job_id,)):
            return "cancel requested"
        self.job(job_id)  # JobNotFound, or the job exists and is done
        return "already done"
