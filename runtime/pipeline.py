"""The worker's side of the queue, off the job's critical path: one thread for all of it.

While a job runs, this thread records the previous job's result, claims the next
job (a prefetch of one; both in one call where the queue offers it, on PostgreSQL
one statement), renews the lease of every job the worker holds, asks the queue for
cancels and beats the worker's heartbeat. The job loop only takes a
claimed job and hands back its result, so neither a claim nor a result sits
between one job's end and the next one's spawn.

Nor does this thread's own work: from one job's result (or a take) to the next job's
spawn it waits before recording or claiming, and does both while the job runs. It is not
even woken in that gap: a result or a take only marks work for it, and the spawn wakes
it. Awake meanwhile (the end of its own pause, at most CANCEL_POLL_SECONDS), it waits for
the spawn no longer than SPAWN_WAIT_SECONDS from the take. Measured, the gap from a
job's exit to the next spawn fell from 0.37 ms to 0.26 ms without those two wake-ups.
The two threads share one GIL, and every syscall of the job loop's preparation
(a mkdir, a rename, a write) would hand it to this thread's SQLite or JSON work for
as long as that work ran: measured, the preparation took 0.5 ms with this thread
busy beside it and 0.26 ms with it waiting.

Prefetch never keeps a job from an idle worker for long: the worker prefetches only
while its current job is younger than PREFETCH_HOLD_SECONDS, and a prefetched job
still waiting after that goes back to the queue (`release`, which undoes the claim's
attempt). At stop, a prefetched job goes back the same way and the results not yet
recorded are sent first, each for as long as its lease may still hold.
"""

from __future__ import annotations

import logging
import threading
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from runtime.executor import Cancellation
from runtime.jobs import JobResult, JobSpec
from runtime.settings import Settings

if TYPE_CHECKING:
    from runtime.worker import JobSource

log = logging.getLogger("orvanta.worker")

IDLE_POLL_SECONDS = 0.02  # first wait after finding the queue empty; doubles while it stays so
IDLE_POLL_MAX_SECONDS = 0.2  # an idle worker (or agent, over HTTP) asks at most 5 times a second
CANCEL_POLL_SECONDS = 0.25
HEARTBEAT_SECONDS = 2.0
PREFETCH_HOLD_SECONDS = 0.5  # longest a prefetched job waits behind this worker's current one
PEEK_MAX_AGE_SECONDS = PREFETCH_HOLD_SECONDS / 2  # an older one is not prepared ahead
RESULT_RETRY_SECONDS = 0.5
SPAWN_WAIT_SECONDS = 0.05  # longest the link defers its work to a job being prepared


@dataclass
class Held:
    """A job this worker holds the lease of: prefetched, or running."""

    spec: JobSpec
    settings: Settings  # the worker's settings with job_isolation as read after the claim
    claimed: float  # monotonic
    cancel: Cancellation = field(default_factory=Cancellation)
    started: float | None = None
    renewed: float = 0.0
    polled: float = 0.0
    prepared: bool = False  # the job loop made it ready ahead: not handed back meanwhile
    abandoned: bool = False  # stopped with the worker (`cancel_running`): not to be recorded

    def __post_init__(self) -> None:
        self.renewed = self.polled = self.claimed


@dataclass
class Outgoing:
    result: JobResult
    deadline: float  # the lease may hold until then; later the job runs again elsewhere
    retry_at: float = 0.0
    logged: bool = False


def canceled(job_id: str) -> JobResult:
    """The result of a job canceled before it started: the queue's own words for it."""
    return JobResult(job_id, "none", "canceled", None, 0.0, "", "", ["canceled"])


class QueueLink:
    """Claims ahead, records behind, keeps leases: the only thread that talks to the queue
    while the worker serves, so a source that is not thread-safe (one HTTP connection) is
    used by one thread."""

    def __init__(
        self,
        source: JobSource,
        name: str,
        lease: float,
        tags: Callable[[], tuple[str, ...]],
        settings_for: Callable[[JobSpec], Settings],
        heartbeat: Callable[[], None],
        max_jobs: int | None = None,
    ) -> None:
        self.source, self.name, self.lease = source, name, lease
        self._tags, self._settings_for, self._heartbeat = tags, settings_for, heartbeat
        self._budget = max_jobs
        self._cond = threading.Condition()
        self._ready: deque[Held] = deque()
        self._running: dict[str, Held] = {}
        self._outbox: deque[Outgoing] = deque()
        self._claiming = True
        self._woken = False
        self._next_claim = 0.0
        self._idle = IDLE_POLL_SECONDS
        self._beat = 0.0
        self._may_work = threading.Event()  # clear from a take to that job's spawn
        self._may_work.set()
        self._hold_until = 0.0  # the link waits for that spawn no longer than this (monotonic)
        self.fatal: Exception | None = None  # an error no retry fixes (a rotated agent token)
        self._thread = threading.Thread(target=self._loop, name="queue-link", daemon=True)
        self._thread.start()

    # the job loop's side

    def take(
        self, stopping: threading.Event, idle: Callable[[], None] = lambda: None
    ) -> Held | None:
        """The next claimed job; None once stopping, out of budget, or the source failed.
        `idle` runs (outside the lock) before the first wait for a claim: the worker tidies
        meanwhile, and lets go of a job it prepared that is no longer to come."""
        idled = False
        while True:
            with self._cond:
                if stopping.is_set():
                    return None
                while self._ready:
                    held = self._ready.popleft()
                    self._woken = True  # claim the one after it, once this one is spawned
                    if not held.cancel.requested:
                        held.started = time.monotonic()
                        self._running[held.spec.id] = held
                        self._hold_until = held.started + SPAWN_WAIT_SECONDS
                        self._may_work.clear()  # until `spawned`: see the module's docstring
                        return held
                    # canceled while it waited: recorded so, never started
                    self._outbox.append(
                        Outgoing(canceled(held.spec.id), time.monotonic() + self.lease)
                    )
                    held.cancel.close()
                if self._over():
                    return None
                self._let_work()  # nothing to spawn: the link claims
                if idled:
                    self._cond.wait(0.1)  # a signal handler sets `stopping`; it cannot notify
                    continue
            idle()
            idled = True

    def peek(self) -> tuple[JobSpec, Settings] | None:
        """The job `take` returns next, if claimed already and not canceled; it is not handed
        back to the queue (PREFETCH_HOLD_SECONDS) until `let_go`: the job loop prepares it
        while the current job runs (runtime.executor.Upcoming)."""
        with self._cond:
            if not self._ready or self._ready[0].cancel.requested:
                return None
            held = self._ready[0]
            if time.monotonic() - held.claimed > PEEK_MAX_AGE_SECONDS:
                return None  # about to be handed back: not worth making it ready
            held.prepared = True
            return held.spec, held.settings

    def let_go(self, spec: JobSpec) -> None:
        """The job loop no longer holds `spec` prepared: it may be handed back again."""
        with self._cond:
            for held in self._ready:
                if held.spec is spec:
                    held.prepared = False

    def cancel_running(self) -> None:
        """Stop the running job as a cancel would, to be `abandon`ed: the worker is stopping
        now. Safe from a signal handler on the job loop's thread: the lock is reentrant."""
        with self._cond:
            running = list(self._running.values())
        for held in running:
            held.abandoned = True
            held.cancel.set()

    def abandon(self, held: Held) -> None:
        """Let go of a job stopped with the worker, recording nothing: its lease lapses and
        another worker runs it again, as after a killed worker (nothing of it left running)."""
        with self._cond:
            self._claiming = False  # the worker is stopping, as after a last `post`
            self._running.pop(held.spec.id, None)
            held.cancel.close()
        log.warning(
            "job %s: stopped with the worker and not recorded: another worker runs it again "
            "once its lease lapses (%gs)",
            held.spec.id,
            self.lease,
        )

    def spawned(self) -> None:
        """The taken job is running (or will not): the link thread goes on with its work."""
        with self._cond:
            self._let_work()

    def _let_work(self) -> None:
        """The link thread may work now, and is woken if work came for it meanwhile: a take
        or a result only marks it (`_woken`), since it would wait for the spawn anyway, and
        a wake-up between a job's end and the next spawn takes the GIL from the job loop."""
        self._may_work.set()
        if self._woken:
            self._cond.notify_all()

    def post(self, held: Held, result: JobResult, last: bool = False) -> None:
        """The job's result, recorded by the link thread while the next job runs (from its
        spawn, as after a take); the job loop goes on at once. `last`: the worker is
        stopping, so nothing more is claimed (`close` sends it)."""
        with self._cond:
            self._claiming = self._claiming and not last
            self._running.pop(held.spec.id, None)
            held.cancel.close()
            self._outbox.append(Outgoing(result, time.monotonic() + self.lease))
            self._next_claim, self._idle = 0.0, IDLE_POLL_SECONDS
            self._hold_until = time.monotonic() + SPAWN_WAIT_SECONDS
            self._may_work.clear()  # the next job's take and spawn come first
            self._woken = True  # woken at the spawn (`_let_work`), or at its pause's end

    def close(self) -> None:
        """Stop claiming, send every result (within its lease), hand prefetched jobs back."""
        with self._cond:
            self._claiming = False
            self._wake()
        self._may_work.set()
        self._thread.join()
        for held in self._ready:
            self._release(held, "the worker is stopping")
            held.cancel.close()
        self._ready.clear()
        while True:  # a job canceled as it was handed back is recorded here
            self._send_results()
            if not self._outbox:
                return
            time.sleep(max(self._outbox[0].retry_at - time.monotonic(), 0.0))

    # the link thread

    def _over(self) -> bool:
        out_of_budget = self._budget is not None and self._budget <= 0
        return self.fatal is not None or (out_of_budget and not self._running)

    def _wake(self) -> None:
        self._woken = True
        self._cond.notify_all()

    def _loop(self) -> None:
        try:
            self._serve()
        except Exception as exc:  # a bug here must stop the worker, not leave it waiting
            log.exception("worker %s: the queue thread failed; stopping", self.name)
            with self._cond:
                self.fatal = exc
                self._claiming = False
                self._cond.notify_all()

    def _serve(self) -> None:
        while True:
            # leases between every call that may block: a slow one must not let them lapse
            self._keep_leases()
            self._wait_for_spawn()
            if not self._send_and_claim():
                self._send_results()
            with self._cond:
                if not self._claiming and not self._outbox:
                    return
            self._keep_leases()
            self._wait_for_spawn()
            self._claim_ahead()
            self._keep_leases()
            self._beat_heartbeat()
            with self._cond:
                if not self._woken:
                    self._cond.wait(self._pause())
                self._woken = False

    def _wait_for_spawn(self) -> None:
        """Until the job taken last is spawned: SPAWN_WAIT_SECONDS from its take in all, however
        many times the loop asks (a job refused before its spawn holds nothing up longer)."""
        self._may_work.wait(max(self._hold_until - time.monotonic(), 0.0))

    def _pause(self) -> float:
        now = time.monotonic()
        pause = CANCEL_POLL_SECONDS
        if self._outbox:
            pause = min(pause, self._outbox[0].retry_at - now)
        if self._wants_claim(now):
            pause = min(pause, self._next_claim - now)
        return max(pause, 0.0)

    def _wants_claim(self, now: float, unsent: int = 0) -> bool:
        """Whether to claim the next job now, with `unsent` results sent in the same call."""
        if not self._claiming or self.fatal is not None or self._ready:
            return False
        if len(self._outbox) > unsent:  # its job's lease is not renewed: it could come back
            return False
        if self._budget is not None and self._budget <= 0:
            return False
        # prefetch only behind a short job: a long one would keep the next from idle workers
        return all(
            h.started is not None and now - h.started < PREFETCH_HOLD_SECONDS
            for h in self._running.values()
        )

    def _claim_ahead(self) -> None:
        with self._cond:
            if not self._wants_claim(time.monotonic()) or time.monotonic() < self._next_claim:
                return
        try:
            spec = self.source.claim(self.name, self.lease, self._tags())
        except Exception as exc:  # the database or server is away: wait, never crash
            if getattr(exc, "fatal", False):  # e.g. the agent's token was rotated
                log.error("worker %s: stopping: %s", self.name, exc)
                with self._cond:
                    self.fatal = exc
                    self._cond.notify_all()
                return
            log.error("worker %s: cannot claim a job (%s); retrying in 1s", self.name, exc)
            self._next_claim = time.monotonic() + 1.0
            return
        self._claimed(spec)

    def _claimed(self, spec: JobSpec | None) -> None:
        """A claim's answer: the job, ready for `take`; or none queued, asked again later."""
        if spec is None:
            self._next_claim = time.monotonic() + self._idle
            self._idle = min(self._idle * 2, IDLE_POLL_MAX_SECONDS)
            return
        self._idle = IDLE_POLL_SECONDS
        held = Held(spec, self._settings_for(spec), time.monotonic())  # the live job_isolation
        with self._cond:
            if self._budget is not None:
                self._budget -= 1
            self._ready.append(held)
            self._cond.notify_all()

    def _send_and_claim(self) -> bool:
        """The one result waiting and the next claim in one call, where the source offers it
        (PostgreSQL: one round trip instead of two). False, with nothing done, where it
        does not or fails: `_send_results` and `_claim_ahead` then do it in two, and say why."""
        both = getattr(self.source, "complete_and_claim", None)
        now = time.monotonic()
        with self._cond:
            if both is None or len(self._outbox) != 1 or self._outbox[0].retry_at > now:
                return False
            if not self._wants_claim(now, unsent=1) or now < self._next_claim:
                return False
            out = self._outbox[0]
        try:
            answer = both(out.result, self.name, self.lease, self._tags())
        except Exception as exc:  # e.g. a deadlock with another worker's, after an outage
            log.warning(
                "job %s: result and claim in one call failed (%s); making the two calls",
                out.result.job_id,
                exc,
            )
            return False
        if answer is None:
            return False
        recorded, spec = answer
        self._log_result(out)
        if not recorded:
            log.warning("job %s: lease lost before completion; result dropped", out.result.job_id)
        with self._cond:
            self._outbox.popleft()
        self._claimed(spec)
        return True

    def _keep_leases(self) -> None:
        with self._cond:
            held = [*self._ready, *self._running.values()]
        for job in held:
            now = time.monotonic()
            # not while prepared (its directory is under its id): the job loop lets go first;
            # it is renewed and polled for a cancel meanwhile, like a running one
            waited = job.started is None and now - job.claimed > PREFETCH_HOLD_SECONDS
            if waited and self._drop_waiting(job, unless_prepared=True):
                self._release(job, f"it waited {PREFETCH_HOLD_SECONDS:g}s behind a long job")
                continue
            if now - job.renewed > self.lease / 3:
                self._renew(job, now)
            if now - job.polled >= CANCEL_POLL_SECONDS:
                job.polled = now
                try:
                    if self.source.cancel_requested(job.spec.id):
                        self._cancel(job)
                except Exception as exc:
                    log.warning("job %s: cannot ask the queue for a cancel: %s", job.spec.id, exc)

    def _renew(self, job: Held, now: float) -> None:
        try:
            if not self.source.renew(job.spec.id, self.name, self.lease):
                if self._drop_waiting(job):
                    log.error("job %s: lease lost before it started; not running it", job.spec.id)
                else:
                    log.error("job %s: lease lost (taken over); stopping it", job.spec.id)
                    self._cancel(job)
            job.renewed = now
        except Exception as exc:  # keep the job running while the lease may hold
            log.warning("job %s: cannot reach the queue to renew: %s", job.spec.id, exc)
            if now - job.renewed > self.lease:
                log.error("job %s: lease expired unrenewed; stopping it", job.spec.id)
                self._cancel(job)

    def _drop_waiting(self, job: Held, unless_prepared: bool = False) -> bool:
        """Forget a job not yet started (True), or leave a running one alone (False); with
        `unless_prepared`, a job the job loop holds prepared too (checked under the lock
        `peek` takes, so the two cannot cross)."""
        with self._cond:
            if job not in self._ready or (unless_prepared and job.prepared):
                return False
            self._ready.remove(job)
            if self._budget is not None:
                self._budget += 1
            job.cancel.close()
            return True

    def _cancel(self, job: Held) -> None:
        with self._cond:  # its pipe is closed once its result is posted
            if job.spec.id in self._running or job in self._ready:
                job.cancel.set()

    def _release(self, job: Held, why: str) -> None:
        """Back to the queue; a job canceled meanwhile is recorded canceled instead."""
        try:
            if self.source.release(job.spec.id, self.name):
                log.info("job %s: handed back to the queue unstarted: %s", job.spec.id, why)
            elif self.source.cancel_requested(job.spec.id):
                with self._cond:
                    self._outbox.append(
                        Outgoing(canceled(job.spec.id), time.monotonic() + self.lease)
                    )
        except Exception as exc:
            log.warning(
                "job %s: cannot hand it back (%s); another worker takes it once its lease "
                "expires in %gs",
                job.spec.id,
                exc,
                self.lease,
            )

    def _send_results(self) -> None:
        while True:
            with self._cond:
                if not self._outbox or self._outbox[0].retry_at > time.monotonic():
                    return
                out = self._outbox[0]
            if self._send(out):
                with self._cond:
                    self._outbox.popleft()
            else:
                out.retry_at = time.monotonic() + RESULT_RETRY_SECONDS
                return

    def _send(self, out: Outgoing) -> bool:
        """Record one result; True when done with it (recorded, refused for good, or late)."""
        result = out.result
        self._log_result(out)
        try:
            if not self.source.complete(result, self.name):
                log.warning("job %s: lease lost before completion; result dropped", result.job_id)
            return True
        except Exception as exc:
            status = getattr(exc, "status", 0)
            if getattr(exc, "fatal", False):  # no retry can send it (a rotated agent token)
                log.error("job %s: cannot record the result: %s", result.job_id, exc)
                return True
            if status in (413, 422) and result.stdout + result.stderr:
                # the server will never take this record: report that instead, once
                log.error("job %s: the server refused the result: %s", result.job_id, exc)
                why = f"error: the server refused the job's result ({exc})"
                out.result = JobResult(
                    result.job_id,
                    result.isolation,
                    "error",
                    result.exit_code,
                    result.duration,
                    "",
                    "",
                    [*result.log, why],
                )
                return self._send(out)
            if time.monotonic() > out.deadline:
                log.error(
                    "job %s: cannot record the result (%s); the job runs again elsewhere "
                    "once its lease expires",
                    result.job_id,
                    exc,
                )
                return True
            log.warning("job %s: cannot record the result yet (%s); retrying", result.job_id, exc)
            return False

    @staticmethod
    def _log_result(out: Outgoing) -> None:
        """Here, once, not by the job loop between two jobs."""
        if not out.logged:
            out.logged = True
            result = out.result
            log.info(
                "job %s: %s exit=%s isolation=%s in %.3fs",
                result.job_id,
                result.status,
                result.exit_code,
                result.isolation,
                result.duration,
            )

    def _beat_heartbeat(self) -> None:
        """Tell the queue which tags this worker serves, so unserved tags are reported."""
        if time.monotonic() - self._beat < HEARTBEAT_SECONDS:
            return
        self._beat = time.monotonic()
        self._heartbeat()
