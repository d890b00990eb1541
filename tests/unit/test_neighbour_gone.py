"""A probe that looks for what the neighbour job holds is measured only while the neighbour
runs (conformance.harness.CellSession._neighbour_gone): once it has ended (no room to plant,
its deadline), a "blocked" would only say its canaries are gone."""

from __future__ import annotations

import types
from pathlib import Path

import pytest

from conformance import harness
from conformance.canaries import NEIGHBOUR_NO_ROOM
from runtime.jobs import JobResult
from runtime.queue import JobQueue


@pytest.mark.req("R-XJOB-1")
def test_a_neighbour_probe_is_not_measured_once_the_neighbour_ended(tmp_path: Path) -> None:
    queue = JobQueue.open(None, tmp_path)
    try:
        neighbour = queue.submit("python3", "pass\n")
        session = types.SimpleNamespace(
            queue=queue, neighbour_id=neighbour, cell=types.SimpleNamespace(backend="none")
        )

        def gone(probe: str) -> dict[str, object] | None:
            return harness.CellSession._neighbour_gone(session, types.SimpleNamespace(name=probe))  # type: ignore[arg-type]

        assert gone("neighbour_ipc") is None  # queued, then running: measured
        assert queue.claim("w", 30.0, ("default",)) is not None
        assert gone("neighbour_ipc") is None
        said = '{"neighbour": "no room to plant", "no_room": {"mqueue": "EMFILE"}}\n'
        queue.complete(
            JobResult(neighbour, "none", "failure", NEIGHBOUR_NO_ROOM, 0.1, said, "", []), "w"
        )
        verdict = gone("neighbour_ipc")
        assert verdict is not None and verdict["outcome"] == "error", verdict
        assert "no room to plant" in str(verdict["not_measured"]) and "EMFILE" in str(
            verdict["evidence"]
        )
        for probe in sorted(harness.READS_NEIGHBOUR):
            assert gone(probe) is not None, probe
        assert gone("proc_environ") is None  # the worker's secret: no neighbour needed
    finally:
        queue.close()
