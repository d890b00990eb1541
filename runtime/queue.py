"""The embedded job queue: one SQLite file in ORVANTA_STATE_DIR, shared by workers on one host.

A claimed job carries a lease that the worker renews while the job runs; a
worker killed mid-job stops renewing, the lease runs out and the next claim
takes the job again, so a killed worker loses no job.
"""

from __future__ import annotations

import json
import sqlite3
import time
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from runtime.executor import JobResult, JobSpec

SCHEMA = """
CREATE TABLE IF NOT EXISTS jobs (
    id          TEXT PRIMARY KEY,
    language    TEXT NOT NULL,
    script      TEXT NOT NULL,
    env         TEXT NOT NULL DEFAULT '{}',
    timeout     REAL,
    status      TEXT NOT NULL DEFAULT 'queued',  -- queued | running | done
    worker      TEXT,
    attempts    INTEGER NOT NULL DEFAULT 0,
    lease_until REAL,
    cancel      INTEGER NOT NULL DEFAULT 0,
    created     REAL NOT NULL,
    finished    REAL,
    result      TEXT
);
CREATE INDEX IF NOT EXISTS jobs_claim ON jobs (status, created);
CREATE TABLE IF NOT EXISTS instance_settings (
    key   TEXT PRIMARY KEY,
    value TEXT NOT NULL
);
"""


@dataclass(frozen=True)
class QueuedJob:
    id: str
    status: str
    attempts: int
    result: JobResult | None


class JobQueue:
    def __init__(self, path: Path) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        self.path = path
        self.db = sqlite3.connect(path, timeout=30.0, isolation_level=None, check_same_thread=False)
        self.db.execute("PRAGMA journal_mode=WAL")
        self.db.execute("PRAGMA synchronous=NORMAL")
        self.db.executescript(SCHEMA)

    @classmethod
    def in_state_dir(cls, state_dir: Path) -> JobQueue:
        return cls(state_dir / "queue.sqlite3")

    def close(self) -> None:
        self.db.close()

    def submit(
        self,
        language: str,
        script: str,
        env: dict[str, str] | None = None,
        timeout: float | None = None,
    ) -> str:
        job_id = uuid.uuid4().hex[:16]
        self.db.execute(
            "INSERT INTO jobs (id, language, script, env, timeout, created) VALUES (?,?,?,?,?,?)",
            (job_id, language, script, json.dumps(env or {}), timeout, time.time()),
        )
        return job_id

    def claim(self, worker: str, lease: float) -> JobSpec | None:
        """Take the oldest queued job, or one whose worker's lease ran out."""
        now = time.time()
        row = self.db.execute(
            """UPDATE jobs SET status='running', worker=?, attempts=attempts+1, lease_until=?
               WHERE id = (SELECT id FROM jobs
                           WHERE status='queued' OR (status='running' AND lease_until < ?)
                           ORDER BY created LIMIT 1)
               RETURNING id, language, script, env, timeout""",
            (worker, now + lease, now),
        ).fetchone()
        if row is None:
            return None
        job_id, language, script, env, timeout = row
        return JobSpec(job_id, language, script, json.loads(env), timeout)

    def renew(self, job_id: str, worker: str, lease: float) -> bool:
        """Extend the lease; False when the job is no longer this worker's."""
        cur = self.db.execute(
            "UPDATE jobs SET lease_until=? WHERE id=? AND worker=? AND status='running'",
            (time.time() + lease, job_id, worker),
        )
        return cur.rowcount == 1

    def cancel(self, job_id: str) -> str:
        """Ask for a job to stop: a queued one never runs, a running one is killed by its worker."""
        with self.db:
            self.db.execute("BEGIN IMMEDIATE")
            row = self.db.execute("SELECT status FROM jobs WHERE id=?", (job_id,)).fetchone()
            if row is None:
                raise KeyError(f"no job {job_id!r} in {self.path}")
            if row[0] == "queued":
                result = JobResult(job_id, "none", "canceled", None, 0.0, "", "", ["canceled"])
                self.db.execute(
                    "UPDATE jobs SET status='done', finished=?, result=? WHERE id=?",
                    (time.time(), json.dumps(result.to_dict()), job_id),
                )
                return "canceled before it ran"
            if row[0] == "running":
                self.db.execute("UPDATE jobs SET cancel=1 WHERE id=?", (job_id,))
                return "cancel requested"
            return "already done"

    def cancel_requested(self, job_id: str) -> bool:
        row = self.db.execute("SELECT cancel FROM jobs WHERE id=?", (job_id,)).fetchone()
        return bool(row and row[0])

    def complete(self, result: JobResult, worker: str) -> bool:
        """Record the result once; False when another worker took the job over meanwhile."""
        cur = self.db.execute(
            """UPDATE jobs SET status='done', finished=?, result=?
               WHERE id=? AND worker=? AND status='running'""",
            (time.time(), json.dumps(result.to_dict()), result.job_id, worker),
        )
        return cur.rowcount == 1

    def get(self, job_id: str) -> QueuedJob | None:
        row = self.db.execute(
            "SELECT id, status, attempts, result FROM jobs WHERE id=?", (job_id,)
        ).fetchone()
        if row is None:
            return None
        result = JobResult(**json.loads(row[3])) if row[3] else None
        return QueuedJob(row[0], row[1], row[2], result)

    def wait(self, job_id: str, timeout: float, poll: float = 0.02) -> QueuedJob:
        """Block until the job is done; TimeoutError naming the job and its state otherwise."""
        end = time.monotonic() + timeout
        while True:
            job = self.get(job_id)
            if job is None:
                raise KeyError(f"no job {job_id!r} in {self.path}")
            if job.status == "done":
                return job
            if time.monotonic() > end:
                raise TimeoutError(
                    f"job {job_id} still {job.status} after {timeout:g}s; is a worker running "
                    f"on {self.path}? (start one with: orvanta worker)"
                )
            time.sleep(poll)

    def setting(self, key: str) -> str | None:
        """An instance setting (job_isolation) as every worker on this queue sees it."""
        row = self.db.execute("SELECT value FROM instance_settings WHERE key=?", (key,)).fetchone()
        return None if row is None else str(row[0])

    def set_setting(self, key: str, value: str | None) -> None:
        if value is None:
            self.db.execute("DELETE FROM instance_settings WHERE key=?", (key,))
        else:
            self.db.execute(
                "INSERT INTO instance_settings (key, value) VALUES (?, ?) "
                "ON CONFLICT (key) DO UPDATE SET value=excluded.value",
                (key, value),
            )

    def counts(self) -> dict[str, Any]:
        return dict(self.db.execute("SELECT status, count(*) FROM jobs GROUP BY status").fetchall())
