"""The installed plugin stays out of other projects' way: no matrix, no Docker, no
change to how they run, unless the conformance suite is asked for."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest


def run_pytest(project: Path, *args: str) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("PYTEST_", "ORVANTA_"))}
    env["DOCKER_HOST"] = f"unix://{project}/no-docker-here.sock"  # any engine call would fail
    env["PATH"] = str(Path(sys.executable).parent)  # no docker CLI either
    return subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", *args],
        cwd=project,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )


@pytest.mark.req("R-OPS-1")
def test_a_foreign_project_with_one_test_passes_untouched(tmp_path: Path) -> None:
    (tmp_path / "test_one.py").write_text("def test_one():\n    assert 1 + 1 == 2\n")
    proc = run_pytest(tmp_path)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "1 passed" in proc.stdout
    assert "INTERNALERROR" not in proc.stdout + proc.stderr
    assert not list(tmp_path.glob("orvanta*")) and not list(tmp_path.glob("reports"))


# The xdist controller's distribution mode, as the last configure hook sees it.
DIST_SPY = """import pytest
@pytest.hookimpl(trylast=True)
def pytest_configure(config):
    if not hasattr(config, "workerinput"):
        open("dist.txt", "w").write(config.option.dist)
"""


def test_a_foreign_project_with_xdist_keeps_its_own_distribution(tmp_path: Path) -> None:
    (tmp_path / "conftest.py").write_text(DIST_SPY)
    (tmp_path / "test_one.py").write_text("def test_one():\n    pass\n")
    proc = run_pytest(tmp_path, "-n", "2")
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert (tmp_path / "dist.txt").read_text() == "load"


def test_asking_for_a_cell_activates_it_and_distributes_by_cell(tmp_path: Path) -> None:
    """`--backend` is one of the suite's options: the plugin wakes, reads its matrix and
    sets --dist loadgroup (one set-up per cell per run)."""
    (tmp_path / "conftest.py").write_text(DIST_SPY)
    (tmp_path / "test_one.py").write_text("def test_one():\n    pass\n")
    proc = run_pytest(tmp_path, "-n", "2", "--backend=none", "--platform=host")
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert (tmp_path / "dist.txt").read_text() == "loadgroup"
