"""nsjail: filesystem, network, resource and PID isolation from one config per language.

The configs are protobuf text files shipped in `runtime/nsjail/` (R-NSJ-1), with
$-placeholders for what differs per job: the job dir, the limits, whether a
user namespace is made (DISABLE_NUSER, R-NSJ-2) and whether the network is
isolated. The rendered config lives in the job's control dir, outside /job.
"""

from __future__ import annotations

from importlib import resources
from pathlib import Path
from string import Template

from runtime import cgroups
from runtime.backends import PreparedJob
from runtime.settings import Settings
from runtime.startup import HostCapabilities

INNER_DIR = "/job"
JAIL_UID = 1000  # what root outside the jail becomes inside, with a user namespace


def config_template(language: str) -> Template:
    text = resources.files("runtime").joinpath("nsjail", f"{language}.cfg").read_text()
    return Template(text)


def render_config(
    language: str,
    settings: Settings,
    job_dir: Path,
    timeout: float,
    cgroup_parent: str | None = cgroups.PARENT,
    volumes: tuple[tuple[Path, str], ...] = (),
) -> str:
    """The nsjail config for one job; every placeholder must be filled (KeyError otherwise)."""
    limits = settings.limits
    userns = not settings.disable_nuser
    id_maps = (
        f'uidmap {{ inside_id: "{JAIL_UID}" outside_id: "" count: 1 }}\n'
        f'gidmap {{ inside_id: "{JAIL_UID}" outside_id: "" count: 1 }}'
        if userns
        else ""
    )
    return config_template(language).substitute(
        job_dir=str(job_dir),
        time_limit=int(timeout) + 1,
        clone_newnet=_bool(settings.nsjail_network == "isolated"),
        clone_newuser=_bool(userns),
        # without a user namespace, bringing the jail's loopback up needs CAP_NET_ADMIN, which
        # the page's minimal capability set lacks: the jail's network stays isolated, lo down
        iface_no_lo=_bool(not userns),
        id_maps=id_maps,
        cpu_seconds=limits.cpu_seconds,
        file_size_mb=limits.file_size_mb,
        open_files=limits.open_files,
        tmpfs_mb=limits.file_size_mb,
        cgroup_limits=_cgroup_limits(settings, cgroup_parent),
        interpreter_mounts=_interpreter_mounts(settings.python_path),
        # a volume is the one host directory a job may write that outlives it (R-ANN-4)
        volume_mounts="\n".join(
            f'mount {{ src: "{host}" dst: "{INNER_DIR}/{name}" is_bind: true rw: true }}'
            for host, name in volumes
        ),
    )


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
    name = "nsjail"

    def __init__(self, settings: Settings, caps: HostCapabilities) -> None:
        if caps.nsjail.path is None:
            raise RuntimeError(
                f"nsjail backend chosen but nsjail is unusable: {caps.nsjail.detail}"
            )
        self.settings = settings
        self.nsjail = caps.nsjail.path

    def inner_dir(self, job: PreparedJob) -> str:
        return INNER_DIR

    def argv(self, job: PreparedJob) -> list[str]:
        job.control_dir.mkdir(exist_ok=True)
        config = job.control_dir / "nsjail.cfg"
        config.write_text(
            render_config(
                job.language.name,
                self.settings,
                job.job_dir,
                job.timeout,
                job.cgroup_parent,
                job.volumes,
            )
        )
        script = f"{INNER_DIR}/{job.language.filename}"
        command = job.language.argv(script, self.settings.python_path)
        return [self.nsjail, "--config", str(config), "--", *command]
