"""Worker start-up and the job loop shared by `orvanta worker` and `orvanta run`.

Start-up probes every mechanism, fails fast where the page says so (R-PID-3,
R-PID-4), logs one line per mechanism (R-OPS-1) and lowers the worker's own
OOM priority (R-NSJ-3). `orvanta run` is the same start-up followed by one job.
"""

from __future__ import annotations

import logging
import os
import signal
import socket
import threading
from collections.abc import Callable
from dataclasses import replace
from types import FrameType
from typing import Protocol

from runtime import idmap
from runtime.backends import BACKEND_NAMES, backend_class
from runtime.capabilities import HostCapabilities
from runtime.executor import JobRunner, Upcoming
from runtime.jobs import JobResult, JobSpec
from runtime.pipeline import Held, QueueLink
from runtime.selection import IsolationUnavailableError, select_isolation
from runtime.settings import JOB_ISOLATION_VALUES, Settings
from runtime.startup import probe_host

log = logging.getLogger("orvanta.worker")

WORKER_OOM_SCORE_ADJ = -900


class JobSource(Protocol):
    """Where a worker's jobs come from: the queue database (MODE=worker) or the API (agent)."""

    path: str

    def claim(self, worker: str, lease: float, tags: tuple[str, ...]) -> JobSpec | None: ...

    def renew(self, job_id: str, worker: str, lease: float) -> bool: ...

    def release(self, job_id: str, worker: str) -> bool: ...

    def cancel_requested(self, job_id: str) -> bool: ...

    def complete(self, result: JobResult, worker: str) -> bool: ...

    def setting(self, key: str) -> str | None: ...

    def heartbeat(
        self, worker: str, mode: str, tags: tuple[str, ...], group: str | None
    ) -> None: ...


def start(settings: Settings, serving: bool = True) -> JobRunner:
    """Everything a worker does before its first job; raises StartupError to refuse to start.
    `serving`: jobs one after another, whose job dirs live on a tmpfs of the worker's own
    where it can mount one (`JobRunner`'s `tmpfs_root`); not for `orvanta run`'s one job."""
    caps = probe_host(settings)
    log_mechanisms(settings, caps)
    protect_from_oom()
    runner = JobRunner(settings, caps, tmpfs_root=serving)
    if runner.tmpfs_root:
        log.info("job dirs: in memory, on a tmpfs at %s (ORVANTA_JOBS_DIR)", runner.jobs_dir)
    return runner


def log_mechanisms(settings: Settings, caps: HostCapabilities) -> None:
    """One line per mechanism: what is active, what was found, and why (R-OPS-1)."""
    try:
        decision = select_isolation(settings, caps)
        log.info("isolation: %s active (%s)", decision.backend, decision.reason)
        if decision.backend == "none":
            log.warning(
                "isolation: jobs can read this worker's environment, memory and files; "
                "set ENABLE_UNSHARE_PID=true or DISABLE_NSJAIL=false before running untrusted code"
            )
    except IsolationUnavailableError as exc:
        log.error("isolation: every job on this worker will fail: %s", exc)
    for name in BACKEND_NAMES:
        backend = backend_class(name)
        for level, line in backend.describe(settings, caps.of(name)):
            log.log(level, "%s", line)
    if idmap.hardened(settings):
        log.info(
            "jobs: under unshare and nsjail a job's root is a host uid and gid of its own "
            "from %d and %d, %d of them (ORVANTA_JOB_UID/GID, ORVANTA_JOB_ID_COUNT), never "
            "the host's root",
            settings.job_uid,
            settings.job_gid,
            settings.job_id_count,
        )
    else:
        log.warning(
            "jobs: under unshare a job's root is this worker's uid %d on the host "
            "(ORVANTA_JOB_UID=0 or a non-root worker: the page's literal recipe)",
            os.geteuid(),
        )
    if caps.tini.ok:
        log.info("tini: found: %s", caps.tini.detail)
    elif settings.enable_unshare_pid:
        log.warning(
            "tini: not available (%s): running jobs without it; an OOM-killed job "
            "may not report exit code 137",
            caps.tini.detail,
        )
    else:
        log.info("tini: not available: %s", caps.tini.detail)


def protect_from_oom() -> None:
    """Lower the worker's oom_score_adj so that a job, not the worker, dies first (R-NSJ-3)."""
    try:
        with open("/proc/self/oom_score_adj", "w") as f:
            f.write(str(WORKER_OOM_SCORE_ADJ))
        log.info("oom: worker oom_score_adj=%d, jobs run at 1000", WORKER_OOM_SCORE_ADJ)
    except OSError as exc:
        log.warning(
            "oom: cannot lower the worker's oom_score_adj (%s; needs CAP_SYS_RESOURCE); "
            "jobs still run at oom_score_adj=1000",
            exc,
        )


class Worker:
    """Runs jobs one at a time until told to stop; its QueueLink claims them ahead."""

    def __init__(self, runner: JobRunner, queue: JobSource, name: str | None = None) -> None:
        self.runner = runner
        self.queue = queue
        self.name = name or f"{socket.gethostname()}-{os.getpid()}"
        self.stopping = threading.Event()
        self.lease = runner.settings.lease_seconds
        self._active = runner.settings.job_isolation
        self._rejected: str | None = None
        self.tags = runner.settings.worker_tags
        self.failed = False  # stopped by an error no retry can fix
        self._link: QueueLink | None = None  # while serving: a second signal cancels its job

    def install_signal_handlers(self) -> None:
        """SIGTERM or SIGINT: stop after the current job. A second one: stop it now (every
        process of it killed, nothing of it left) and record nothing, so that it runs again
        on another worker once its lease lapses: a stop is not the job's cancel."""

        def stop(signum: int, _frame: FrameType | None) -> None:
            name = signal.Signals(signum).name
            if self.stopping.is_set():
                log.warning(
                    "worker %s: %s received again: stopping the running job now",
                    self.name,
                    name,
                )
                if self._link is not None:
                    self._link.cancel_running()
                return
            log.info(
                "worker %s: %s received, stopping after the current job (send it again to "
                "stop that job now)",
                self.name,
                name,
            )
            self.stopping.set()

        signal.signal(signal.SIGTERM, stop)
        signal.signal(signal.SIGINT, stop)

    def serve(self, max_jobs: int | None = None) -> int:
        """Run jobs until stopped (or `max_jobs` done); returns how many ran.

        Everything the queue is told or asked goes through one runtime.pipeline.QueueLink
        thread, so the next job is claimed while this one runs and its result is recorded
        while the next one runs.
        """
        done = 0
        log.info("worker %s: pulling jobs from %s", self.name, self.queue.path)
        link = QueueLink(
            self.queue,
            self.name,
            self.lease,
            lambda: self.tags,
            self._current_settings,
            self._heartbeat,
            max_jobs,
        )
        upcoming = Upcoming(link.peek, link.let_go)
        self._link = link

        def idle() -> None:
            """No job to run yet: one prepared ahead is not coming (canceled, or its lease
            lost, while it waited), and what finished jobs left goes."""
            discarded = self.runner.discard_ahead()
            if discarded is not None:
                link.let_go(discarded)
            self.runner.pause()

        try:
            while not self.stopping.is_set():
                held = link.take(self.stopping, idle)
                if held is None:
                    break
                result = self._run(held, link.spawned, upcoming)
                if held.abandoned and result.status == "canceled":
                    link.abandon(held)  # a second signal stopped it: it runs again elsewhere
                else:
                    link.post(held, result, last=self.stopping.is_set())  # and logged there
                done += 1
        finally:
            try:
                discarded = self.runner.discard_ahead()  # before the link hands the job back
                if discarded is not None:
                    link.let_go(discarded)
            finally:
                try:
                    link.close()
                finally:
                    self._link = None
                    self.runner.settle()  # a stopped worker leaves no dir, cgroup or id behind
        if link.fatal is not None:
            self.failed = True
        return done

    def _heartbeat(self) -> None:
        """Tell the queue which tags this worker serves, so unserved tags are reported."""
        try:
            self.queue.heartbeat(self.name, self.runner.settings.mode, self.tags, None)
        except Exception as exc:
            log.warning("worker %s: heartbeat failed: %s", self.name, exc)

    def _run(self, held: Held, spawned: Callable[[], None], upcoming: Upcoming) -> JobResult:
        """Run one job; its lease and cancel are the link's. A job error never stops the worker."""
        try:
            return self.runner.run(held.spec, held.settings, held.cancel, spawned, upcoming)
        except Exception as exc:
            log.exception("job %s: the worker could not run it", held.spec.id)
            spawned()  # none will come: the queue thread goes on at once
            return JobResult(
                held.spec.id, "unknown", "error", None, 0.0, "", str(exc), [f"error: {exc}"]
            )

    def _current_settings(self, spec: JobSpec) -> Settings:
        """The worker's settings with the live job_isolation instance setting (R-SEL-7).

        Read for every job, with its claim where the source can (`spec.job_isolation_read`),
        so a change applies without a restart. A value this worker cannot use is logged and
        ignored; it never stops the worker.
        """
        settings = self.runner.settings
        try:
            if spec.job_isolation_read:
                value = spec.job_isolation
            else:
                value = self.queue.setting("job_isolation")
        except Exception as exc:  # a broken settings table must not crash the worker
            log.error(
                "job_isolation: cannot read the instance setting (%s); keeping %s",
                exc,
                settings.job_isolation,
            )
            return settings
        if value is None or value == settings.job_isolation:
            current = settings
        elif value not in JOB_ISOLATION_VALUES:
            if value != self._rejected:
                log.error(
                    "job_isolation=%r is not valid (accepted: %s); keeping %s",
                    value,
                    ", ".join(JOB_ISOLATION_VALUES),
                    settings.job_isolation or "unset",
                )
                self._rejected = value
            current = settings
        else:
            current = replace(settings, job_isolation=None if value == "none" else value)
        if current.job_isolation != self._active:
            self._active = current.job_isolation
            log.info("job_isolation is now %s", self._active or "unset")
            if current.force_nsjail and not self.runner.caps.of("nsjail").ok:
                log.error(
                    "job_isolation=nsjail_sandboxing but nsjail is not available on this "
                    "worker (%s): its jobs fail until nsjail is installed or the setting "
                    "changes",
                    self.runner.caps.of("nsjail").detail,
                )
        return current
