"""A worker that starts while another records a result must not deadlock with it.

Each worker brings the schema up to date at start (runtime.store.schema.upgrade), in one
transaction. `CREATE INDEX IF NOT EXISTS` takes its table's SHARE lock even when the index
exists, and holds it to the end: one on `jobs`, then one on `finished_jobs`, against a
running worker's result (a row into `finished_jobs`, then one out of `jobs`). CI saw it:
a worker restarted by the chaos test died with DeadlockDetected. An up-to-date queue now
takes no such lock.
"""

from __future__ import annotations

import threading
import time
from pathlib import Path

import pytest

from runtime.queue import JobQueue
from runtime.store.schema import FINISHED


@pytest.mark.parametrize("database_url", ["postgresql"], indirect=True)
def test_a_starting_worker_does_not_wait_on_a_running_workers_result(
    database_url: str, tmp_path: Path
) -> None:
    import psycopg

    JobQueue.open(database_url, tmp_path / "first").close()  # the tables and indexes exist
    with psycopg.connect(database_url) as running:  # a result in flight: its row lock held
        running.execute(
            f"INSERT INTO {FINISHED} (id, language, script, created) VALUES ('r1', 'bash', 'x', 0)"
        )
        opened: list[float] = []

        def start_worker() -> None:
            begun = time.monotonic()
            JobQueue.open(database_url, tmp_path / "second").close()
            opened.append(time.monotonic() - begun)

        starting = threading.Thread(target=start_worker, daemon=True)
        starting.start()
        starting.join(10)
        running.rollback()
    starting.join(30)
    assert opened and opened[0] < 10, f"the starting worker waited on the running one: {opened}"
