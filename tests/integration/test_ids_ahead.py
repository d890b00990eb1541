"""A job's own host ids taken ahead of it (runtime.executor): the last job's teardown takes
the next job's ids, the next job runs under them, and a stopped runner holds none."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
from cli_helpers import BACKEND_ENV, tool_missing

from runtime import executor, idmap
from runtime.executor import JobRunner
from runtime.jobs import JobSpec
from runtime.settings import Settings
from runtime.startup import probe_host

pytestmark = pytest.mark.integration

HOST_UID = "awk 'NR == 1 { print $2 }' /proc/self/uid_map\n"


@pytest.mark.req("R-HOST-1", "R-XJOB-1")
@pytest.mark.parametrize("backend", ["unshare", "nsjail"])
def test_the_next_jobs_ids_are_taken_ahead_and_none_is_held_after(
    tmp_path: Path, backend: str
) -> None:
    missing = tool_missing(backend)
    if missing:
        pytest.skip(f"{backend}: {missing}")
    env = {**BACKEND_ENV[backend], "ORVANTA_STATE_DIR": str(tmp_path / "state")}
    settings = Settings.from_env(env)
    if not idmap.hardened(settings):
        pytest.skip("jobs get no host ids of their own here (not root, or ORVANTA_JOB_UID=0)")
    with JobRunner(settings, probe_host(settings)) as runner:
        first = runner.run(JobSpec("idsaheadfirst001", "bash", HOST_UID, {}, 30))
        assert first.status == "success", first
        runner.wait_teardowns()  # the worker's pause: the first job's ids go, the next's come
        ahead = runner._ids_ahead
        assert ahead is not None, "no ids taken for the next job"
        assert ahead.lock_path is not None and ahead.lock_path.exists()
        assert idmap.in_range(ahead, settings)
        second = runner.run(JobSpec("idsaheadsecond01", "bash", HOST_UID, {}, 30))
        assert second.status == "success", second
        assert int(second.stdout) == ahead.uid, "the second job did not run under the ids taken"
        runner.wait_teardowns()
        again = runner._ids_ahead
        assert again is not None and again.lock_path is not None
        # the second job's pair went with its teardown (unless drawn again for the third)
        assert again.lock_path == ahead.lock_path or not ahead.lock_path.exists()
    assert not ahead.lock_path.exists() and not again.lock_path.exists(), "ids held after close"


@pytest.mark.req("R-HOST-1")
@pytest.mark.parametrize("ahead", [False, True], ids=["as-configured", "ids-ahead-too"])
@pytest.mark.parametrize("backend", ["unshare", "nsjail"])
def test_one_id_for_the_host_still_runs_job_after_job(
    tmp_path: Path, backend: str, ahead: bool, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A range of one: each job waits for the last one's teardown to give its ids back. As
    configured none is taken ahead for so small a range; where one is (`ahead`), the settle
    that a job out of ids waits for takes the only one ahead, and the job must use it."""
    if ahead:
        monkeypatch.setattr(executor, "IDS_AHEAD_MIN_COUNT", 1)
    missing = tool_missing(backend)
    if missing:
        pytest.skip(f"{backend}: {missing}")
    env = {
        **BACKEND_ENV[backend],
        "ORVANTA_STATE_DIR": str(tmp_path / "state"),
        # a range of its own: no other test's running job holds this id
        "ORVANTA_JOB_UID": str(1_950_000_000 + os.getpid() % 1000),
        "ORVANTA_JOB_ID_COUNT": "1",
    }
    settings = Settings.from_env(env)
    if not idmap.hardened(settings):
        pytest.skip("jobs get no host ids of their own here (not root, or ORVANTA_JOB_UID=0)")
    with JobRunner(settings, probe_host(settings)) as runner:
        for n in range(3):
            result = runner.run(JobSpec(f"idsonlyone{n:06d}", "bash", HOST_UID, {}, 30))
            assert result.status == "success", result
            assert int(result.stdout) == settings.job_uid
        runner.wait_teardowns()
        assert (runner._ids_ahead is not None) == ahead
