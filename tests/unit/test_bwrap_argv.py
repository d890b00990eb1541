"""The bwrap backend's command: unprivileged bwrap as the job's own ids, limits set before
the ids drop, and the job's variables only in the file bwrap reads by fd (R-JOB-1)."""

from __future__ import annotations

from pathlib import Path

import pytest

from runtime.backends import PreparedJob
from runtime.backends.bwrap import Bubblewrap
from runtime.capabilities import HostCapabilities, Probe
from runtime.languages import language
from runtime.settings import Settings


def backend() -> Bubblewrap:
    caps = HostCapabilities({"bwrap": Probe("/usr/bin/bwrap", "ok")}, Probe(None, "no tini"))
    return Bubblewrap(Settings.from_env({"ORVANTA_BACKEND": "bwrap"}), caps)


@pytest.mark.req("R-JOB-1", "R-HOST-1")
def test_the_jobs_variables_never_reach_a_command_line(tmp_path: Path) -> None:
    job = PreparedJob("j1", language("bash"), tmp_path / "job", 5.0, None, (), (70005, 70005))
    launch = backend().launch(job, {"API_TOKEN": "s3cret-value", "PATH": "/usr/bin"})
    assert not any("s3cret" in arg for arg in launch.argv)
    assert "s3cret" not in str(launch.env)
    (data,) = launch.inputs  # a memfd of the worker's for bwrap (runtime.executor)
    args = data.split(b"\0")
    assert args[args.index(b"API_TOKEN") - 1 :][:3] == [b"--setenv", b"API_TOKEN", b"s3cret-value"]
    argv = launch.argv_for([7])
    assert argv[argv.index("--args") + 1] == "7"
    # limits first (as root), then the job's ids, then bwrap with no privilege
    assert argv[0] == "prlimit" and argv.index("setpriv") < argv.index("/usr/bin/bwrap")
    assert "--reuid=70005" in argv and "--no-new-privs" in argv
    assert argv[-2:] == ["/bin/bash", "/job/main.sh"]


def test_without_ids_of_its_own_bwrap_runs_as_the_worker(tmp_path: Path) -> None:
    job = PreparedJob("j2", language("python3"), tmp_path / "job", 5.0)
    argv = backend().launch(job, {}).argv
    assert "setpriv" not in argv
