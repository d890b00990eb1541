"""What a finished job leaves is removed while the next job runs, not before it starts.

Once every process of a job is dead (R-JOB-3, on the job's path), removing its
directory and cgroup and freeing its ids is what costs the most of a trivial
job on a root worker after its spawn. The worker's own thread does it at the
moments it would otherwise only wait: right after it spawned the next job
(whose end it waits for next), and when it waits for a job to come
(`pause`). A thread of its own did the same work but took the GIL from
the job loop at every syscall: measured, about 70 lock handoffs and 0.3 ms of
worker CPU a job, and 12% fewer jobs a second. A teardown whose length the job
decides (its dir a plain directory it filled, volumes whose setuid bits are
stripped) still runs on a thread of its own (`heavy`): on the job loop's
thread it would hold off the next job's deadline and cancel for as long.

Nothing is weakened by the wait: the job's mounts are detached before its
result (no later job's namespace copies them; a `none` job's, which no
namespace of this worker copied, before its next spawn that would), the ids
are freed last and only once nothing of the job is left, so no later job
gets the uid that could read the dir, and a volume stays locked until its
setuid bits are stripped.
At most BACKLOG teardowns of each kind wait (a further light one runs the
oldest at once, a further heavy one waits for the thread), and they all run
before what must find them done: a worker that stops, `orvanta run` before it
exits, a retry of a job still in teardown, a volume job, a worker out of job
ids. A worker killed meanwhile leaves what a worker killed mid-job leaves,
which the next one sweeps (`runtime.jobdir.sweep_orphans`).
"""

from __future__ import annotations

import logging
import queue
import threading
from collections import deque
from collections.abc import Callable

log = logging.getLogger("orvanta.tidier")

BACKLOG = 2  # finished jobs whose teardown may wait for the worker's next pause


class Tidier:
    """Light teardowns run in the order they were handed in, one at a time, by whichever
    thread pauses (a runner shared by threads still removes each job's leftovers once);
    heavy ones run in order on one thread of their own."""

    def __init__(self) -> None:
        self._pending: deque[Callable[[], None]] = deque()
        self._lock = threading.Lock()  # held through a teardown: `settle` waits for it
        self._heavy: queue.Queue[Callable[[], None]] = queue.Queue(maxsize=BACKLOG)
        self._thread: threading.Thread | None = None
        self._thread_lock = threading.Lock()

    def submit(self, teardown: Callable[[], None], heavy: bool = False) -> None:
        """Run `teardown` at the next pause (light), or on the tidier's thread (heavy: it
        waits while BACKLOG others wait there). Past BACKLOG light ones, the oldest runs now."""
        if heavy:
            with self._thread_lock:
                if self._thread is None or not self._thread.is_alive():
                    self._thread = threading.Thread(target=self._loop, name="tidier", daemon=True)
                    self._thread.start()
            self._heavy.put(teardown)
            return
        with self._lock:
            self._pending.append(teardown)
            excess = len(self._pending) - BACKLOG
        for _ in range(excess):
            self._run_one()

    def pause(self) -> None:
        """Run every light teardown handed in so far: the worker has nothing else to do."""
        while self._run_one():
            pass

    def settle(self) -> None:
        """Return once every teardown handed in so far is done, of both kinds."""
        self.pause()
        self._heavy.join()

    def _run_one(self) -> bool:
        with self._lock:
            if not self._pending:
                return False
            _run(self._pending.popleft())
        return True

    def _loop(self) -> None:
        while True:
            teardown = self._heavy.get()
            try:
                _run(teardown)
            finally:
                self._heavy.task_done()


def _run(teardown: Callable[[], None]) -> None:
    try:
        teardown()
    except Exception:  # a failed teardown is logged; the next job's is still done
        log.exception("removing what a finished job left failed")
