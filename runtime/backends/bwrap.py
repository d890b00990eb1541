"""bubblewrap: nsjail's kind of isolation from a small unprivileged tool (not on the page).

Selected only by ORVANTA_BACKEND=bwrap; the page's hierarchy never picks it.
The job gets a filesystem of its own (read-only /usr, its job dir at /job, a
private /tmp, /dev/shm, /proc and /dev), and namespaces of its own for
processes, network (a loopback only), IPC, hostname and cgroups. bwrap itself
runs without any privilege: a root worker starts it through `setpriv` as the
job's own host ids (runtime.idmap), so bwrap makes an unprivileged user
namespace in which the job is uid 0 without any capability (another uid makes
bwrap nest a second namespace, and the job's view of its ids would no longer be
the host's). That needs unprivileged user namespaces on the host; where they
are off, the start-up probe fails and the worker refuses to start. Resources
are bounded with rlimits set by `prlimit` before the ids drop: the process
count per job (RLIMIT_NPROC counts the job's own uid), address space, CPU time,
file size and open files. The job's variables reach bwrap through a file
descriptor (`--args`), never its command line, which every host user can read
for the job's whole life.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path
from typing import ClassVar

from runtime import idmap
from runtime.backends import INFO, Launch, PreparedJob, memory_file, records, tool_path
from runtime.capabilities import HostCapabilities, Probe, run_probe
from runtime.settings import Settings

INNER_DIR = "/job"
JAIL_UID = 0  # with no capability at all: one user namespace, mapped to the job's host ids
# what every job sees read-only, as on the host (a symlink stays a symlink: merged /usr)
SYSTEM = ("/usr", "/bin", "/sbin", "/lib", "/lib64", "/lib32", "/libx32")
SYSTEM_FILES = ("/etc/alternatives", "/etc/ld.so.cache", "/etc/ssl/certs", "/etc/resolv.conf")


def sandbox_args(settings: Settings, job_dir: str, env: dict[str, str]) -> list[str]:
    """bwrap's arguments before the command: namespaces, the filesystem, the environment."""
    args = [
        "--unshare-all",  # user, pid, net (loopback up), ipc, uts, cgroup
        "--unshare-user",  # required, not just tried: the job never shares the host's
        # no --disable-userns: bwrap would nest a second user namespace for it, and the job's
        # view of its ids would no longer be the host's (measured by setuid_jobdir)
        "--die-with-parent",
        "--new-session",  # no TIOCSTI into the worker's terminal
        "--hostname",
        "orvanta-job",
        "--uid",
        str(JAIL_UID),
        "--gid",
        str(JAIL_UID),
        "--cap-drop",
        "ALL",
    ]
    for path in SYSTEM:
        if os.path.islink(path):
            args += ["--symlink", os.readlink(path), path]
        elif os.path.isdir(path):
            args += ["--ro-bind", path, path]
    for path in SYSTEM_FILES:
        args += ["--ro-bind-try", path, path]
    prefix = Path(settings.python_path).resolve().parent.parent
    if prefix != Path("/usr") and Path("/usr") not in prefix.parents:
        args += ["--ro-bind", str(prefix), str(prefix)]  # a Python of its own prefix
    args += [
        "--proc",
        "/proc",
        "--dev",
        "/dev",
        *tmpfs("/dev/shm", settings.limits.file_size_mb),
        *tmpfs("/tmp", settings.limits.file_size_mb),
        "--bind",
        job_dir,
        INNER_DIR,
        "--chdir",
        INNER_DIR,
        "--clearenv",
    ]
    for name, value in env.items():
        args += ["--setenv", name, value]
    return args


def tmpfs(path: str, size_mb: int) -> list[str]:
    """A private tmpfs of bounded size: the job's memory, never the host's disk."""
    return ["--size", str(size_mb * 1024 * 1024), "--tmpfs", path]


def launcher(settings: Settings, bwrap: str, host_ids: tuple[int, int] | None) -> list[str]:
    """prlimit, then (for a root worker) setpriv to the job's ids, then bwrap."""
    limits = settings.limits
    argv = [
        "prlimit",
        f"--nproc={limits.pids}",
        f"--as={limits.memory_mb * 1024 * 1024}",
        f"--cpu={limits.cpu_seconds}",
        f"--fsize={limits.file_size_mb * 1024 * 1024}",
        f"--nofile={limits.open_files}",
        "--core=0",
        "--",
    ]
    if host_ids is not None:
        uid, gid = host_ids
        argv += ["setpriv", f"--reuid={uid}", f"--regid={gid}", "--clear-groups"]
        argv += ["--no-new-privs", "--"]
    return [*argv, bwrap]


class Bubblewrap:
    name: ClassVar[str] = "bwrap"
    on_the_page: ClassVar[bool] = False
    own_cgroups: ClassVar[bool] = False
    rlimits: ClassVar[bool] = True  # prlimit
    own_mounts: ClassVar[bool] = False  # unprivileged: it binds only what its ids can reach
    copies_mounts: ClassVar[bool] = True

    @classmethod
    def probe(cls, settings: Settings) -> Probe:
        path = shutil.which("bwrap")
        if path is None:
            return Probe(None, "bwrap: command not found (install bubblewrap)")
        hardened = idmap.hardened(settings)
        if os.geteuid() == 0 and not hardened:
            return Probe(
                None,
                "a root worker runs bwrap jobs as unprivileged host ids of their own, and this "
                f"one cannot (ORVANTA_JOB_UID={settings.job_uid}, or those ids are not mapped "
                "in the worker's user namespace, or it lacks CAP_SETUID/CAP_SETGID/CAP_CHOWN): "
                "a job would be uid 0",
            )
        if hardened:
            idmap.install_helpers(settings)
            problem = idmap.jobs_root_problem(settings)
            if problem:
                return Probe(None, problem)
        owner = idmap.job_owner(settings)
        with tempfile.TemporaryDirectory(prefix="orvanta-bwrap-probe-") as tmp:
            os.chown(tmp, *owner)
            fd = memory_file(records(sandbox_args(settings, tmp, {})))
            try:
                argv = [*launcher(settings, path, owner if hardened else None), "--args", str(fd)]
                # --as-pid-1: no init of bwrap's own, which outlives the outer bwrap as a zombie
                # of the host's PID 1 (jobs keep it: the worker, their subreaper, reaps it)
                argv += ["--as-pid-1", "--", "/bin/sh", "-c", f"echo ok > {INNER_DIR}/probe"]
                ok, output = run_probe(argv, idmap.launcher_env(settings), pass_fds=(fd,))
            finally:
                os.close(fd)
            # proof, not trust: what the job writes belongs to the job's host uid
            made = Path(tmp, "probe")
            made_by = made.stat().st_uid if ok and made.is_file() else None
        if not ok:
            return Probe(None, f"{path} cannot make a sandbox here: {output}")
        if made_by != owner[0]:
            return Probe(None, f"a job under {path} would write files as host uid {made_by}")
        return Probe(path, f"{path}: live probe ok")

    @classmethod
    def describe(cls, settings: Settings, probe: Probe) -> list[tuple[int, str]]:
        state = "available" if probe.ok else "not available"
        return [(INFO, f"bwrap: {state} (not on the page; ORVANTA_BACKEND=bwrap): {probe.detail}")]

    def __init__(self, settings: Settings, caps: HostCapabilities) -> None:
        self.settings = settings
        self.bwrap = tool_path(self.name, caps)

    def own_ids(self) -> bool:
        return True

    def inner_dir(self, job: PreparedJob) -> str:
        return INNER_DIR

    def launch(self, job: PreparedJob, env: dict[str, str]) -> Launch:
        args = records(sandbox_args(self.settings, str(job.job_dir), env))
        script = f"{INNER_DIR}/{job.language.filename}"
        command = job.language.argv(script, self.settings.python_path)
        argv = [*launcher(self.settings, self.bwrap, job.host_ids), "--args", "{fd0}", "--"]
        return Launch([*argv, *command], idmap.launcher_env(self.settings), (args,))
