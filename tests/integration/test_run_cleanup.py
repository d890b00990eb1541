"""Nothing a run makes outlives it: not after Ctrl-C, and not after kill -9, which runs no
teardown; then the next run removes what the killed one left (conformance.leftovers):
- its containers;
- on the host, its workers, its neighbour's files and SysV segment, its victim cgroup;
- its cells dir in the temp dir.

Runs the real suite as a subprocess and interrupts it while its cell is up.
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

from conformance.leftovers import LEDGER
from conformance.platforms.docker import SESSION_LABEL, engine_problem
from conformance.platforms.host import CGROUP_ROOT, VICTIM
from conformance.platforms.session import alive

pytestmark = [pytest.mark.integration, pytest.mark.slow]

ROOT = Path(__file__).resolve().parents[2]


def suite_run(platform: str) -> list[str]:
    """The suite on one platform's none cells, one probe: long enough to interrupt."""
    return [
        "conformance",
        f"--platform={platform}",
        "--backend=none",
        "-k",
        "cpu_hog",
        "-p",
        "no:cacheprovider",
        "-q",
    ]


CELL = suite_run("docker-unprivileged")


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


@pytest.fixture
def engine() -> None:
    problem = engine_problem()
    assert problem is None, problem  # scripts/setup installs and starts the engine


@pytest.mark.req("R-PLT-2")
@pytest.mark.usefixtures("engine")
def test_ctrl_c_removes_the_runs_containers() -> None:
    run = start_run()
    wait_for_container(run)
    run.send_signal(signal.SIGINT)
    run.wait(120)
    assert containers_of(run.pid) == []


@pytest.mark.req("R-PLT-2")
@pytest.mark.usefixtures("engine")
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


HOST = suite_run("host")


def victims_of(pid: int) -> list[Path]:
    return [
        p for base in (CGROUP_ROOT, CGROUP_ROOT / "freezer") for p in base.glob(f"{VICTIM}{pid}-*")
    ]


def ledger_of(pid: int, kind: str) -> list[str]:
    lines = [
        line.split(" ", 1)
        for run in cells_dirs_of(pid)
        for ledger in run.glob(f"*/{LEDGER}")
        for line in ledger.read_text().splitlines()
    ]
    return [value for k, value in lines if k == kind]


def job_groups(job_ids: list[str]) -> list[Path]:
    """The jobs' cgroups (runtime.cgroups.job_group), in every hierarchy."""
    return [
        group
        for job_id in job_ids
        for group in [
            CGROUP_ROOT / "orvanta" / f"job-{job_id}",
            *CGROUP_ROOT.glob(f"*/orvanta/job-{job_id}"),
        ]
        if group.is_dir()
    ]


def sysv_keys() -> str:
    return subprocess.run(["ipcs", "-m"], capture_output=True, text=True, check=True).stdout


def planted(token: str) -> bool:
    """The neighbour's plants: a file in /dev/shm and a SysV segment keyed by its token."""
    key = f"{int(token[:7], 16) | 0x4F000000:#010x}"
    return Path(f"/dev/shm/orvanta-neighbour-{token}").exists() and key in sysv_keys()


def test_the_next_run_removes_what_a_killed_run_left_on_the_host() -> None:
    env = {k: v for k, v in os.environ.items() if k != "ORVANTA_SESSION"}
    run = subprocess.Popen(
        [sys.executable, "-m", "pytest", *HOST],
        cwd=ROOT,
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        end = time.monotonic() + 180
        while time.monotonic() < end:
            workers, tokens = ledger_of(run.pid, "worker"), ledger_of(run.pid, "token")
            neighbour = next((token for token in tokens if planted(token)), None)
            if len(workers) >= 2 and neighbour is not None:
                break  # the cell's two workers started, and its neighbour planted
            assert run.poll() is None, "the run ended before its neighbour had planted"
            time.sleep(0.02)
        else:
            raise AssertionError("the run's cell never came up with its neighbour")
    finally:
        run.kill()
        run.wait(30)
    # the positive control: kill -9 leaves all of it, the neighbour job (15 min) running
    jobs = ledger_of(run.pid, "job")
    assert all(alive(w) for w in workers), "the killed run's workers are not running"
    assert planted(neighbour) and cells_dirs_of(run.pid) and victims_of(run.pid)
    assert any((group / "cgroup.procs").read_text().split() for group in job_groups(jobs))
    reaped = time.monotonic()
    subprocess.run(
        [sys.executable, "-m", "pytest", *HOST, "--collect-only"],
        cwd=ROOT,
        env=env,
        capture_output=True,
        check=True,
        timeout=120,
    )
    assert time.monotonic() - reaped < 30, "the workers were not stopped at once"
    assert [w for w in workers if alive(w)] == []
    assert job_groups(jobs) == []
    assert not Path(f"/dev/shm/orvanta-neighbour-{neighbour}").exists()
    assert f"{int(neighbour[:7], 16) | 0x4F000000:#010x}" not in sysv_keys()
    assert cells_dirs_of(run.pid) == [] and victims_of(run.pid) == []
