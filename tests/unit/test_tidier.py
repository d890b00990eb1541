"""The tidier: teardowns run in order at the worker's pauses, never far behind, never lost."""

from __future__ import annotations

import functools
import logging
import threading

import pytest

from runtime.tidier import BACKLOG, Tidier


def test_teardowns_wait_for_a_pause_then_run_in_the_order_handed_in() -> None:
    tidier = Tidier()
    done: list[int] = []
    for n in range(BACKLOG):
        tidier.submit(functools.partial(done.append, n))
    assert done == [], "a teardown ran on the job's path instead of at the next pause"
    tidier.settle()
    assert done == list(range(BACKLOG))
    tidier.settle()  # nothing left: nothing runs twice
    assert done == list(range(BACKLOG))


def test_past_the_backlog_the_oldest_teardown_runs_at_once() -> None:
    """A worker that never pauses (a queue of failing jobs) still removes what they leave."""
    tidier = Tidier()
    done: list[int] = []
    for n in range(BACKLOG + 3):
        tidier.submit(functools.partial(done.append, n))
    assert done == [0, 1, 2]
    tidier.settle()
    assert done == list(range(BACKLOG + 3))


def test_settle_from_another_thread_waits_for_the_teardown_running() -> None:
    """A runner shared by threads: settle returns only once the running teardown is done."""
    tidier = Tidier()
    started, release = threading.Event(), threading.Event()
    done: list[str] = []

    def slow() -> None:
        started.set()
        release.wait(5)
        done.append("slow")

    tidier.submit(slow)
    runner = threading.Thread(target=tidier.settle)
    runner.start()
    assert started.wait(5)
    waiter = threading.Thread(target=tidier.settle)
    waiter.start()
    waiter.join(0.2)
    assert waiter.is_alive(), "settle returned while a teardown was still running"
    release.set()
    waiter.join(5)
    runner.join(5)
    assert done == ["slow"]


def test_a_failed_teardown_is_logged_and_the_next_still_runs(
    caplog: pytest.LogCaptureFixture,
) -> None:
    tidier = Tidier()
    done: list[str] = []

    def fails() -> None:
        raise OSError("umount: busy")

    tidier.submit(fails)
    tidier.submit(lambda: done.append("next"))
    with caplog.at_level(logging.ERROR, logger="orvanta.tidier"):
        tidier.settle()
    assert done == ["next"]
    assert "umount: busy" in caplog.text


def test_a_heavy_teardown_runs_on_its_own_thread_and_only_settle_waits_for_it() -> None:
    """One whose length the job decides (a volume to strip) never holds the job loop."""
    tidier = Tidier()
    release = threading.Event()
    done: list[str] = []

    def heavy() -> None:
        release.wait(5)
        done.append("heavy")

    tidier.submit(heavy, heavy=True)
    tidier.submit(lambda: done.append("light"))
    tidier.pause()  # the job loop's pause: the light one only
    assert done == ["light"]
    release.set()
    tidier.settle()
    assert done == ["light", "heavy"]
