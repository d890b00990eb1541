"""No container outlives its run: not after Ctrl-C, and not after kill -9 (the next run reaps it,
and the cells dir the killed run left in the temp dir).

Runs the real suite on a Docker cell as a subprocess and interrupts it while the cell's
container is up.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest

from conformance.platforms.docker import SESSION_LABEL, engine_problem

pytestmark = [pytest.mark.integration, pytest.mark.slow]

ROOT = Path(__file__).resolve().parents[2]
CELL = [
    "conformance",
    "--platform=docker-unprivileged",
    "--backend=none",
    "-k",
    "cpu_hog",
    "-p",
    "no:cacheprovider",
    "-q",
]


def containers_of(owner_pid: int) -> list[str]:
    out = subprocess.run(
        ["docker", "ps", "-a", "--format", f'{{{{.ID}}}} {{{{.Label "{SESSION_LABEL}"}}}}'],
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    return [
        line.split()[0]
        for line in out.splitlines()
        if f" {owner_pid}:" in f" {line.split(' ', 1)[-1]}"
    ]


def cells_dirs_of(owner_pid: int) -> list[Path]:
    return list(Path(tempfile.gettempdir()).glob(f"orvanta-cells-{owner_pid}-*"))


def start_run() -> subprocess.Popen[bytes]:
    env = {k: v for k, v in os.environ.items() if k != "ORVANTA_SESSION"}
    return subprocess.Popen(
        [sys.executable, "-m", "pytest", *CELL],
        cwd=ROOT,
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )


def wait_for_container(run: subprocess.Popen[bytes]) -> list[str]:
    end = time.monotonic() + 240  # a cold image build takes about a minute
    while time.monotonic() < end:
        found = containers_of(run.pid)
        if found:
            return found
        assert run.poll() is None, "the run ended before its container came up"
        time.sleep(0.2)
    raise AssertionError("no container of the run appeared")


@pytest.fixture(autouse=True)
def _engine() -> None:
    problem = engine_problem()
    assert problem is None, problem  # scripts/setup installs and starts the engine


@pytest.mark.req("R-PLT-2")
def test_ctrl_c_removes_the_runs_containers() -> None:
    run = start_run()
    wait_for_container(run)
    run.send_signal(signal.SIGINT)
    run.wait(120)
    assert containers_of(run.pid) == []


@pytest.mark.req("R-PLT-2")
def test_containers_of_a_killed_run_are_reaped_by_the_next_run() -> None:
    run = start_run()
    wait_for_container(run)
    run.kill()
    run.wait(30)
    assert containers_of(run.pid), "kill -9 leaves the container: nothing could remove it"
    assert cells_dirs_of(run.pid), "kill -9 leaves the cells dir: no fixture teardown ran"
    subprocess.run(
        [sys.executable, "-m", "pytest", *CELL, "--collect-only"],
        cwd=ROOT,
        capture_output=True,
        check=True,
        timeout=120,
    )
    assert containers_of(run.pid) == []
    assert cells_dirs_of(run.pid) == []
