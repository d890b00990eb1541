"""The PID-namespace command line: `unshare <flags> -- [tini -s --] <job>` (R-PID-1, R-PID-2)."""

from __future__ import annotations

from pathlib import Path

import pytest

from runtime.backends import PreparedJob, make_backend
from runtime.backends.unshare import PidNamespace
from runtime.languages import language
from runtime.settings import Settings
from runtime.startup import HostCapabilities, Probe

JOB_DIR = Path("/var/lib/orvanta/jobs/0123456789abcdef/job")


def host(tini: bool = True, unshare: bool = True) -> HostCapabilities:
    return HostCapabilities(
        nsjail=Probe(None, "nsjail binary not found"),
        unshare=Probe("/usr/bin/unshare", "ok") if unshare else Probe(None, "unshare failed"),
        tini=Probe("/usr/bin/tini", "ok") if tini else Probe(None, "tini not found"),
    )


def prepared(lang: str) -> PreparedJob:
    return PreparedJob("0123456789abcdef", language(lang), JOB_DIR, JOB_DIR.parent / "control", 5.0)


def settings(**env: str) -> Settings:
    return Settings.from_env({"ENABLE_UNSHARE_PID": "true", **env})


@pytest.mark.req("R-PID-1", "R-PID-2", "R-CFG-2")
def test_python_job_with_tini() -> None:
    argv = PidNamespace(settings(), host()).argv(prepared("python3"))
    assert argv == [
        "/usr/bin/unshare",
        "--user",
        "--map-root-user",
        "--pid",
        "--fork",
        "--mount-proc",
        "--",
        "/usr/bin/tini",
        "-s",
        "--",
        "/usr/bin/python3",
        "-u",
        f"{JOB_DIR}/main.py",
    ]


@pytest.mark.req("R-PID-1", "R-PID-2")
def test_python_job_without_tini() -> None:
    argv = PidNamespace(settings(), host(tini=False)).argv(prepared("python3"))
    assert argv == [
        "/usr/bin/unshare",
        "--user",
        "--map-root-user",
        "--pid",
        "--fork",
        "--mount-proc",
        "--",
        "/usr/bin/python3",
        "-u",
        f"{JOB_DIR}/main.py",
    ]
    assert not any("tini" in part for part in argv)


@pytest.mark.req("R-PID-1", "R-CFG-2", "R-CFG-3")
def test_bash_job_with_custom_flags_and_python() -> None:
    s = settings(UNSHARE_ISOLATION_FLAGS="--user --map-root-user --pid --fork --net")
    argv = PidNamespace(s, host()).argv(prepared("bash"))
    assert argv == [
        "/usr/bin/unshare",
        "--user",
        "--map-root-user",
        "--pid",
        "--fork",
        "--net",
        "--",
        "/usr/bin/tini",
        "-s",
        "--",
        "/bin/bash",
        f"{JOB_DIR}/main.sh",
    ]


@pytest.mark.req("R-PID-1")
def test_python_path_setting_is_used() -> None:
    s = settings(ORVANTA_PYTHON="/opt/py/bin/python3")
    argv = PidNamespace(s, host()).argv(prepared("python3"))
    assert argv[-3:] == ["/opt/py/bin/python3", "-u", f"{JOB_DIR}/main.py"]


@pytest.mark.req("R-PID-1")
def test_job_sees_its_directory_at_the_host_path() -> None:
    assert PidNamespace(settings(), host()).inner_dir(prepared("python3")) == str(JOB_DIR)


@pytest.mark.req("R-PID-3")
def test_backend_refuses_an_unusable_unshare() -> None:
    with pytest.raises(RuntimeError, match="unshare failed"):
        PidNamespace(settings(), host(unshare=False))


@pytest.mark.req("R-SEL-6", "R-PID-1")
def test_make_backend_returns_the_pid_namespace() -> None:
    backend = make_backend("unshare", settings(), host())
    assert backend.name == "unshare"
    assert backend.argv(prepared("python3"))[0] == "/usr/bin/unshare"
