"""Fixtures for the job service: a real `orvanta server` over SQLite and over PostgreSQL.

Every test that takes `service` runs twice, once per database (the same suite
for both). PostgreSQL is the machine's own (scripts/setup starts it); without
it those runs skip with the reason, except under CI, where they fail.
"""

from __future__ import annotations

import os
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from service_helpers import WorkerProcess

from conformance.service import ROOT, Service
from runtime.jobdir import sweep_orphans, unmount_root
from runtime.settings import Settings

READY = "pulling jobs from"


@pytest.fixture
def service(database_url: str, tmp_path: Path) -> Iterator[Service]:
    svc = Service.start(database_url, tmp_path / "server")
    yield svc
    svc.stop()


def worker_env(tmp_path: Path, name: str, env: dict[str, str]) -> dict[str, str]:
    return {
        "PATH": os.environ.get("PATH", "/usr/bin:/bin"),
        "LANG": "C.UTF-8",
        "ORVANTA_STATE_DIR": str(tmp_path / f"{name}-state"),
        **env,
    }


@pytest.fixture
def spawn_worker(tmp_path: Path) -> Iterator[Callable[..., WorkerProcess]]:
    """spawn_worker(name, env, wait=True): a real `orvanta worker`, stopped at teardown."""
    started: list[WorkerProcess] = []

    def spawn(name: str, env: dict[str, str], wait: bool = True) -> WorkerProcess:
        log = tmp_path / f"{name}.log"
        with open(log, "ab") as out:
            proc = subprocess.Popen(
                [sys.executable, "-m", "runtime.cli", "worker", "--name", name],
                env=worker_env(tmp_path, name, env),
                cwd=ROOT,
                stdin=subprocess.DEVNULL,
                stdout=out,
                stderr=subprocess.STDOUT,
            )
        worker = WorkerProcess(name, proc, log)
        started.append(worker)
        if wait:
            end = time.monotonic() + 30
            while READY not in worker.output():
                assert proc.poll() is None, f"worker {name} exited:\n{worker.output()}"
                assert time.monotonic() < end, f"worker {name} not ready:\n{worker.output()}"
                time.sleep(0.02)
        return worker

    yield spawn
    for worker in started:
        if worker.proc.poll() is None:
            worker.proc.terminate()
    for worker in started:
        try:
            worker.proc.wait(10)
        except subprocess.TimeoutExpired:
            worker.proc.kill()
            worker.proc.wait()
    # a worker killed mid-job leaves its tmpfs job dir mounted until a worker of the same
    # jobs root starts again (runtime.jobdir.sweep_orphans); these never do
    for worker in started:
        job_root = Settings(state_dir=tmp_path / f"{worker.name}-state").job_root
        sweep_orphans(job_root)
        unmount_root(job_root)  # the tmpfs of its own a killed worker leaves at its jobs root


@pytest.fixture
def normal_worker(
    service: Service, database_url: str, spawn_worker: Callable[..., WorkerProcess]
) -> Callable[..., WorkerProcess]:
    """A MODE=worker process on the service's database."""

    def start(name: str = "w", **env: str) -> WorkerProcess:
        return spawn_worker(name, {"DATABASE_URL": database_url, **env})

    return start


@pytest.fixture
def agent_worker(
    service: Service, spawn_worker: Callable[..., WorkerProcess]
) -> Callable[..., WorkerProcess]:
    """A MODE=agent process holding only its group's token and the server's URL."""

    def start(name: str, token: str, wait: bool = True, **env: str) -> WorkerProcess:
        agent_env = {
            "MODE": "agent",
            "ORVANTA_SERVER_URL": service.url,
            "ORVANTA_AGENT_TOKEN": token,
            **env,
        }
        return spawn_worker(name, agent_env, wait)

    return start
