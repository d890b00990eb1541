"""Jobs as workers see them: claimed under a lease, kept, and answered once.

A claimed job carries a lease that its worker renews while the job runs; a
worker killed mid-job stops renewing, the lease runs out and the next claim
takes the job again, so a killed worker loses no job. A result is recorded
once, by the worker holding the lease, so no job has two results.
"""

from __future__ import annotations

import json
import time

from runtime.jobs import DEFAULT_TAG, JobResult, JobSpec
from runtime.store import Store

MAX_ATTEMPTS = 5  # a job whose workers died (or could not report) this often fails for good


class ClaimStore(Store):
    def claim(
        self,
        worker: str,
        lease: float,
        tags: tuple[str, ...] = (DEFAULT_TAG,),
        group: str | None = None,
    ) -> JobSpec | None:
        """Take the oldest queued job of these tags, or one whose worker's lease ran out."""
        if not tags:
            return None
        marks = ",".join("?" * len(tags))
        while True:
            now = time.time()
            rows = self.db.query(
                f"""UPDATE jobs SET status='running', worker=?, worker_group=?,
                       attempts=attempts+1, lease_until=?
                   WHERE id = (SELECT id FROM jobs
                               WHERE (status='queued' OR (status='running' AND lease_until < ?))
                                 AND tag IN ({marks})
                               ORDER BY created LIMIT 1{self.db.skip_locked})
                   RETURNING id, language, script, env, timeout, workspace, attempts""",
                (worker, group, now + lease, now, *tags),
            )
            if not rows:
                return None
            job_id, language, script, env, timeout, workspace, attempts = rows[0]
            if attempts <= MAX_ATTEMPTS:
                return JobSpec(job_id, language, script, json.loads(env), timeout, workspace)
            why = (
                f"abandoned after {attempts - 1} attempts whose workers died or could not "
                f"report a result"
            )
            self.complete(JobResult(job_id, "none", "error", None, 0.0, "", why, [why]), worker)

    def renew(self, job_id: str, worker: str, lease: float) -> bool:
        """Extend the lease; False when the job is no longer this worker's."""
        changed = self.db.execute(
            "UPDATE jobs SET lease_until=? WHERE id=? AND worker=? AND status='running'",
            (time.time() + lease, job_id, worker),
        )
        return changed == 1

    def cancel_requested(self, job_id: str) -> bool:
        rows = self.db.query("SELECT cancel FROM jobs WHERE id=?", (job_id,))
        return bool(rows and rows[0][0])

    def held_by_group(self, job_id: str, group: str) -> bool:
        """Whether a worker of this group holds (or held) the job: all an agent may ask about."""
        rows = self.db.query("SELECT worker_group FROM jobs WHERE id=?", (job_id,))
        return bool(rows) and rows[0][0] == group

    def complete(self, result: JobResult, worker: str) -> bool:
        """Record the result once; False when another worker took the job over meanwhile."""
        changed = self.db.execute(
            """UPDATE jobs SET status='done', finished=?, result=?
               WHERE id=? AND worker=? AND status='running'""",
            (time.time(), json.dumps(result.to_dict()), result.job_id, worker),
        )
        return changed == 1
