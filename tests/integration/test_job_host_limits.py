"""What a job may do to the host beyond the page's table (SPEC "Beyond the page").

Each test is an attack with its positive control: volume poisoning (R-VOL-2), setuid
files left in volumes (R-HOST-3), the disk quota (R-DISK-1), and a process that leaves
the job's cgroup (R-HOST-5). They drive the runtime in-process with real unshare and
nsjail; the conformance probes cover the same ground through real workers.
"""

from __future__ import annotations

import os
import stat
from pathlib import Path

import pytest
from cli_helpers import BACKEND_ENV, processes_with, tool_missing

from runtime.executor import JobRunner
from runtime.jobs import JobResult, JobSpec
from runtime.settings import Settings
from runtime.startup import probe_host

pytestmark = pytest.mark.integration


def runner(tmp_path: Path, backend: str, **extra: str) -> JobRunner:
    missing = tool_missing(backend)
    if missing:
        pytest.skip(f"{backend}: {missing}")
    env = {**BACKEND_ENV[backend], "ORVANTA_STATE_DIR": str(tmp_path / "state"), **extra}
    settings = Settings.from_env(env)
    return JobRunner(settings, probe_host(settings))


def run(r: JobRunner, script: str, job_id: str, lang: str = "bash") -> JobResult:
    return r.run(JobSpec(job_id, lang, script, {}, 30))


@pytest.mark.req("R-VOL-2", "R-ANN-4")
@pytest.mark.parametrize("backend", ["none", "unshare", "nsjail"])
def test_a_poisoned_volume_is_refused_and_the_host_left_alone(tmp_path: Path, backend: str) -> None:
    """Positive control: the link is what an earlier root job could plant (none); the next
    job, on any backend, must be refused rather than given the host path."""
    r = runner(tmp_path, backend)
    target = tmp_path / "host-dir"
    target.mkdir()
    (target / "secret").write_text("host file\n")
    volumes = tmp_path / "state" / "volumes" / "default"
    volumes.mkdir(parents=True)
    (volumes / "cache").symlink_to(target)
    result = run(r, "# volume: cache\ncat cache/secret; echo pwned > cache/new\n", "poison1")
    assert result.status == "error", result
    assert "has a symlink or a file at 'cache'" in result.stderr
    assert "host file" not in result.stdout
    assert sorted(p.name for p in target.iterdir()) == ["secret"]


@pytest.mark.req("R-VOL-2", "R-HOST-3")
@pytest.mark.parametrize("backend", ["unshare", "nsjail"])
def test_volumes_are_mounted_nosuid_nodev_and_owned_by_the_job_uid(
    tmp_path: Path, backend: str
) -> None:
    r = runner(tmp_path, backend)
    script = "# volume: cache\necho data > cache/f; awk '$5 ~ /\\/cache$/' /proc/self/mountinfo\n"
    result = run(r, script, "nosuid" + backend)
    assert result.status == "success", result
    options = result.stdout.split()[5]
    assert {"nosuid", "nodev"} <= set(options.split(",")), result.stdout
    volume = tmp_path / "state" / "volumes" / "default" / "cache"
    assert (volume / "f").stat().st_uid == r.settings.job_uid


@pytest.mark.req("R-HOST-3")
def test_setuid_files_left_in_a_volume_are_stripped(tmp_path: Path) -> None:
    """Under `none` the job is root and can make a setuid-root copy of a shell (the attack);
    the worker strips the bits when the job ends, whatever the backend."""
    r = runner(tmp_path, "none")
    script = "# volume: cache\ncp /bin/sh cache/sh && chmod 4755 cache/sh && stat -c %a cache/sh\n"
    result = run(r, script, "setuid1")
    assert result.stdout.strip() == "4755", result  # the attack worked while the job ran
    left = tmp_path / "state" / "volumes" / "default" / "cache" / "sh"
    assert not left.stat().st_mode & (stat.S_ISUID | stat.S_ISGID)


@pytest.mark.req("R-DISK-1")
@pytest.mark.parametrize("backend", ["none", "unshare", "nsjail"])
def test_the_disk_quota_stops_a_job_and_the_worker_says_so(tmp_path: Path, backend: str) -> None:
    r = runner(tmp_path, backend, ORVANTA_JOB_DISK_MB="4")
    script = "for i in 1 2 3 4 5 6; do head -c 1048576 /dev/zero > f$i || exit 3; done; echo all\n"
    result = run(r, script, "disk" + backend)
    assert result.exit_code == 3 and "all" not in result.stdout, result
    assert "No space left on device" in result.stderr
    assert any(line.startswith("disk quota:") for line in result.log), result.log


@pytest.mark.req("R-HOST-5", "R-JOB-3")
def test_a_process_that_leaves_the_job_cgroup_is_found_and_reported(tmp_path: Path) -> None:
    """Under `none` a root job can move a daemon to the root cgroup (the attack); the worker,
    a child subreaper, still finds it, kills it and says so instead of a clean end."""
    r = runner(tmp_path, "none")
    marker = f"orvanta-escape-{os.getpid()}"
    script = f"""
import os, sys, time
pid = os.fork()
if pid == 0:
    os.setsid()
    if os.fork():
        os._exit(0)
    for procs in ("/sys/fs/cgroup/freezer/cgroup.procs", "/sys/fs/cgroup/cgroup.procs"):
        try:
            open(procs, "w").write(str(os.getpid()))
        except OSError:
            pass
    os.execv(sys.executable, [sys.executable, "-c", "import time; time.sleep(30)", "{marker}"])
os.waitpid(pid, 0)
time.sleep(0.3)
print("left")
"""
    result = run(r, script, "escape1", "python3")
    try:
        assert result.status == "success", result
        assert any("outside its cgroup" in line for line in result.log), result.log
        assert processes_with(marker) == []
    finally:
        for pid in processes_with(marker):
            os.kill(pid, 9)


@pytest.mark.req("R-JOB-5", "R-DISK-1")
def test_a_starting_worker_removes_what_a_killed_one_left_mounted(tmp_path: Path) -> None:
    """A worker killed mid-job leaves its tmpfs job dir mounted; the next worker of the same
    jobs root unmounts and removes it, and never touches a live worker's job dir."""
    from runtime.jobdir import JobDir

    first = runner(tmp_path, "none")
    live = JobDir.create(first.jobs_dir, "livejob000000001", (0, 0), 4, True)
    dead = JobDir.create(first.jobs_dir, "deadjob000000001", (0, 0), 4, True)
    assert dead.quota and live.quota
    os.close(dead.lock_fd)  # what a kill -9 does to the lock; the mount stays
    dead.lock_fd = -1
    runner(tmp_path, "none")  # a worker starting on the same jobs root
    assert not dead.root.exists()
    assert live.job_dir.is_mount()
    live.remove()
    assert not live.root.exists()


@pytest.mark.req("R-HOST-4")
def test_the_workers_state_is_its_own(tmp_path: Path) -> None:
    """State dir 0700, queue file (and its WAL) 0600, jobs root 0711 whatever the umask."""
    from runtime.queue import JobQueue

    old = os.umask(0)
    try:
        r = runner(tmp_path, "none")
        queue = JobQueue.in_state_dir(r.settings.state_dir)
        queue.submit("bash", "true\n")
        modes = {
            path.name: stat.S_IMODE(path.stat().st_mode)
            for path in (r.settings.state_dir, r.jobs_dir, *r.settings.state_dir.glob("queue*"))
        }
        queue.close()
    finally:
        os.umask(old)
    assert modes == {
        "state": 0o700,
        "state-jobs": 0o711,
        "queue.sqlite3": 0o600,
        "queue.sqlite3-wal": 0o600,
        "queue.sqlite3-shm": 0o600,
    }
