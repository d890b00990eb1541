"""A serving worker's jobs root as a tmpfs of its own (runtime.jobdir.mount_root): mounted
where nothing is there yet, shared by the workers of the same root, unmounted by the last
one to stop, and never over anything that is there already."""

from __future__ import annotations

import fcntl
import os
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from runtime import jobdir
from runtime.executor import JobRunner
from runtime.jobs import JobSpec
from runtime.settings import Settings
from runtime.startup import probe_host

pytestmark = pytest.mark.integration


@pytest.fixture
def root(tmp_path: Path) -> Iterator[Path]:
    if os.geteuid() != 0:
        pytest.skip("only a root worker mounts a tmpfs at its jobs root")
    jobs = tmp_path / "jobs"
    yield jobs
    jobdir.remove_tree(tmp_path)  # whatever a failed test left mounted, then the files


def runner(root: Path, state: str, **env: str) -> JobRunner:
    settings = Settings.from_env(
        {"ORVANTA_JOBS_DIR": str(root), "ORVANTA_STATE_DIR": str(root.parent / state), **env}
    )
    return JobRunner(settings, probe_host(settings), tmpfs_root=True)


def job(name: str) -> JobSpec:
    return JobSpec(f"{name}{time.monotonic_ns() % 16**12:012x}", "bash", "echo ok > f; cat f\n")


def tmpfs_at(path: Path) -> bool:
    return os.path.ismount(path) and jobdir._source(path) == jobdir.ROOT_SOURCE


@pytest.mark.req("R-JOB-5", "R-HOST-4")
def test_a_serving_workers_job_dirs_live_on_a_tmpfs_it_unmounts_at_its_stop(root: Path) -> None:
    worker = runner(root, "state")
    try:
        assert tmpfs_at(root), "no tmpfs of its own at the jobs root"
        assert root.stat().st_mode & 0o777 == 0o711  # enter your own job dir, list no other
        spec = job("tmpfsroot")
        result = worker.run(spec)
        assert result.status == "success" and result.stdout == "ok\n", result
        worker.wait_teardowns()
        assert not (root / spec.id).exists()
    finally:
        worker.close()
    assert not os.path.ismount(root), "the jobs root's tmpfs outlived the worker"
    assert list(root.iterdir()) == []


@pytest.mark.req("R-JOB-5")
def test_workers_of_one_jobs_root_share_its_tmpfs_and_the_last_one_unmounts_it(
    root: Path,
) -> None:
    first = runner(root, "state-a")
    second = runner(root, "state-b")
    try:
        assert tmpfs_at(root)
        assert first._root_mounted and second._root_mounted
        table = Path("/proc/self/mountinfo").read_text().splitlines()
        assert sum(f" {root} " in line for line in table) == 1, "mounted twice, one over the other"
        for worker in (first, second):
            assert worker.run(job("shared")).status == "success"
            worker.wait_teardowns()  # each keeps a job dir made ahead in it
        first.close()
        assert tmpfs_at(root), "unmounted under the other worker's job dirs"
        assert second.run(job("after")).status == "success"
    finally:
        first.close()
        second.close()
    assert not os.path.ismount(root), "the last worker to stop left it mounted"


@pytest.mark.req("R-JOB-5")
def test_a_jobs_root_with_something_in_it_or_mounted_on_stays_as_it_is(root: Path) -> None:
    root.mkdir()
    (root / "operator-notes").write_text("not a job dir\n")
    worker = runner(root, "state")
    try:
        assert not worker._root_mounted and not os.path.ismount(root)
        assert worker.run(job("plain")).status == "success"
    finally:
        worker.close()
    assert (root / "operator-notes").read_text() == "not a job dir\n"
    (root / "operator-notes").unlink()
    jobdir.mounts.tmpfs(str(root), 8, 0, 0, "operator-own")
    try:
        worker = runner(root, "state")
        mounted = worker.tmpfs_root
        worker.close()
        assert not mounted, "an operator's own mount taken as the worker's"
        assert os.path.ismount(root) and jobdir._source(root) == "operator-own"
    finally:
        jobdir.mounts.detach(str(root))
    # a bind mount from the same filesystem, which os.path.ismount does not see
    disk = root.parent / "operator-disk"
    disk.mkdir()
    jobdir.mounts.mount(str(disk), str(root), None, jobdir.mounts.MS_BIND)
    try:
        worker = runner(root, "state")
        mounted = worker.tmpfs_root
        worker.close()
        assert not mounted, "mounted over an operator's bind mount"
        assert jobdir._source(root) != jobdir.ROOT_SOURCE
    finally:
        jobdir.mounts.detach(str(root))


@pytest.mark.req("R-JOB-5")
def test_orvanta_jobs_tmpfs_false_keeps_job_dirs_on_the_roots_filesystem(root: Path) -> None:
    worker = runner(root, "state", ORVANTA_JOBS_TMPFS="false")
    try:
        assert not worker.tmpfs_root and not os.path.ismount(root)
        assert worker.run(job("ondisk")).status == "success"
    finally:
        worker.close()


@pytest.mark.req("R-JOB-5")
def test_no_job_dir_is_made_while_the_root_is_being_unmounted(root: Path) -> None:
    """A job dir is made under a shared lock on the root's parent, which `unmount_root` takes
    exclusively: one made by a sharing worker lands in the tmpfs before the check (which
    then keeps it mounted) or on the disk after the detach, never in a detached tmpfs."""
    first = runner(root, "state-a")
    first.settle()  # nothing of its own in the root
    made: list[jobdir.JobDir] = []
    blocked = threading.Event()
    parent = os.open(root.parent, os.O_RDONLY | os.O_DIRECTORY)
    try:
        fcntl.flock(parent, fcntl.LOCK_EX)  # as unmount_root between its check and detach

        def make() -> None:
            blocked.set()
            made.append(jobdir.JobDir.make(root, "sharer0000000001"))

        maker = threading.Thread(target=make)
        maker.start()
        blocked.wait(5)
        time.sleep(0.2)
        assert not made, "a job dir was made while the root's lock was held exclusively"
        jobdir.mounts.detach(str(root))  # the unmount the lock was held for
        fcntl.flock(parent, fcntl.LOCK_UN)
        maker.join(5)
        assert made and made[0].root.is_dir(), "made in a detached tmpfs, out of everyone's reach"
        assert not os.path.ismount(root)
    finally:
        os.close(parent)
        for place in made:
            place.remove()
        first._root_mounted = False
        first.close()
