"""The worker's queue thread keeps off the job loop from a take to that job's spawn
(runtime.pipeline), on a real SQLite queue whose calls are timed."""

from __future__ import annotations

import threading
import time
from pathlib import Path
from typing import Any

import pytest

from runtime import pipeline
from runtime.jobs import JobResult
from runtime.pipeline import QueueLink
from runtime.queue import JobQueue
from runtime.settings import Settings


class Timed:
    """The queue, with the time of each claim and completion it was asked for."""

    def __init__(self, queue: JobQueue) -> None:
        self.queue = queue
        self.calls: list[tuple[str, float]] = []

    def __getattr__(self, name: str) -> Any:
        method = getattr(self.queue, name)

        def timed(*args: Any, **kwargs: Any) -> Any:
            if name in ("claim", "complete"):
                self.calls.append((name, time.monotonic()))
            return method(*args, **kwargs)

        return timed

    def after(self, moment: float) -> list[str]:
        return [name for name, at in self.calls if at >= moment]


def wait_for(condition: Any, seconds: float = 5.0) -> None:
    deadline = time.monotonic() + seconds
    while not condition():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.002)


@pytest.mark.req("R-JOB-3")
def test_the_queue_thread_waits_for_the_spawn_of_the_job_taken(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    wait = 1.0  # longer than the 50 ms: a loaded machine's sleep does not outlast it
    monkeypatch.setattr(pipeline, "SPAWN_WAIT_SECONDS", wait)
    monkeypatch.setattr(pipeline, "PREFETCH_HOLD_SECONDS", 10 * wait)  # still claims behind it
    queue = JobQueue.open(None, tmp_path)
    for _ in range(3):
        queue.submit("bash", "true\n")
    source = Timed(queue)
    settings = Settings.from_env({})
    link = QueueLink(
        source,  # type: ignore[arg-type]
        "w",
        30.0,
        lambda: settings.worker_tags,
        lambda spec: settings,
        lambda: None,
    )
    stopping = threading.Event()
    try:
        first = link.take(stopping)
        assert first is not None
        time.sleep(wait / 5)
        assert source.after(0.0) == ["claim"], "claimed ahead before the taken job was spawned"
        spawned = time.monotonic()
        link.spawned()
        wait_for(lambda: "claim" in source.after(spawned))
        link.post(first, _result(first.spec.id))
        posted = time.monotonic()
        time.sleep(wait / 10)  # the job loop's way from a result to the next take
        second = link.take(stopping)  # claimed ahead: ready at once
        assert second is not None
        time.sleep(wait / 5)
        assert source.after(posted) == [], "recorded a result before the next job's spawn"
        spawned = time.monotonic()
        link.spawned()
        wait_for(lambda: "complete" in source.after(spawned))

        # without a spawn (a job refused before it): the thread waits no longer than the bound
        wait_for(lambda: "claim" in source.after(spawned))  # the third, claimed ahead
        link.post(second, _result(second.spec.id))
        third = link.take(stopping)
        assert third is not None
        taken = time.monotonic()
        wait_for(lambda: "complete" in source.after(taken))
        waited = next(at for name, at in source.calls if name == "complete" and at >= taken) - taken
        # once from the take, not once per call that waits (the loop waits twice: 2 s)
        assert wait * 0.8 <= waited < 1.5 * wait, waited
        link.spawned()
        link.post(third, _result(third.spec.id))
    finally:
        link.close()
    try:
        assert dict(queue.counts()) == {"done": 3}
    finally:
        queue.close()


def _result(job_id: str) -> JobResult:
    return JobResult(job_id, "none", "success", 0, 0.001, "", "", [])


@pytest.mark.req("R-JOB-3")
def test_a_result_and_a_take_do_not_wake_the_queue_thread_before_the_spawn(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Between one job's end and the next one's spawn the queue thread stays asleep: a
    wake-up there would take the GIL from the job loop for nothing, since its work waits
    for the spawn anyway. The spawn wakes it at once."""
    monkeypatch.setattr(pipeline, "SPAWN_WAIT_SECONDS", 10.0)
    monkeypatch.setattr(pipeline, "CANCEL_POLL_SECONDS", 10.0)  # its own pause: long
    queue = JobQueue.open(None, tmp_path)
    for _ in range(2):
        queue.submit("bash", "true\n")
    settings = Settings.from_env({})
    link = QueueLink(
        queue, "w", 30.0, lambda: settings.worker_tags, lambda spec: settings, lambda: None
    )
    woken: list[float] = []
    keep = link._keep_leases
    monkeypatch.setattr(link, "_keep_leases", lambda: woken.append(time.monotonic()) or keep())
    stopping = threading.Event()
    try:
        first = link.take(stopping)
        assert first is not None
        link.spawned()
        wait_for(lambda: len(link._ready) == 1)  # the second, claimed ahead
        time.sleep(0.1)  # asleep now, in its long pause
        ended = time.monotonic()
        link.post(first, _result(first.spec.id))
        second = link.take(stopping)
        assert second is not None
        time.sleep(0.3)  # the job loop's way to the next spawn, made long
        assert [at for at in woken if at >= ended] == [], "woken before the spawn"
        spawned = time.monotonic()
        link.spawned()
        wait_for(lambda: queue.counts().get("done") == 1, seconds=2.0)  # not its 10 s pause
        assert min(at for at in woken if at >= spawned) - spawned < 1.0
        link.post(second, _result(second.spec.id))
    finally:
        link.close()
    try:
        assert dict(queue.counts()) == {"done": 2}
    finally:
        queue.close()
