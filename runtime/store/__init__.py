"""The queue's stores, split by what they keep, over one `runtime.database.Database`.

Jobs (`jobs`: what admins submit and read; `claims`: what workers take and
report; `finished`: where done jobs go), live workers, worker groups and
instance settings. Each store runs only its own SQL and never asks which
database it has. runtime.queue.JobQueue puts them together for callers that
use several; the server's routes ask for the stores they use.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from typing import Any

from runtime.database import Database
from runtime.settings import DEFAULT_JOB_RETENTION
from runtime.store import finished
from runtime.store.schema import finish


class Store:
    """Queries over one database connection, which every store of a queue shares."""

    def __init__(self, db: Database, retention: float = DEFAULT_JOB_RETENTION) -> None:
        self.db = db
        self.retention = retention  # seconds a finished job is kept (ORVANTA_JOB_RETENTION_SECONDS)
        self._purged_at = 0.0

    def _finish(self, job_id: str, where: str, params: Sequence[Any], result: str) -> bool:
        """Mark job `job_id` done with `result`, if it matches `where`, and move it to the
        finished table in the same transaction (runtime.store.schema.finish): claims never
        see finished jobs. False when it did not match.

        Finished jobs past the retention go first, outside that transaction, so a purge
        that fails fails before the result is recorded and its caller's retry is safe.
        """
        self._purge_due()
        return finish(self.db, job_id, where, params, time.time(), result)

    def _purge_due(self) -> None:
        """Remove a batch of finished jobs past the retention, when one is due."""
        now = time.time()
        due = now - self._purged_at >= min(finished.PURGE_EVERY, self.retention)
        if due and finished.purge(self.db, now - self.retention) < finished.PURGE_BATCH:
            self._purged_at = now  # else more are due: the next finish takes the next batch
