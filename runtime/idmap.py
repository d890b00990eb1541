"""Who a job is on the host under unshare: root in its namespace, an unprivileged uid outside.

The page's recipe, `unshare --user --map-root-user`, run by a root worker maps
the job's root to the host's uid 0: the job passes every file permission check
and sysctl as host root. The worker instead maps the job's root to
ORVANTA_JOB_UID/GID (R-HOST-1, R-HOST-2) with util-linux's `--map-users`,
`--map-groups`, `--setuid 0 --setgid 0`. unshare has those maps written by
`newuidmap`/`newgidmap`, looked up on PATH; the worker runs unshare with a PATH
that starts with its own two helpers (root-owned, in the 0700 state dir),
which write /proc/PID/uid_map and gid_map directly. Root in the parent
namespace may map any id, so this needs no setuid newuidmap, no /etc/subuid
and no unprivileged user namespaces: it works where
kernel.unprivileged_userns_clone=0 or AppArmor restricts them (Ubuntu 24.04).

Each running job gets ids of its own from ORVANTA_JOB_ID_COUNT consecutive ones
(`take_ids`, a lock file per id in /run shared by every worker of the host):
a concurrent job's dir is 0700 and another uid's, so a path learnt from the mount
table opens nothing (R-HOST-4).
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import functools
import os
import secrets
from dataclasses import dataclass
from pathlib import Path

from runtime.settings import Settings

SYSTEM_PATH = "/usr/sbin:/usr/bin:/sbin:/bin"
# Exactly the arguments unshare passes (PID then INNER OUTER COUNT triples); anything else fails.
HELPER = """#!/bin/sh
# Written by the orvanta worker: newuidmap/newgidmap for util-linux unshare run by root.
set -eu
case "${0##*/}" in *gid*) file=gid_map ;; *) file=uid_map ;; esac
pid=$1; shift
case "$pid" in ''|*[!0-9]*) echo "$0: bad pid $pid" >&2; exit 1 ;; esac
map=""
while [ $# -ge 3 ]; do
  for id in "$1" "$2" "$3"; do
    case "$id" in ''|*[!0-9]*) echo "$0: bad id $id" >&2; exit 1 ;; esac
  done
  map="$map$1 $2 $3
"
  shift 3
done
[ $# -eq 0 ] || { echo "$0: trailing arguments" >&2; exit 1; }
printf '%s' "$map" > "/proc/$pid/$file"
"""


def hardened(settings: Settings) -> bool:
    """Jobs get the unprivileged host ids: the worker is root, ORVANTA_JOB_UID is not 0, and
    the worker's own user namespace has those ids (a worker in a user namespace of its own
    may have only its root mapped)."""
    return (
        os.geteuid() == 0
        and settings.job_uid != 0
        and _can_hand_over()
        and _mapped("uid_map", settings.job_uid, settings.job_id_count)
        and _mapped("gid_map", settings.job_gid, settings.job_id_count)
    )


CAP_CHOWN, CAP_SETGID, CAP_SETUID = 0, 6, 7


@functools.cache
def _can_hand_over() -> bool:
    """The worker may give a job dir to another uid and map ids (CAP_CHOWN, CAP_SETUID,
    CAP_SETGID): the page's minimal nsjail capability set, for one, has none of them."""
    try:
        status = Path("/proc/self/status").read_text()
    except OSError:
        return False
    for line in status.splitlines():
        if line.startswith("CapEff:"):
            caps = int(line.split()[1], 16)
            return all(caps >> bit & 1 for bit in (CAP_CHOWN, CAP_SETGID, CAP_SETUID))
    return False


@functools.cache
def _mapped(which: str, first: int, count: int) -> bool:
    """Ids first..first+count-1 exist in this process's user namespace (one line of
    /proc/self/uid_map or gid_map holds them all)."""
    try:
        lines = Path(f"/proc/self/{which}").read_text().splitlines()
    except OSError:
        return False
    for line in lines:
        inside, _, length = (int(x) for x in line.split())
        if inside <= first and first + count <= inside + length:
            return True
    return False


def job_owner(settings: Settings) -> tuple[int, int]:
    """The first of the host ids sandboxed jobs get (what the start-up probes run as)."""
    if hardened(settings):
        return settings.job_uid, settings.job_gid
    return os.geteuid(), os.getegid()


ID_LOCKS = Path("/run/orvanta/job-ids")


class JobIdsExhaustedError(RuntimeError):
    """Every id of the range belongs to a running job."""


@dataclass
class JobIds:
    """One running job's host uid and gid, held by a lock on `ID_LOCKS/<n>` until released."""

    uid: int
    gid: int
    lock_fd: int = -1
    lock_path: Path | None = None

    @property
    def owner(self) -> tuple[int, int]:
        return self.uid, self.gid

    def release(self) -> None:
        """After every process of the job is gone: the ids may go to the next job."""
        if self.lock_fd < 0 or self.lock_path is None:
            return
        with contextlib.suppress(OSError):
            self.lock_path.unlink()  # while still locked, so no one holds a dead name
        os.close(self.lock_fd)
        self.lock_fd = -1


_CHECKED_LOCKS: set[Path] = set()


def in_range(ids: JobIds, settings: Settings) -> bool:
    """`ids` are among the ones `settings` gives jobs (ORVANTA_JOB_UID/GID and the count)."""
    n = ids.uid - settings.job_uid
    return 0 <= n < settings.job_id_count and ids.gid == settings.job_gid + n


def take_ids(settings: Settings, locks: Path = ID_LOCKS) -> JobIds:
    """Ids no other running job of this host has: ORVANTA_JOB_UID/GID + n for a free n.

    The search starts at a random n, so the next job rarely gets the ids the last
    one had (and whatever it left in a shared /tmp under them). A lock file exists
    only while its job runs; a lock taken on a name its holder just unlinked is
    told by the inode and skipped.
    """
    if locks not in _CHECKED_LOCKS or not locks.is_dir():  # checked once, made again if gone
        locks.mkdir(mode=0o700, parents=True, exist_ok=True)
        held = locks.stat()
        if held.st_uid != os.geteuid() or held.st_mode & 0o022:
            raise PermissionError(
                f"{locks} belongs to uid {held.st_uid} with mode {held.st_mode & 0o777:o}: the "
                "locks that keep two jobs from sharing ids must be the worker's alone (chmod 700)"
            )
        _CHECKED_LOCKS.add(locks)
    count = settings.job_id_count
    start = secrets.randbelow(count)
    for step in range(count):
        n = (start + step) % count
        path = locks / str(settings.job_uid + n)  # by uid: overlapping ranges still exclude
        fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            if os.stat(path).st_ino == os.fstat(fd).st_ino:
                return JobIds(settings.job_uid + n, settings.job_gid + n, fd, path)
        except OSError as exc:
            if exc.errno not in (errno.EWOULDBLOCK, errno.ENOENT):
                os.close(fd)
                raise
        os.close(fd)
    raise JobIdsExhaustedError(
        f"all {count} job ids from ORVANTA_JOB_UID={settings.job_uid} are taken by running "
        "jobs on this host; raise ORVANTA_JOB_ID_COUNT"
    )


def helper_dir(settings: Settings) -> Path:
    return settings.state_dir / "bin"


def launcher_env(settings: Settings) -> dict[str, str]:
    """The whole environment of a launcher (unshare, tini, nsjail), which runs as root outside
    any sandbox: fixed by the worker, never the job's (its variables are applied inside)."""
    return {"PATH": f"{helper_dir(settings)}:{SYSTEM_PATH}", "LANG": "C.UTF-8"}


def install_helpers(settings: Settings) -> None:
    """The state dir (0700) with the two id-map helpers in it; idempotent. Root runs them, so
    a state dir that anyone but this worker's user could write to is refused."""
    prepare_state_dir(settings.state_dir)
    info = settings.state_dir.stat()
    if info.st_uid != os.geteuid() or info.st_mode & 0o022:
        raise PermissionError(
            f"ORVANTA_STATE_DIR={settings.state_dir} belongs to uid {info.st_uid} with mode "
            f"{info.st_mode & 0o777:o}: the worker runs helpers from it as root, so it must be "
            "the worker's own and writable by no one else (chown it, chmod 700)"
        )
    bin_dir = helper_dir(settings)
    bin_dir.mkdir(mode=0o700, exist_ok=True)
    for name in ("newuidmap", "newgidmap"):
        path = bin_dir / name
        try:
            current = path.read_text()
        except OSError:
            current = ""
        if current != HELPER:
            tmp = bin_dir / f".{name}.tmp"
            tmp.write_text(HELPER)
            tmp.chmod(0o700)
            tmp.replace(path)


def unreachable(path: Path, uid: int, gid: int) -> Path | None:
    """The first directory on the way to `path` that uid:gid may not pass through, if any.

    A job under unshare reaches its job dir by its host path, as the unprivileged job uid:
    every directory above the jobs root must let it through (o+x, or its own uid/gid).
    """
    for folder in [*reversed(path.parents), path]:
        try:
            info = folder.stat()
        except OSError:
            return folder
        if info.st_uid == uid:
            bit = 0o100
        elif info.st_gid == gid:
            bit = 0o010
        else:
            bit = 0o001
        if not info.st_mode & bit:
            return folder
    return None


def let_jobs_through(path: Path) -> None:
    """o+x on `path` and on each parent of it this process owns (a pytest or mkdtemp dir is
    0700): traverse only, nothing becomes listable. For test harnesses and the benchmark."""
    for folder in [path, *path.parents]:
        info = folder.stat()
        if info.st_uid == os.geteuid() and not info.st_mode & 0o001:
            folder.chmod((info.st_mode & 0o7777) | 0o011)


def prepare_state_dir(state_dir: Path) -> None:
    """The worker's state is its own: 0700, whatever the umask made of it (R-HOST-4)."""
    state_dir.mkdir(parents=True, exist_ok=True, mode=0o700)
    info = state_dir.stat()
    if info.st_uid == os.geteuid() and info.st_mode & 0o077:
        state_dir.chmod(0o700)


def jobs_root_problem(settings: Settings) -> str | None:
    """Why the job uid cannot reach the jobs root (unshare's jobs walk their host path, and
    nsjail mounts the job dir as the job uid), or None."""
    if not hardened(settings):
        return None
    jobs = settings.job_root
    jobs.mkdir(parents=True, exist_ok=True, mode=0o711)
    closed = unreachable(jobs, settings.job_uid, settings.job_gid)
    if closed is None:
        return None
    return (
        f"jobs run as host uid {settings.job_uid} (ORVANTA_JOB_UID) and reach their "
        f"directories under {jobs} by path, but {closed} does not let that uid through "
        f"(mode {closed.stat().st_mode & 0o777:o}); give it o+x or set ORVANTA_JOBS_DIR "
        "to a directory whose parents do"
    )
