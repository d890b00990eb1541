"""cgroups made ahead of their job (runtime.cgroups.AheadGroups): on v1 the next job's
groups exist before it comes and become its own by a rename; none is ever left behind.
v2 cannot rename a group, so none is made ahead there."""

from __future__ import annotations

import os
import secrets
import subprocess
import threading
from pathlib import Path

import pytest
from cli_helpers import BACKEND_ENV, job_cgroup, jobs_cgroup, tool_missing, wait_until

from runtime import cgroups
from runtime.executor import JobRunner
from runtime.jobs import JobResult, JobSpec
from runtime.settings import Settings
from runtime.startup import probe_host

pytestmark = pytest.mark.integration


def mine(controller: str) -> list[Path]:
    """This process's groups made ahead under `controller` (v1), or under orvanta/ (v2)."""
    if controller == "freezer":
        parent = jobs_cgroup()
    else:
        parent = cgroups.ROOT / controller / cgroups.PARENT
    if not parent.is_dir():
        return []
    return [p for p in parent.iterdir() if p.name.startswith(f"{cgroups.AHEAD}{os.getpid()}-")]


@pytest.mark.req("R-JOB-3")
@pytest.mark.parametrize("backend", ["none", "nsjail"])
def test_the_next_jobs_groups_are_made_ahead_and_none_is_left(tmp_path: Path, backend: str) -> None:
    missing = tool_missing(backend)
    if missing:
        pytest.skip(f"{backend}: {missing}")
    if os.geteuid() != 0 or not os.access(cgroups.ROOT, os.W_OK):
        pytest.skip("cgroups are not writable here (not root)")
    env = {**BACKEND_ENV[backend], "ORVANTA_STATE_DIR": str(tmp_path / "state")}
    settings = Settings.from_env(env)
    controllers = ["freezer", *(cgroups.NSJAIL_CONTROLLERS if backend == "nsjail" else [])]
    # ids of this run alone: a group a killed run left under a fixed id would be reused as
    # that job's own (a retry's), never replaced by the one made ahead
    first_id, second_id = (f"ahead{which}{secrets.token_hex(6)}" for which in ("first", "next"))
    with JobRunner(settings, probe_host(settings)) as runner:
        first = runner.run(JobSpec(first_id, "bash", "true\n", {}, 30))
        assert first.status == "success", first
        runner.wait_teardowns()  # the worker's pause: the next job's groups are made
        if cgroups.is_v2():
            assert mine("freezer") == [], "a group made ahead on v2, which cannot rename it"
            return
        ahead = {c: mine(c) for c in controllers}
        assert all(len(groups) == 1 for groups in ahead.values()), ahead
        inodes = {c: groups[0].stat().st_ino for c, groups in ahead.items()}

        result: list[JobResult] = []
        job = threading.Thread(
            target=lambda: result.append(
                runner.run(JobSpec(second_id, "bash", "sleep 1\n", {}, 30))
            )
        )
        job.start()
        try:  # joined whatever fails: its end kills every child this process has then
            taken = {c: cgroups.ROOT / c / cgroups.PARENT / f"job-{second_id}" for c in controllers}
            assert taken["freezer"] == job_cgroup(second_id)
            # the freezer group comes first, nsjail's parents one by one after it
            wait_until(lambda: all(p.exists() for p in taken.values()), 10, "the job's groups")
            assert {c: p.stat().st_ino for c, p in taken.items()} == inodes, (
                "the job's groups are new ones, not the ones made ahead for it"
            )
            assert all(mine(c) == [] for c in controllers), "a group made ahead was left aside"
        finally:
            job.join(30)
        assert result and result[0].status == "success", result
    for controller in controllers:
        assert mine(controller) == [], f"a {controller} group made ahead outlived its runner"
        leftover = cgroups.ROOT / controller / cgroups.PARENT
        assert not list(leftover.glob(f"job-{first_id}")), f"{first_id}'s {controller} group"
        assert not list(leftover.glob(f"job-{second_id}")), f"{second_id}'s {controller} group"


def test_the_groups_a_gone_worker_made_ahead_are_swept() -> None:
    """Only a gone worker's, told by pid and start time: a live one's are its next job's."""
    if cgroups.is_v2() or os.geteuid() != 0:
        pytest.skip("groups are made ahead on cgroup v1 only, by a root worker")
    gone = subprocess.Popen(["true"])
    gone.wait()  # its pid now names no process
    parent = jobs_cgroup()
    parent.mkdir(exist_ok=True)
    live_pid, me = os.getppid(), os.getpid()
    groups = {
        "dead": parent / f"{cgroups.AHEAD}{gone.pid}-1-test",
        "pid reused": parent / f"{cgroups.AHEAD}{live_pid}-1-test",
        "this pid, not made here": parent / f"{cgroups.AHEAD}{me}-{cgroups._started(me)}-test",
        "live": parent / f"{cgroups.AHEAD}{live_pid}-{cgroups._started(live_pid)}-test",
    }
    for group in groups.values():
        group.mkdir()
    try:
        swept = cgroups.sweep_ahead()
        for case, group in groups.items():
            assert (group in swept) == (case != "live"), case
            assert group.exists() == (case == "live"), case
    finally:
        for group in groups.values():
            if group.exists():
                group.rmdir()
