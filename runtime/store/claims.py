"""Jobs as workers see them: claimed under a lease, kept, and answered once.

A claimed job carries a lease that its worker renews while the job runs; a
worker killed mid-job stops renewing, the lease runs out and the next claim
takes the job again, so a killed worker loses no job. A result is recorded
once, by the worker holding the lease, so no job has two results.

A claim's cost does not grow with the backlog or the history: it looks up each of its
tags' oldest queued job on the partial index of queued jobs, and a lapsed lease on the
partial index of running jobs, then takes the oldest of those few rows; finished jobs
are in another table (runtime.store.schema).
"""

from __future__ import annotations

import json
import logging
import time
from typing import Any

from runtime.jobs import DEFAULT_TAG, JobResult, JobSpec
from runtime.store import Store
from runtime.store.finished import by_id
from runtime.store.schema import ALL_COLUMNS, COLUMNS, FINISHED, HOT

log = logging.getLogger("orvanta.queue")

MAX_ATTEMPTS = 5  # a job whose workers died (or could not report) this often fails for good


def claim_query(tag_count: int, skip_locked: str) -> str:
    """The claim: one UPDATE of the oldest of at most tag_count + 1 candidates, each found
    through its own index, so no step sorts or scans the backlog.

    Parameters: worker, group, lease end, now (lapsed leases), the tags (for the lapsed
    lease), the tags again (one queued head each). A lapsed lease goes first: its job
    was claimed before any queued one. The instance's job_isolation comes back with the
    job, read in the same statement: live for every job (R-SEL-7), and no query of its own.
    """
    marks = ",".join("?" * tag_count)
    lapsed = (
        f"SELECT id, 0 AS queued, created FROM (SELECT id, created FROM {HOT} "
        f"WHERE status='running' AND lease_until < ? AND tag IN ({marks}) "
        f"ORDER BY lease_until LIMIT 1{skip_locked}) AS lapsed"
    )
    heads = " UNION ALL ".join(
        f"SELECT id, 1, created FROM (SELECT id, created FROM {HOT} "
        f"WHERE status='queued' AND tag=? ORDER BY created LIMIT 1{skip_locked}) AS head{n}"
        for n in range(tag_count)
    )
    return f"""UPDATE {HOT} SET status='running', worker=?, worker_group=?,
                   attempts=attempts+1, lease_until=?
               WHERE id = (SELECT id FROM ({lapsed} UNION ALL {heads}) AS candidates
                           ORDER BY queued, created LIMIT 1)
               RETURNING id, language, script, env, timeout, workspace, attempts,
                         (SELECT value FROM instance_settings WHERE key='job_isolation')"""


def complete_and_claim_query(tag_count: int, skip_locked: str) -> str:
    """PostgreSQL's result and next claim in one statement (data-modifying WITH clauses):
    the finished job moved as in `schema.finish`, the claim as in `claim_query`, never of
    the job being finished, even with its lease lapsed. Parameters: its id and worker,
    finished, result, then the claim's, with its id again after the lapsed leases' time.
    The first column tells whether the result was recorded; the rest are the claim's
    (NULL where none was taken)."""
    claim = claim_query(tag_count, skip_locked).replace(
        "lease_until < ? AND",
        "lease_until < ? AND id <> ? AND",  # before the lapsed LIMIT 1
    )
    values = {"status": "'done'", "finished": "?", "result": "?"}
    select = ", ".join(values.get(column, column) for column in COLUMNS)
    return (
        f"WITH gone AS (DELETE FROM {HOT} WHERE id=? AND worker=? AND status='running' "
        f"RETURNING {ALL_COLUMNS}), "
        f"moved AS (INSERT INTO {FINISHED} ({ALL_COLUMNS}) SELECT {select} FROM gone "
        "RETURNING id), "
        f"claimed AS ({claim}) "
        "SELECT (SELECT COUNT(*) FROM moved), claimed.* FROM (SELECT 1) AS one "
        "LEFT JOIN claimed ON true"
    )


class ClaimStore(Store):
    def claim(
        self,
        worker: str,
        lease: float,
        tags: tuple[str, ...] = (DEFAULT_TAG,),
        group: str | None = None,
    ) -> JobSpec | None:
        """Take the oldest queued job of these tags, or one whose worker's lease ran out."""
        tags = tuple(dict.fromkeys(tags))
        if not tags:
            return None
        sql = claim_query(len(tags), self.db.skip_locked)
        while True:
            now = time.time()
            rows = self.db.query(sql, (worker, group, now + lease, now, *tags, *tags))
            if not rows:
                return None
            spec = self._claimed(rows[0], worker)
            if spec is not None:
                return spec

    def complete_and_claim(
        self, result: JobResult, worker: str, lease: float, tags: tuple[str, ...]
    ) -> tuple[bool, JobSpec | None] | None:
        """`complete`, then `claim`, in one round trip where the database can (PostgreSQL):
        whether the result was recorded, and the job claimed. None where it cannot: the
        caller makes the two calls."""
        tags = tuple(dict.fromkeys(tags))
        if not self.db.moves_in_one_statement or not tags:
            return None
        self._purge_due()
        now = time.time()
        params = (result.job_id, worker, now, json.dumps(result.to_dict()))
        claim = (worker, None, now + lease, now, result.job_id, *tags, *tags)
        sql = complete_and_claim_query(len(tags), self.db.skip_locked)
        recorded, *row = self.db.query(sql, (*params, *claim))[0]
        if row[0] is None:
            return recorded == 1, None
        try:  # the result is recorded: what fails now is the claim's alone
            spec = self._claimed(tuple(row), worker)
            return recorded == 1, spec if spec is not None else self.claim(worker, lease, tags)
        except Exception as exc:
            log.warning("claim after job %s's result failed: %s", result.job_id, exc)
            return recorded == 1, None

    def _claimed(self, row: tuple[Any, ...], worker: str) -> JobSpec | None:
        """The job a claim returned; None where its attempts ran out (recorded failed)."""
        job_id, language, script, env, timeout, workspace, attempts, isolation = row
        if attempts <= MAX_ATTEMPTS:
            return JobSpec(
                job_id,
                language,
                script,
                json.loads(env),
                timeout,
                workspace,
                None if isolation is None else str(isolation),
                job_isolation_read=True,
            )
        why = (
            f"abandoned after {attempts - 1} attempts whose workers died or could not "
            f"report a result"
        )
        self.complete(JobResult(job_id, "none", "error", None, 0.0, "", why, [why]), worker)
        return None

    def renew(self, job_id: str, worker: str, lease: float) -> bool:
        """Extend the lease; False when the job is no longer this worker's."""
        changed = self.db.execute(
            f"UPDATE {HOT} SET lease_until=? WHERE id=? AND worker=? AND status='running'",
            (time.time() + lease, job_id, worker),
        )
        return changed == 1

    def release(self, job_id: str, worker: str) -> bool:
        """Hand back a job claimed but never started (a worker's prefetch): queued again, its
        claim's attempt undone. False when the job is no longer this worker's, or a cancel
        came for it meanwhile (then the worker records it canceled: it must never run)."""
        changed = self.db.execute(
            f"""UPDATE {HOT} SET status='queued', worker=NULL, worker_group=NULL,
                       attempts=attempts-1, lease_until=NULL
                WHERE id=? AND worker=? AND status='running' AND cancel=0""",
            (job_id, worker),
        )
        return changed == 1

    def cancel_requested(self, job_id: str) -> bool:
        rows = self.db.query(by_id("cancel"), (job_id, job_id))
        return bool(rows and rows[0][0])

    def held_by_group(self, job_id: str, group: str) -> bool:
        """Whether a worker of this group holds (or held) the job: all an agent may ask about."""
        rows = self.db.query(by_id("worker_group"), (job_id, job_id))
        return bool(rows) and rows[0][0] == group

    def complete(self, result: JobResult, worker: str) -> bool:
        """Record the result once; False when another worker took the job over meanwhile."""
        return self._finish(
            result.job_id,
            "worker=? AND status='running'",
            (worker,),
            json.dumps(result.to_dict()),
        )
