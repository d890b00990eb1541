"""The job queue: jobs, worker groups, live workers and instance settings in one database.

SQLite by default, PostgreSQL when DATABASE_URL says so (runtime.database). A
claimed job carries a lease that its worker renews while the job runs; a
worker killed mid-job stops renewing, the lease runs out and the next claim
takes the job again, so a killed worker loses no job. A result is recorded
once, by the worker holding the lease, so no job has two results.

A job carries a tag; a worker claims only the tags its group serves (R-GRP-1).
"""

from __future__ import annotations

import hashlib
import json
import secrets
import time
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from runtime.database import PostgresDatabase, SqliteDatabase, connect
from runtime.jobs import DEFAULT_TAG, DEFAULT_WORKSPACE, JobResult, JobSpec, QueuedJob
from runtime.languages import is_plain_name
from runtime.submission import validate_job

WORKER_LIVE_SECONDS = 15.0  # a worker not seen for this long serves no tag
MAX_ATTEMPTS = 5  # a job whose workers died (or could not report) this often fails for good

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
);
CREATE TABLE IF NOT EXISTS worker_groups (
    name       TEXT PRIMARY KEY,
    tags       TEXT NOT NULL,
    token_hash TEXT NOT NULL UNIQUE,
    created    DOUBLE PRECISION NOT NULL
);
CREATE TABLE IF NOT EXISTS workers (
    name         TEXT PRIMARY KEY,
    mode         TEXT NOT NULL,
    worker_group TEXT,
    tags         TEXT NOT NULL,
    last_seen    DOUBLE PRECISION NOT NULL
);
CREATE TABLE IF NOT EXISTS instance_settings (
    key   TEXT PRIMARY KEY,
    value TEXT NOT NULL
)
"""


INDEXES = "CREATE INDEX IF NOT EXISTS jobs_by_tag ON jobs (status, tag, created)"
# Columns added since the first release: a queue file of an older worker gains them in place.
ADDED_COLUMNS = {
    "tag": "TEXT NOT NULL DEFAULT 'default'",
    "workspace": "TEXT NOT NULL DEFAULT 'default'",
    "worker_group": "TEXT",
}


class InvalidNameError(ValueError):
    """A tag, group, workspace or volume name that could be a path or an injection."""

    def __init__(self, what: str, value: str) -> None:
        super().__init__(
            f"{what} {value!r} is not valid: use 1-63 letters, digits, '_', '.' or '-', "
            f"starting with a letter or digit"
        )


def check_name(what: str, value: str) -> str:
    if not is_plain_name(value):
        raise InvalidNameError(what, value)
    return value


@dataclass(frozen=True)
class WorkerGroup:
    name: str
    tags: tuple[str, ...]


JOB_COLUMNS = (
    "id, status, attempts, result, tag, workspace, worker, worker_group, created, finished"
)


def _queued_job(row: tuple[Any, ...]) -> QueuedJob:
    result = JobResult(**json.loads(row[3])) if row[3] else None
    return QueuedJob(row[0], row[1], row[2], result, *row[4:])


def hash_token(token: str) -> str:
    return hashlib.sha256(token.encode()).hexdigest()


class JobQueue:
    def __init__(self, db: SqliteDatabase | PostgresDatabase) -> None:
        self.db = db
        self.path = db.display
        if isinstance(db, PostgresDatabase):
            with db.transaction():  # concurrent CREATE IF NOT EXISTS races in PostgreSQL
                db.query("SELECT pg_advisory_xact_lock(5617)")
                db.script(SCHEMA)
                for column, kind in ADDED_COLUMNS.items():
                    db.execute(f"ALTER TABLE jobs ADD COLUMN IF NOT EXISTS {column} {kind}")
                db.execute(INDEXES)
        else:
            db.script(SCHEMA)
            with db.transaction():
                have = {row[1] for row in db.query("PRAGMA table_info(jobs)")}
                for column, kind in ADDED_COLUMNS.items():
                    if column not in have:
                        db.execute(f"ALTER TABLE jobs ADD COLUMN {column} {kind}")
                db.execute(INDEXES)

    @classmethod
    def open(cls, url: str | None, state_dir: Path) -> JobQueue:
        """The queue DATABASE_URL names; without one, the SQLite file in the state dir."""
        return cls(connect(url, state_dir))

    @classmethod
    def in_state_dir(cls, state_dir: Path) -> JobQueue:
        return cls(SqliteDatabase(state_dir / "queue.sqlite3"))

    def close(self) -> None:
        self.db.close()

    # -- jobs ------------------------------------------------------------------------------
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

    def claim(
        self,
        worker: str,
        lease: float,
        tags: tuple[str, ...] = (DEFAULT_TAG,),
        group: str | None = None,
    ) -> JobSpec | None:
        """Take the oldest queued job of these tags, or one whose worker's lease ran out."""
        if not tags:
            return None
        lock = " FOR UPDATE SKIP LOCKED" if isinstance(self.db, PostgresDatabase) else ""
        marks = ",".join("?" * len(tags))
        while True:
            now = time.time()
            rows = self.db.query(
                f"""UPDATE jobs SET status='running', worker=?, worker_group=?,
                       attempts=attempts+1, lease_until=?
                   WHERE id = (SELECT id FROM jobs
                               WHERE (status='queued' OR (status='running' AND lease_until < ?))
                                 AND tag IN ({marks})
                               ORDER BY created LIMIT 1{lock})
                   RETURNING id, language, script, env, timeout, workspace, attempts""",
                (worker, group, now + lease, now, *tags),
            )
            if not rows:
                return None
            job_id, language, script, env, timeout, workspace, attempts = rows[0]
            if attempts <= MAX_ATTEMPTS:
                return JobSpec(job_id, language, script, json.loads(env), timeout, workspace)
            why = (
                f"abandoned after {attempts - 1} attempts whose workers died or could not "
                f"report a result"
            )
            self.complete(JobResult(job_id, "none", "error", None, 0.0, "", why, [why]), worker)

    def renew(self, job_id: str, worker: str, lease: float) -> bool:
        """Extend the lease; False when the job is no longer this worker's."""
        changed = self.db.execute(
            "UPDATE jobs SET lease_until=? WHERE id=? AND worker=? AND status='running'",
            (time.time() + lease, job_id, worker),
        )
        return changed == 1

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
        if self.get(job_id) is None:
            raise KeyError(f"no job {job_id!r}")
        return "already done"

    def cancel_requested(self, job_id: str) -> bool:
        rows = self.db.query("SELECT cancel FROM jobs WHERE id=?", (job_id,))
        return bool(rows and rows[0][0])

    def complete(self, result: JobResult, worker: str) -> bool:
        """Record the result once; False when another worker took the job over meanwhile."""
        changed = self.db.execute(
            """UPDATE jobs SET status='done', finished=?, result=?
               WHERE id=? AND worker=? AND status='running'""",
            (time.time(), json.dumps(result.to_dict()), result.job_id, worker),
        )
        return changed == 1

    def get(self, job_id: str) -> QueuedJob | None:
        rows = self.db.query(f"SELECT {JOB_COLUMNS} FROM jobs WHERE id=?", (job_id,))
        return _queued_job(rows[0]) if rows else None

    def jobs(self, status: str | None = None, limit: int = 100) -> list[QueuedJob]:
        """The newest jobs (of one status), in one query."""
        where, params = ("WHERE status=?", [status]) if status else ("", [])
        rows = self.db.query(
            f"SELECT {JOB_COLUMNS} FROM jobs {where} ORDER BY created DESC LIMIT ?",
            (*params, limit),
        )
        return [_queued_job(row) for row in rows]

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
                why = self.waiting_reason(job.tag) or "no worker took it in time"
                raise TimeoutError(
                    f"job {job_id} still {job.status} after {timeout:g}s on {self.path}: {why} "
                    f"(start one with: orvanta worker)"
                )
            time.sleep(poll)

    def counts(self) -> dict[str, Any]:
        return dict(self.db.query("SELECT status, count(*) FROM jobs GROUP BY status"))

    # -- workers and groups (R-GRP-1) ------------------------------------------------------
    def heartbeat(self, worker: str, mode: str, tags: tuple[str, ...], group: str | None) -> None:
        self.db.execute(
            "INSERT INTO workers (name, mode, worker_group, tags, last_seen) VALUES (?,?,?,?,?) "
            "ON CONFLICT (name) DO UPDATE SET mode=excluded.mode, "
            "worker_group=excluded.worker_group, tags=excluded.tags, last_seen=excluded.last_seen",
            (worker, mode, group, json.dumps(list(tags)), time.time()),
        )

    def live_workers(self) -> list[dict[str, Any]]:
        rows = self.db.query(
            "SELECT name, mode, worker_group, tags, last_seen FROM workers WHERE last_seen > ? "
            "ORDER BY name",
            (time.time() - WORKER_LIVE_SECONDS,),
        )
        return [
            {"name": n, "mode": m, "group": g, "tags": json.loads(t), "last_seen": s}
            for n, m, g, t, s in rows
        ]

    def served_tags(self) -> set[str]:
        """The tags some live worker serves."""
        return {tag for worker in self.live_workers() for tag in worker["tags"]}

    def waiting_reason(self, tag: str, served: set[str] | None = None) -> str | None:
        """Why a job of this tag would wait forever: no live worker serves it."""
        if tag in (self.served_tags() if served is None else served):
            return None
        return (
            f"no live worker serves tag {tag!r} (none seen in the last "
            f"{WORKER_LIVE_SECONDS:g}s); the job waits until one does"
        )

    def create_group(self, name: str, tags: tuple[str, ...]) -> str:
        """A worker group and its agent token; the token is shown once and stored hashed."""
        check_name("worker group", name)
        for tag in tags:
            check_name("tag", tag)
        token = f"orv_{name}_{secrets.token_urlsafe(24)}"
        try:
            self.db.execute(
                "INSERT INTO worker_groups (name, tags, token_hash, created) VALUES (?,?,?,?)",
                (name, json.dumps(sorted(set(tags))), hash_token(token), time.time()),
            )
        except Exception as exc:
            if "unique" in str(exc).lower() or "duplicate" in str(exc).lower():
                raise KeyError(f"worker group {name!r} already exists") from None
            raise
        return token

    def rotate_group_token(self, name: str) -> str:
        token = f"orv_{name}_{secrets.token_urlsafe(24)}"
        if not self.db.execute(
            "UPDATE worker_groups SET token_hash=? WHERE name=?", (hash_token(token), name)
        ):
            raise KeyError(f"no worker group {name!r}")
        return token

    def delete_group(self, name: str) -> None:
        if not self.db.execute("DELETE FROM worker_groups WHERE name=?", (name,)):
            raise KeyError(f"no worker group {name!r}")

    def groups(self) -> list[WorkerGroup]:
        rows = self.db.query("SELECT name, tags FROM worker_groups ORDER BY name")
        return [WorkerGroup(n, tuple(json.loads(t))) for n, t in rows]

    def group_for_token(self, token: str) -> WorkerGroup | None:
        rows = self.db.query(
            "SELECT name, tags FROM worker_groups WHERE token_hash=?", (hash_token(token),)
        )
        return WorkerGroup(rows[0][0], tuple(json.loads(rows[0][1]))) if rows else None

    # -- instance settings (R-SEL-7) -------------------------------------------------------
    def setting(self, key: str) -> str | None:
        """An instance setting (job_isolation) as every worker on this queue sees it."""
        rows = self.db.query("SELECT value FROM instance_settings WHERE key=?", (key,))
        return None if not rows else str(rows[0][0])

    def set_setting(self, key: str, value: str | None) -> None:
        if value is None:
            self.db.execute("DELETE FROM instance_settings WHERE key=?", (key,))
        else:
            self.db.execute(
                "INSERT INTO instance_settings (key, value) VALUES (?, ?) "
                "ON CONFLICT (key) DO UPDATE SET value=excluded.value",
                (key, value),
            )
