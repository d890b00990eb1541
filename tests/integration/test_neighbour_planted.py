"""No probe is sent before the neighbour job has planted its canaries.

A real host/none cell whose neighbour takes 4 s before it plants (a slow sandbox start, a
loaded machine). The cell used to start once the neighbour was claimed and the second
worker was up, about a second: neighbour_ipc then found no canary and read "blocked", a
channel that holds under none. Now the cell starts once the neighbour is asleep, which it
is only after planting, and the same probe reads what the channel really is: exposed.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from conformance import harness
from conformance.canaries import PLANT_NEIGHBOUR
from conformance.harness import CellSession
from conformance.matrix import load

MATRIX = Path(__file__).resolve().parents[2] / "matrix.yaml"
PLANT_DELAY = 4  # seconds: longer than the second worker's start

pytestmark = [pytest.mark.integration, pytest.mark.slow]


@pytest.mark.req("R-XJOB-1")
def test_the_first_probe_waits_for_a_slow_neighbour_to_plant(
    tmp_path: Path, platform_of: Callable[[str], Any], monkeypatch: pytest.MonkeyPatch
) -> None:
    slow = harness.NEIGHBOUR.replace(
        PLANT_NEIGHBOUR, f"import time\ntime.sleep({PLANT_DELAY})\n{PLANT_NEIGHBOUR}"
    )
    assert slow != harness.NEIGHBOUR
    monkeypatch.setattr(harness, "NEIGHBOUR", slow)
    matrix = load(MATRIX)
    cell = next(c for c in matrix.cells if c.id == "host/none/default")
    platform = platform_of(cell.platform)
    session = CellSession(matrix, cell, platform, tmp_path)
    try:
        session.start()
        planted = Path(f"/tmp/orvanta-neighbour-{session.neighbour_token}")
        assert planted.exists(), "the cell started before its neighbour planted"
        run = session.run_probe(matrix.probes["neighbour_ipc"])
    finally:
        session.close()
        platform.close()
    assert run.outcome == "exposed", run.verdict  # under none every channel is open
