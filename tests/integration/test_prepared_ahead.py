"""The next job made ready while one runs (runtime.executor `prepare_ahead`, `Upcoming`):
it runs as it was made, its deadline counts from its own spawn, and when it does not run
next (the running job outlived the hold, the worker stops) nothing of it is left under
its id before it may go to another worker."""

from __future__ import annotations

import os
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from cli_helpers import BACKEND_ENV, job_cgroup, tool_missing

from runtime import executor, pipeline
from runtime.executor import JobRunner, Upcoming
from runtime.jobs import JobSpec
from runtime.queue import JobQueue
from runtime.settings import Settings
from runtime.startup import probe_host
from runtime.worker import Worker

pytestmark = pytest.mark.integration


class Next:
    """An Upcoming that always names one job, and records what it was told."""

    def __init__(self, spec: JobSpec, settings: Settings) -> None:
        self.spec, self.settings = spec, settings
        self.peeked = 0
        self.let_go: list[JobSpec] = []
        self.on_let_go = lambda spec: None

    def upcoming(self) -> Upcoming:
        return Upcoming(self._peek, self._let_go)

    def _peek(self) -> tuple[JobSpec, Settings] | None:
        self.peeked += 1
        return self.spec, self.settings

    def _let_go(self, spec: JobSpec) -> None:
        self.on_let_go(spec)
        self.let_go.append(spec)


@pytest.fixture(params=["none", "unshare", "nsjail"])
def runner(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[JobRunner]:
    missing = tool_missing(request.param)
    if missing:
        pytest.skip(f"{request.param}: {missing}")
    env = {**BACKEND_ENV[request.param], "ORVANTA_STATE_DIR": str(tmp_path / "state")}
    settings = Settings.from_env(env)
    with JobRunner(settings, probe_host(settings)) as made:
        yield made


def own_id(name: str) -> str:
    """A job id of this run alone (16 hex digits): no earlier run left anything under it."""
    return f"{abs(hash((name, time.monotonic_ns()))) % 16**16:016x}"


@pytest.mark.req("R-JOB-3", "R-JOB-5")
def test_the_next_job_is_made_ready_while_one_runs_and_runs_as_made(
    runner: JobRunner, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(executor, "AHEAD_HOLD_SECONDS", 30.0)  # kept however slow the machine
    second = JobSpec(own_id("second"), "bash", "sleep 0.3\necho second\n", {}, 1.0)
    following = Next(second, runner.settings)
    first = runner.run(
        JobSpec(own_id("first"), "bash", "sleep 1.2\necho first\n", {}, 30),
        upcoming=following.upcoming(),
    )
    assert first.status == "success" and first.stdout == "first\n", first
    assert following.peeked == 1 and following.let_go == [], "not made ready ahead"
    script = runner.jobs_dir / second.id / "job" / "main.sh"
    assert script.read_text() == second.script, "the next job's place is not ready"

    prepared: list[JobSpec] = []
    real_prepare = runner._prepare

    def counted(
        spec: JobSpec, settings: Settings | None = None, ahead: bool = False
    ) -> executor.Prepared:
        prepared.append(spec)
        return real_prepare(spec, settings, ahead)

    monkeypatch.setattr(runner, "_prepare", counted)
    done = runner.run(second)
    # its 1 s deadline counts from its spawn: made ready 1.2 s before, it still had its second
    assert done.status == "success" and done.stdout == "second\n", done
    assert prepared == [], "made again instead of run as made"
    runner.settle()
    assert not (runner.jobs_dir / second.id).exists()


@pytest.mark.req("R-JOB-5", "R-XJOB-1")
def test_a_job_made_ready_ahead_is_gone_before_it_is_let_go_behind_a_long_job(
    runner: JobRunner, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Past the hold the queue thread may hand the job back to another worker, which may
    share this jobs root: by then no directory or cgroup of it may be left under its id
    (another worker would take it for a live attempt and refuse to run it)."""
    monkeypatch.setattr(executor, "AHEAD_HOLD_SECONDS", 0.2)
    second = JobSpec(own_id("second"), "bash", "echo second\n", {}, 30)
    following = Next(second, runner.settings)
    seen: dict[str, bool] = {}

    def at_let_go(spec: JobSpec) -> None:
        seen["dir"] = (runner.jobs_dir / spec.id).exists()
        seen["cgroup"] = job_cgroup(spec.id).exists()

    following.on_let_go = at_let_go
    real_discard = runner.discard_ahead

    def discard() -> JobSpec | None:
        seen["made"] = (runner.jobs_dir / second.id / "job" / "main.sh").exists()
        return real_discard()

    monkeypatch.setattr(runner, "discard_ahead", discard)
    first = runner.run(
        JobSpec(own_id("first"), "bash", "sleep 1\necho first\n", {}, 30),
        upcoming=following.upcoming(),
    )
    assert first.status == "success", first
    assert following.let_go == [second], "made ready, but never let go"
    assert seen == {"made": True, "dir": False, "cgroup": False}, "let go while under its id"
    assert runner._ahead_job is None
    again = runner.run(second)  # later, on its turn: made anew
    assert again.status == "success" and again.stdout == "second\n", again


@pytest.mark.req("R-VOL-2", "R-ANN-1")
@pytest.mark.parametrize(
    "script",
    ["# volume: cache data\necho vol\n", "# sandbx\necho near-miss\n"],
    ids=["names-a-volume", "header-near-miss"],
)
def test_a_job_whose_header_waits_for_its_turn_is_not_made_ready_ahead(
    runner: JobRunner, script: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A volume may be held by the running job itself; a header error is the job's own,
    reported on its turn."""
    monkeypatch.setattr(executor, "AHEAD_HOLD_SECONDS", 30.0)  # let go for no other reason
    second = JobSpec(own_id("second"), "bash", script, {}, 30)
    following = Next(second, runner.settings)
    first = runner.run(
        JobSpec(own_id("first"), "bash", "sleep 0.3\n", {}, 30), upcoming=following.upcoming()
    )
    assert first.status == "success", first
    assert following.let_go == [second]
    assert runner._ahead_job is None and not (runner.jobs_dir / second.id).exists()


class Releases:
    """The queue, noting at each hand-back whether the job's place was still there."""

    def __init__(self, queue: JobQueue, jobs_dir: Path) -> None:
        self.queue, self.jobs_dir = queue, jobs_dir
        self.released: list[tuple[str, bool]] = []

    def __getattr__(self, name: str) -> Any:
        return getattr(self.queue, name)

    def release(self, job_id: str, worker: str) -> bool:
        self.released.append((job_id, (self.jobs_dir / job_id).exists()))
        return self.queue.release(job_id, worker)


@pytest.mark.req("R-JOB-5")
def test_a_job_made_ready_goes_back_to_the_queue_only_once_its_place_is_gone(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Prepared, it is not handed back at PREFETCH_HOLD_SECONDS (its place is under its id);
    a stopping worker removes the place first, then hands it back."""
    monkeypatch.setattr(executor, "AHEAD_HOLD_SECONDS", 30.0)
    monkeypatch.setattr(pipeline, "PREFETCH_HOLD_SECONDS", 0.3)
    settings = Settings.from_env({"ORVANTA_STATE_DIR": str(tmp_path / "state")})
    queue = JobQueue.in_state_dir(settings.state_dir)
    try:
        first = queue.submit("bash", "sleep 3\necho first\n")  # the stop comes while it runs
        second = queue.submit("bash", "echo second\n")
        with JobRunner(settings, probe_host(settings)) as runner:
            source = Releases(queue, runner.jobs_dir)
            worker = Worker(runner, source, "w-ahead")  # type: ignore[arg-type]
            ready = runner.jobs_dir / second / "job" / "main.sh"

            def stop_once_ready() -> None:
                deadline = time.monotonic() + 20
                while not ready.exists() and time.monotonic() < deadline:
                    time.sleep(0.01)
                time.sleep(0.6)  # past the queue thread's hold
                worker.stopping.set()

            stopper = threading.Thread(target=stop_once_ready)
            stopper.start()
            try:
                assert worker.serve() == 1
            finally:
                stopper.join()
            assert source.released == [(second, False)]
            assert not job_cgroup(second).exists()
        done = queue.get(first)
        assert done is not None and done.result is not None and done.result.stdout == "first\n"
        back = queue.get(second)
        assert back is not None and (back.status, back.attempts, back.worker) == ("queued", 0, None)
    finally:
        queue.close()


@pytest.mark.req("R-JOB-4")
def test_discarding_a_job_made_ready_never_waits_for_other_jobs_teardowns(
    runner: JobRunner, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The discard runs beside the running job, inside its wait: it removes the one place
    it made, never waits for another job's long teardown (a plain dir, volumes to strip)."""
    monkeypatch.setattr(executor, "AHEAD_HOLD_SECONDS", 0.2)
    runner._tidier.submit(lambda: time.sleep(4), heavy=True)  # an earlier job's, still going
    second = JobSpec(own_id("second"), "bash", "echo second\n", {}, 30)
    following = Next(second, runner.settings)
    first = runner.run(
        JobSpec(own_id("first"), "bash", "sleep 1\n", {}, 30), upcoming=following.upcoming()
    )
    assert first.status == "success", first
    assert following.let_go == [second]
    assert first.duration < 3, f"the running job waited for another teardown: {first.duration}"


@pytest.mark.req("R-HOST-1")
def test_no_job_ids_are_held_for_a_waiting_job_in_a_range_sized_to_running_jobs(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Below 1,024 ids a range is sized to the jobs running at once: a job made ready
    ahead would hold a second pair, which another worker's running job may need."""
    from runtime import idmap

    missing = tool_missing("unshare")
    if missing:
        pytest.skip(f"unshare: {missing}")
    monkeypatch.setattr(executor, "AHEAD_HOLD_SECONDS", 30.0)
    env = {
        **BACKEND_ENV["unshare"],
        "ORVANTA_STATE_DIR": str(tmp_path / "state"),
        "ORVANTA_JOB_UID": str(1_960_000_000 + os.getpid() % 1000),  # a range of its own
        "ORVANTA_JOB_ID_COUNT": "2",
    }
    settings = Settings.from_env(env)
    if not idmap.hardened(settings):
        pytest.skip("jobs get no host ids of their own here (not root, or ORVANTA_JOB_UID=0)")
    with JobRunner(settings, probe_host(settings)) as runner:
        second = JobSpec(own_id("second"), "bash", "echo second\n", {}, 30)
        following = Next(second, settings)
        first = runner.run(
            JobSpec(own_id("first"), "bash", "sleep 0.3\n", {}, 30),
            upcoming=following.upcoming(),
        )
        assert first.status == "success", first
        assert following.let_go == [second] and runner._ahead_job is None
        assert runner.run(second).status == "success"


@pytest.mark.req("R-JOB-3")
def test_a_job_made_ready_then_canceled_leaves_nothing_on_an_idle_worker(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(executor, "AHEAD_HOLD_SECONDS", 30.0)
    monkeypatch.setattr(pipeline, "PREFETCH_HOLD_SECONDS", 30.0)
    monkeypatch.setattr(pipeline, "PEEK_MAX_AGE_SECONDS", 30.0)
    settings = Settings.from_env({"ORVANTA_STATE_DIR": str(tmp_path / "state")})
    queue = JobQueue.in_state_dir(settings.state_dir)
    try:
        queue.submit("bash", "sleep 1.5\n")
        second = queue.submit("bash", "echo second\n")
        with JobRunner(settings, probe_host(settings)) as runner:
            worker = Worker(runner, queue, "w-cancel")
            place = runner.jobs_dir / second
            seen: dict[str, bool] = {}

            def cancel_then_look() -> None:
                deadline = time.monotonic() + 20
                while not (place / "job" / "main.sh").exists() and time.monotonic() < deadline:
                    time.sleep(0.01)
                seen["made"] = place.exists()
                queue.cancel(second)
                done = queue.wait(second, 20)
                seen["canceled"] = done.result is not None and done.result.status == "canceled"
                time.sleep(0.5)  # the worker idles: nothing else is queued
                seen["left"] = place.exists()
                worker.stopping.set()

            looker = threading.Thread(target=cancel_then_look)
            looker.start()
            try:
                worker.serve()
            finally:
                looker.join()
        assert seen == {"made": True, "canceled": True, "left": False}, seen
    finally:
        queue.close()


def _mounted(path: Path) -> bool:
    """`path` is a mount point in the worker's own mount table."""
    return any(
        line.split()[4] == str(path)
        for line in Path("/proc/self/mountinfo").read_text().splitlines()
    )


@pytest.mark.req("R-JOB-5")
@pytest.mark.parametrize("first_backend", ["none", "unshare"])
def test_a_jobs_tmpfs_is_gone_before_a_job_whose_namespace_would_copy_it(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, first_backend: str
) -> None:
    """A job's tmpfs is detached after its result (its own namespace, if it had one, died
    with it), but before the spawn of a job that makes a mount namespace: none of it is in
    that job's namespace."""
    missing = tool_missing("unshare")
    if missing:
        pytest.skip(f"unshare: {missing}")
    state = {"ORVANTA_STATE_DIR": str(tmp_path / "state")}
    plain = Settings.from_env(state)
    isolated = Settings.from_env({**BACKEND_ENV["unshare"], **state})
    with JobRunner(plain, probe_host(isolated)) as runner:
        if not runner._mount:
            pytest.skip("job dirs are tmpfs only where the worker may mount (root)")
        first = JobSpec(own_id("first"), "bash", "echo secret > note\n")
        done = runner.run(first, plain if first_backend == "none" else isolated)
        assert done.status == "success" and done.isolation == first_backend, done
        assert _mounted(runner.jobs_dir / first.id / "job"), "detached at once: not deferred"
        second = JobSpec(own_id("second"), "bash", "cat /proc/self/mountinfo\n")
        with monkeypatch.context() as patch:  # the teardown, beside the job, may come too late
            patch.setattr(runner._tidier, "pause", lambda: None)
            seen = runner.run(second, isolated)
        assert seen.isolation == "unshare" and seen.status == "success", seen
        assert str(runner.jobs_dir / second.id) in seen.stdout  # its own tmpfs: it can see
        assert first.id not in seen.stdout, "the last job's tmpfs is in this job's namespace"
        assert not _mounted(runner.jobs_dir / first.id / "job")


@pytest.mark.req("R-JOB-5", "R-VOL-2")
def test_a_none_jobs_tmpfs_is_detached_at_once_where_its_teardown_runs_on_another_thread(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A teardown with volumes to strip runs on the tidier's own thread; a tmpfs left for it to
    detach could still be attached when this thread spawns a job whose namespace copies it.
    Here the script does not fit the job's 1 MiB tmpfs after its volume was claimed."""
    env = {"ORVANTA_STATE_DIR": str(tmp_path / "state"), "ORVANTA_JOB_DISK_MB": "1"}
    settings = Settings.from_env(env)
    with JobRunner(settings, probe_host(settings)) as runner:
        if not runner._mount:
            pytest.skip("job dirs are tmpfs only where the worker may mount (root)")
        held: list[Any] = []
        try:
            with monkeypatch.context() as patch:  # teardowns wait: what they would free is seen
                patch.setattr(
                    runner._tidier, "submit", lambda teardown, heavy=False: held.append(teardown)
                )
                script = "# volume: cache data\n" + "#" * 2**21 + "\n"
                spec = JobSpec(own_id("big"), "bash", script)
                with pytest.raises(OSError):
                    runner.run(spec)
                assert held, "no teardown handed to the tidier"
                assert runner._attached == [], "left attached for a teardown on another thread"
                assert not _mounted(runner.jobs_dir / spec.id / "job")
        finally:
            runner._detach_deferred()
            for teardown in held:
                teardown()
