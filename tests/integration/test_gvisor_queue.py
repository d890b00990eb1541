"""A gVisor cell's queue: the harness's statements run beside the workers, under their locks.

runsc's Sentry keeps its processes' file locks to itself. The control: while a process in
the sandbox holds the queue's write lock (BEGIN IMMEDIATE, as a worker's claim does), the
host's own connection takes the same lock at once: two writers that do not see each
other, which lost about one probe job in 130. Through the relay
(conformance.platforms.queue_relay) the harness waits for the worker's lock, as a second
worker would.
"""

from __future__ import annotations

import sqlite3
import subprocess
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from conformance.platforms.docker import docker_cli

HOLD_SECONDS = 3.0
# a worker's claim, held: the write lock, then nothing until it commits
HOLDER = f"""import sqlite3, sys, time
db = sqlite3.connect(sys.argv[1], isolation_level=None)
db.execute("PRAGMA journal_mode=WAL")
db.execute("BEGIN IMMEDIATE")
print("held", flush=True)
time.sleep({HOLD_SECONDS})
db.execute("COMMIT")
"""

pytestmark = [pytest.mark.integration, pytest.mark.slow]


@pytest.mark.req("R-PLT-7")
def test_the_harness_waits_for_a_gvisor_workers_lock_through_the_relay(
    tmp_path: Path, platform_of: Callable[[str], Any]
) -> None:
    platform = platform_of("docker-gvisor")
    queue = tmp_path / "state" / "queue.sqlite3"
    queue.parent.mkdir()
    sqlite3.connect(queue).execute("PRAGMA journal_mode=WAL").close()
    try:
        platform.start(tmp_path)
        exec_prefix = [docker_cli(), "exec", "-i", platform.id, "python3"]

        def hold() -> subprocess.Popen[str]:
            holder = subprocess.Popen(
                [*exec_prefix, "-c", HOLDER, str(queue)], stdout=subprocess.PIPE, text=True
            )
            assert holder.stdout is not None and holder.stdout.readline() == "held\n"
            return holder

        holder = hold()  # the control: the host's own connection does not see that lock
        host = sqlite3.connect(queue, timeout=0, isolation_level=None)
        try:
            host.execute("BEGIN IMMEDIATE")  # a second writer beside the sandbox's
            host.execute("ROLLBACK")
        except sqlite3.OperationalError as exc:  # runsc shares its locks now: say so
            pytest.fail(f"the host waited for the sandbox's lock ({exc}): the relay is not needed")
        finally:
            host.close()
            holder.wait(30)

        db = platform.queue_database(None, queue.parent)
        try:
            holder = hold()
            began = time.monotonic()
            db.execute("BEGIN IMMEDIATE")  # in the relay, beside the holder: it waits
            waited = time.monotonic() - began
            db.execute("ROLLBACK")
            holder.wait(30)
        finally:
            db.close()
        assert waited > HOLD_SECONDS / 2, f"the relay took the lock after {waited:.2f}s"
    finally:
        platform.close()
