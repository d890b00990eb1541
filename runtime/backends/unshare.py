"""PID namespace via `unshare <flags> -- env -i <job vars> [tini -s --] <job>` (R-PID-1, R-PID-2).

unshare runs as root outside any sandbox, with the worker's fixed launcher
environment. The job's own variables are applied by `env -i` as the first step
inside the namespace, after the uid map and `--setuid`: from there on, env,
tini and the job run as the job's own uid, so a variable that makes them load
code (LD_PRELOAD) runs it with no privilege the job lacks (issue: LD_PRELOAD
into the launchers). `env` execs tini at once, so the values stay in no
long-lived command line. With a root worker the flags are hardened
(`runtime.idmap`): the job's root maps to ORVANTA_JOB_UID, not the host's root.
"""

from __future__ import annotations

import functools
import re
import subprocess

from runtime import idmap
from runtime.backends import Launch, PreparedJob
from runtime.settings import Settings
from runtime.startup import HostCapabilities

ENV = "/usr/bin/env"
_CLUSTER = re.compile(r"^-[mUuinpCTfrc]{2,}$")  # short flags that take no value, e.g. -Urpf
_USERNS = {"-U", "--user", "-r", "--map-root-user", "-c", "--map-current-user", "--map-auto"}
_MAP_WITH_VALUE = ("--map-user", "--map-group", "--map-users", "--map-groups")


def hardened_flags(flags: tuple[str, ...], uid: int, gid: int, colon_maps: bool) -> list[str]:
    """The configured flags with every id mapping replaced: the job's root becomes uid:gid.

    Without a user namespace in the flags the job runs as uid:gid directly.
    """
    expanded: list[str] = []
    for flag in flags:
        expanded += [f"-{c}" for c in flag[1:]] if _CLUSTER.match(flag) else [flag]
    kept: list[str] = []
    userns = False
    skip_value = False
    for flag in expanded:
        if skip_value:
            skip_value = False
            continue
        if flag in _USERNS:
            userns = True
            continue
        if flag in _MAP_WITH_VALUE:
            userns, skip_value = True, True
            continue
        if flag.startswith(tuple(f"{m}=" for m in _MAP_WITH_VALUE)):
            userns = True
            continue
        kept.append(flag)
    if not userns:
        return [*kept, f"--setuid={uid}", f"--setgid={gid}"]
    users = f"0:{uid}:1" if colon_maps else f"{uid},0,1"
    groups = f"0:{gid}:1" if colon_maps else f"{gid},0,1"
    return [
        "--user",
        f"--map-users={users}",
        f"--map-groups={groups}",
        "--setuid=0",
        "--setgid=0",
        *kept,
    ]


@functools.cache
def colon_id_maps(unshare: str) -> bool:
    """util-linux 2.39 reads --map-users as inner:outer:count; 2.38 as outer,inner,count."""
    try:
        text = subprocess.run(
            [unshare, "--help"], capture_output=True, text=True, timeout=10, check=False
        ).stdout
    except (OSError, subprocess.TimeoutExpired):
        return False
    return "<outeruid>,<inneruid>" not in text


def launch_flags(settings: Settings, unshare: str) -> list[str]:
    """The flags unshare really gets: as configured, or hardened for a root worker."""
    if not idmap.hardened(settings):
        return list(settings.unshare_flags)
    return hardened_flags(
        settings.unshare_flags, settings.job_uid, settings.job_gid, colon_id_maps(unshare)
    )


class PidNamespace:
    name = "unshare"

    def __init__(self, settings: Settings, caps: HostCapabilities) -> None:
        if caps.unshare.path is None:
            raise RuntimeError(
                f"unshare backend chosen but unshare is unusable: {caps.unshare.detail}"
            )
        self.settings = settings
        self.unshare = caps.unshare.path
        self.tini = caps.tini.path  # None: run without tini (warned at startup)
        self.flags = launch_flags(settings, self.unshare)

    def inner_dir(self, job: PreparedJob) -> str:
        return str(job.job_dir)

    def launch(self, job: PreparedJob, env: dict[str, str]) -> Launch:
        script = f"{self.inner_dir(job)}/{job.language.filename}"
        command = job.language.argv(script, self.settings.python_path)
        init = [self.tini, "-s", "--"] if self.tini else []
        assignments = [f"{k}={v}" for k, v in env.items()]
        argv = [self.unshare, *self.flags, "--", ENV, "-i", *assignments, *init, *command]
        return Launch(argv, idmap.launcher_env(self.settings))
