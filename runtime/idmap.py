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
"""

from __future__ import annotations

import functools
import os
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
        and _mapped("uid_map", settings.job_uid)
        and _mapped("gid_map", settings.job_gid)
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
def _mapped(which: str, value: int) -> bool:
    """`value` is an id of this process's user namespace (/proc/self/uid_map or gid_map)."""
    try:
        lines = Path(f"/proc/self/{which}").read_text().splitlines()
    except OSError:
        return False
    for line in lines:
        inside, _, count = (int(x) for x in line.split())
        if inside <= value < inside + count:
            return True
    return False


def job_owner(settings: Settings) -> tuple[int, int]:
    """The host ids a sandboxed job's files belong to."""
    if hardened(settings):
        return settings.job_uid, settings.job_gid
    return os.geteuid(), os.getegid()


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
