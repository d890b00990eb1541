"""What a job may do to the host beyond the page's table (SPEC "Beyond the page").

Each test is an attack with its positive control: volume poisoning (R-VOL-2), setuid
files left in volumes (R-HOST-3), the disk quota (R-DISK-1), and a process that leaves
the job's cgroup (R-HOST-5). They drive the runtime in-process with real unshare and
nsjail; the conformance probes cover the same ground through real workers.
"""

from __future__ import annotations

import json
import os
import stat
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from cli_helpers import BACKEND_ENV, processes_with, tool_missing, wait_until

from runtime.executor import JobRunner
from runtime.jobdir import AHEAD, JobDir
from runtime.jobs import JobResult, JobSpec
from runtime.settings import Settings
from runtime.startup import probe_host

pytestmark = pytest.mark.integration


_RUNNERS: list[JobRunner] = []


@pytest.fixture(autouse=True)
def _runners_closed() -> Iterator[None]:
    """What the last job of a test left is removed before its tmp_path goes (runtime.tidier)."""
    yield
    while _RUNNERS:
        _RUNNERS.pop().close()


def runner(tmp_path: Path, backend: str, **extra: str) -> JobRunner:
    missing = tool_missing(backend)
    if missing:
        pytest.skip(f"{backend}: {missing}")
    env = {**BACKEND_ENV[backend], "ORVANTA_STATE_DIR": str(tmp_path / "state"), **extra}
    settings = Settings.from_env(env)
    made = JobRunner(settings, probe_host(settings))
    _RUNNERS.append(made)
    return made


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
    first = r.settings.job_uid
    assert first <= (volume / "f").stat().st_uid < first + r.settings.job_id_count


@pytest.mark.req("R-ANN-4", "R-HOST-4")
@pytest.mark.parametrize("backend", ["unshare", "nsjail"])
def test_a_volume_stays_writable_for_the_next_job_under_other_ids(
    tmp_path: Path, backend: str
) -> None:
    """Each job has host ids of its own, and a volume outlives them: what one job wrote,
    the next (another uid) may change; its own ids are in the job's /proc/self/uid_map."""
    r = runner(tmp_path, backend)
    uids = []
    for n in range(3):
        script = f"# volume: cache\necho run{n} >> cache/log && mkdir -p cache/d{n} && "
        script += "cat cache/log && cat /proc/self/uid_map\n"
        result = run(r, script, f"adopt{backend}{n}")
        assert result.status == "success", result
        lines = result.stdout.split("\n")
        assert lines[: n + 1] == [f"run{i}" for i in range(n + 1)], result.stdout
        uids.append(int(lines[n + 1].split()[1]))
    assert all(
        r.settings.job_uid <= uid < r.settings.job_uid + r.settings.job_id_count for uid in uids
    )


# A job that keeps a secret in its dir and says where it is, until the test kills it.
HOLDER = """echo "$SECRET" > mine.txt && chmod 644 mine.txt
pwd > "$READY.tmp" && mv "$READY.tmp" "$READY"
for _ in $(seq 300); do [ -e "$READY.done" ] && exit 0; sleep 0.1; done
"""
# The attack: another job's dir is named in this job's copy of the host's mount table.
READER = """import json, os
found = {}
for line in open("/proc/self/mountinfo"):
    point = line.split()[4]
    if point.endswith("/job") and os.path.realpath(point) != os.getcwd():
        try:
            found[point] = open(os.path.join(point, "mine.txt")).read().strip()
        except OSError as exc:
            found[point] = exc.strerror
print(json.dumps(found))
"""


@pytest.mark.req("R-HOST-4", "R-XJOB-1")
@pytest.mark.parametrize(
    ("job_uid", "readable"), [("0", True), (None, False)], ids=["page-literal", "own-ids"]
)
def test_a_concurrent_jobs_dir_is_closed_to_a_job_that_knows_its_path(
    tmp_path: Path, job_uid: str | None, readable: bool
) -> None:
    """Positive control: the page's recipe (ORVANTA_JOB_UID=0) reads the neighbour's file by
    the path its mount table gives away; with ids of its own per job it is refused."""
    extra = {"ORVANTA_JOB_UID": job_uid} if job_uid else {}
    r = runner(tmp_path, "unshare", **extra)
    secret = f"ORVANTA_CANARY_{os.getpid()}_{tmp_path.name}"
    ready = Path(f"/tmp/orvanta-holder-{os.getpid()}-{tmp_path.name}")
    holder_script = tmp_path / "holder.sh"
    holder_script.write_text(HOLDER)
    env = {
        **os.environ,
        **BACKEND_ENV["unshare"],
        **extra,
        "ORVANTA_STATE_DIR": str(tmp_path / "state"),
    }
    holder = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "runtime.cli",
            "run",
            str(holder_script),
            "--json",
            "--env",
            f"SECRET={secret}",
            "--env",
            f"READY={ready}",
        ],
        env=env,
        stdin=subprocess.DEVNULL,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        start_new_session=True,
    )
    try:
        deadline = time.monotonic() + 30
        while not ready.exists():
            assert holder.poll() is None, holder.stderr.read() if holder.stderr else ""
            assert time.monotonic() < deadline, "the holder job never started"
            time.sleep(0.05)
        result = run(r, READER, "reader", "python3")
        assert result.status == "success", result
        found = json.loads(result.stdout)
        assert found, "the holder's job dir is not in the reader's mount table"
        assert (secret in found.values()) is readable, found
    finally:  # the holder ends by itself once told; its job is in a session of its own
        Path(f"{ready}.done").touch()
        try:
            holder.wait(60)
        finally:
            ready.unlink(missing_ok=True)
            Path(f"{ready}.done").unlink(missing_ok=True)


@pytest.mark.req("R-HOST-3")
def test_setuid_files_left_in_a_volume_are_stripped(tmp_path: Path) -> None:
    """Under `none` the job is root and can make a setuid-root copy of a shell (the attack);
    the worker strips the bits when the job ends, whatever the backend."""
    r = runner(tmp_path, "none")
    script = "# volume: cache\ncp /bin/sh cache/sh && chmod 4755 cache/sh && stat -c %a cache/sh\n"
    result = run(r, script, "setuid1")
    assert result.stdout.strip() == "4755", result  # the attack worked while the job ran
    r.settle()  # stripped in the teardown, before the volume's lock lets the next job in
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


@pytest.mark.req("R-JOB-3", "R-PLT-7")
def test_a_kernel_without_pidfd_still_ends_jobs_on_time(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """gVisor's runsc answers pidfd_open with ENOSYS: the worker then polls the job's exit,
    and output, exit code and the deadline stay what they are with a pidfd."""
    import errno as errno_

    def no_pidfd(pid: int, flags: int = 0) -> int:
        raise OSError(errno_.ENOSYS, "Function not implemented")

    monkeypatch.setattr(os, "pidfd_open", no_pidfd)
    r = runner(tmp_path, "none")
    done = run(r, "echo out; echo err >&2; exit 3\n", "nopidfd1")
    assert (done.exit_code, done.stdout, done.stderr) == (3, "out\n", "err\n"), done
    slow = r.run(JobSpec("nopidfd2", "bash", "sleep 30\n", {}, 1))
    assert slow.status == "timeout" and slow.duration < 5, slow


@pytest.mark.req("R-ANN-4")
def test_a_volume_named_twice_is_refused_instead_of_waiting_on_itself(tmp_path: Path) -> None:
    """Each volume is held by one job at a time; the same one at two targets would wait for
    the job's own lock until its timeout."""
    r = runner(tmp_path, "unshare")
    result = run(r, "# volume: cache a\n# volume: cache b\necho ran\n", "twice1")
    assert result.status == "error" and "named twice" in result.stderr, result
    assert "ran" not in result.stdout and result.duration < 5


@pytest.mark.req("R-VOL-2", "R-HOST-3")
def test_adopting_a_volume_leaves_a_hard_link_to_another_file_alone(tmp_path: Path) -> None:
    """A file with a second link may be another's: the worker does not give it to the job."""
    r = runner(tmp_path, "unshare")
    first = run(r, "# volume: cache\necho mine > cache/f\n", "adopt-link1")
    assert first.status == "success", first
    volume = tmp_path / "state" / "volumes" / "default" / "cache"
    outside = tmp_path / "outside"
    outside.write_text("root's\n")
    os.link(outside, volume / "linked")  # what a job could not do, planted as root
    run(r, "# volume: cache\ntrue\n", "adopt-link2")
    assert outside.stat().st_uid == 0


@pytest.mark.req("R-JOB-5")
def test_what_a_root_job_adds_around_its_dir_goes_and_a_mount_it_made_is_not_walked(
    tmp_path: Path,
) -> None:
    """Under `none` the job is root: it writes beside its job dir (into control/ and the job's
    root), links to a host file and binds a host directory inside its job dir. The fast
    removal of what the worker made must step aside, and the full one must remove all of
    it without deleting a byte of the host directory."""
    r = runner(tmp_path, "none")
    host = tmp_path / "host-data"
    host.mkdir()
    (host / "precious").write_text("keep me\n")
    script = (
        "mkdir ../control/sub && touch ../control/sub/f ../stray && "
        f"ln -s {host}/precious ../control/link && "
        f"mkdir mnt && mount --bind {host} mnt && cat mnt/precious\n"
    )
    result = run(r, script, "rootmess00000001")
    assert (result.status, result.stdout) == ("success", "keep me\n"), result
    r.settle()
    assert (host / "precious").read_text() == "keep me\n"
    assert not (r.jobs_dir / "rootmess00000001").exists()
    assert str(host) not in Path("/proc/self/mountinfo").read_text()


@pytest.mark.req("R-JOB-3", "R-JOB-5")
@pytest.mark.parametrize("backend", ["none", "unshare", "nsjail"])
def test_a_retry_right_behind_its_first_attempt_runs_clean(tmp_path: Path, backend: str) -> None:
    """The same job id again while the tidier may still remove the first attempt (a lease
    lost and the job claimed back by this worker): it waits for that teardown, runs in a
    directory and cgroup of its own, and nothing of either attempt is left."""
    r = runner(tmp_path, backend)
    for attempt in ("first", "second"):
        result = run(r, f"echo {attempt} > mark && cat mark\n", "retried000000001")
        assert (result.status, result.stdout) == ("success", f"{attempt}\n"), result
    r.settle()
    assert not (r.jobs_dir / "retried000000001").exists()
    assert list(r.jobs_dir.iterdir()) == []


TAMPERING = {
    "nothing": "",
    "an xattr on its root": (
        "try:\n    os.setxattr('..', 'user.mark', b'1')\n"
        "except OSError as exc:\n    print('no user xattrs' if exc.errno == 95 else exc)"
    ),
    "its root opened to all": "os.chmod('..', 0o777)",
    "a second link to the lock": "os.link('../control/owner.lock', os.environ['LINK'])",
    "a file beside its dir": "open('../stray', 'w').close()",
    "bytes in the lock": "open('../control/owner.lock', 'a').write('x' * 4096)",
    # its tmpfs gone, two binds over the job dir: the worker detaches the top one only
    "a mount under its dir": (
        "d = os.getcwd(); os.chdir('/'); subprocess.run(['umount', '-l', d], check=True); "
        "[subprocess.run(['mount', '--bind', os.environ['EMPTY'], d], check=True) "
        "for _ in range(2)]"
    ),
}


@pytest.mark.req("R-JOB-5", "R-XJOB-1")
@pytest.mark.parametrize("change", sorted(TAMPERING))
def test_a_job_dir_goes_to_the_next_job_only_as_the_worker_made_it(
    tmp_path: Path, change: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The worker hands a finished job's directories to the next job (runtime.jobdir
    `recycle`) only if nothing was added, changed or mounted on them. Under `none` the job
    is root and can do any of it: then the next job gets a new directory, with none of it."""
    r = runner(tmp_path, "none")
    decided: list[bool] = []
    recorded: list[bool] = []  # asserted here: the tidier logs what a teardown raises
    recycle = JobDir.recycle

    def spied(place: JobDir, jobs_root: Path) -> bool:
        decided.append(recycle(place, jobs_root))
        if decided[-1]:  # what it records for the next check is what a full read shows
            recorded.append(place.made is not None and place.made == place._state())
        return decided[-1]

    monkeypatch.setattr(JobDir, "recycle", spied)
    empty = tmp_path / "empty"
    empty.mkdir()
    link = tmp_path / "lock-link"
    script = "import os, subprocess\n" + TAMPERING[change] + "\n"
    env = {"LINK": str(link), "EMPTY": str(empty)}
    ids = [f"tampered{sorted(TAMPERING).index(change)}{n:07d}" for n in (1, 2)]  # xdist: unique
    result = r.run(JobSpec(ids[0], "python3", script, env, 30))
    assert result.status == "success", result
    if result.stdout.strip() == "no user xattrs":  # hostfs in a UML guest, for one
        pytest.skip("this filesystem takes no user xattrs: the attack cannot be made here")
    r.wait_teardowns()  # the worker's pause: the next job's place is made
    (ahead,) = [p for p in r.jobs_dir.iterdir() if p.name.startswith(AHEAD)]
    assert os.listxattr(ahead) == [] and stat.S_IMODE(ahead.stat().st_mode) == 0o711
    assert sorted(p.name for p in ahead.iterdir()) == ["control", "job"]
    lock = os.stat(ahead / "control" / "owner.lock")
    assert (lock.st_nlink, lock.st_size) == (1, 0)
    assert str(empty) not in Path("/proc/self/mountinfo").read_text()
    assert decided == [change == "nothing"], f"{change}: handed on: {decided}"
    assert recorded == [True] * decided.count(True), "the state recorded is not the place's"
    nxt = r.run(JobSpec(ids[1], "bash", "ls -A; stat -c %a ..\n", {}, 30))
    assert (nxt.status, nxt.stdout) == ("success", "main.sh\n711\n"), nxt
    link.unlink(missing_ok=True)


@pytest.mark.req("R-DISK-1")
def test_a_tmpfs_made_ahead_that_will_not_attach_leaves_the_job_its_quota(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """move_mount refused (a kernel or filter that forbids it): the job's tmpfs is mounted on
    the spot instead, never left out."""
    from runtime import mounts

    refusals: list[str] = []

    def refused(mount_fd: int, target: str) -> None:
        refusals.append(target)
        raise mounts.MountError(1, f"move_mount {target}: Operation not permitted")

    monkeypatch.setattr(JobDir, "detached_mounts", True)  # restored after the test
    monkeypatch.setattr(mounts, "attach", refused)
    r = runner(tmp_path, "none")
    for n in (1, 2):  # the second job's tmpfs was made ahead, and is refused
        result = run(r, "stat -f -c %T .\n", f"noattach0000000{n}")
        assert (result.status, result.stdout) == ("success", "tmpfs\n"), result
        r.wait_teardowns()
    assert len(refusals) == 1 and JobDir.detached_mounts is False  # then on the spot only


@pytest.mark.req("R-JOB-3", "R-TBL-RES")
def test_a_long_teardown_holds_off_no_later_jobs_timeout(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """How long stripping a volume takes is the job's to decide (its size): that teardown
    runs on a thread of its own, so the next job is still stopped at its deadline."""
    import runtime.jobdir

    strip = runtime.jobdir.strip_setid

    def slow_strip(fd: int) -> int:
        time.sleep(4)  # a volume of millions of files
        return strip(fd)

    monkeypatch.setattr(runtime.jobdir, "strip_setid", slow_strip)
    r = runner(tmp_path, "none")
    assert run(r, "# volume: big\ntrue\n", "longteardown0001").status == "success"
    started = time.monotonic()
    late = r.run(JobSpec("longteardown0002", "bash", "sleep 30\n", {}, 1))
    took = time.monotonic() - started
    assert late.status == "timeout", late
    assert took < 3, f"a 1 s job ended after {took:.1f} s, behind the last job's teardown"


@pytest.mark.req("R-JOB-5", "R-XJOB-1")
def test_a_copy_of_a_jobs_tmpfs_in_another_namespace_goes_with_the_job(tmp_path: Path) -> None:
    """A mount namespace made while a job runs (another worker's unshare job) copies the
    job's tmpfs. When the job's dir is handed on, its job/ is made anew: removing the old
    one detaches that copy (shown to stay, at the next job's path, without it)."""
    r = runner(tmp_path, "none")
    holder = subprocess.Popen(  # started before the job: no leftover of it, never killed
        ["sh", "-c", "read go; exec unshare -m --propagation private sleep 60"],
        stdin=subprocess.PIPE,
    )
    ran: list[JobResult] = []
    job = threading.Thread(
        target=lambda: ran.append(run(r, "echo x > f; sleep 1\n", "copiedtmpfs00001"))
    )
    try:
        job.start()
        wait_until((r.jobs_dir / "copiedtmpfs00001" / "job" / "f").exists, 10, "the job")
        assert holder.stdin is not None
        holder.stdin.write(b"go\n")
        holder.stdin.flush()

        def copies() -> list[str]:
            lines = Path(f"/proc/{holder.pid}/mountinfo").read_text().splitlines()
            return [line for line in lines if str(r.jobs_dir) in line and "orvanta-job" in line]

        wait_until(copies, 10, "the other namespace's copy of the job's tmpfs")
        job.join(30)
        assert ran and ran[0].status == "success", ran
        r.wait_teardowns()
        assert copies() == [], "the job's tmpfs outlived it in another namespace"
    finally:
        if job.is_alive():  # its end kills every child this process has then
            job.join(30)
        holder.kill()
        holder.wait()
