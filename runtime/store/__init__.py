"""The queue's stores, split by what they keep, over one `runtime.database.Database`.

Jobs (`jobs`: what admins submit and read; `claims`: what workers take and
report), live workers, worker groups and instance settings. Each store runs
only its own SQL and never asks which database it has. runtime.queue.JobQueue
puts them together for callers that use several; the server's routes ask
for the stores they use.
"""

from __future__ import annotations

from runtime.database import Database


class Store:
    """Queries over one database connection, which every store of a queue shares."""

    def __init__(self, db: Database) -> None:
        self.db = db
