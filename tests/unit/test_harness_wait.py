"""The harness's wait on a probe job that reads as missing for a moment (a worker in a
gVisor sandbox writes the SQLite file through its gofer: conformance.harness.CellSession._wait)."""

from __future__ import annotations

import threading
import time
import types
from pathlib import Path

import pytest

from conformance import harness
from runtime.jobs import JobResult
from runtime.queue import JobQueue
from runtime.store.schema import HOT


@pytest.mark.req("R-JOB-3")
@pytest.mark.parametrize("early_miss", [False, True], ids=["at its end", "twice"])
def test_a_job_missing_for_a_moment_at_its_end_is_waited_for(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, early_miss: bool
) -> None:
    """The miss comes when the job ends, after a wait longer than the grace: the grace
    counts from the miss, not from the start of the wait, nor from an earlier miss."""
    monkeypatch.setattr(harness, "MISSING_GRACE", 1.0)
    queue = JobQueue.open(None, tmp_path)
    job_id = queue.submit("bash", "true\n")
    columns = [r[1] for r in queue.db.query(f"PRAGMA table_info({HOT})")]
    (row,) = queue.db.query(f"SELECT * FROM {HOT} WHERE id=?", (job_id,))
    marks = ", ".join("?" for _ in columns)

    def torn_read() -> None:
        queue.db.execute(f"DELETE FROM {HOT} WHERE id=?", (job_id,))
        time.sleep(0.1)  # a tenth of the grace: a loaded machine's sleep stays well inside it
        queue.db.execute(f"INSERT INTO {HOT} ({', '.join(columns)}) VALUES ({marks})", tuple(row))

    def the_job_ends_torn() -> None:
        if early_miss:
            time.sleep(0.1)
            torn_read()
        time.sleep(1.5)  # the job runs for longer than the grace
        torn_read()
        spec = queue.claim("w", 30.0, ("default",))
        assert spec is not None and spec.id == job_id
        queue.complete(JobResult(job_id, "none", "success", 0, 0.1, "", "", []), "w")

    ending = threading.Thread(target=the_job_ends_torn)
    ending.start()
    try:
        session = types.SimpleNamespace(queue=queue)
        job = harness.CellSession._wait(session, job_id, 10.0)  # type: ignore[arg-type]
        assert job.status == "done"
    finally:
        ending.join()
        queue.close()
