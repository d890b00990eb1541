"""What a finished job leaves is removed behind the next job's start, not before it.

Once every process of a job is dead (R-JOB-3, on the job's path), removing its
directory and cgroup and freeing its ids is what costs the most of a trivial
job on a root worker after its spawn: rmdirs, lock files. One thread does it
while the worker claims and starts the next job. Nothing is weakened by the
wait: the job's mounts are detached before its result (no later job's namespace
copies them), the ids are freed last and only once nothing of the job is left,
so no later job gets the uid that could read the dir, and a volume stays
locked until its setuid bits are stripped. The thread runs at most BACKLOG
jobs behind the one it is removing (a slow disk makes the worker wait, never
pile up), and `settle` waits for it: a worker that stops, `orvanta run` before
it exits, a retry of a job still in teardown, a volume job, a worker out of
job ids. A worker killed meanwhile leaves what a worker killed
mid-job leaves, which the next one sweeps (`runtime.jobdir.sweep_orphans`).
"""

from __future__ import annotations

import logging
import queue
import threading
from collections.abc import Callable

log = logging.getLogger("orvanta.tidier")

BACKLOG = 2  # finished jobs whose teardown may wait behind the one being done


class Tidier:
    """One thread running teardowns in the order they were handed in."""

    def __init__(self) -> None:
        self._pending: queue.Queue[Callable[[], None]] = queue.Queue(maxsize=BACKLOG)
        self._thread: threading.Thread | None = None
        self._lock = threading.Lock()

    def submit(self, teardown: Callable[[], None]) -> None:
        """Run `teardown` soon; waits while BACKLOG others wait behind the one running."""
        with self._lock:
            if self._thread is None or not self._thread.is_alive():
                self._thread = threading.Thread(target=self._loop, name="tidier", daemon=True)
                self._thread.start()
        self._pending.put(teardown)

    def settle(self) -> None:
        """Return once every teardown handed in so far is done."""
        self._pending.join()

    def _loop(self) -> None:
        while True:
            teardown = self._pending.get()
            try:
                teardown()
            except Exception:  # a failed teardown is logged; the next job's is still done
                log.exception("removing what a finished job left failed")
            finally:
                self._pending.task_done()
