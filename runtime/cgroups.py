"""Control groups: nsjail's parent groups, and one tracking group per job (R-JOB-3).

A job's processes can leave its process group (setsid) or double-fork, but
they cannot leave its cgroup. On cgroup v1 the tracking group lives in the
freezer hierarchy, which nsjail leaves alone (it moves jailed processes into
its own memory/pids/cpu groups), so freeze-kill-thaw reaches every process a
job ever started. Where cgroups are read-only (an unprivileged container),
the worker falls back to being a child subreaper (see `runtime.reaper`).
"""

from __future__ import annotations

import contextlib
import functools
import logging
import os
import secrets
import signal
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

log = logging.getLogger("orvanta.cgroups")

ROOT = Path("/sys/fs/cgroup")
PARENT = "orvanta"
NSJAIL_CONTROLLERS = ("memory", "pids", "cpu")
AHEAD = ".ahead-"  # a v1 group made before its job: `.ahead-<pid>-<its start>-<random>`


@functools.cache
def is_v2() -> bool:
    """The host's cgroup version, which does not change while a worker runs."""
    return (ROOT / "cgroup.controllers").exists()


def ensure_nsjail_parents() -> None:
    """nsjail on cgroup v1 creates its per-jail groups under <controller>/orvanta."""
    if is_v2():
        return
    for controller in NSJAIL_CONTROLLERS:
        base = ROOT / controller
        if base.is_dir():
            try:
                (base / PARENT).mkdir(exist_ok=True)
            except OSError as exc:
                log.debug("cannot create %s/%s: %s", base, PARENT, exc)


def job_group(job_id: str) -> str:
    """The job's group name under each hierarchy; nsjail nests its own groups below it."""
    return f"{PARENT}/job-{job_id}"


def nsjail_cgroup_parent() -> str | None:
    """The shared parent for nsjail's groups, or None where cgroups are not writable here."""
    if is_v2():
        return PARENT if os.access(ROOT, os.W_OK) else None
    ok = all(os.access(ROOT / c / PARENT, os.W_OK) for c in ("memory", "pids"))
    return PARENT if ok else None


class JobCgroup:
    """A cgroup holding every process of one job, so that all of them can be killed.

    On v1 the job also gets a group in each controller nsjail uses, as the parent of
    the groups nsjail makes: they are removed with the job even when nsjail itself
    was killed and could not clean up.
    """

    def __init__(
        self, path: Path, v2: bool, nsjail_parents: list[Path], fresh: bool = True
    ) -> None:
        self.path = path
        self.v2 = v2
        self.nsjail_parents = nsjail_parents
        self.fresh = fresh  # False: left by a killed worker's attempt at the same job
        # the job's path reads and writes these after every job: plain strings, made once
        self._dir, self._parent = str(path), str(path.parent)
        self._procs = f"{path}/cgroup.procs"
        self._member, self._who = (
            ("cgroup.procs", str(os.getpid()).encode()) if v2 else ("tasks", b"0")
        )
        self._hierarchy = ROOT if v2 else path.parent.parent
        self._home: tuple[int, Path] | None = None  # set by `enter`, for `leave`

    @classmethod
    def create(
        cls, job_id: str, nsjail: bool = False, ahead: AheadGroups | None = None
    ) -> JobCgroup | None:
        """The job's group (an existing one, left by a killed worker, is reused and emptied
        by the caller), or None where this process may not make one. Groups of `ahead` are
        renamed to the job's where they can be; it keeps the ones the job did not need."""
        v2 = is_v2()
        base = _tracking_base(v2)
        path = base / f"job-{job_id}"
        fresh = True
        for _ in range(2):
            if ahead is not None and ahead.take("freezer", path):
                break
            try:
                if base not in _MADE:
                    base.mkdir(exist_ok=True)
                    _MADE.add(base)
                path.mkdir()
                break
            except FileExistsError:
                fresh = False
                break
            except FileNotFoundError:
                _MADE.discard(base)  # someone removed the parent: make it again
            except OSError as exc:
                log.debug("no tracking cgroup for job %s: %s", job_id, exc)
                return None
        else:
            return None
        parents = []
        if nsjail and not v2:
            for controller in NSJAIL_CONTROLLERS:
                parent = ROOT / controller / job_group(job_id)
                if ahead is not None and ahead.take(controller, parent):
                    parents.append(parent)
                    continue
                try:
                    parent.mkdir(parents=True, exist_ok=True)
                    parents.append(parent)
                except OSError as exc:
                    log.debug("no %s group for job %s: %s", controller, job_id, exc)
        return cls(path, v2, parents, fresh)

    def pids(self) -> list[int]:
        """Every process in the group or in a group the job made below it."""
        if self._alone():  # the common case, after every job: one read
            try:
                return [int(line) for line in read_small(self._procs).split()]
            except OSError:
                return []
        pids = []
        for group in self._tree():
            try:
                text = read_small(group / "cgroup.procs")
            except OSError:
                continue
            pids += [int(line) for line in text.split()]
        return pids

    def _alone(self) -> bool:
        """The group has no subgroup, known from its link count where cgroupfs keeps one."""
        try:
            return _counts_subgroups(self._parent) and os.stat(self._dir).st_nlink <= 2
        except OSError:
            return False

    def _tree(self) -> list[Path]:
        """The group and its descendants, top-down; a job may nest (and freeze) groups below
        its own (R-HOST-5), and they must die and go with it."""
        groups = [self.path]
        if self._alone():
            return groups  # no subgroup: spared a walk of the group's files
        with contextlib.suppress(OSError):
            for top, dirs, _ in os.walk(self.path):
                groups += [Path(top) / d for d in dirs]
        return groups

    def enter(self) -> None:
        """The calling thread inside the job's group, so that what it spawns is born there;
        `leave` must follow, on the same thread (a plain pair, not a context manager: the
        job's path takes it after every job).

        On v1 only the thread moves (it writes "0" to `tasks`), which the kernel does without
        the lock a whole-process move takes: that lock waits for an RCU grace period, up to
        a millisecond a move after jobs that made namespaces. A v2 domain group takes whole
        processes only.
        """
        self._home = _home(self._hierarchy, self._member)  # opened while still outside
        _write(f"{self._dir}/{self._member}", self._who)

    def leave(self) -> None:
        """The calling thread back in the group it was in before `enter`."""
        assert self._home is not None, "leave without enter"
        home, home_path = self._home
        try:
            os.write(home, self._who)
        except OSError as exc:
            # The home group was removed meanwhile. Never asked of /proc from in here (it
            # would name the job's group): the hierarchy's root, which always exists.
            _forget_home(self._hierarchy, self._member)
            try:
                _write(self._hierarchy / self._member, self._who)
                log.warning(
                    "home cgroup %s is gone (%s); the worker moved to %s",
                    home_path,
                    exc,
                    self._hierarchy,
                )
            except OSError as again:
                log.error("worker stays in job group %s: %s", self.path, again)

    @contextlib.contextmanager
    def entered(self) -> Iterator[None]:
        """`enter`, then `leave` at the end of the block."""
        self.enter()
        try:
            yield
        finally:
            self.leave()

    def kill_all(self, deadline: float = 5.0) -> int:
        """SIGKILL every process in the group until it is empty; returns how many were hit."""
        killed = 0
        pids = self.pids()
        if not pids:
            return 0
        if os.getpid() in pids:  # stuck in it (see entered): no freeze, no cgroup.kill
            log.error(
                "the worker is in job group %s: its processes are killed one by one", self.path
            )
            for pid in pids:
                if pid != os.getpid():
                    with contextlib.suppress(ProcessLookupError):
                        os.kill(pid, signal.SIGKILL)
                        killed += 1
            return killed
        end = time.monotonic() + deadline
        if self.v2 and (self.path / "cgroup.kill").exists():
            pids = self.pids()
            if pids:
                (self.path / "cgroup.kill").write_text("1")
                killed = len(pids)
        else:
            self._set_frozen(True)
            for pid in self.pids():
                try:
                    os.kill(pid, signal.SIGKILL)
                    killed += 1
                except ProcessLookupError:
                    pass
            self._set_frozen(False)
            for group in self._tree()[1:]:  # groups the job froze itself stay frozen otherwise
                with contextlib.suppress(OSError):
                    (group / "freezer.state").write_text("THAWED")
        while self.pids() and time.monotonic() < end:
            for pid in self.pids():
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGKILL)
            time.sleep(0.01)
        return killed

    def remove(self) -> None:
        for parent in self.nsjail_parents:
            for child in parent.glob("NSJAIL.*"):
                _rmdir(child)
            _rmdir(parent)
        for group in reversed(self._tree()):
            _rmdir(group)

    def _set_frozen(self, frozen: bool) -> None:
        state = self.path / "freezer.state"
        if not state.exists():
            return
        state.write_text("FROZEN" if frozen else "THAWED")
        if frozen:
            end = time.monotonic() + 1.0
            while state.read_text().strip() != "FROZEN" and time.monotonic() < end:
                time.sleep(0.005)


_MADE: set[Path] = set()  # parents this process has made (or found) already


@functools.cache
def _tracking_base(v2: bool) -> Path:
    """The parent of the job groups: one object, whose hash (asked after every job) is kept."""
    return ROOT / PARENT if v2 else ROOT / "freezer" / PARENT


@dataclass
class AheadGroups:
    """Empty groups made off the job's path, in the worker's pause (runtime.tidier), for a
    job not yet known: on v1 a group may be renamed within its parent, so the job's path
    renames them to the job's (`JobCgroup.create`), a call each instead of a mkdir (a
    memory group's costs the most). v2 cannot rename groups: there they are made on the
    path. Named with the worker's pid and start time: a starting worker removes a dead
    one's (`sweep_ahead`)."""

    groups: dict[str, Path] = field(default_factory=dict)  # controller -> its group

    def fill(self, nsjail: bool) -> None:
        """The tracking group, and nsjail's parents if `nsjail`, for each one missing."""
        if is_v2():
            return
        name = f"{AHEAD}{os.getpid()}-{_own_start(os.getpid())}-{secrets.token_hex(6)}"
        for controller in ("freezer", *(NSJAIL_CONTROLLERS if nsjail else ())):
            if controller in self.groups:
                continue
            group = ROOT / controller / PARENT / name
            try:
                group.mkdir()
            except OSError as exc:  # no such hierarchy or parent yet: made on the path
                log.debug("no %s group made ahead: %s", controller, exc)
                continue
            self.groups[controller] = group
            _AHEAD_HERE.add(group)

    def take(self, controller: str, target: Path) -> bool:
        """`controller`'s group renamed to `target` (the job's). False where there is none or
        the rename fails (`target` exists: a retry); the group is then removed."""
        group = self.groups.pop(controller, None)
        if group is None:
            return False
        _AHEAD_HERE.discard(group)
        try:
            os.rename(group, target)
        except OSError as exc:
            log.debug("group %s not renamed to %s: %s", group, target, exc)
            _rmdir(group)
            return False
        return True

    def remove(self) -> None:
        for group in self.groups.values():
            _AHEAD_HERE.discard(group)
            _rmdir(group)
        self.groups.clear()


_AHEAD_HERE: set[Path] = set()  # made ahead by this process and not yet taken or removed


def sweep_ahead() -> list[Path]:
    """Remove the groups made ahead by workers that are gone: no process has their pid and
    start time (a pid alone may be reused, or be another pid namespace's), or it is this
    process but it did not make them."""
    if is_v2():
        return []
    swept = []
    for controller in ("freezer", *NSJAIL_CONTROLLERS):
        parent = ROOT / controller / PARENT
        try:
            names = os.listdir(parent)
        except OSError:
            continue
        for name in names:
            pid, _, rest = name[len(AHEAD) :].partition("-")
            start = rest.partition("-")[0]
            if not name.startswith(AHEAD) or not pid.isdigit():
                continue
            alive = _started(int(pid)) == start
            if alive and (int(pid) != os.getpid() or parent / name in _AHEAD_HERE):
                continue
            with contextlib.suppress(OSError):
                os.rmdir(parent / name)
                swept.append(parent / name)
    return swept


@functools.cache
def _own_start(pid: int) -> str:  # by pid: a forked child is another process
    return _started(pid)


def _started(pid: int) -> str:
    """When process `pid` started (clock ticks after boot, /proc/PID/stat), or "" if none."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return ""
    return stat.rpartition(")")[2].split()[19]


_COUNTED: dict[str, bool] = {}


def _counts_subgroups(parent: str) -> bool:
    """Linux's cgroupfs gives a group 2 links plus 1 per subgroup. Asked once per parent of
    job groups, while it holds one (gVisor's cgroupfs, say, might not count them)."""
    if parent not in _COUNTED:
        _COUNTED[parent] = os.stat(parent).st_nlink >= 3
    return _COUNTED[parent]


_HOMES: dict[tuple[str, str, int, int], tuple[int, Path]] = {}


def _home(hierarchy: Path, member: str) -> tuple[int, Path]:
    """An open fd on `member` of the calling thread's group at its first job, and its path:
    where it returns after each spawn. One per thread (v1 moves threads one by one) and
    process; looked up only while the thread is outside every job's group."""
    key = (str(hierarchy), member, os.getpid(), threading.get_native_id())
    home = _HOMES.get(key)
    if home is None:
        path = _own_group(hierarchy) / member
        home = _HOMES[key] = (os.open(path, os.O_WRONLY | os.O_CLOEXEC), path)
    return home


def _forget_home(hierarchy: Path, member: str) -> None:
    home = _HOMES.pop((str(hierarchy), member, os.getpid(), threading.get_native_id()), None)
    if home is not None:
        os.close(home[0])


def _own_group(hierarchy: Path) -> Path:
    """The calling thread's group in the hierarchy mounted at `hierarchy`."""
    controller = hierarchy.name
    for line in Path("/proc/thread-self/cgroup").read_text().splitlines():
        _, controllers, path = line.split(":", 2)
        if (hierarchy == ROOT and controllers == "") or controller in controllers.split(","):
            return hierarchy / path.lstrip("/")
    raise RuntimeError(f"this process is in no {controller} cgroup")


def _write(path: Path | str, data: bytes) -> None:
    fd = os.open(path, os.O_WRONLY | os.O_CLOEXEC)
    try:
        os.write(fd, data)
    finally:
        os.close(fd)


def read_small(path: Path | str) -> str:
    """A small kernel file (cgroup.procs, /proc/.../children) in one read, without the text
    layer of open(): the worker reads a few of them after every job."""
    fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    try:
        chunks = []
        while chunk := os.read(fd, 65536):
            chunks.append(chunk)
        return b"".join(chunks).decode()
    finally:
        os.close(fd)


def _rmdir(path: Path) -> None:
    try:
        path.rmdir()
    except FileNotFoundError:
        pass
    except OSError as exc:
        log.warning("could not remove cgroup %s: %s", path, exc)
