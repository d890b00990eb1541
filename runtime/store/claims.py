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
import time

from runtime.jobs import DEFAULT_TAG, JobResult, JobSpec
from runtime.store import Store
from runtime.store.finished import by_id
from runtime.store.schema import HOT

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
            job_id, language, script, env, timeout, workspace, attempts, isolation = rows[0]
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
