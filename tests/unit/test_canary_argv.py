"""No canary secret on any command line, which every user of the host can read (ps).

A worker gets the secret in its environment on every platform; `docker exec -e NAME` takes
the value from the client's own environment. Real cells start here (two workers and the
neighbour job, as in the suite) and run a job while every process's argv is scanned.
"""

from __future__ import annotations

import contextlib
import threading
from collections.abc import Callable
from pathlib import Path
from typing import Any

import psutil
import pytest

from conformance.harness import CellSession
from conformance.matrix import load

MATRIX = Path(__file__).resolve().parents[2] / "matrix.yaml"

pytestmark = pytest.mark.slow


class ArgvWatch(threading.Thread):
    """Scans every process's argv until stopped, keeping those that hold `needle`."""

    def __init__(self, needle: str) -> None:
        super().__init__(daemon=True)
        self.needle = needle
        self.seen: set[str] = set()
        self.scans = 0
        self.done = threading.Event()

    def run(self) -> None:
        while not self.done.is_set():
            for proc in psutil.process_iter(["cmdline"]):
                argv = " ".join(proc.info["cmdline"] or ())
                if self.needle in argv:
                    self.seen.add(f"{proc.pid}: {argv}")
            self.scans += 1


def holders(name: str, value: str) -> list[str]:
    """Command lines of the processes whose environment has name=value."""
    found = []
    for proc in psutil.process_iter(["cmdline"]):
        with contextlib.suppress(psutil.Error):
            if proc.environ().get(name) == value:
                found.append(" ".join(proc.info["cmdline"] or ()))
    return found


@pytest.mark.req("R-PLT-1", "R-PLT-2")
@pytest.mark.parametrize("cell_id", ["host/none/default", "docker-unprivileged/none/default"])
def test_no_canary_secret_on_any_command_line(
    tmp_path: Path, cell_id: str, platform_of: Callable[[str], Any]
) -> None:
    matrix = load(MATRIX)
    cell = next(c for c in matrix.cells if c.id == cell_id)
    platform = platform_of(cell.platform)
    session = CellSession(matrix, cell, platform, tmp_path)
    watch = ArgvWatch(session.canaries.secret)
    watch.start()
    try:
        session.start()
        assert session.run_script("bash", "echo ran").stdout == "ran\n"
        workers = holders("SUPERADMIN_SECRET", session.canaries.secret)
    finally:
        watch.done.set()
        watch.join()
        session.close()
        platform.close()
    assert [w for w in workers if "worker" in w], "no worker holds the secret: nothing to prove"
    assert watch.scans > 1
    shown = session.canaries.mask("\n".join(sorted(watch.seen)))
    assert not watch.seen, f"the canary secret is on a command line:\n{shown}"
