"""The tidier: teardowns run in order behind the caller, never far behind, never lost."""

from __future__ import annotations

import functools
import logging
import threading
import time

import pytest

from runtime.tidier import BACKLOG, Tidier


def test_teardowns_run_in_the_order_handed_in_and_settle_waits_for_all() -> None:
    tidier = Tidier()
    done: list[int] = []

    def slow(n: int) -> None:
        time.sleep(0.01)
        done.append(n)

    for n in range(5):
        tidier.submit(functools.partial(slow, n))
    tidier.settle()
    assert done == [0, 1, 2, 3, 4]


def test_the_caller_waits_once_backlog_teardowns_are_pending() -> None:
    """A slow disk makes the worker wait for its tidier rather than pile up job dirs."""
    tidier = Tidier()
    release = threading.Event()

    def busy() -> None:
        release.wait()

    tidier.submit(busy)  # running: the thread is busy with it
    for _ in range(BACKLOG):
        tidier.submit(lambda: None)  # queued behind it
    blocked = threading.Thread(target=tidier.submit, args=(lambda: None,))
    blocked.start()
    blocked.join(0.2)
    assert blocked.is_alive(), "a teardown past the backlog was queued without waiting"
    release.set()
    blocked.join(5)
    assert not blocked.is_alive()
    tidier.settle()


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
