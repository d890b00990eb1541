"""mount(2), umount2(2), renameat2(2) and the fd-based mount API for the worker, which
Python's standard library lacks.

The worker mounts each job's directory as a size-limited tmpfs (R-DISK-1) and
binds the job's volumes into it (R-VOL-2). Both need CAP_SYS_ADMIN: where the
worker lacks it (an unprivileged container), `MountError` says so and the
caller falls back to plain directories.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import errno
import functools
import os

MS_NOSUID = 2
MS_NODEV = 4
MS_REMOUNT = 32
MS_BIND = 4096
MNT_DETACH = 2
UMOUNT_NOFOLLOW = 8
AT_FDCWD = -100


class MountError(OSError):
    """A mount or unmount the kernel refused; errno and the target say which."""


@functools.cache
def _libc() -> ctypes.CDLL:
    return ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)


def _check(result: int, what: str, target: str) -> None:
    if result != 0:
        err = ctypes.get_errno()
        raise MountError(err, f"{what} {target}: {os.strerror(err)}")


def mount(source: str, target: str, fstype: str | None, flags: int, data: str = "") -> None:
    _check(
        _libc().mount(
            source.encode(),
            target.encode(),
            fstype.encode() if fstype else None,
            ctypes.c_ulong(flags),
            data.encode() if data else None,
        ),
        "mount",
        target,
    )


def tmpfs(target: str, size_mb: int, uid: int, gid: int, source: str = "orvanta-job") -> None:
    """A private tmpfs of `size_mb` that only uid:gid may enter; nothing in it runs setuid.
    `source` is its name in the mount table."""
    options = ",".join(f"{k}={v}" for k, v in _tmpfs_options(size_mb, uid, gid).items())
    mount(source, target, "tmpfs", MS_NOSUID | MS_NODEV, options)


def _tmpfs_options(size_mb: int, uid: int, gid: int) -> dict[str, str]:
    """A job dir's tmpfs, whichever way it is mounted: its size and only uid:gid inside."""
    return {"size": f"{size_mb}m", "mode": "0700", "uid": str(uid), "gid": str(gid)}


# The mount API of Linux 5.2 (the same numbers on every architecture): a mount made
# detached, in no namespace's tree, and attached later with one call.
SYS_MOVE_MOUNT, SYS_FSOPEN, SYS_FSCONFIG, SYS_FSMOUNT = 429, 430, 431, 432
FSOPEN_CLOEXEC = FSMOUNT_CLOEXEC = 1
FSCONFIG_SET_STRING, FSCONFIG_CMD_CREATE = 1, 6
MOUNT_ATTR_NOSUID, MOUNT_ATTR_NODEV = 2, 4
MOVE_MOUNT_F_EMPTY_PATH = 4


def detached_tmpfs(size_mb: int, uid: int, gid: int) -> int:
    """`tmpfs`'s mount made now but attached to nothing (a mount fd): no namespace made
    meanwhile can copy it, and `attach` puts it in place with one call. MountError where
    the kernel has no such API (before 5.2, gVisor) or refuses it."""
    syscall = _libc().syscall
    fs = syscall(SYS_FSOPEN, b"tmpfs", FSOPEN_CLOEXEC)
    if fs < 0:
        _check(fs, "fsopen", "tmpfs")
    try:
        options = {"source": "orvanta-job", **_tmpfs_options(size_mb, uid, gid)}
        for key, value in options.items():
            _check(
                syscall(SYS_FSCONFIG, fs, FSCONFIG_SET_STRING, key.encode(), value.encode(), 0),
                "fsconfig",
                "tmpfs",
            )
        _check(syscall(SYS_FSCONFIG, fs, FSCONFIG_CMD_CREATE, None, None, 0), "fsconfig", "tmpfs")
        fd = syscall(SYS_FSMOUNT, fs, FSMOUNT_CLOEXEC, MOUNT_ATTR_NOSUID | MOUNT_ATTR_NODEV)
        if fd < 0:
            _check(fd, "fsmount", "tmpfs")
        return int(fd)
    finally:
        os.close(fs)


def attach(mount_fd: int, target: str) -> None:
    """A detached mount (`detached_tmpfs`) in place at `target`; the fd is the caller's."""
    _check(
        _libc().syscall(
            SYS_MOVE_MOUNT, mount_fd, b"", AT_FDCWD, target.encode(), MOVE_MOUNT_F_EMPTY_PATH
        ),
        "move_mount",
        target,
    )


def bind(source: str, target: str) -> None:
    """Bind `source` (a /proc/self/fd path: the directory already resolved) nosuid,nodev."""
    mount(source, target, None, MS_BIND)
    try:
        mount("none", target, None, MS_REMOUNT | MS_BIND | MS_NOSUID | MS_NODEV)
    except MountError:
        detach(target)
        raise


def detach(target: str) -> None:
    """Lazy unmount: gone from the tree at once, freed when the last user lets go."""
    _check(_libc().umount2(target.encode(), MNT_DETACH | UMOUNT_NOFOLLOW), "umount", target)


RENAME_NOREPLACE = 1


def rename_noreplace(source: str, target: str) -> None:
    """rename(2) that fails with EEXIST instead of replacing an empty directory at `target`;
    OSError(EINVAL or ENOSYS) where the kernel or filesystem has no RENAME_NOREPLACE."""
    try:
        renameat2 = _libc().renameat2
    except AttributeError:  # a libc without it (musl, glibc before 2.28)
        raise OSError(errno.ENOSYS, "renameat2 is not in this libc", target) from None
    result = renameat2(
        AT_FDCWD, source.encode(), AT_FDCWD, target.encode(), ctypes.c_uint(RENAME_NOREPLACE)
    )
    if result != 0:
        err = ctypes.get_errno()
        raise OSError(err, os.strerror(err), target)
