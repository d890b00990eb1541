"""The job tables, their indexes, and the migration of a queue of any older release.

Two tables of the same columns: `jobs` holds queued and running jobs only, so a claim
walks an index whose size is the backlog of its own tags; `finished_jobs` holds the rest
(runtime.store.finished). Partial indexes (both databases have them) keep each lookup of
a claim on its own index: queued jobs by tag and age, running jobs by lease.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from runtime.database import Database

HOT = "jobs"
FINISHED = "finished_jobs"
COLUMNS = {
    "id": "TEXT PRIMARY KEY",
    "language": "TEXT NOT NULL",
    "script": "TEXT NOT NULL",
    "env": "TEXT NOT NULL DEFAULT '{}'",
    "timeout": "DOUBLE PRECISION",
    "tag": "TEXT NOT NULL DEFAULT 'default'",
    "workspace": "TEXT NOT NULL DEFAULT 'default'",
    "status": "TEXT NOT NULL DEFAULT 'queued'",
    "worker": "TEXT",
    "worker_group": "TEXT",
    "attempts": "INTEGER NOT NULL DEFAULT 0",
    "lease_until": "DOUBLE PRECISION",
    "cancel": "INTEGER NOT NULL DEFAULT 0",
    "created": "DOUBLE PRECISION NOT NULL",
    "finished": "DOUBLE PRECISION",
    "result": "TEXT",
}
ALL_COLUMNS = ", ".join(COLUMNS)
# columns added since the first release: a queue of an older worker gains them in place
ADDED_COLUMNS = ("tag", "workspace", "worker_group")
SUPERSEDED_INDEXES = ("jobs_by_tag",)  # (status, tag, created): every claim sorted the backlog
INDEXES = f"""
CREATE INDEX IF NOT EXISTS jobs_queued ON {HOT} (tag, created) WHERE status = 'queued';
CREATE INDEX IF NOT EXISTS jobs_leased ON {HOT} (lease_until) WHERE status = 'running';
CREATE INDEX IF NOT EXISTS finished_jobs_by_created ON {FINISHED} (created);
CREATE INDEX IF NOT EXISTS finished_jobs_by_finished ON {FINISHED} (finished)
"""
SCHEMA = ";".join(
    f"CREATE TABLE IF NOT EXISTS {table} ({', '.join(f'{c} {t}' for c, t in COLUMNS.items())})"
    for table in (HOT, FINISHED)
)


def upgrade(db: Database) -> None:
    """Bring the job tables of any release up to date; run inside `db.schema_transaction()`.

    Idempotent: an up-to-date queue finds nothing to add and no done job to move.
    """
    db.script(SCHEMA)
    have = db.columns(HOT)
    for column in ADDED_COLUMNS:
        if column not in have:
            db.execute(f"ALTER TABLE {HOT} ADD COLUMN {column} {COLUMNS[column]}")
    indexes = existing_indexes(db)
    for index in SUPERSEDED_INDEXES:
        if index in indexes:
            db.execute(f"DROP INDEX IF EXISTS {index}")
    # Only what is missing: CREATE INDEX takes its table's SHARE lock even when the index
    # exists, and held to the end of this transaction, one on `jobs` then one on
    # `finished_jobs` deadlocked with a running worker's result (PostgreSQL: a worker that
    # started while another recorded a result died with DeadlockDetected).
    for statement in INDEXES.split(";"):
        if statement.split()[5] not in indexes:
            db.execute(statement)
    move_to_finished(db, "status = 'done'")  # older releases finished jobs in place


def existing_indexes(db: Database) -> set[str]:
    """The names of the indexes the queue's database has now."""
    if db.kind == "sqlite":
        return {row[0] for row in db.query("SELECT name FROM sqlite_master WHERE type = 'index'")}
    rows = db.query("SELECT indexname FROM pg_indexes WHERE schemaname = current_schema()")
    return {row[0] for row in rows}


def move_to_finished(db: Database, where: str, params: Sequence[Any] = ()) -> None:
    """Move the hot table's jobs that match `where` to the finished table; in a transaction."""
    db.execute(
        f"INSERT INTO {FINISHED} ({ALL_COLUMNS}) SELECT {ALL_COLUMNS} FROM {HOT} WHERE {where}",
        params,
    )
    db.execute(f"DELETE FROM {HOT} WHERE {where}", params)


def finish(
    db: Database, job_id: str, where: str, params: Sequence[Any], finished: float, result: str
) -> bool:
    """Move job `job_id`, if it matches `where`, to the finished table, marked done with its
    time and result, atomically; False where it does not match (nothing changed)."""
    values = {"status": "'done'", "finished": "?", "result": "?"}
    select = ", ".join(values.get(column, column) for column in COLUMNS)
    if db.moves_in_one_statement:  # one round trip: the statement is its own transaction
        moved = db.execute(
            f"WITH gone AS (DELETE FROM {HOT} WHERE id=? AND {where} RETURNING {ALL_COLUMNS}) "
            f"INSERT INTO {FINISHED} ({ALL_COLUMNS}) SELECT {select} FROM gone",
            (job_id, *params, finished, result),
        )
        return moved == 1
    with db.transaction():
        moved = db.execute(
            f"INSERT INTO {FINISHED} ({ALL_COLUMNS}) "
            f"SELECT {select} FROM {HOT} WHERE id=? AND {where}",
            (finished, result, job_id, *params),
        )
        if moved == 1:
            db.execute(f"DELETE FROM {HOT} WHERE id=?", (job_id,))
    return moved == 1
