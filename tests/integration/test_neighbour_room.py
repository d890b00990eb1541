"""A neighbour job that found no room for a canary leaves its probes unmeasured, never "blocked".

A real host/none cell (two workers and the neighbour job, as in the suite) starts with the
uid's POSIX queue budget (RLIMIT_MSGQUEUE) at 0, inherited by its workers and jobs: the
neighbour cannot plant its queue. Before, it slept on, and neighbour_ipc read the missing
queue (and anything else) as a closed channel. The same cell with the budget is the control.
"""

from __future__ import annotations

import resource
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from conformance.harness import CellSession
from conformance.matrix import load

MATRIX = Path(__file__).resolve().parents[2] / "matrix.yaml"

pytestmark = [pytest.mark.integration, pytest.mark.slow]


def neighbour_ipc(
    tmp_path: Path, queue_budget: int | None, platform_of: Callable[[str], Any]
) -> tuple[str, dict[str, object]]:
    matrix = load(MATRIX)
    cell = next(c for c in matrix.cells if c.id == "host/none/default")
    platform = platform_of(cell.platform)
    session = CellSession(matrix, cell, platform, tmp_path)
    before = resource.getrlimit(resource.RLIMIT_MSGQUEUE)
    try:
        if queue_budget is not None:  # for the workers this starts, and so their jobs
            resource.setrlimit(resource.RLIMIT_MSGQUEUE, (queue_budget, before[1]))
        try:
            session.start()
        finally:
            resource.setrlimit(resource.RLIMIT_MSGQUEUE, before)
        run = session.run_probe(matrix.probes["neighbour_ipc"])
    finally:
        session.close()
        platform.close()
    return run.outcome, run.verdict or {}


@pytest.mark.req("R-XJOB-1")
def test_a_neighbour_with_no_room_leaves_its_probes_unmeasured(
    tmp_path: Path, platform_of: Callable[[str], Any]
) -> None:
    outcome, verdict = neighbour_ipc(tmp_path / "room", None, platform_of)
    assert outcome == "exposed", verdict  # the control: under none the queue is reachable
    outcome, verdict = neighbour_ipc(tmp_path / "no-room", 0, platform_of)
    assert outcome == "error", verdict
    assert "no room to plant" in str(verdict.get("not_measured")), verdict
    assert "mqueue" in str(verdict.get("evidence")), verdict
