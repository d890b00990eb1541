"""Runs one job under the selected backend, with what every backend must guarantee.

Whatever the isolation (R-JOB-1..5): the job gets its own directory (a tmpfs
of ORVANTA_JOB_DISK_MB where the worker may mount, R-DISK-1), an environment
built from an allow-list, no worker fd beyond stdio, a deadline after which it
is killed, capped output, and when it ends none of its processes survive (any
found outside its cgroup is reported, R-HOST-5) and its directory is removed.
"""

from __future__ import annotations

import atexit
import contextlib
import errno
import functools
import logging
import os
import re
import select
import signal
import subprocess
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from runtime import idmap, reaper
from runtime.backends import Backend, Launch, PreparedJob, make_backend, memory_file
from runtime.capabilities import HostCapabilities
from runtime.cgroups import AheadGroups, JobCgroup, job_group, nsjail_cgroup_parent, sweep_ahead
from runtime.jobdir import (
    JobDir,
    held,
    mount_root,
    remove_tree,
    sweep_orphans,
    unmount_root,
)
from runtime.jobs import JobResult as JobResult  # re-exported: conformance.harness imports it
from runtime.jobs import JobSpec
from runtime.languages import VolumeRequest, is_plain_name, language, parse_header
from runtime.selection import Decision, IsolationUnavailableError, select_isolation
from runtime.settings import Settings
from runtime.submission import ENV_NAME_PATTERN
from runtime.tidier import Tidier
from runtime.volumes import VolumeError, adopt_volume, claim_volume, open_volume

log = logging.getLogger("orvanta.executor")

JOB_PATH = "/usr/local/bin:/usr/bin:/bin"
JOB_OOM_SCORE_ADJ = b"1000"  # the job, not the worker, is what the OOM killer takes (R-NSJ-3)
CPU_NOTE_SHARE = 0.5  # of ORVANTA_JOB_CPU_SECONDS: a kill past it gets the note
IDS_AHEAD_MIN_COUNT = 1024  # a smaller ORVANTA_JOB_ID_COUNT: no ids taken ahead
# a job prepared ahead is discarded once the running job is this old, well before the queue
# thread hands an unstarted job back to idle workers (runtime.pipeline.PREFETCH_HOLD_SECONDS)
AHEAD_HOLD_SECONDS = 0.25
AHEAD_RETRY_SECONDS = 0.0005  # the next job not claimed yet: asked again, twice as late each time
AHEAD_RETRY_MAX_SECONDS = 0.01  # up to this
EXIT_GRACE = 0.2  # seconds to drain pipes after the main process exited
EXIT_POLL = 0.02  # seconds between exit checks where the kernel offers no pidfd
ENV_NAME = re.compile(ENV_NAME_PATTERN)


class Cancellation:
    """Set from another thread to stop a running job; wakes the executor through a pipe."""

    def __init__(self) -> None:
        self._read, self._write = os.pipe()
        self.requested = False

    def fileno(self) -> int:
        return self._read

    def set(self) -> None:
        if not self.requested:
            self.requested = True
            os.write(self._write, b"x")

    def close(self) -> None:
        os.close(self._read)
        os.close(self._write)


@dataclass(frozen=True)
class Upcoming:
    """The job a worker runs next, once its queue thread has claimed it: prepared while
    the current job runs (`JobRunner.prepare_ahead`), so that one job's end is followed by
    the next one's spawn. `peek` names it and keeps the queue thread from handing it back
    while it is prepared; `let_go` says it no longer is (taken, or discarded)."""

    peek: Callable[[], tuple[JobSpec, Settings] | None]
    let_go: Callable[[JobSpec], None]


@dataclass(eq=False)
class Prepared:
    """A job made ready to spawn (`JobRunner._prepare`). Everything its teardown frees
    (`JobRunner._tidy`) is here, so it is run (`_start`) or let go unstarted (`_let_go`)."""

    spec: JobSpec
    settings: Settings
    decision: Decision | None = None
    backend: Backend | None = None
    annotated: bool = False
    ids: idmap.JobIds | None = None
    volume_fds: list[tuple[int, str]] = field(default_factory=list)
    root: Path | None = None
    place: JobDir | None = None
    cgroup: JobCgroup | None = None
    ours: bool = False  # the root and cgroup are this attempt's, not a live worker's
    job_log: list[str] = field(default_factory=list)
    job: PreparedJob | None = None
    launch: Launch | None = None
    refused: JobResult | None = None  # may not run: its result, and nothing of it left
    seconds: float = 0.0  # how long preparing it took: part of the job's duration

    def owner(self) -> tuple[int, int]:
        """The host uid and gid the job's files belong to."""
        return self.ids.owner if self.ids is not None else (os.geteuid(), os.getegid())


class JobRunner:
    """Executes jobs on this worker; one instance per worker, reused for every job."""

    def __init__(
        self, settings: Settings, caps: HostCapabilities, tmpfs_root: bool = False
    ) -> None:
        """`tmpfs_root`: a root worker mounts a tmpfs of its own at the jobs root where it can
        (`runtime.jobdir.mount_root`), as `orvanta worker` does unless ORVANTA_JOBS_TMPFS is
        false; the tmpfs each job gets is made either way."""
        self.settings = settings
        self.caps = caps
        settings.job_root.mkdir(parents=True, exist_ok=True, mode=0o711)
        # resolved: mountinfo, which remove_tree reads, knows mount points by their real path
        self.jobs_dir = settings.job_root.resolve()
        if self.jobs_dir.stat().st_uid == os.geteuid():
            self.jobs_dir.chmod(0o711)  # enter your own job dir; list nobody else's (R-HOST-4)
        idmap.prepare_state_dir(settings.state_dir)  # 0700: the queue file, volumes (R-HOST-4)
        swept = sweep_orphans(self.jobs_dir)
        if swept:
            log.warning("removed %d job dir(s) a killed worker left: %s", len(swept), swept)
        self._mount = os.geteuid() == 0  # job dirs as tmpfs; off after the first refusal
        self._root_mounted = (
            tmpfs_root
            and settings.jobs_tmpfs
            and self._mount
            and mount_root(self.jobs_dir, settings.limits.disk_mb)
        )
        groups = sweep_ahead()
        if groups:
            log.info("removed %d empty cgroup(s) a stopped worker made ahead", len(groups))
        reaper.become_subreaper()  # a job's process that leaves its cgroup is still ours
        self._tidier = Tidier()  # what finished jobs leave goes while the next one runs
        self._ahead: list[JobDir] = []  # a job dir the tidier made for the next job
        self._groups_ahead = AheadGroups()  # cgroups the tidier made for the next job (v1)
        self._nsjail_next = False  # the last job ran under nsjail: make its parents ahead
        self._ids_next = False  # the last job had ids of its own: take the next one's ahead
        self._ids_ahead: idmap.JobIds | None = None
        self._ahead_lock = threading.Lock()
        self._tearing_down: set[str] = set()  # job ids whose teardown is still to be done
        self._backends: dict[tuple[str, Settings], Backend] = {}
        self._ahead_job: Prepared | None = None  # the next job, prepared while one runs
        self._attached: list[JobDir] = []  # finished jobs' tmpfs not detached yet (_let_go)
        self._attached_lock = threading.Lock()  # held through a detach
        atexit.register(self._at_exit)  # what the last job left is removed at exit too

    def run(
        self,
        spec: JobSpec,
        settings: Settings | None = None,
        cancel: Cancellation | None = None,
        spawned: Callable[[], None] = lambda: None,
        upcoming: Upcoming | None = None,
    ) -> JobResult:
        """Run one job to its end. `settings` may carry a newer job_isolation (R-SEL-7);
        `spawned` is called once the job runs (the worker's queue thread waits for it);
        `upcoming` names the job after it, which is prepared while this one runs."""
        settings = settings or self.settings
        job = self._take_prepared(spec, settings, upcoming) or self._prepare(spec, settings)
        return self._start(job, cancel, spawned, upcoming)

    def _prepare(
        self, spec: JobSpec, settings: Settings | None = None, ahead: bool = False
    ) -> Prepared:
        """Everything before the spawn: the isolation chosen, ids taken, volumes claimed, the
        job's directory and cgroup made, the launcher's command built. A refused job comes
        back with its result (`refused`) and nothing of it left to free; it is logged on
        its turn, not `ahead` (`prepare_ahead` drops a refusal: it is made again then)."""
        settings = settings or self.settings
        begun = time.monotonic()
        job = Prepared(spec, settings)
        try:
            header = parse_header(spec.script)  # fail closed on a near miss (R-ANN-1)
            job.annotated = header.sandbox
            job.decision = select_isolation(settings, self.caps, job.annotated)
            job.backend = self._backend(job.decision.backend, settings)
            self._ids_next = job.backend.own_ids() and idmap.hardened(settings)
            if self._ids_next:
                job.ids = self._take_ids_ahead(settings)
            if self._ids_next and job.ids is None:
                if ahead and settings.job_id_count < IDS_AHEAD_MIN_COUNT:
                    # a range sized to the jobs running at once has no pair for a waiting one
                    raise RuntimeError("no job ids are taken for a job not yet running")
                try:
                    job.ids = idmap.take_ids(settings)
                except idmap.JobIdsExhaustedError:
                    if ahead:
                        raise  # never waits for other jobs' teardowns beside a running job
                    self._tidier.settle()  # finished jobs may still hold theirs
                    job.ids = self._take_ids_ahead(settings) or idmap.take_ids(settings)
            job.volume_fds = self._volumes(
                spec, header.volumes, job.owner(), timeout=spec.timeout or settings.job_timeout
            )
        except (IsolationUnavailableError, ValueError, OSError, RuntimeError) as exc:
            for fd, _ in job.volume_fds:
                os.close(fd)
            if job.ids is not None:
                job.ids.release()
            log.log(logging.DEBUG if ahead else logging.ERROR, "job %s refused: %s", spec.id, exc)
            job.refused = JobResult(
                spec.id, "unavailable", "error", None, 0.0, "", str(exc), [f"error: {exc}"]
            )
            return job
        try:
            self._make_place(job)
        except BaseException:
            self._let_go(job, now=ahead)
            raise
        if job.refused is not None:
            self._let_go(job, now=ahead)
        job.seconds = time.monotonic() - begun
        return job

    def _start(
        self,
        job: Prepared,
        cancel: Cancellation | None = None,
        spawned: Callable[[], None] = lambda: None,
        upcoming: Upcoming | None = None,
    ) -> JobResult:
        """Spawn a prepared job and wait for its end; what it leaves goes to the tidier."""
        if job.refused is not None:
            spawned()
            return job.refused
        assert job.launch is not None and job.job is not None and job.place is not None
        assert job.decision is not None and job.backend is not None
        begun = time.monotonic()
        settings, job_log = job.settings, job.job_log
        try:
            outcome = self._execute(job, cancel, spawned, upcoming)  # all dead after it
            if job.place.full():
                job_log.append(
                    f"disk quota: the job filled its {settings.limits.disk_mb} MiB job dir "
                    "(ORVANTA_JOB_DISK_MB); writes past it failed with ENOSPC"
                )
        finally:
            self._let_go(job)
        exit_code, stopped, stdout, stderr, notes, cpu = outcome
        job_log.extend(notes)
        if job.backend.rlimits and not stopped:
            job_log.extend(_cpu_limit_note(exit_code, cpu, settings.limits.cpu_seconds))
        if stopped:
            status = "canceled" if cancel is not None and cancel.requested else "timeout"
            why = "canceled" if status == "canceled" else f"timed out after {job.job.timeout:g}s"
            job_log.append(f"{why}: every process of the job was killed")
        else:
            status = "success" if exit_code == 0 else "failure"
        duration = job.seconds + time.monotonic() - begun
        return JobResult(
            job.spec.id, job.decision.backend, status, exit_code, duration, stdout, stderr, job_log
        )

    def prepare_ahead(self, spec: JobSpec, settings: Settings) -> bool:
        """Prepare the job this worker runs next while the current one runs (`upcoming`);
        True if it is now prepared. Not a job that names volumes (the current job may hold
        one), nor a job whose last attempt is still here: those wait for their turn."""
        if self._ahead_job is not None:
            return self._ahead_job.spec == spec and self._ahead_job.settings == settings
        with self._ahead_lock:
            again = spec.id in self._tearing_down
        try:
            if again or parse_header(spec.script).volumes or (self.jobs_dir / spec.id).exists():
                return False
        except ValueError:
            return False  # refused on its turn, with the header's own error
        job = self._prepare(spec, settings, ahead=True)
        if job.refused is not None:
            return False  # refused again on its turn: a refusal may not hold by then
        self._ahead_job = job
        return True

    def discard_ahead(self) -> JobSpec | None:
        """Undo `prepare_ahead`: the job's directory, cgroup and ids are gone (or renamed
        away from its id) when this returns, so another worker may take the job. Returns
        the job discarded, if any."""
        job, self._ahead_job = self._ahead_job, None
        if job is None:
            return None
        self._let_go(job, now=True)  # no longer under the job's id before it is handed back
        return job.spec

    def _take_prepared(
        self, spec: JobSpec, settings: Settings, upcoming: Upcoming | None
    ) -> Prepared | None:
        """The job prepared ahead, if it is this one; one prepared for another is discarded
        (it was canceled, or its lease lost, while it waited)."""
        job = self._ahead_job
        if job is None:
            return None
        if job.spec == spec and job.settings == settings:
            self._ahead_job = None
            return job
        discarded = self.discard_ahead()
        if discarded is not None and upcoming is not None:
            upcoming.let_go(discarded)
        return None

    def pause(self) -> None:
        """The worker has no job to run yet: remove what finished jobs left (runtime.tidier)."""
        self._tidier.pause()

    def wait_teardowns(self) -> None:
        """Return once what every finished job left is removed (the bench between samples);
        the next job's dir stays."""
        self._tidier.settle()

    def settle(self) -> None:
        """Wait until what every finished job left is removed, and remove the job dir made
        for the next one (a stopping worker, `orvanta run`, a test)."""
        self.discard_ahead()
        self._tidier.settle()
        with self._ahead_lock:
            ahead, self._ahead = self._ahead, []
            groups, self._groups_ahead = self._groups_ahead, AheadGroups()
        for place in ahead:
            place.remove()
        groups.remove()
        with self._ahead_lock:
            ids, self._ids_ahead = self._ids_ahead, None
        if ids is not None:
            ids.release()

    @property
    def tmpfs_root(self) -> bool:
        """The jobs root is a tmpfs of this worker's own, or of the workers sharing it."""
        return self._root_mounted

    def close(self) -> None:
        """`settle`, for a runner done with (a test): nothing is left for the exit."""
        self._at_exit()
        atexit.unregister(self._at_exit)

    def _at_exit(self) -> None:
        """`settle`, then the jobs root's tmpfs unmounted if this runner mounted it and no
        other worker's job dir is in it."""
        try:
            self.settle()
        finally:
            if self._root_mounted:
                self._root_mounted = False
                unmount_root(self.jobs_dir)

    def __enter__(self) -> JobRunner:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _backend(self, name: str, settings: Settings) -> Backend:
        """One backend per name and settings (a live job_isolation change is new settings)."""
        key = (name, settings)
        if key not in self._backends:
            self._backends = {key: make_backend(name, settings, self.caps)}  # the last only
        return self._backends[key]

    def _take_ahead(self) -> JobDir | None:
        with self._ahead_lock:
            return self._ahead.pop() if self._ahead else None

    def _take_ids_ahead(self, settings: Settings) -> idmap.JobIds | None:
        """The ids the last teardown took for this job, if they are of `settings`' range."""
        with self._ahead_lock:
            ids, self._ids_ahead = self._ids_ahead, None
        if ids is not None and not idmap.in_range(ids, settings):
            ids.release()
            return None
        return ids

    def _ids_for_next(self) -> None:
        """Ids (a lock file made on disk) for the next job, taken while nothing waits for
        them: like any job's, at a random place in the range, never the ones still held."""
        with self._ahead_lock:
            wanted = self._ids_next and self._ids_ahead is None
        if not wanted or self.settings.job_id_count < IDS_AHEAD_MIN_COUNT:
            return  # a range sized to the jobs running at once has no pair to spare
        try:
            ids: idmap.JobIds | None = idmap.take_ids(self.settings)
        except (OSError, RuntimeError) as exc:  # the next job asks again, and reports it
            log.debug("no job ids taken ahead: %s", exc)
            return
        with self._ahead_lock:
            if self._ids_ahead is None:
                self._ids_ahead, ids = ids, None
        if ids is not None:
            ids.release()  # another thread's teardown took some meanwhile

    def _detach_deferred(self, only: JobDir | None = None) -> None:
        """Detach the tmpfs of finished jobs that `_let_go` left attached: every one before a
        spawn whose mount namespace would copy them, `only` the one a teardown removes."""
        with self._attached_lock:
            for place in [p for p in self._attached if only is None or p is only]:
                try:
                    place.unmount()
                finally:  # listed until detached: a spawn on another thread waits for it
                    self._attached.remove(place)

    def _tidy(
        self,
        job_id: str,
        place: JobDir | None,
        root: Path | None,
        cgroup: JobCgroup | None,
        volume_fds: list[tuple[int, str]],
        ids: idmap.JobIds | None,
    ) -> None:
        """By the tidier (see runtime.tidier), once the job ended: volumes it never got, its
        directory (setid bits stripped from its volumes first; left as the worker made it,
        it becomes the next job's), its cgroup, its ids last, and only if nothing of the job
        is left (else they stay out of use, logged); then a job dir for the next job."""
        clean = False
        recycled: JobDir | None = None
        try:
            if place is not None:
                self._detach_deferred(place)
            for fd, _ in volume_fds:
                os.close(fd)
            try:
                with self._ahead_lock:
                    wanted = not self._ahead and JobDir.renames
                if place is not None and wanted and place.recycle(self.jobs_dir):
                    recycled = place  # the next job's, ahead: nothing of this job is in it
                elif place is not None:
                    place.remove()
                elif root is not None:
                    remove_tree(root)
            finally:
                if cgroup is not None:
                    cgroup.remove()
            clean = not (root is not None and root.exists()) and not (
                cgroup is not None and cgroup.path.exists()
            )
        finally:
            if ids is not None and clean:
                ids.release()  # no process and no file of the job is left under them
            elif ids is not None:
                log.error(
                    "job ids %d:%d stay out of use until the worker restarts: their job's "
                    "directory or cgroup could not be removed (see above)",
                    *ids.owner,
                )
            with self._ahead_lock:
                self._tearing_down.discard(job_id)
        with self._ahead_lock:
            wanted = not self._ahead and JobDir.renames
        if recycled is not None or wanted:
            made = recycled or JobDir.ahead(self.jobs_dir)
            if self._mount:
                made.mount_ahead(self.settings.limits.disk_mb)
            with self._ahead_lock:
                self._ahead.append(made)
        with self._ahead_lock:
            groups, self._groups_ahead = self._groups_ahead, AheadGroups()
        groups.fill(self._nsjail_next)
        with self._ahead_lock:
            self._groups_ahead.remove()  # made meanwhile by another thread's teardown
            self._groups_ahead = groups
        self._ids_for_next()

    def _make_place(self, job: Prepared) -> None:
        """The job's directory and cgroup, its script and volumes in place, its launcher's
        command built; `job.refused` set where it may not run. From here on the job's ids,
        volumes, directory and cgroup are the tidier's to free (`_let_go`), whatever
        happens on the way."""
        spec, settings, backend, decision = job.spec, job.settings, job.backend, job.decision
        assert backend is not None and decision is not None
        job_log = job.job_log
        root = job.root = self.jobs_dir / spec.id
        with self._ahead_lock:
            again = spec.id in self._tearing_down
        present = again or root.exists()
        if present:
            self._tidier.settle()  # this worker's own last attempt may still be in teardown
            present = root.exists()
        lang = language(spec.language)
        owner = job.owner()
        job_log.append(f"isolation: {decision.backend} ({decision.reason})")
        if decision.backend == "nsjail" and job.annotated:
            job_log.append("sandbox mode (nsjail)")
        timeout = spec.timeout or settings.job_timeout
        self._nsjail_next = backend.own_cgroups
        with self._ahead_lock:
            groups, self._groups_ahead = self._groups_ahead, AheadGroups()
        try:
            job.cgroup = JobCgroup.create(spec.id, nsjail=backend.own_cgroups, ahead=groups)
        finally:
            with self._ahead_lock:  # what this job did not take waits for the next
                self._groups_ahead.remove()
                self._groups_ahead = groups
        cgroup = job.cgroup
        # A fresh tracking group holds no process of an earlier attempt, but that
        # attempt's directory may survive it (a reboot or container restart resets
        # cgroups only).
        stale = cgroup is not None and not cgroup.fresh and bool(cgroup.pids())
        present = present or root.exists()  # a lease-lost attempt's, made meanwhile
        if present and held(root):
            why = "another worker still runs this job (it lost the lease); try again later"
            job_log.append(f"error: {why}")
            job.refused = JobResult(spec.id, decision.backend, "error", None, 0.0, "", why, job_log)
            return
        job.ours = True
        if stale or present:
            # A retry after a worker died mid-job: nothing of that attempt may linger.
            killed = cgroup.kill_all() if cgroup is not None else 0
            remove_tree(root)
            job_log.append(f"retry: removed the previous attempt's files and {killed} process(es)")
        nsjail_parent = None
        if backend.own_cgroups:
            nsjail_parent = (
                job_group(spec.id) if cgroup and cgroup.nsjail_parents else nsjail_cgroup_parent()
            )
        try:
            place = job.place = JobDir.create(
                self.jobs_dir,
                spec.id,
                owner,
                settings.limits.disk_mb,
                self._mount,
                self._take_ahead(),
            )
        except FileExistsError:
            job.ours = False  # another worker's attempt made it meanwhile: not ours to remove
            raise
        if self._mount and not place.quota:
            self._mount = False
            log.warning(
                "job dirs: this worker may not mount a tmpfs here, so a job's disk use is "
                "not bounded by ORVANTA_JOB_DISK_MB (R-DISK-1)"
            )
        place.write_script(lang.filename, spec.script)
        jail_binds: list[tuple[str, str]] = []
        try:
            while job.volume_fds:
                fd, name = job.volume_fds.pop(0)  # the job dir's to close from here on
                source = place.add_volume(fd, name, backend.own_mounts)
                if source is not None:
                    jail_binds.append((source, name))
                job_log.append(f"volume: {name}")
        except (VolumeError, OSError) as exc:
            job_log.append(f"error: {exc}")
            log.error("job %s refused: %s", spec.id, exc)
            job.refused = JobResult(
                spec.id, decision.backend, "error", None, 0.0, "", str(exc), job_log
            )
            return
        place.hand_over()
        job.job = PreparedJob(
            spec.id,
            lang,
            place.job_dir,
            timeout,
            nsjail_parent,
            tuple(jail_binds),
            job.ids.owner if job.ids is not None else None,
        )
        job.launch = backend.launch(job.job, _job_env(spec, backend.inner_dir(job.job)))

    def _let_go(self, job: Prepared, now: bool = False) -> None:
        """The job's mounts detached, the rest handed to the tidier (`_tidy`) once it ended.
        No later job's mount namespace may copy them: the job's tmpfs is detached in the
        teardown, or before the spawn of a job whose namespace would copy it
        (`_detach_deferred`), whichever comes first, not between the two jobs (a lone job's
        result waits for neither). The job's own namespace, which copied it, died with the
        job. A teardown on the tidier's own thread (volumes, a plain dir) detaches it here,
        as does a job whose backend is not known. `now`: a job that
        never ran (prepared ahead, then discarded) is torn down here, this one alone (its
        place holds only the script), so it is gone from under its id before the job goes
        back to the queue, without waiting for other jobs' teardowns."""
        place = job.place
        if place is not None:
            unknown = job.backend is None
            if now or unknown or not place.quota or place.volume_fds or job.volume_fds:
                place.unmount()
            else:  # a light teardown (on this thread) detaches it, or a spawn that would copy it
                with self._attached_lock:
                    self._attached.append(place)
        with self._ahead_lock:
            self._tearing_down.add(job.spec.id)
        teardown = functools.partial(
            self._tidy,
            job.spec.id,
            place,
            job.root if job.ours else None,
            job.cgroup if job.ours else None,
            list(job.volume_fds),
            job.ids,
        )
        if now:
            try:
                teardown()
            except Exception:  # as the tidier does: logged, and the worker goes on
                log.exception("job %s: removing what it was prepared with failed", job.spec.id)
            return
        # the job decides how long removing a plain dir or stripping its volumes takes
        heavy = (place is None and job.ours) or (
            place is not None and (not place.quota or bool(place.volume_fds))
        )
        self._tidier.submit(teardown, heavy=heavy or bool(job.volume_fds))

    def _volumes(
        self,
        spec: JobSpec,
        requests: tuple[VolumeRequest, ...],
        owner: tuple[int, int],
        timeout: float,
    ) -> list[tuple[int, str]]:
        """The workspace's volumes the script header names, opened safely (R-ANN-4, R-VOL-2),
        each held by this job alone and owned by its ids (a volume outlives the uid of the
        job that wrote it)."""
        if not requests:
            return []
        self._tidier.settle()  # an earlier job may still hold one of them until its teardown
        script = language(spec.language).filename
        if any(r.target == script for r in requests):
            raise ValueError(f"volume target {script!r} is the job's own script; name another")
        if not is_plain_name(spec.workspace):
            raise ValueError(f"workspace {spec.workspace!r} is not a valid name for volumes")
        names = [r.name for r in requests]
        twice = sorted({n for n in names if names.count(n) > 1})
        if twice:  # a second fd on the same directory would wait for this job's own lock
            raise VolumeError(f"volume(s) {twice} named twice in the header; name each once")
        opened: list[tuple[int, str]] = []
        deadline = time.monotonic() + timeout
        try:
            for request in sorted(requests, key=lambda r: r.name):  # one lock order: no deadlock
                fd = open_volume(self.settings.state_dir, spec.workspace, request.name)
                opened.append((fd, request.target))
                claim_volume(fd, request.name, deadline)
                adopt_volume(fd, owner)
        except BaseException:
            for fd, _ in opened:
                os.close(fd)
            raise
        return opened

    def _execute(
        self,
        prepared: Prepared,
        cancel: Cancellation | None,
        spawned: Callable[[], None],
        upcoming: Upcoming | None,
    ) -> tuple[int, bool, str, str, list[str], float | None]:
        launch, job, cgroup = prepared.launch, prepared.job, prepared.cgroup
        assert launch is not None and job is not None and prepared.backend is not None
        if self._attached and prepared.backend.copies_mounts:
            self._detach_deferred()  # no earlier job's tmpfs in this job's namespace
        # No preexec_fn: it would force a full fork of the worker for every job. The child is
        # born in the job's cgroup and at the job's OOM score because the worker takes both on
        # for the spawn; every process of the job inherits them, with no race.
        spared = frozenset(reaper.own_children())
        fds: list[int] = []
        stdin = subprocess.DEVNULL
        pipes = _JobPipes()
        try:
            for data in launch.inputs:
                fds.append(memory_file(data))
            if launch.stdin is not None:  # fd 0 of the launcher only: CLOEXEC, not passed
                stdin = memory_file(launch.stdin)
            argv = launch.argv_for(fds)
            # no helper of the tidier's is spawned meanwhile: on v2 it would be born in here
            with reaper.spawning(), _Birthplace(cgroup):
                proc = subprocess.Popen(
                    argv,
                    stdin=stdin,
                    stdout=pipes.stdout[1],
                    stderr=pipes.stderr[1],
                    close_fds=True,  # R-JOB-2: stdio, and what the launcher reads, nothing else
                    pass_fds=fds,
                    env=launch.env,
                    cwd=job.job_dir,
                    start_new_session=True,
                )
        except BaseException:
            pipes.close()
            raise
        finally:
            for fd in fds:
                os.close(fd)
            if stdin != subprocess.DEVNULL:
                os.close(stdin)

        next_job = _NextJob(self, upcoming) if upcoming is not None else None

        def meanwhile(first: bool) -> float | None:
            """First, what finished jobs left goes; then the next job is made ready."""
            if first:
                spawned()
                self._tidier.pause()
            return next_job.step() if next_job is not None else None

        try:
            out, err, stopped = _collect(
                proc, pipes, job.timeout, self.settings.output_limit, cancel, meanwhile
            )
        finally:
            try:
                survivors, escaped, cpu = _kill_job(proc, cgroup, spared)
            finally:
                pipes.close()
        notes = [n for n in (out.note("stdout"), err.note("stderr")) if n]
        if survivors:
            notes.append(f"killed {survivors} leftover process(es) of the job")
        notes.extend(escaped.notes())
        code = proc.returncode
        exit_code = 128 - code if code < 0 else code
        return exit_code, stopped, out.text(), err.text(), notes, cpu


class _NextJob:
    """While a job runs, the job after it is prepared (`JobRunner.prepare_ahead`) once the
    queue thread has claimed it: asked after the last jobs' teardown, then again after
    AHEAD_RETRY_SECONDS, twice that, and so on (at most AHEAD_RETRY_MAX_SECONDS apart) for
    half the hold. Discarded again if the
    running job outlives AHEAD_HOLD_SECONDS, so that the queue thread may hand it back to
    idle workers. An error here is never the running job's: the next job meets it again
    on its turn."""

    def __init__(self, runner: JobRunner, upcoming: Upcoming) -> None:
        self.runner, self.upcoming = runner, upcoming
        self.started = time.monotonic()
        self.tries = 0
        self.prepared: JobSpec | None = None

    def step(self) -> float | None:
        """Seconds until it wants to be asked again; None: no more."""
        if self.prepared is not None:  # the running job outlived the hold
            self._discard(self.prepared)
            return None
        named = self.upcoming.peek()
        if named is None:
            later = min(AHEAD_RETRY_SECONDS * float(1 << self.tries), AHEAD_RETRY_MAX_SECONDS)
            self.tries += 1
            if time.monotonic() + later - self.started > AHEAD_HOLD_SECONDS / 2:
                return None
            return later
        spec, settings = named
        try:
            ready = self.runner.prepare_ahead(spec, settings)
        except Exception:
            log.exception("job %s: cannot prepare it ahead; it is prepared on its turn", spec.id)
            ready = False
        if not ready:
            self.upcoming.let_go(spec)
            return None
        self.prepared = spec
        return max(self.started + AHEAD_HOLD_SECONDS - time.monotonic(), 0.0)

    def _discard(self, spec: JobSpec) -> None:
        ahead = self.runner._ahead_job
        if ahead is not None and ahead.spec is spec:
            try:
                self.runner.discard_ahead()
            except Exception:
                log.exception("job %s: discarding its preparation failed", spec.id)
                return  # still under its id, maybe: never handed back to the queue by us
        self.upcoming.let_go(spec)


def _cpu_limit_note(exit_code: int, cpu: float | None, limit: int) -> list[str]:
    """Why a job died of SIGKILL or SIGXCPU with nothing to say: the kernel's RLIMIT_CPU.

    `cpu` sums the main process and every descendant it waited for; one process past the
    limit puts the sum past it too (several below it may as well: hence "probably"). The
    kernel kills at the limit by its tick-sampled count (CPUCLOCK_PROF), and rusage is the
    scheduler's exact time, which reads lower on a loaded machine: a lone process killed at
    a 1 s limit read 0.70 s beside wakeup-heavy neighbours, reaped directly. So a SIGKILL
    from half the limit up is named, with the other causes where it reads short of it.
    """
    if exit_code not in (128 + signal.SIGKILL, 128 + signal.SIGXCPU) or cpu is None:
        return []
    if cpu < limit * CPU_NOTE_SHARE:
        return []
    name = signal.Signals(exit_code - 128).name
    sure = exit_code == 128 + signal.SIGXCPU or cpu >= limit * 0.98
    head = f"cpu limit: killed by {name} (exit {exit_code}) after {cpu:.2f} s of CPU time, "
    rule = f"each process of a job may use {limit} s (ORVANTA_JOB_CPU_SECONDS, RLIMIT_CPU)"
    if sure:
        return [f"{head}probably the limit: {rule}"]
    return [
        f"{head}perhaps the limit: {rule}, counted by the kernel in ticks, which a loaded "
        "machine reads high; else the memory limit (ORVANTA_JOB_MEMORY_MB) or a kill from "
        "outside the job"
    ]


def _job_env(spec: JobSpec, home: str) -> dict[str, str]:
    """Built from scratch: no worker variable (DATABASE_URL, tokens) reaches a job (R-JOB-1).

    Names that are no variable name (a row written by an older release) are dropped: they
    would be misread as options by the `env` step that applies them inside the sandbox.
    """
    env = {"PATH": JOB_PATH, "HOME": home, "LANG": "C.UTF-8", "ORVANTA_JOB_ID": spec.id}
    for name, value in spec.env.items():
        if ENV_NAME.fullmatch(name) and "\x00" not in value:
            env[name] = value
        else:
            log.warning("job %s: variable %r dropped: not a variable name", spec.id, name)
    return env


class _Birthplace:
    """The job's cgroup and OOM score, taken on by the spawning thread for the moment of a
    spawn, so that the job is born with both (R-JOB-3, R-NSJ-3); given back after it.

    Raising oom_score_adj, and lowering it back to where it was, needs no privilege; the
    job inherits the raised value, so it, not the worker, is what the OOM killer takes.
    The file stays open and its old value known: two writes per job, no opens. A class,
    not a generator: the job's path takes it for every job.
    """

    __slots__ = ("cgroup", "oom")

    def __init__(self, cgroup: JobCgroup | None) -> None:
        self.cgroup = cgroup
        self.oom = _oom_handle()

    def __enter__(self) -> None:
        if self.cgroup is not None:
            self.cgroup.enter()
        if self.oom is not None:
            try:
                os.pwrite(self.oom[0], JOB_OOM_SCORE_ADJ, 0)
            except BaseException:
                if self.cgroup is not None:
                    self.cgroup.leave()
                raise

    def __exit__(self, *exc: object) -> None:
        try:
            if self.oom is not None:
                os.pwrite(self.oom[0], self.oom[1], 0)
        finally:
            if self.cgroup is not None:
                self.cgroup.leave()


_OOM: dict[int, tuple[int, bytes] | None] = {}


def _oom_handle() -> tuple[int, bytes] | None:
    """This process's oom_score_adj, open for writing, and its value at first use."""
    pid = os.getpid()
    if pid not in _OOM:
        try:
            with open("/proc/self/oom_score_adj", "rb") as f:
                before = f.read().strip()
            _OOM[pid] = (os.open("/proc/self/oom_score_adj", os.O_WRONLY | os.O_CLOEXEC), before)
        except OSError as exc:
            log.debug("cannot set oom_score_adj for spawns: %s", exc)
            _OOM[pid] = None
    return _OOM[pid]


class _Capped:
    """Keeps the first `limit` bytes of a stream and counts the rest (R-JOB-4)."""

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self.chunks: list[bytes] = []
        self.kept = 0
        self.dropped = 0

    def add(self, data: bytes) -> None:
        room = self.limit - self.kept
        if room > 0:
            self.chunks.append(data[:room])
            self.kept += min(room, len(data))
        self.dropped += max(0, len(data) - max(room, 0))

    def text(self) -> str:
        # NUL becomes U+FFFD: no database stores it in text, and a result must always store
        text = b"".join(self.chunks).decode("utf-8", "replace").replace("\x00", "\ufffd")
        if self.dropped:
            text += f"\n[output truncated: {self.dropped} more bytes dropped]\n"
        return text

    def note(self, name: str) -> str | None:
        if not self.dropped:
            return None
        return f"{name} truncated at {self.limit} bytes ({self.dropped} bytes dropped)"


class _JobPipes:
    """The job's stdout and stderr: pipes whose write ends the worker holds too while the job
    runs, so that their ends at the job's exit wake it once (the pidfd), not once per pipe;
    it lets go of them at the exit (`release`) and reads what is left."""

    def __init__(self) -> None:
        self.stdout = os.pipe()  # (read, write), close-on-exec: only the spawn dups them
        try:
            self.stderr = os.pipe()
        except BaseException:
            for fd in self.stdout:
                os.close(fd)
            raise
        self._open = [*self.stdout, *self.stderr]

    def release(self) -> None:
        """Close the worker's write ends: the pipes end once the job's processes close theirs."""
        for fd in (self.stdout[1], self.stderr[1]):
            self._close(fd)

    def close(self) -> None:
        for fd in list(self._open):
            self._close(fd)

    def _close(self, fd: int) -> None:
        if fd in self._open:
            self._open.remove(fd)
            os.close(fd)


def _collect(
    proc: subprocess.Popen[bytes],
    pipes: _JobPipes,
    timeout: float,
    limit: int,
    cancel: Cancellation | None,
    meanwhile: Callable[[bool], float | None] = lambda first: None,
) -> tuple[_Capped, _Capped, bool]:
    """Read both pipes until the job's main process exits; True when stopped first
    (deadline passed or canceled). `meanwhile(True)` runs once the job is started, before
    the first wait for it (the last jobs' teardown, runtime.tidier; the next job made
    ready); the deadline counts from the spawn all the same. It returns how long from now
    to call it again (`meanwhile(False)`) while the job runs, or None.

    A pidfd tells us the moment the main process exits even while a leftover child
    still holds the pipes open; what is already buffered is read for a short grace
    period, then the leftovers are killed by the caller.
    """
    out, err = _Capped(limit), _Capped(limit)
    streams = {pipes.stdout[0]: out, pipes.stderr[0]: err}
    deadline = time.monotonic() + timeout
    pidfd = _pidfd(proc.pid)
    if pidfd is None:
        pipes.release()  # the exit is polled: the pipes' ends are what wake us meanwhile
    try:
        poller = select.poll()  # no syscall to set up, one per wait: fewer GIL handoffs
        watched = [*streams, *([pidfd] if pidfd is not None else [])]
        if cancel is not None:
            watched.append(cancel.fileno())
        for fd in watched:
            poller.register(fd, select.POLLIN)
        waited_on = len(watched) - len(streams)
        again = meanwhile(True)
        call_at = None if again is None else time.monotonic() + again
        exited_at: float | None = None
        while exited_at is None or len(watched) > waited_on:
            now = time.monotonic()
            if now >= deadline:
                return out, err, True
            if exited_at is not None and now - exited_at > EXIT_GRACE:
                break
            if call_at is not None and now >= call_at and exited_at is None:
                again = meanwhile(False)
                call_at = None if again is None else time.monotonic() + again
                continue
            wait = deadline - now if exited_at is None else EXIT_GRACE
            if call_at is not None and exited_at is None:
                wait = min(wait, call_at - now)
            if pidfd is None and exited_at is None:
                if _has_exited(proc):  # no pidfd (gVisor): asked, at most every 20 ms
                    exited_at = now
                    continue
                wait = min(wait, EXIT_POLL)
            for fd, _ in poller.poll(max(wait, 0.0) * 1000):  # ms, rounded up
                if cancel is not None and fd == cancel.fileno():
                    return out, err, True
                if fd == pidfd:
                    exited_at = time.monotonic()
                    poller.unregister(fd)
                    watched.remove(fd)
                    waited_on -= 1
                    pipes.release()  # what the job's processes still hold is read for the grace
                    continue
                data = os.read(fd, 65536)
                if data:
                    streams[fd].add(data)
                else:  # end of file (POLLHUP too)
                    poller.unregister(fd)
                    watched.remove(fd)
    finally:
        if pidfd is not None:
            os.close(pidfd)
    return out, err, False


def _pidfd(pid: int) -> int | None:
    """A pidfd on the job's main process, or None where the kernel has none (gVisor's
    runsc answers ENOSYS): the exit is then polled."""
    try:
        return os.pidfd_open(pid)
    except OSError as exc:
        if exc.errno not in (errno.ENOSYS, errno.EPERM):
            raise
        return None


def _kill_job(
    proc: subprocess.Popen[bytes], cgroup: JobCgroup | None, spared: frozenset[int]
) -> tuple[int, reaper.Orphans, float | None]:
    """No process of the job survives it (R-JOB-3): its cgroup is emptied, then whatever left
    the cgroup is found among the worker's adopted orphans (R-HOST-5). Returns how many
    processes the cgroup still held, the orphans, and the main process's CPU time."""
    survivors = 0
    if not _has_exited(proc):
        _killpg(proc.pid)
    if cgroup is not None:
        survivors = cgroup.kill_all()
    else:
        _killpg(proc.pid)
    cpu = _reap(proc)
    orphans = reaper.kill_orphans(outside_cgroup=cgroup is not None, spared=spared)
    return survivors, orphans, cpu


def _has_exited(proc: subprocess.Popen[bytes]) -> bool:
    """The main process has ended; left unreaped, so that _reap gets its CPU time."""
    if proc.returncode is not None:
        return True
    try:
        return os.waitid(os.P_PID, proc.pid, os.WEXITED | os.WNOHANG | os.WNOWAIT) is not None
    except ChildProcessError:
        return True


def _reap(proc: subprocess.Popen[bytes]) -> float | None:
    """Wait for the main process (its status to proc.returncode); the CPU seconds of it and
    of every descendant it waited for (a launcher's: the job's), None if already reaped."""
    if proc.returncode is not None:
        return None
    try:
        _, status, usage = os.wait4(proc.pid, 0)
    except ChildProcessError:
        proc.wait()
        return None
    proc.returncode = os.waitstatus_to_exitcode(status)
    return usage.ru_utime + usage.ru_stime


def _killpg(pgid: int) -> None:
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(pgid, signal.SIGKILL)
