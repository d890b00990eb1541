"""A job's place on the host: `JOBS/<id>/job` for the job, `JOBS/<id>/control` for the worker.

The jobs root is outside the 0700 state dir and 0711: a job can enter its own
directory but list no other (R-HOST-4). The job dir is a tmpfs of
ORVANTA_JOB_DISK_MB, mounted nosuid,nodev and owned by the job's host uid, so
one job cannot fill the host's disk through it (R-DISK-1) and removing it is
one unmount. Volumes are bound into it through an fd the worker resolved
itself (R-VOL-2). The worker holds a lock on `control/owner.lock` while the
job lives, so a worker that starts can tell (and remove) what a killed one
left mounted, even in a jobs root that live workers share. Where the worker
may not mount (an unprivileged container) the job dir is a plain directory and
volumes are symlinks: no quota there, which the worker says at start.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import logging
import os
import secrets
import shutil
import stat
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import ClassVar

from runtime import mounts, reaper
from runtime.volumes import VolumeError, strip_setid

log = logging.getLogger("orvanta.jobdir")


@dataclass
class JobDir:
    root: Path
    job_dir: Path
    quota: bool  # the job dir is a size-limited tmpfs
    owner: tuple[int, int] = (0, 0)  # the job's host uid and gid
    mounted: list[str] = field(default_factory=list)  # innermost last
    volume_fds: list[int] = field(default_factory=list)
    lock_fd: int = -1  # flock held while the job lives
    mount_fd: int = -1  # made ahead: the job dir's tmpfs, detached (`mounts.detached_tmpfs`)
    mount_mb: int = 0  # its size
    made: tuple[object, ...] | None = None  # `_state` as the worker made it
    renames: ClassVar[bool] = True  # job dirs made ahead can be renamed to a job's id here
    detached_mounts: ClassVar[bool] = True  # the kernel makes detached mounts for us

    @classmethod
    def make(cls, jobs_root: Path, name: str) -> JobDir:
        """The directories and the held lock, the worker's own: a job's under its id, or one
        made ahead of the job (`ahead`), which `create` renames to the job's id."""
        root = jobs_root / name
        with _root_lock(jobs_root, fcntl.LOCK_SH):  # never while the root is (un)mounted
            root.mkdir(mode=0o711)
        job_dir = root / "job"
        job_dir.mkdir(mode=0o700)
        control = root / "control"
        control.mkdir(mode=0o700)
        place = cls(root, job_dir, quota=False)
        # locked before it has its name: a starting worker's sweep never sees it unlocked
        place.lock_fd = os.open(control / ".lock", os.O_WRONLY | os.O_CREAT | os.O_CLOEXEC, 0o600)
        fcntl.flock(place.lock_fd, fcntl.LOCK_EX)
        os.rename(control / ".lock", control / LOCK)
        place.made = place._state()
        return place

    @classmethod
    def ahead(cls, jobs_root: Path) -> JobDir:
        """A job dir made before its job is known, off the job's path (runtime.tidier): a
        name no job id has, renamed to the job's when one comes."""
        return cls.make(jobs_root, AHEAD + secrets.token_hex(8))

    @classmethod
    def create(
        cls,
        jobs_root: Path,
        job_id: str,
        owner: tuple[int, int],
        disk_mb: int,
        mount: bool,
        ahead: JobDir | None = None,
    ) -> JobDir:
        """The job's place under its id: `ahead` renamed (never over an existing one), else
        made now; then its job dir mounted as the job's tmpfs where the worker may."""
        if ahead is None:
            place = cls.make(jobs_root, job_id)
        else:
            root = jobs_root / job_id
            try:
                mounts.rename_noreplace(str(ahead.root), str(root))
            except BaseException as exc:
                ahead.remove()
                if not isinstance(exc, OSError) or exc.errno == errno.EEXIST:
                    raise  # EEXIST: another worker's attempt at this job made it meanwhile
                cls.renames = False  # every job dir is made on the spot from now on
                log.warning("job dirs are not made ahead here: %s", exc)
                return cls.create(jobs_root, job_id, owner, disk_mb, mount)
            place = cls(root, root / "job", quota=False, lock_fd=ahead.lock_fd)
            place.mount_fd, place.mount_mb, place.made = ahead.mount_fd, ahead.mount_mb, ahead.made
            ahead.lock_fd = ahead.mount_fd = -1  # the job's place holds them now
        place.owner = owner
        job_dir = place.job_dir
        if mount:
            try:  # the worker's own until hand_over: no job can enter while it is set up
                if not place._attach(disk_mb):
                    mounts.tmpfs(str(job_dir), disk_mb, os.geteuid(), os.getegid())
                place.mounted.append(str(job_dir))
                place.quota = True
            except mounts.MountError as exc:
                log.debug("job %s: no tmpfs job dir (%s)", job_id, exc)
        place._drop_mount_fd()
        return place

    def mount_ahead(self, disk_mb: int) -> None:
        """The tmpfs of the job this place is made for, made now and attached to nothing, so
        that the job's path only attaches it (`create`). Where the kernel cannot (before
        5.2, gVisor, no CAP_SYS_ADMIN), `create` mounts it as before."""
        if not JobDir.detached_mounts or self.mount_fd >= 0:
            return
        try:
            self.mount_fd = mounts.detached_tmpfs(disk_mb, os.geteuid(), os.getegid())
            self.mount_mb = disk_mb
        except mounts.MountError as exc:
            JobDir.detached_mounts = False
            log.debug("job dirs are mounted on the job's path: %s", exc)

    def _attach(self, disk_mb: int) -> bool:
        """The tmpfs made ahead in place; False (the caller mounts one) where there is none
        of that size, or the kernel refuses to attach it."""
        if self.mount_fd < 0 or self.mount_mb != disk_mb:
            return False
        try:
            mounts.attach(self.mount_fd, str(self.job_dir))
        except mounts.MountError as exc:
            JobDir.detached_mounts = False
            log.warning("job dirs are mounted on the job's path from now on: %s", exc)
            return False
        return True

    def _drop_mount_fd(self) -> None:
        if self.mount_fd >= 0:
            os.close(self.mount_fd)  # attached, it stays; else the unused tmpfs goes with it
            self.mount_fd = -1

    def write_script(self, name: str, text: str) -> None:
        """The job's script, created (never followed or reused) in the job dir."""
        flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC
        fd = os.open(self.job_dir / name, flags, 0o644)
        try:
            data = memoryview(text.encode())
            while data:
                data = data[os.write(fd, data) :]
        finally:
            os.close(fd)

    def hand_over(self) -> None:
        """The job dir becomes the job's, once everything the worker puts in it is there."""
        if self.owner != (os.geteuid(), os.getegid()):
            os.chown(self.job_dir, *self.owner, follow_symlinks=False)

    def add_volume(self, volume_fd: int, name: str, jail_binds: bool = False) -> str | None:
        # called before hand_over: the job dir is the worker's alone (0700) while this runs
        """The volume at ./name: bound nosuid,nodev where the worker may mount. Where it may
        not, and `jail_binds` (nsjail mounts in a namespace of its own), the path the jail is
        to bind is returned. Else a link."""
        self.volume_fds.append(volume_fd)
        target = self.job_dir / name
        source = f"/proc/self/fd/{volume_fd}"
        if self.quota:
            target.mkdir()
            try:
                mounts.bind(source, str(target))
            except mounts.MountError as exc:  # gVisor: no remount, so no nosuid,nodev
                raise VolumeError(
                    f"volume {name!r} cannot be given to this job: this kernel refuses to "
                    f"bind it nosuid,nodev ({exc})"
                ) from None
            self.mounted.append(str(target))
        elif jail_binds:
            # nsjail mounts in a mount namespace of its own, where the kernel refuses a bind
            # whose source (this fd's mount) belongs to another: it gets the path just resolved
            # without a symlink. Only root may change what lies there (the state dir is 0700).
            target.mkdir()
            return os.readlink(source)
        elif self.owner == (os.geteuid(), os.getegid()):  # the job is the worker's uid: a link
            target.symlink_to(os.readlink(source))
        else:
            raise VolumeError(
                f"volume {name!r} cannot be given to this job: the worker may not mount here "
                "(no CAP_SYS_ADMIN), and a link into the 0700 state dir is closed to the job's "
                "uid. Run the worker with CAP_SYS_ADMIN, or run volume jobs without isolation"
            )
        return None

    def full(self) -> bool:
        """The job used up its quota: its tmpfs has (next to) no block left."""
        if not self.quota:
            return False
        try:
            st = os.statvfs(self.job_dir)
        except OSError:
            return False
        return st.f_bavail * st.f_frsize < 64 * 1024

    def unmount(self) -> None:
        """Detach the job's tmpfs and volume binds: gone at once from every mount table, so
        a later job's namespace copies none of them (the rest may wait: runtime.tidier)."""
        for target in reversed(self.mounted):
            try:
                mounts.detach(target)
            except OSError as exc:
                log.error("cannot unmount %s: %s", target, exc)
        self.mounted.clear()

    def remove(self) -> None:
        """Unmount, strip setid bits the job left in its volumes, and delete the rest; the fds
        and the lock are let go whatever fails on the way."""
        try:
            self.unmount()
            for fd in self.volume_fds:
                stripped = strip_setid(fd)
                if stripped:
                    log.warning("stripped setuid/setgid bits from %d file(s) in a volume", stripped)
            if not self._remove_own():
                remove_tree(self.root)
        finally:
            self._drop_mount_fd()
            for fd in self.volume_fds:
                os.close(fd)
            self.volume_fds.clear()
            if self.lock_fd >= 0:
                os.close(self.lock_fd)
                self.lock_fd = -1

    def recycle(self, jobs_root: Path) -> bool:
        """Make this place the next job's, ahead (see `ahead`), where the job left it exactly
        as the worker made it: its tmpfs detached (the job's files went with it), so only
        the worker's own directories are left, the lock still held, nothing added, changed
        or mounted on (`_state`). job/ is made anew (removing it detaches the copies of
        the job's tmpfs that namespaces made while it ran, since Linux 3.18), and the
        place renamed to an ahead name: on ext4 a rename, an rmdir and a mkdir instead of
        three of each and a new lock. False otherwise: `remove` then removes it all."""
        if not (self.quota and not self.mounted and not self.volume_fds and self.lock_fd >= 0):
            return False  # a plain job dir is the job's own: never handed to another
        if self.made is None or self._state() != self.made:
            return False
        try:  # a new job/: the kernel detaches what other namespaces copied of the old one
            os.rmdir(self.job_dir)
            os.mkdir(self.job_dir, 0o700)
        except OSError:
            return False
        self.made = self._state_with_new_job(self.made)
        if self.made is None:
            return False
        target = jobs_root / (AHEAD + secrets.token_hex(8))
        try:
            mounts.rename_noreplace(str(self.root), str(target))
        except OSError:
            return False
        self.root, self.job_dir = target, target / "job"
        self.quota = False
        return True

    def _state(self) -> tuple[object, ...] | None:
        """The worker's three directories as the kernel shows them now: each one's device,
        inode, owner, mode, extended attributes (ACLs among them) and entries, and the
        lock's inode, links, mode, owner and size. A mount on one of them, an entry swapped
        or added, an ACL, a second link to the lock or a byte in it: another state. A job
        that was never host root can change none of them; for one that was (`none` as
        root), this is what can be seen, not proof (an inode flag is not compared). None
        where one cannot be read."""
        flags = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC
        state: list[object] = []
        opened: list[int] = []
        try:
            opened.append(os.open(self.root, flags))
            for name in ("job", "control"):
                opened.append(os.open(name, flags, dir_fd=opened[0]))
            state.extend(_dir_state(fd) for fd in opened)
            lock = os.stat(LOCK, dir_fd=opened[2], follow_symlinks=False)
            state.append(
                (
                    lock.st_dev,
                    lock.st_ino,
                    lock.st_nlink,
                    lock.st_mode,
                    lock.st_uid,
                    lock.st_gid,
                    lock.st_size,
                )
            )
        except OSError:
            return None
        finally:
            for fd in opened:
                os.close(fd)
        return tuple(state)

    def _state_with_new_job(self, before: tuple[object, ...]) -> tuple[object, ...] | None:
        """`_state` once job/ alone was made anew (`recycle`): only job/ is read again. The
        other two directories and the lock are as `before` showed them a moment ago, and
        the worker alone acted since (the job and its processes are dead); their times and
        link counts, which the new job/ changes, are not part of the state."""
        try:
            fd = os.open(self.job_dir, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC)
            try:
                return (before[0], _dir_state(fd), *before[2:])
            finally:
                os.close(fd)
        except OSError:
            return None

    def _remove_own(self) -> bool:
        """The tree as the worker left it, unmounted, removed by name: the plain files of
        control/, then the three directories; no mount table read, no walk. False, with
        nothing removed that the worker did not make, where anything else is there (a job
        under `none` may write, even mount, anywhere): remove_tree then looks at all of it."""
        flags = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC
        try:
            root = os.open(self.root, flags)
        except OSError:
            return False
        try:
            device = os.fstat(root).st_dev
            control = os.open("control", flags, dir_fd=root)
            try:
                with os.scandir(control) as entries:
                    files = sorted(entries, key=lambda e: e.name == LOCK)  # the lock last:
                for entry in files:  # a dir left with no lock would never be swept
                    info = entry.stat(follow_symlinks=False)
                    if not stat.S_ISREG(info.st_mode) or info.st_dev != device:
                        return False  # a link, a directory, something mounted: not ours
                    os.unlink(entry.name, dir_fd=control)
            finally:
                os.close(control)
            os.rmdir("control", dir_fd=root)
            os.rmdir("job", dir_fd=root)  # EBUSY if mounted on, ENOTEMPTY if written to
        except OSError:
            return False
        finally:
            os.close(root)
        try:
            os.rmdir(self.root)
        except OSError:
            return False
        return True


LOCK = "owner.lock"
AHEAD = ".ahead-"  # a job dir made before its job: no job id starts with a dot


def held(root: Path) -> bool:
    """A live worker holds this job dir's lock (a job whose lease it lost, still running)."""
    try:
        fd = os.open(root / "control" / LOCK, os.O_WRONLY | os.O_CLOEXEC)
    except OSError:
        return False
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:
        return True
    finally:
        os.close(fd)
    return False


ROOT_SOURCE = "orvanta-root"  # the jobs root's own tmpfs, by its name in the mount table


def mount_root(jobs_root: Path, size_mb: int) -> bool:
    """A tmpfs of its own at the jobs root, where nothing is mounted there yet and nothing is
    in it (after the sweep); True if the root is such a tmpfs now, mounted by this call or
    by another worker that shares it. A job dir's own directories and lock then cost
    memory, not journalled ext4 writes: renaming, recycling and removing them was about
    half of a trivial job's teardown (measured: 1.27 -> 0.68 ms, and x1.12 jobs/s for a
    `none` worker). Its jobs' files are on their own tmpfs as before; a job dir that could
    not get one fills at most `size_mb` of this. Workers that share the root share it: one
    mounts it, under a lock on the root's parent, and the last one to stop leaves nothing
    in it and unmounts it (`unmount_root`); one killed leaves it mounted, for the next one
    to find and sweep. A root that holds anything, or that anything else is mounted on (an
    operator's own tmpfs or bind mount, say), stays as it is. A job dir is made under a
    shared lock on the same parent (`make`), so none is made between the check and the
    mount, or between `unmount_root`'s check and its detach.

    Workers in different mount namespaces (systemd units with ProtectSystem=, containers
    given the same host dir) each mount their own, and no longer see each other's job
    dirs: a job whose lease one of them lost may then start on the other while it still
    runs, as on two hosts. ORVANTA_JOBS_TMPFS=false keeps job dirs on the root's own
    filesystem for them."""
    try:
        with _root_lock(jobs_root, fcntl.LOCK_EX, required=True):
            source = _source(jobs_root)  # the mount table: a bind mount from the same fs too
            if source is not None:
                return source == ROOT_SOURCE  # another worker's: shared; else the operator's
            if not _empty(jobs_root):
                return False  # another worker's job dirs, or anything else: left as it is
            mounts.tmpfs(str(jobs_root), size_mb, os.geteuid(), os.getegid(), ROOT_SOURCE)
            os.chmod(jobs_root, 0o711)  # enter your own job dir; list nobody else's (R-HOST-4)
            return True
    except OSError as exc:  # mounts.MountError among them: no CAP_SYS_ADMIN here, say
        log.debug("jobs root %s stays on its filesystem: %s", jobs_root, exc)
        return False


def unmount_root(jobs_root: Path) -> None:
    """Detach the jobs root's tmpfs (`mount_root`) if nothing is in it: a worker that shares
    it (its job dirs, or the one it made ahead) keeps it mounted, and unmounts it last."""
    try:
        with _root_lock(jobs_root, fcntl.LOCK_EX, required=True):
            if _source(jobs_root) == ROOT_SOURCE and _empty(jobs_root):
                mounts.detach(str(jobs_root))
    except OSError as exc:
        log.warning("the tmpfs at the jobs root %s stays mounted: %s", jobs_root, exc)


def _source(point: Path) -> str | None:
    """The source of the topmost mount at `point` (this process's mount table), if any."""
    sources = [source for at, source in _mount_table() if at == str(point)]
    return sources[-1] if sources else None


@contextlib.contextmanager
def _root_lock(jobs_root: Path, how: int, required: bool = False) -> Iterator[None]:
    """flock on the jobs root's parent: exclusive to mount or unmount the root's tmpfs
    (`required`: OSError where the parent cannot be opened), shared to make a job dir in it
    (made unlocked there: nothing is mounted at such a root by this worker either)."""
    try:
        parent = os.open(jobs_root.parent, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    except OSError:
        if required:
            raise
        yield
        return
    try:
        fcntl.flock(parent, how)
        yield
    finally:
        os.close(parent)


def _empty(directory: Path) -> bool:
    with os.scandir(directory) as entries:
        return next(entries, None) is None


def sweep_orphans(jobs_root: Path) -> list[str]:
    """Remove the job dirs whose worker died (no one holds their lock); returns their names."""
    swept: list[str] = []
    try:
        entries = list(jobs_root.iterdir())
    except OSError:
        return swept
    for root in entries:
        if not (root / "control" / LOCK).exists() or held(root):
            continue  # being made right now, a live worker's, or not a job dir of this release
        remove_tree(root)
        swept.append(root.name)
    return swept


def remove_tree(root: Path) -> None:
    """Delete a job's tree, first unmounting anything still mounted below it (a dead worker's
    attempt): rmtree must never walk into a volume."""
    prefix = str(root) + "/"
    for target in sorted(_mount_points(prefix), key=len, reverse=True):
        with contextlib.suppress(OSError):
            mounts.detach(target)
    try:
        shutil.rmtree(root, ignore_errors=True)
    except RecursionError:  # deeper than Python's stack: rm walks it without recursion
        reaper.run_helper(["rm", "-rf", "--one-file-system", "--", str(root)])


def _mount_points(prefix: str) -> list[str]:
    return [point for point, _ in _mount_table() if point.startswith(prefix)]


def _mount_table() -> list[tuple[str, str]]:
    """(mount point, source) of each line of this process's mountinfo, in its order."""
    try:
        with open("/proc/self/mountinfo") as f:
            lines = f.read().splitlines()
    except OSError:
        return []
    table = []
    for line in lines:
        fields, _, rest = line.partition(" - ")
        source = rest.split(" ", 2)[1] if " " in rest else ""  # fstype source options
        table.append((_unescape(fields.split(" ", 5)[4]), source))
    return table


def _unescape(field_text: str) -> str:
    """mountinfo writes space, tab, newline and backslash as octal escapes."""
    for code, char in (("\\040", " "), ("\\011", "\t"), ("\\012", "\n"), ("\\134", "\\")):
        field_text = field_text.replace(code, char)
    return field_text


def _dir_state(fd: int) -> tuple[object, ...]:
    """One directory of `JobDir._state`: device, inode, owner, mode, xattr names, entries."""
    info = os.fstat(fd)
    return (
        info.st_dev,
        info.st_ino,
        info.st_uid,
        info.st_gid,
        info.st_mode,
        sorted(os.listxattr(fd)),
        sorted(os.listdir(fd)),
    )
