"""Finished jobs: a table of their own, so the hot table holds only queued and running jobs
and a claim costs the same after a million jobs as after ten.

A job moves there in the transaction that marks it done (runtime.store.Store._finish) and
is dropped once older than the retention (ORVANTA_JOB_RETENTION_SECONDS), a batch at a
time. Readers look in both tables with one statement, which sees a job in exactly one.
"""

from __future__ import annotations

from runtime.database import Database
from runtime.store.schema import FINISHED, HOT

PURGE_EVERY = 60.0  # seconds between looks for jobs past the retention, per queue
PURGE_BATCH = 1000  # jobs dropped per look: a finish never waits on a big delete


def by_id(columns: str) -> str:
    """One job's `columns` from whichever table holds it; parameters: the id, twice."""
    return (
        f"SELECT {columns} FROM {HOT} WHERE id=? "
        f"UNION ALL SELECT {columns} FROM {FINISHED} WHERE id=?"
    )


def purge(db: Database, before: float) -> int:
    """Drop up to PURGE_BATCH jobs finished before `before`, oldest first; how many went."""
    return db.execute(
        f"DELETE FROM {FINISHED} WHERE id IN "
        f"(SELECT id FROM {FINISHED} WHERE finished < ? ORDER BY finished LIMIT {PURGE_BATCH})",
        (before,),
    )
