"""Persistent volumes (R-ANN-4), opened so that a job can never turn one into a host path.

A volume is `STATE/volumes/WORKSPACE/NAME`. Each component below the state dir
is opened with O_NOFOLLOW|O_DIRECTORY relative to its parent's fd, so a
symlink or a file planted anywhere on the way fails the job instead of being
followed (R-VOL-2); the job then gets the directory through that fd, never
through its path. Each running job has host ids of its own, so a job holds
its volumes alone (a lock on the directory) and the worker first gives it
everything in them (`adopt_volume`). After a job, setuid and setgid bits are
stripped from what it left in its volumes (R-HOST-3).
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import logging
import os
import stat
import time
from pathlib import Path

log = logging.getLogger("orvanta.volumes")

_DIR_FLAGS = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC


class VolumeError(ValueError):
    """The volume's host path is not a plain directory inside the state dir."""


def open_volume(state_dir: Path, workspace: str, name: str) -> int:
    """An fd on the volume's directory, made (0700, root's) on first use."""
    fd = os.open(state_dir, _DIR_FLAGS & ~os.O_NOFOLLOW)  # the operator's path; may be a link
    try:
        for part, mode in (("volumes", 0o700), (workspace, 0o700), (name, 0o700)):
            with contextlib.suppress(FileExistsError):
                os.mkdir(part, mode, dir_fd=fd)
            try:
                child = os.open(part, _DIR_FLAGS, dir_fd=fd)
            except OSError as exc:
                if exc.errno in (errno.ELOOP, errno.ENOTDIR):
                    raise VolumeError(
                        f"volume {name!r} of workspace {workspace!r} refused: "
                        f"{state_dir}/volumes/{workspace}/{name} has a symlink or a file at "
                        f"{part!r} where a directory must be; it was not mounted. An earlier "
                        "job may have poisoned it: inspect and remove that entry as root"
                    ) from None
                raise
            os.close(fd)
            fd = child
        return fd  # handed to the job's ids by adopt_volume, once this job holds it
    except BaseException:
        os.close(fd)
        raise


def claim_volume(volume_fd: int, name: str, deadline: float) -> None:
    """This job's alone until its fds close: another job with the volume is waited for, up
    to `deadline` (time.monotonic)."""
    while True:
        try:
            fcntl.flock(volume_fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            return
        except BlockingIOError:
            if time.monotonic() > deadline:
                raise VolumeError(
                    f"volume {name!r} stayed in use by another job until this job's timeout; "
                    "a volume serves one job at a time"
                ) from None
            time.sleep(0.05)


def adopt_volume(volume_fd: int, owner: tuple[int, int]) -> int:
    """Give the job's ids the volume and what earlier jobs (other ids) left in it; returns how
    many entries changed owner. Called with the volume's lock held. Each entry is judged and
    changed through an fd of its own (opened without following a symlink), so a name swapped
    meanwhile for a link to another file changes nothing; symlinks, sockets, files with a
    second hard link and anything on another filesystem are left alone, and chown clears
    setuid/setgid bits on the way."""
    info = os.fstat(volume_fd)
    if (info.st_uid, info.st_gid) != owner:
        os.fchown(volume_fd, *owner)
    if stat.S_IMODE(info.st_mode) != 0o700:
        os.fchmod(volume_fd, 0o700)
    device = info.st_dev
    changed = 0
    try:
        for _, dirs, files, dir_fd in os.fwalk(".", dir_fd=volume_fd, follow_symlinks=False):
            for name in (*dirs, *files):
                try:
                    fd = os.open(name, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK, dir_fd=dir_fd)
                except OSError:
                    continue  # a symlink (ELOOP), a socket, or gone
                try:
                    entry = os.fstat(fd)
                    if (
                        (entry.st_uid, entry.st_gid) != owner
                        and entry.st_dev == device
                        and (stat.S_ISDIR(entry.st_mode) or entry.st_nlink == 1)
                    ):
                        os.fchown(fd, *owner)
                        changed += 1
                except OSError:
                    pass
                finally:
                    os.close(fd)
    except RecursionError:
        log.error("a volume is nested too deep to walk whole; entries below stay with their ids")
    return changed


SETID = stat.S_ISUID | stat.S_ISGID


def strip_setid(volume_fd: int) -> int:
    """Clear setuid/setgid bits on every regular file below the volume; returns how many.

    Each file is judged by what its own fd says (a regular file of the volume's filesystem
    with one link), so a name swapped for a hard link to /usr/bin/su meanwhile is left alone.
    """
    stripped = 0
    device = os.fstat(volume_fd).st_dev
    try:
        for _, _, files, dir_fd in os.fwalk(".", dir_fd=volume_fd, follow_symlinks=False):
            for name in files:
                try:
                    fd = os.open(name, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK, dir_fd=dir_fd)
                except OSError:
                    continue
                try:
                    info = os.fstat(fd)
                    if (
                        stat.S_ISREG(info.st_mode)
                        and info.st_mode & SETID
                        and info.st_dev == device
                        and info.st_nlink == 1
                    ):
                        os.fchmod(fd, stat.S_IMODE(info.st_mode) & ~SETID)
                        stripped += 1
                finally:
                    os.close(fd)
    except RecursionError:  # a tree deeper than Python's stack: what was walked is stripped
        log.error("a volume is nested too deep to walk whole; setid bits below that depth stay")
    return stripped
