"""What nsjail really takes away from a job on this host (R-TBL-FS, R-NSJ-*, R-TBL-NET)."""

from __future__ import annotations

import socket
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from cli_helpers import ROOT, CliRun, job_output

pytestmark = pytest.mark.integration

FILESYSTEM = r"""
import json, os, sys


def attempt(fn):
    try:
        return ["ok", fn()]
    except OSError as exc:
        return ["denied", type(exc).__name__]


secret = os.environ["SECRET_FILE"]
with open("written-by-job.txt", "w") as f:
    f.write("hello")
print(json.dumps({
    "cwd": os.getcwd(),
    "wrote": open("written-by-job.txt").read(),
    "list_root_home": attempt(lambda: sorted(os.listdir("/root"))),
    "read_secret": attempt(lambda: open(secret).read()),
    "list_repo": attempt(lambda: sorted(os.listdir(os.environ["REPO"]))),
    "list_state": attempt(lambda: sorted(os.listdir(os.environ["STATE"]))),
}))
"""

UID = "import os, json\nprint(json.dumps([os.getuid(), os.geteuid(), os.getgid()]))\n"

CONNECT = r"""
import os, socket
s = socket.socket()
s.settimeout(2)
try:
    s.connect(("127.0.0.1", int(os.environ["PORT"])))
    print("connected")
except OSError as exc:
    print("refused:", type(exc).__name__, exc)
"""


@pytest.fixture
def secret_file(tmp_path: Path, canary: str) -> Path:
    path = tmp_path / "outside" / "secret.txt"
    path.parent.mkdir()
    path.write_text(canary)
    return path


def fs_env(secret_file: Path, state_dir: Path) -> list[str]:
    return [
        "--env",
        f"SECRET_FILE={secret_file}",
        "--env",
        f"REPO={ROOT}",
        "--env",
        f"STATE={state_dir}",
    ]


@pytest.mark.req("R-TBL-FS", "R-NSJ-1")
@pytest.mark.parametrize("backend", ["nsjail"])
def test_nsjail_job_sees_only_its_directory(
    run_job: Callable[..., CliRun],
    backend_env: dict[str, str],
    secret_file: Path,
    state_dir: Path,
) -> None:
    report = job_output(run_job(FILESYSTEM, env=backend_env, args=fs_env(secret_file, state_dir)))
    assert report["cwd"] == "/job"
    assert report["wrote"] == "hello"
    assert report["list_root_home"][0] == "denied"
    assert report["read_secret"][0] == "denied"
    assert report["list_repo"][0] == "denied"
    assert report["list_state"][0] == "denied"


@pytest.mark.req("R-TBL-FS")
@pytest.mark.parametrize("backend", ["none", "unshare"])
def test_without_nsjail_the_host_filesystem_is_reachable(
    run_job: Callable[..., CliRun],
    backend_env: dict[str, str],
    secret_file: Path,
    state_dir: Path,
    canary: str,
) -> None:
    """Positive control (the table's "no" for none and the PID namespace), except the
    worker's own state (0700), which the unprivileged job uid under unshare cannot list
    (R-HOST-4)."""
    report = job_output(run_job(FILESYSTEM, env=backend_env, args=fs_env(secret_file, state_dir)))
    assert report["read_secret"] == ["ok", canary]
    assert report["list_repo"][0] == "ok" and "runtime" in report["list_repo"][1]
    if backend_env.get("ENABLE_UNSHARE_PID") == "true":
        assert report["list_state"] == ["denied", "PermissionError"]
    else:
        assert report["list_state"][0] == "ok" and "volumes" not in report["list_state"][1]
    assert report["wrote"] == "hello"


@pytest.mark.req("R-NSJ-2", "R-CFG-5")
@pytest.mark.parametrize(
    ("disable_nuser", "expected"), [(None, [1000, 1000, 1000]), ("true", [0, 0, 0])]
)
@pytest.mark.parametrize("backend", ["nsjail"])
def test_job_uid_with_and_without_user_namespace(
    run_job: Callable[..., CliRun],
    backend_env: dict[str, str],
    disable_nuser: str | None,
    expected: list[int],
) -> None:
    env = dict(backend_env)
    if disable_nuser is not None:
        env["DISABLE_NUSER"] = disable_nuser
    run = run_job(UID, env=env)
    assert run.result is not None and run.result["isolation"] == "nsjail"
    assert job_output(run) == expected


@pytest.fixture
def listener() -> Iterator[int]:
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    sock.listen(8)
    try:
        yield sock.getsockname()[1]
    finally:
        sock.close()


@pytest.mark.req("R-TBL-NET")
@pytest.mark.parametrize(
    ("backend", "extra", "reachable"),
    [
        ("none", {}, True),  # positive control
        ("unshare", {}, True),  # the table: "no" network isolation by default
        (
            "unshare",
            {"UNSHARE_ISOLATION_FLAGS": "--user --map-root-user --pid --fork --mount-proc --net"},
            False,
        ),
        ("nsjail", {}, False),
        ("nsjail", {"ORVANTA_NSJAIL_NETWORK": "shared"}, True),
    ],
    ids=["none", "unshare", "unshare-net", "nsjail", "nsjail-shared"],
)
def test_network_reach_of_a_local_listener(
    run_job: Callable[..., CliRun],
    backend: str,
    backend_env: dict[str, str],
    extra: dict[str, str],
    reachable: bool,
    listener: int,
) -> None:
    run = run_job(CONNECT, env={**backend_env, **extra}, args=["--env", f"PORT={listener}"])
    assert run.result is not None and run.result["status"] == "success", run
    assert run.result["isolation"] == backend
    out = run.result["stdout"]
    if reachable:
        assert out == "connected\n"
    else:
        assert out.startswith("refused:"), out


BIG_FILE = r"""
try:
    with open("big", "wb") as f:
        f.write(b"x" * (3 * 1024 * 1024))
    print("wrote")
except OSError as exc:
    print("refused", exc.errno)
"""

MANY_PROCESSES = r"""
import subprocess
procs = []
try:
    for _ in range(40):
        procs.append(subprocess.Popen(["sleep", "5"]))
    print("spawned", len(procs))
except OSError as exc:
    print("refused", len(procs))
for p in procs:
    p.kill()
"""

ALLOCATE = r"""
chunks = []
for _ in range(30):
    chunks.append(bytearray(10 * 1024 * 1024))
print("allocated 300 MiB")
"""


@pytest.mark.req("R-TBL-RES")
@pytest.mark.parametrize(("backend", "limited"), [("none", False), ("nsjail", True)])
def test_file_size_limit(
    run_job: Callable[..., CliRun], backend_env: dict[str, str], limited: bool
) -> None:
    run = run_job(BIG_FILE, env={**backend_env, "ORVANTA_JOB_FILE_SIZE_MB": "1"})
    assert run.result is not None and run.result["status"] == "success", run
    assert run.result["stdout"] == ("refused 27\n" if limited else "wrote\n")  # 27: EFBIG


@pytest.mark.req("R-TBL-RES")
@pytest.mark.parametrize(("backend", "limited"), [("none", False), ("nsjail", True)])
def test_process_count_limit(
    run_job: Callable[..., CliRun], backend_env: dict[str, str], limited: bool
) -> None:
    run = run_job(MANY_PROCESSES, env={**backend_env, "ORVANTA_JOB_PIDS": "10"})
    assert run.result is not None and run.result["status"] == "success", run
    out = run.result["stdout"].split()
    if limited:
        assert out[0] == "refused" and int(out[1]) < 10, out
    else:
        assert out == ["spawned", "40"]


@pytest.mark.req("R-TBL-RES")
@pytest.mark.parametrize(("backend", "limited"), [("none", False), ("nsjail", True)])
def test_memory_limit(
    run_job: Callable[..., CliRun], backend_env: dict[str, str], limited: bool
) -> None:
    run = run_job(ALLOCATE, env={**backend_env, "ORVANTA_JOB_MEMORY_MB": "64"})
    assert run.result is not None, run
    if limited:
        assert run.result["status"] == "failure"
        assert run.result["exit_code"] == 137  # OOM-killed inside its own cgroup
        assert run.result["stdout"] == ""
    else:
        assert run.result["status"] == "success"
        assert run.result["stdout"] == "allocated 300 MiB\n"


@pytest.mark.req("R-TBL-RES")
# nsjail alone: bwrap's outer process ends without reaping the namespace's init, so wait4
# reports none of the job's CPU time (0.003 s measured) and its jobs get no such note
@pytest.mark.parametrize("backend", ["nsjail"])
def test_cpu_time_limit(run_job: Callable[..., CliRun], backend_env: dict[str, str]) -> None:
    """The kernel's kill leaves no output: the job's log says it was the CPU limit."""
    env = {**backend_env, "ORVANTA_JOB_CPU_SECONDS": "1"}
    run = run_job("while True:\n    pass\n", env=env, args=["--timeout", "20"])
    assert run.result is not None, run
    assert run.result["status"] == "failure"  # killed by the limit, not by the 20 s deadline
    assert run.result["exit_code"] in (137, 152)  # SIGKILL or SIGXCPU
    assert run.result["duration"] < 10
    notes = [line for line in run.result["log"] if line.startswith("cpu limit: ")]
    assert len(notes) == 1 and "ORVANTA_JOB_CPU_SECONDS" in notes[0], run.result["log"]
    # a job that ends at once with the same code (its own SIGKILL would not do: it is the
    # namespace's PID 1, which no signal of its own kills): no CPU spent, no such note
    quick = run_job("import os\nos._exit(137)\n", env=env)
    assert quick.result is not None and quick.result["exit_code"] == 137, quick
    assert not any(line.startswith("cpu limit") for line in quick.result["log"]), quick.result
