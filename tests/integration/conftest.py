"""Fixtures for driving the real CLI (`python -m runtime.cli`) on this host.

Every run gets a fresh ORVANTA_STATE_DIR under tmp_path, a minimal environment built
here (nothing of the test runner's own isolation variables leaks in), the real queue as
DATABASE_URL and a SUPERADMIN_SECRET holding a random canary secret no job may ever see.
"""

from __future__ import annotations

import os
import secrets
import subprocess
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from cli_helpers import (
    BACKEND_ENV,
    BACKENDS,
    ROOT,
    CliRun,
    WorkerProcess,
    cli_command,
    kill_all,
    parse_json,
    processes_with,
    tool_missing,
    wait_until,
)


@pytest.fixture
def canary() -> str:
    return f"ORVANTA_CANARY_{secrets.token_hex(8)}"


@pytest.fixture
def state_dir(tmp_path: Path) -> Path:
    return tmp_path / "state"


@pytest.fixture
def base_env(state_dir: Path, canary: str) -> dict[str, str]:
    return {
        "PATH": os.environ.get("PATH", "/usr/local/bin:/usr/bin:/bin"),
        "LANG": "C.UTF-8",
        "ORVANTA_STATE_DIR": str(state_dir),
        "DATABASE_URL": f"sqlite:///{state_dir}/queue.sqlite3",
        "SUPERADMIN_SECRET": canary,
        "ORVANTA_WORKER_TOKEN": f"token-{canary}",
    }


@pytest.fixture(params=BACKENDS)
def backend(request: pytest.FixtureRequest) -> str:
    """The isolation under test; override with @pytest.mark.parametrize("backend", [...])."""
    name: str = request.param
    return name


@pytest.fixture
def backend_env(backend: str) -> dict[str, str]:
    missing = tool_missing(backend)
    if missing:
        pytest.skip(f"{backend}: {missing}")
    return dict(BACKEND_ENV[backend])


@pytest.fixture
def write_script(tmp_path: Path) -> Callable[..., Path]:
    counter = iter(range(1_000_000))

    def write(text: str, suffix: str = ".py") -> Path:
        folder = tmp_path / "scripts"
        folder.mkdir(exist_ok=True)
        path = folder / f"job{next(counter)}{suffix}"
        path.write_text(text)
        return path

    return write


@pytest.fixture
def run_cli(base_env: dict[str, str]) -> Callable[..., CliRun]:
    """run_cli("run", FILE, "--json", env={...}) -> (returncode, JSON record or None, stderr)."""

    def run(
        *args: str, env: dict[str, str] | None = None, timeout: float = 60, **kw: Any
    ) -> CliRun:
        proc = subprocess.run(
            cli_command(*args),
            env={**base_env, **(env or {})},
            cwd=ROOT,
            stdin=subprocess.DEVNULL,
            capture_output=True,
            text=True,
            timeout=timeout,
            check=False,
            **kw,
        )
        return CliRun(proc.returncode, parse_json(proc.stdout), proc.stderr)

    return run


@pytest.fixture
def run_job(
    run_cli: Callable[..., CliRun], write_script: Callable[..., Path]
) -> Callable[..., CliRun]:
    """run_job(script text, env=..., args=[...], suffix=".py") via `orvanta run FILE --json`."""

    def run(
        script: str,
        env: dict[str, str] | None = None,
        args: tuple[str, ...] | list[str] = (),
        suffix: str = ".py",
        **kw: Any,
    ) -> CliRun:
        path = write_script(script, suffix)
        return run_cli("run", str(path), "--json", *args, env=env, **kw)

    return run


@pytest.fixture
def marker() -> Iterator[str]:
    """A unique string for a job's processes; whatever still carries it afterwards is killed."""
    value = f"orvanta-marker-{secrets.token_hex(6)}"
    yield value
    kill_all(processes_with(value))


@pytest.fixture
def start_worker(
    base_env: dict[str, str], tmp_path: Path
) -> Iterator[Callable[..., WorkerProcess]]:
    """start_worker(name, env={...}) -> a running `orvanta worker`, stopped at teardown."""
    started: list[WorkerProcess] = []

    def start(name: str, env: dict[str, str] | None = None, *args: str) -> WorkerProcess:
        log = tmp_path / f"worker-{name}.log"
        with open(log, "wb") as out:
            proc = subprocess.Popen(
                cli_command("worker", "--name", name, *args),
                env={**base_env, **(env or {})},
                cwd=ROOT,
                stdin=subprocess.DEVNULL,
                stdout=out,
                stderr=subprocess.STDOUT,
            )
        worker = WorkerProcess(name, proc, log)
        started.append(worker)
        wait_until(
            lambda: "pulling jobs from" in worker.output() or proc.poll() is not None,
            20,
            f"worker {name} to start",
        )
        assert proc.poll() is None, f"worker {name} exited at start:\n{worker.output()}"
        return worker

    yield start
    for worker in started:
        if worker.proc.poll() is None:
            worker.proc.terminate()
            try:
                worker.proc.wait(3)
            except subprocess.TimeoutExpired:
                worker.proc.kill()
                worker.proc.wait()
