"""PID namespace: `unshare <flags> -- [setpriv <drop all> --] dash -s -- [tini -s --] <job>`.

R-PID-1, 2.

unshare runs as root outside any sandbox, with the worker's fixed launcher
environment. The job's own variables never appear on a command line: `unshare
--fork` stays alive as the job's parent for the whole job, and its argv is
readable by every user of the host (`ps`). They are in an anonymous memory file
of the worker's (a memfd: no path, only root reaches it), the launcher's stdin.
The first step inside the namespace, after the uid map and `--setuid`, reads it
and makes the
variables the whole environment, then execs tini: dash, reading it on its stdin
as a script of `export NAME='value'` lines (every value single-quoted, so none is
ever parsed) that ends `exec "$@" </dev/null`. Where dash is missing, or a name
is one dash refuses as a plain variable (OPTIND), a few lines of Perl (perl-base
is in every Debian) read the same variables NUL-separated from an fd; dash starts
about 2 ms sooner. From there on, the reader, tini and the job run as the job's
own uid, so a variable that makes them load code (LD_PRELOAD) runs it with no
privilege the job lacks. Every step execs, so tini is still PID 1. With a root
worker the flags are hardened (`runtime.idmap`): the job's root maps to
ORVANTA_JOB_UID, not the host's root.

In a user namespace the job is root of it, and its namespace owns the job's mount
namespace: with those capabilities it could unmount the /proc that `--mount-proc`
mounted and see the host's /proc beneath it, every process on the host (R-TBL-PROC),
besides every other privilege a namespace's root has. So setpriv, still with the
launcher's environment, empties the bounding set and the inheritable and ambient sets
before anything of the job's runs: from the next exec on, the job's root has no
capability, and no exec gives one back. A user namespace the job makes itself copies
the mounts locked: /proc cannot be unmounted there either.
"""

from __future__ import annotations

import functools
import os
import shutil
import subprocess
from typing import ClassVar

from runtime import idmap
from runtime.backends import (
    INFO,
    Launch,
    PreparedJob,
    memory_file,
    records,
    tool_path,
)
from runtime.capabilities import HostCapabilities, Probe, host_euid, run_probe
from runtime.settings import Settings

DASH = "/bin/dash"
DASH_REFUSES = frozenset({"OPTIND"})  # dash checks these on assignment (OPTIND: a number)
PERL = "/usr/bin/perl"
SETPRIV = "/usr/bin/setpriv"
DROP_CAPS = ("--bounding-set=-all", "--inh-caps=-all", "--ambient-caps=-all")
# argv: FD, then the command. Reads NAME=VALUE records from FD, which it closes; exact for
# any value (no shell reads it); the environment is then exactly those variables.
APPLY_ENV = (
    'open(my $f, "<&=", shift) or die "orvanta: job environment: $!\\n"; local $/ = "\\0"; '
    "%ENV = (); while (my $kv = <$f>) { chop $kv; my ($k, $v) = split /=/, $kv, 2; "
    "$ENV{$k} = $v } close $f; "
    'exec { $ARGV[0] } @ARGV or die "orvanta: cannot run $ARGV[0]: $!\\n"'
)

# util-linux unshare's options (2.38, 2.39): long name -> takes a value ("no", "opt", "req").
# getopt_long also takes any unambiguous prefix of a long name (`--map-root`), and short
# options clustered, with a value glued on (`-rw/`): every spelling must be read as unshare
# reads it, or a mapping to the host's root slips through the rewrite below.
LONG_OPTIONS = {
    "mount": "opt", "uts": "opt", "ipc": "opt", "net": "opt", "pid": "opt", "user": "opt",
    "cgroup": "opt", "time": "opt", "fork": "no", "kill-child": "opt", "mount-proc": "opt",
    "map-user": "req", "map-group": "req", "map-root-user": "no", "map-current-user": "no",
    "map-auto": "no", "map-users": "req", "map-groups": "req", "propagation": "req",
    "setgroups": "req", "keep-caps": "no", "root": "req", "wd": "req", "setuid": "req",
    "setgid": "req", "monotonic": "req", "boottime": "req", "help": "no", "version": "no",
}  # fmt: skip
SHORT_OPTIONS = {
    "m": "mount", "u": "uts", "i": "ipc", "n": "net", "p": "pid", "U": "user", "C": "cgroup",
    "T": "time", "f": "fork", "r": "map-root-user", "c": "map-current-user", "R": "root",
    "w": "wd", "S": "setuid", "G": "setgid", "h": "help", "V": "version",
}  # fmt: skip
_ID_OPTIONS = {
    "map-user", "map-group", "map-root-user", "map-current-user", "map-auto", "map-users",
    "map-groups", "setuid", "setgid",
}  # fmt: skip


class UnshareFlagError(ValueError):
    """A flag the worker cannot read the way unshare would; it refuses rather than guess."""


def parse_flags(flags: tuple[str, ...]) -> list[tuple[str, str | None]]:
    """(long name, value) for each option, exactly as unshare's getopt_long reads them."""
    parsed: list[tuple[str, str | None]] = []
    pending: list[str] = list(flags)
    while pending:
        flag = pending.pop(0)
        if flag.startswith("--"):
            name, eq, value = flag[2:].partition("=")
            matches = [n for n in LONG_OPTIONS if n == name] or [
                n for n in LONG_OPTIONS if n.startswith(name)
            ]
            if not name or len(matches) != 1:
                raise UnshareFlagError(f"unshare flag {flag!r} is unknown or ambiguous")
            full = matches[0]
            kind = LONG_OPTIONS[full]
            if kind == "no" and eq:
                raise UnshareFlagError(f"unshare flag {flag!r} takes no value")
            if kind == "req" and not eq:
                if not pending:
                    raise UnshareFlagError(f"unshare flag {flag!r} needs a value")
                value, eq = pending.pop(0), "="
            parsed.append((full, value if eq else None))
        elif flag.startswith("-") and len(flag) > 1:
            letters = flag[1:]
            while letters:
                letter, letters = letters[0], letters[1:]
                if letter not in SHORT_OPTIONS:
                    raise UnshareFlagError(f"unshare flag {flag!r}: unknown option -{letter}")
                full = SHORT_OPTIONS[letter]
                if LONG_OPTIONS[full] == "req":
                    if not letters and not pending:
                        raise UnshareFlagError(f"unshare flag {flag!r} needs a value")
                    parsed.append((full, letters or pending.pop(0)))
                    letters = ""
                else:
                    parsed.append((full, None))
        else:
            raise UnshareFlagError(
                f"unshare flag {flag!r} is no option: unshare would run it as the program"
            )
    return parsed


def makes_user_namespace(flags: list[str] | tuple[str, ...]) -> bool:
    """The flags give the job a user namespace of its own (`--user`, or an id mapping,
    which implies one): its root there has capabilities to drop (`drop_caps`)."""
    return any(name == "user" or name.startswith("map-") for name, _ in _parsed(tuple(flags)))


def drop_caps(flags: list[str] | tuple[str, ...]) -> list[str]:
    """What runs first inside the namespace: setpriv dropping every capability, where the
    job has a user namespace of its own. Nothing otherwise: without one, the hardened flags
    make the job a plain host uid with no capability (the page's literal recipe with
    ORVANTA_JOB_UID=0 and no --user keeps the host's root, which the audit reports)."""
    return [SETPRIV, *DROP_CAPS, "--"] if makes_user_namespace(flags) else []


@functools.lru_cache(maxsize=16)
def _parsed(flags: tuple[str, ...]) -> tuple[tuple[str, str | None], ...]:
    """parse_flags once per configured flags, not once per job."""
    return tuple(parse_flags(flags))


def hardened_flags(flags: tuple[str, ...], uid: int, gid: int, colon_maps: bool) -> list[str]:
    """The configured flags with every id mapping replaced: the job's root becomes uid:gid.

    Without a user namespace in the flags the job runs as uid:gid directly. The flags come
    back in unshare's long spelling.
    """
    userns = False
    kept: list[str] = []
    for name, value in _parsed(flags):
        if name in _ID_OPTIONS:
            userns = userns or name not in ("setuid", "setgid")
            continue
        if name == "user":
            userns = True
            if value is None:
                continue
        kept.append(f"--{name}" if value is None else f"--{name}={value}")
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
    name: ClassVar[str] = "unshare"
    on_the_page: ClassVar[bool] = True
    own_cgroups: ClassVar[bool] = False
    rlimits: ClassVar[bool] = False
    own_mounts: ClassVar[bool] = False  # its jobs reach the job dir by its host path
    copies_mounts: ClassVar[bool] = True  # --mount-proc: a mount namespace

    @classmethod
    def probe(cls, settings: Settings) -> Probe:
        return probe_unshare(settings)

    @classmethod
    def describe(cls, settings: Settings, probe: Probe) -> list[tuple[int, str]]:
        if probe.ok:
            return [(INFO, f"unshare: works: {probe.detail}")]
        flags = " ".join(settings.unshare_flags)
        return [(INFO, f"unshare: does not work with flags {flags}: {probe.detail}")]

    def __init__(self, settings: Settings, caps: HostCapabilities) -> None:
        self.settings = settings
        self.unshare = tool_path(self.name, caps)
        self.tini = caps.tini.path  # None: run without tini (warned at startup)
        self.colon_maps = idmap.hardened(settings) and colon_id_maps(self.unshare)
        # whether the job's root has capabilities to drop depends on the flags' names alone,
        # not on the ids a job maps: asked once, not parsed again for every job's flags
        configured = settings.unshare_flags
        self._drop = {
            False: drop_caps(configured),
            True: drop_caps(hardened_flags(configured, 0, 0, self.colon_maps)),
        }

    def own_ids(self) -> bool:
        return True

    def flags(self, job: PreparedJob) -> list[str]:
        """The configured flags, with the job's root mapped to its own host ids if it has any."""
        if job.host_ids is None:
            return list(self.settings.unshare_flags)
        return hardened_flags(self.settings.unshare_flags, *job.host_ids, self.colon_maps)

    def inner_dir(self, job: PreparedJob) -> str:
        return str(job.job_dir)

    def launch(self, job: PreparedJob, env: dict[str, str]) -> Launch:
        script = f"{self.inner_dir(job)}/{job.language.filename}"
        command = job.language.argv(script, self.settings.python_path)
        init = [self.tini, "-s", "--"] if self.tini else []
        launcher_env = idmap.launcher_env(self.settings)
        flags = self.flags(job)
        unshare = [self.unshare, *flags, "--", *self._drop[job.host_ids is not None]]
        if _has_dash() and not env.keys() & DASH_REFUSES:
            argv = [*unshare, DASH, "-s", "--", *init, *command]
            return Launch(argv, launcher_env, stdin=env_script(env, launcher_env).encode())
        argv = [*unshare, PERL, "-e", APPLY_ENV, "{fd0}", *init, *command]
        return Launch(argv, launcher_env, (records([f"{k}={v}" for k, v in env.items()]),))


def env_script(env: dict[str, str], launcher_env: dict[str, str]) -> str:
    """What dash reads on its stdin: the launcher's variables (and the PWD dash adds) out,
    the job's in, then the job, with /dev/null as its stdin. Names are variable names
    (runtime.executor drops any other); a value is single-quoted, where nothing is special
    but the quote itself, written as '\\''."""
    lines = ["unset " + " ".join(sorted({*launcher_env, "PWD", "OLDPWD"}))]
    for name, value in env.items():
        if not (name.isascii() and name.isidentifier()) or "\0" in value:
            raise ValueError(f"job variable {name!r}: not a variable name, or a NUL in its value")
        lines.append(f"export {name}='" + value.replace("'", "'\\''") + "'")
    lines.append('exec "$@" </dev/null')
    return "\n".join(lines) + "\n"


@functools.cache
def _has_dash() -> bool:
    return os.access(DASH, os.X_OK)


def probe_unshare(settings: Settings) -> Probe:
    """unshare with the flags jobs get: as configured, or hardened for a root worker."""
    path = shutil.which("unshare")
    if path is None:
        return Probe(None, "unshare: command not found (install util-linux)")
    # The flags as configured first: their failure is the one the page's message speaks of,
    # and util-linux's --map-users leaves its id-map child waiting when unshare itself fails.
    ok, output = run_probe([path, *settings.unshare_flags, "--", "/bin/true"])
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
        problem = idmap.jobs_root_problem(settings)
        if problem:
            return Probe(None, problem)
        # Proof, not trust: the job's effective uid on the host must be ORVANTA_JOB_UID.
        show = [path, *flags, "--", "/bin/cat", "/proc/self/uid_map", "/proc/self/status"]
        ok, output = run_probe(show, idmap.launcher_env(settings), want_stdout=True)
        host_uid = host_euid(output) if ok else None
        if host_uid != settings.job_uid:
            why = output if not ok else f"the job would run as host uid {host_uid}"
            return Probe(
                None,
                f"{why or 'unshare exited non-zero without a message'} (with the job's root "
                f"mapped to host uid {settings.job_uid}: {' '.join(flags)})",
            )
    try:
        problem = apply_env_problem(path, flags, settings) or caps_problem(path, flags, settings)
    except ValueError as exc:  # a flag the worker cannot read as unshare would
        return Probe(None, f"{exc}; write each flag out in full (e.g. --map-root-user)")
    if problem:
        return Probe(None, problem)
    return Probe(path, f"{path} with flags {' '.join(settings.unshare_flags)}: ok")


def caps_problem(unshare: str, flags: list[str], settings: Settings) -> str | None:
    """Proof, not trust: where the job has a user namespace, it runs with no capability
    (none effective or permitted; as root inside, none in its bounding set either)."""
    drop = drop_caps(flags)
    if not drop:
        return None
    if not os.access(SETPRIV, os.X_OK):
        return (
            f"{SETPRIV} not found: it drops the capabilities of the job's root in its user "
            "namespace (apt util-linux)"
        )
    argv = [unshare, *flags, "--", *drop, "/bin/cat", "/proc/self/status"]
    ok, output = run_probe(argv, idmap.launcher_env(settings), want_stdout=True)
    status = dict(line.split(":", 1) for line in output.splitlines() if ":" in line)
    # the bounding set is what an exec gives root back; a job that is not root inside (a
    # mapping to another uid) gets nothing from it, and may not empty it either
    root = status.get("Uid", "x x").split()[1] == "0"
    checked = ("CapEff", "CapPrm", "CapBnd") if root else ("CapEff", "CapPrm")
    held = {k: status[k].strip() for k in checked if k in status and int(status[k], 16)}
    if ok and all(k in status for k in checked) and not held:
        return None
    why = output.strip() if not ok else f"the job would keep capabilities {held}"
    return f"the job's capabilities are not dropped in its user namespace: {why or 'no output'}"


def apply_env_problem(unshare: str, flags: list[str], settings: Settings) -> str | None:
    """Jobs' variables reach them through APPLY_ENV inside the namespace: try it as jobs will."""
    if not os.access(PERL, os.X_OK):
        return f"{PERL} not found: it applies the job's variables in the namespace (apt perl-base)"
    fd = memory_file(records(["ORVANTA_PROBE=ok"]))
    try:
        argv = [unshare, *flags, "--", PERL, "-e", APPLY_ENV, str(fd), "/usr/bin/env"]
        ok, output = run_probe(argv, idmap.launcher_env(settings), True, (fd,))
    finally:
        os.close(fd)
    if ok and output.strip() == "ORVANTA_PROBE=ok":
        return None
    return f"the job's variables do not reach it through {PERL} ({output or 'no output'})"
