"""The job queue: jobs, worker groups, live workers and instance settings in one database.

SQLite by default, PostgreSQL when DATABASE_URL says so (runtime.database). A
job carries a tag; a worker claims only the tags its group serves (R-GRP-1).
What each part stores, and how, is in runtime.store; this module opens the
database, makes its tables and puts the stores together.
"""

from __future__ import annotations

import os
import time
from pathlib import Path

from runtime.database import Database, SqliteDatabase, connect
from runtime.jobs import QueuedJob
from runtime.settings import job_retention
from runtime.store import groups, instance_settings, schema, workers
from runtime.store.claims import ClaimStore
from runtime.store.errors import JobNotFound
from runtime.store.groups import GroupStore
from runtime.store.instance_settings import InstanceSettings
from runtime.store.jobs import JobStore
from runtime.store.workers import WorkerRegistry


def create_tables(db: Database) -> None:
    """Every table, brought up to date in one transaction that concurrent openers wait for."""
    with db.schema_transaction():
        schema.upgrade(db)
        for tables in (groups.SCHEMA, workers.SCHEMA, instance_settings.SCHEMA):
            db.script(tables)


class JobQueue(JobStore, ClaimStore, WorkerRegistry, GroupStore, InstanceSettings):
    """Every store over one database, for callers that use several: a worker (its
    runtime.worker.JobSource), the CLI, the server, the conformance harness.

    The stores' method names are disjoint (a unit test checks), so none hides another.
    """

    def __init__(self, db: Database, retention: float | None = None) -> None:
        """`retention`: seconds finished jobs are kept; ORVANTA_JOB_RETENTION_SECONDS (checked
        with the other settings at start-up) when not given, for every opener alike."""
        super().__init__(db, job_retention(os.environ) if retention is None else retention)
        self.path = db.display
        create_tables(db)

    @classmethod
    def open(cls, url: str | None, state_dir: Path, retention: float | None = None) -> JobQueue:
        """The queue DATABASE_URL names; without one, the SQLite file in the state dir."""
        return cls(connect(url, state_dir), retention)

    @classmethod
    def in_state_dir(cls, state_dir: Path, retention: float | None = None) -> JobQueue:
        return cls(SqliteDatabase(state_dir / "queue.sqlite3"), retention)

    def close(self) -> None:
        self.db.close()

    def wait(self, job_id: str, timeout: float, poll: float = 0.02) -> QueuedJob:
        """Block until the job is done; TimeoutError naming the job and its state otherwise."""
        end = time.monotonic() + timeout
        while True:
            job = self.get(job_id)
            if job is None:
                raise JobNotFound(job_id, f" in {self.path}")
            if job.status == "done":
                return job
            if time.monotonic() > end:
                why = self.waiting_reason(job.tag) or "no worker took it in time"
                raise TimeoutError(
                    f"job {job_id} still {job.status} after {timeout:g}s on {self.path}: {why} "
                    f"(start one with: orvanta worker)"
                )
            time.sleep(poll)
