"""`orvanta bench --queue`: what claiming and completing a job costs as the backlog and the
history grow.

Each row is one fresh queue seeded in one statement (a recursive CTE, so a million rows take
seconds, on both databases) with a backlog of queued jobs and a history of finished ones,
then drained by one worker for `--queue-sample` jobs: claim, then complete. The figure is
ms per job; a queue whose claim walks an index stays flat across the rows.
"""

from __future__ import annotations

import argparse
import contextlib
import secrets
import statistics
import sys
import tempfile
import time
import urllib.parse
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

from runtime.jobs import JobResult

if TYPE_CHECKING:  # not at run time: `orvanta` loads the bench for every command, agents too
    from runtime.database import Database
    from runtime.queue import JobQueue

# where the seed puts finished jobs: the table, and the status it gives them
FINISHED = ("finished_jobs", "done")
WARM_UP = 20  # jobs of another tag run first
SEED = """WITH RECURSIVE seq(n) AS (SELECT 1 UNION ALL SELECT n + 1 FROM seq WHERE n < ?)
INSERT INTO TABLE (id, language, script, env, tag, workspace, status, created, finished, result)
SELECT ? || n, 'bash', 'true', '{}', 'default', 'default', ?, ? + n * 0.000001, ?,
       CASE WHEN ? THEN '{"job_id": "' || ? || n || '", "isolation": "none", "status": "success",
            "exit_code": 0, "duration": 0.0, "stdout": "", "stderr": "", "log": []}' END
FROM seq"""


def add_arguments(bench: argparse.ArgumentParser) -> None:
    group = bench.add_argument_group("queue (--queue)")
    group.add_argument(
        "--queue",
        action="store_true",
        help="only the queue: claim + complete ms/job on SQLite and on DATABASE_URL's PostgreSQL",
    )
    group.add_argument("--queue-small", type=int, default=300, help="queued jobs (default 300)")
    group.add_argument("--queue-backlog", type=int, default=100_000, help="default 100,000")
    group.add_argument("--queue-finished", type=int, default=1_000_000, help="default 1,000,000")
    group.add_argument("--queue-sample", type=int, default=300, help="jobs drained per row")


def run(args: argparse.Namespace, database_url: str | None) -> dict[str, Any]:
    """Three rows per database: small backlog, big backlog, small backlog with a big history."""
    sizes = [
        (args.queue_small, 0),
        (args.queue_backlog, 0),
        (args.queue_small, args.queue_finished),
    ]
    kinds = ["sqlite"] + (["postgresql"] if database_url else [])
    rows = []
    for kind in kinds:
        for queued, finished in sizes:
            with scratch(kind, database_url) as db:
                row = measure(db, queued, finished, min(args.queue_sample, queued))
                rows.append(row)
                print(
                    f"[bench] {kind:10} {queued:>9,} queued {finished:>9,} finished "
                    f"{row['ms_per_job']:7.3f} ms/job, median {row['median_ms']:7.3f} "
                    f"(seeded in {row['seed_s']} s)",
                    file=sys.stderr,
                    flush=True,
                )
    return {"sample": args.queue_sample, "queue": rows}


def postgres_url(url: str | None) -> str | None:
    """DATABASE_URL when it names PostgreSQL: the bench adds a schema there, and drops it."""
    from runtime.database import POSTGRES_SCHEMES

    return url if url and url.startswith(POSTGRES_SCHEMES) else None


@contextlib.contextmanager
def scratch(kind: str, database_url: str | None) -> Iterator[Database]:
    """An empty database: a temporary SQLite file, or a fresh schema in DATABASE_URL's database
    (the queue's own tables there are never touched)."""
    from runtime.database import PostgresDatabase, SqliteDatabase

    if kind == "sqlite":
        with tempfile.TemporaryDirectory(prefix="orvanta-bench-queue-") as tmp:
            sqlite = SqliteDatabase(Path(tmp) / "queue.sqlite3")
            yield sqlite
            sqlite.close()
        return
    with scratch_url(kind, database_url) as url:
        assert url
        db = PostgresDatabase(url)
        try:
            yield db
        finally:
            db.close()


@contextlib.contextmanager
def scratch_url(kind: str, database_url: str | None) -> Iterator[str | None]:
    """For workers of their own: None (SQLite in a state dir), or the URL of a fresh schema
    in DATABASE_URL's database, dropped afterwards."""
    if kind == "sqlite":
        yield None
        return
    from runtime.database import PostgresDatabase

    assert database_url
    schema = f"orvanta_bench_{secrets.token_hex(4)}"
    admin = PostgresDatabase(database_url)
    admin.execute(f"CREATE SCHEMA {schema}")
    joiner = "&" if "?" in database_url else "?"
    try:
        yield f"{database_url}{joiner}options={urllib.parse.quote(f'-csearch_path={schema}')}"
    finally:
        admin.execute(f"DROP SCHEMA {schema} CASCADE")
        admin.close()


def measure(db: Database, queued: int, finished: int, sample: int) -> dict[str, Any]:
    from runtime.queue import JobQueue

    queue = JobQueue(db)
    started = time.monotonic()
    now = time.time()
    table, done = FINISHED
    with db.transaction():
        if finished:
            db.execute(SEED.replace("TABLE", table), (finished, "f", done, now - 1, now, True, "f"))
        if queued:
            db.execute(
                SEED.replace("TABLE", "jobs"), (queued, "q", "queued", now, None, False, "q")
            )
    if db.kind == "postgresql":
        db.execute("ANALYZE")  # what autovacuum does after a bulk load
    seeded = time.monotonic() - started
    warm_up = [queue.submit("bash", "true", tag="warm-up") for _ in range(WARM_UP)]
    for _ in warm_up:  # connection, caches and prepared statements, outside the figure
        drain(queue, ("warm-up",))
    times = []
    for _ in range(sample):
        started = time.perf_counter()
        drain(queue, ("default",))
        times.append((time.perf_counter() - started) * 1000)
    return {
        "database": db.kind,
        "queued": queued,
        "finished": finished,
        "jobs": sample,
        # the mean carries the machine's stalls (a shared disk's fsync), the median the queue's
        "ms_per_job": round(sum(times) / max(sample, 1), 3),
        "median_ms": round(statistics.median(times), 3) if times else 0.0,
        "seed_s": round(seeded, 2),
    }


def drain(queue: JobQueue, tags: tuple[str, ...]) -> None:
    """One job, claimed and completed as a worker does."""
    spec = queue.claim("bench", 60.0, tags)
    assert spec is not None, f"the seeded backlog of {tags} ran out"
    assert queue.complete(JobResult(spec.id, "none", "success", 0, 0.0, "", "", []), "bench")


def markdown(results: dict[str, Any]) -> str:
    lines = [
        "| database | queued | finished | claim + complete ms/job |",
        "|---|---|---|---|",
    ]
    for r in results["queue"]:
        lines.append(
            f"| {r['database']} | {r['queued']:,} | {r['finished']:,} | {r['ms_per_job']} |"
        )
    return "\n".join(lines)
