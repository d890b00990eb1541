"""No worker file descriptor reaches a job (R-JOB-2); a namespaced job cannot see the
worker's descriptors through /proc (R-PID-FD)."""

from __future__ import annotations

import os
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from cli_helpers import CliRun, job_output

pytestmark = pytest.mark.integration

FDS = r"""
import json, os

target = os.environ["SECRET_NAME"]


def links(pid):
    try:
        names = os.listdir(f"/proc/{pid}/fd")
    except OSError:
        return []
    out = []
    for name in names:
        try:
            out.append(os.readlink(f"/proc/{pid}/fd/{name}"))
        except OSError:
            pass
    return out


me, ppid = os.getpid(), os.getppid()
print(json.dumps({
    "self": sorted(os.listdir("/proc/self/fd"), key=int),
    "parent_sees_file": any(target in link for link in links(ppid)) if ppid else False,
    "pids_holding_file": [
        int(p) for p in os.listdir("/proc")
        if p.isdigit() and int(p) != me and any(target in link for link in links(p))
    ],
}))
"""


@pytest.fixture
def held_file(tmp_path: Path) -> Iterator[tuple[int, str]]:
    """A file the worker holds open (passed to the CLI with pass_fds); yields (fd, name)."""
    name = f"worker-held-{os.getpid()}-{tmp_path.name}.txt"
    path = tmp_path / name
    path.write_text("the worker's private file\n")
    fd = os.open(path, os.O_RDONLY)
    try:
        yield fd, name
    finally:
        os.close(fd)


@pytest.mark.req("R-JOB-2", "R-PID-FD", "R-TBL-PROC")
def test_only_stdio_reaches_the_job(
    run_job: Callable[..., CliRun],
    backend: str,
    backend_env: dict[str, str],
    held_file: tuple[int, str],
) -> None:
    fd, name = held_file
    run = run_job(FDS, env=backend_env, args=["--env", f"SECRET_NAME={name}"], pass_fds=(fd,))
    report = job_output(run)
    assert run.result is not None and run.result["isolation"] == backend
    # 0, 1, 2 and the descriptor listdir itself opened; the worker's fd is not one of them
    assert report["self"] == ["0", "1", "2", "3"], report
    if backend == "none":
        # positive control: the worker really holds the file, and a plain job can see it
        assert report["parent_sees_file"] is True
        assert report["pids_holding_file"]
    else:
        assert report["parent_sees_file"] is False
        assert report["pids_holding_file"] == []
