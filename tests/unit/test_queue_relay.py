"""The queue relay (conformance.platforms.queue_relay): a gVisor cell's queue, reached by the
harness through a process beside the workers. Here the relay runs on this host, over a real
SQLite queue that a worker's own connection shares: the protocol and its failures. That its
locks are the workers' under gVisor is tests/integration/test_gvisor_queue.py."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

from conformance.platforms import queue_relay
from conformance.platforms.queue_relay import RelayDatabase
from runtime.jobs import JobResult
from runtime.queue import JobQueue


@pytest.mark.req("R-PLT-7")
def test_a_queue_through_the_relay_serves_beside_a_workers_connection(tmp_path: Path) -> None:
    path = tmp_path / "queue.sqlite3"
    harness = JobQueue(RelayDatabase([sys.executable], path, tmp_path / "relay.log", "a test"))
    worker = JobQueue.open(None, tmp_path)  # the worker's own connection to the file
    try:
        job_id = harness.submit("bash", "echo hi\n", {}, 30)
        spec = worker.claim("w", 30.0, ("default",))
        assert spec is not None and spec.id == job_id
        assert harness.get(job_id).status == "running"  # type: ignore[union-attr]
        worker.complete(JobResult(job_id, "none", "success", 0, 0.1, "hi\n", "", []), "w")
        done = harness.wait(job_id, 10)
        assert done.result is not None and done.result.stdout == "hi\n"
        assert "a test" in harness.path
    finally:
        worker.close()
        harness.close()


def test_a_relay_that_is_gone_is_an_error_that_says_so(tmp_path: Path) -> None:
    log = tmp_path / "relay.log"
    db = RelayDatabase([sys.executable], tmp_path / "queue.sqlite3", log, "a test")
    db._relay.kill()  # the sandbox's exec ended under the harness
    db._relay.wait()
    with pytest.raises(RuntimeError, match="closed the connection"):
        db.query("SELECT 1")
    db.close()


def test_a_relay_opens_only_its_own_file(tmp_path: Path) -> None:
    db = RelayDatabase([sys.executable], tmp_path / "queue.sqlite3", tmp_path / "l", "x")
    try:
        with pytest.raises(RuntimeError, match="this relay serves"):
            db._call("open", url=f"sqlite:///{tmp_path}/other.sqlite3")
    finally:
        db.close()


def test_a_relay_that_does_not_answer_is_given_up(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A stuck sandbox: the harness errs after ANSWER_SECONDS instead of waiting forever."""
    monkeypatch.setattr(queue_relay, "ANSWER_SECONDS", 0.5)
    stuck = [sys.executable, "-c", "import time; time.sleep(30)"]  # reads nothing
    with pytest.raises(RuntimeError, match="no answer to open"):
        RelayDatabase(stuck, tmp_path / "queue.sqlite3", tmp_path / "relay.log", "a test")


def test_a_closed_relay_refuses_statements(tmp_path: Path) -> None:
    db = RelayDatabase([sys.executable], tmp_path / "queue.sqlite3", tmp_path / "l", "a test")
    db.close()
    db.close()  # twice is fine
    with pytest.raises(RuntimeError, match="after the connection was closed"):
        db.query("SELECT 1")
