"""Worker settings, read once from the environment and validated (R-CFG-1..7).

A bad value stops the worker before it runs anything: the error names the
variable, the value it got and the values it accepts, because a worker that
silently falls back to "no isolation" is the failure this project exists to
catch.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path

DEFAULT_UNSHARE_FLAGS = ("--user", "--map-root-user", "--pid", "--fork", "--mount-proc")
JOB_ISOLATION_VALUES = ("none", "nsjail_sandboxing")
NSJAIL_NETWORK_VALUES = ("isolated", "shared")
MODE_VALUES = ("worker", "agent")
DEFAULT_JOB_RETENTION = 30 * 86400.0  # seconds a finished job stays readable
_TRUE = ("true", "1", "yes")
_FALSE = ("false", "0", "no")


class SettingsError(ValueError):
    """A worker variable holds a value the worker cannot run with."""

    def __init__(self, variable: str, value: str, accepted: str, hint: str = "") -> None:
        self.variable = variable
        self.value = value
        message = f"{variable}={value!r} is not valid; accepted values: {accepted}."
        if hint:
            message += f" {hint}"
        super().__init__(message)


@dataclass(frozen=True)
class JobLimits:
    """Per-job resource limits that nsjail enforces (R-TBL-RES)."""

    memory_mb: int = 512
    pids: int = 128
    cpu_seconds: int = 60
    file_size_mb: int = 64
    open_files: int = 256
    disk_mb: int = 256  # what one job may put on the host's disk (R-DISK-1)


@dataclass(frozen=True)
class Settings:
    enable_unshare_pid: bool = False
    unshare_flags: tuple[str, ...] = DEFAULT_UNSHARE_FLAGS
    tini_path: str = "tini"
    disable_nsjail: bool = True
    disable_nuser: bool = False
    nsjail_path: str | None = None
    job_isolation: str | None = None
    nsjail_network: str = "isolated"
    python_path: str = "/usr/bin/python3"
    state_dir: Path = Path("/var/lib/orvanta")
    jobs_dir: Path | None = None  # None: beside the state dir, `<state dir>-jobs`
    jobs_tmpfs: bool = True  # a serving root worker's jobs root on a tmpfs of its own
    # the host uid/gid a job's root becomes under unshare and nsjail when the worker is root;
    # 0 keeps the page's literal recipes (the job's root is the host's root), for comparison
    job_uid: int = 1_900_000_000
    job_gid: int = 1_900_000_000
    # how many consecutive ids from job_uid/job_gid jobs take: one pair per running job, so
    # no two jobs on the host share a uid (a concurrent job's dir stays closed to the other)
    job_id_count: int = 65_536
    job_timeout: float = 300.0
    output_limit: int = 1 << 20
    lease_seconds: float = 30.0
    job_retention: float = DEFAULT_JOB_RETENTION
    limits: JobLimits = field(default_factory=JobLimits)
    backend: str | None = None  # ORVANTA_BACKEND: one backend for every job, past the hierarchy
    mode: str = "worker"  # worker: the queue database; agent: the server's API only (R-AGT-1)
    database_url: str | None = field(default=None, repr=False)
    server_url: str | None = None
    agent_token: str | None = field(default=None, repr=False)
    worker_tags: tuple[str, ...] = ("default",)

    @property
    def job_root(self) -> Path:
        """Where job directories live: outside the 0700 state dir, which jobs cannot enter."""
        return self.jobs_dir or self.state_dir.with_name(self.state_dir.name + "-jobs")

    @property
    def force_nsjail(self) -> bool:
        """The instance setting job_isolation=nsjail_sandboxing (R-CFG-6)."""
        return self.job_isolation == "nsjail_sandboxing"

    @classmethod
    def from_env(cls, env: Mapping[str, str] | None = None) -> Settings:
        env = os.environ if env is None else env
        flags_raw = env.get("UNSHARE_ISOLATION_FLAGS")
        flags = tuple(flags_raw.split()) if flags_raw is not None else DEFAULT_UNSHARE_FLAGS
        enable_unshare = _bool(env, "ENABLE_UNSHARE_PID", False)
        if enable_unshare:
            validate_unshare_flags(flags, flags_raw or "")
        job_isolation = env.get("JOB_ISOLATION") or None
        if job_isolation is not None and job_isolation not in JOB_ISOLATION_VALUES:
            raise SettingsError(
                "JOB_ISOLATION",
                job_isolation,
                ", ".join(JOB_ISOLATION_VALUES),
                "It is the job_isolation instance setting; leave it unset for the default.",
            )
        python = env.get("ORVANTA_PYTHON") or "/usr/bin/python3"
        if not python.startswith("/"):
            raise SettingsError(
                "ORVANTA_PYTHON",
                python,
                "an absolute path to a python3 interpreter",
                "Jobs run with it inside their own root: a relative name means nothing there.",
            )
        network = env.get("ORVANTA_NSJAIL_NETWORK", "isolated")
        if network not in NSJAIL_NETWORK_VALUES:
            raise SettingsError("ORVANTA_NSJAIL_NETWORK", network, ", ".join(NSJAIL_NETWORK_VALUES))
        limits = JobLimits(
            memory_mb=positive_int(env, "ORVANTA_JOB_MEMORY_MB", JobLimits.memory_mb),
            pids=positive_int(env, "ORVANTA_JOB_PIDS", JobLimits.pids),
            cpu_seconds=positive_int(env, "ORVANTA_JOB_CPU_SECONDS", JobLimits.cpu_seconds),
            file_size_mb=positive_int(env, "ORVANTA_JOB_FILE_SIZE_MB", JobLimits.file_size_mb),
            disk_mb=positive_int(env, "ORVANTA_JOB_DISK_MB", JobLimits.disk_mb),
        )
        job_uid = _id(env, "ORVANTA_JOB_UID", Settings.job_uid)
        job_gid = _id(
            env, "ORVANTA_JOB_GID", job_uid if "ORVANTA_JOB_UID" in env else Settings.job_gid
        )
        job_id_count = positive_int(env, "ORVANTA_JOB_ID_COUNT", Settings.job_id_count)
        for name, base in (("ORVANTA_JOB_UID", job_uid), ("ORVANTA_JOB_GID", job_gid)):
            if base and base + job_id_count > 2**31 - 1:
                raise SettingsError(
                    "ORVANTA_JOB_ID_COUNT",
                    str(job_id_count),
                    f"a count with {name}={base} + count below 2147483647",
                    "Each running job takes its own id from that range; lower the base id "
                    "or the count.",
                )
        jobs_dir = env.get("ORVANTA_JOBS_DIR") or None
        backend = env.get("ORVANTA_BACKEND") or None
        if backend is not None:
            from runtime.backends import BACKEND_NAMES

            if backend not in BACKEND_NAMES:
                raise SettingsError(
                    "ORVANTA_BACKEND",
                    backend,
                    ", ".join(BACKEND_NAMES),
                    "Unset it to keep the page's hierarchy (nsjail, then the PID namespace, "
                    "then none).",
                )
        mode = env.get("MODE") or "worker"
        if mode not in MODE_VALUES:
            raise SettingsError("MODE", mode, ", ".join(MODE_VALUES))
        database_url = env.get("DATABASE_URL") or None
        server_url = env.get("ORVANTA_SERVER_URL") or None
        agent_token = env.get("ORVANTA_AGENT_TOKEN") or None
        if mode == "agent":
            _check_agent(database_url, server_url, agent_token)
        tags = tuple(t for t in (env.get("WORKER_TAGS") or "default").replace(",", " ").split())
        return cls(
            mode=mode,
            database_url=database_url,
            server_url=server_url,
            agent_token=agent_token,
            worker_tags=tags,
            enable_unshare_pid=enable_unshare,
            unshare_flags=flags,
            tini_path=env.get("UNSHARE_TINI_PATH") or "tini",
            disable_nsjail=_bool(env, "DISABLE_NSJAIL", True),
            disable_nuser=_bool(env, "DISABLE_NUSER", False),
            nsjail_path=env.get("NSJAIL_PATH") or None,
            job_isolation=job_isolation,
            nsjail_network=network,
            python_path=python,
            state_dir=Path(env.get("ORVANTA_STATE_DIR") or "/var/lib/orvanta"),
            jobs_dir=Path(jobs_dir) if jobs_dir else None,
            jobs_tmpfs=_bool(env, "ORVANTA_JOBS_TMPFS", True),
            job_uid=job_uid,
            job_gid=job_gid,
            job_id_count=job_id_count,
            backend=backend,
            job_timeout=float(positive_int(env, "ORVANTA_JOB_TIMEOUT", 300)),
            output_limit=positive_int(env, "ORVANTA_OUTPUT_LIMIT", 1 << 20),
            lease_seconds=float(positive_int(env, "ORVANTA_LEASE_SECONDS", 30)),
            job_retention=job_retention(env),
            limits=limits,
        )


def job_retention(env: Mapping[str, str]) -> float:
    """ORVANTA_JOB_RETENTION_SECONDS: how long a finished job (result, log) is kept."""
    return float(
        positive_int(env, "ORVANTA_JOB_RETENTION_SECONDS", int(DEFAULT_JOB_RETENTION), "seconds")
    )


def _check_agent(database_url: str | None, server_url: str | None, token: str | None) -> None:
    """An agent holds no database credentials and reaches the queue only through the API."""
    if database_url:
        raise SettingsError(
            "DATABASE_URL",
            "***",
            "unset when MODE=agent",
            "An agent worker must hold no database credentials (R-AGT-1): remove DATABASE_URL "
            "and give ORVANTA_SERVER_URL and ORVANTA_AGENT_TOKEN instead.",
        )
    if not server_url or not server_url.startswith(("http://", "https://", "unix:///")):
        raise SettingsError(
            "ORVANTA_SERVER_URL",
            server_url or "",
            "the server's base URL: http://HOST:PORT, https://... or unix:///PATH/TO/SOCKET",
            "MODE=agent pulls jobs only through the server's API.",
        )
    if not token:
        raise SettingsError(
            "ORVANTA_AGENT_TOKEN",
            "",
            "the worker group's token (orvanta groups create NAME --tags ...)",
            "MODE=agent authenticates with its group's token.",
        )


def validate_unshare_flags(flags: tuple[str, ...], raw: str) -> None:
    """Refuse flag sets the page calls broken before unshare is ever run (R-PID-1)."""
    if not flags:
        raise SettingsError(
            "UNSHARE_ISOLATION_FLAGS",
            raw,
            "a whitespace-separated list of unshare flags",
            f"Default: {' '.join(DEFAULT_UNSHARE_FLAGS)}",
        )
    if "--pid" in flags and "--fork" not in flags:
        raise SettingsError(
            "UNSHARE_ISOLATION_FLAGS",
            raw,
            "flags that include --fork whenever --pid is given",
            "Add --fork: without it the job is not PID 1 of the new namespace.",
        )


def _bool(env: Mapping[str, str], name: str, default: bool) -> bool:
    raw = env.get(name)
    if raw is None or raw == "":
        return default
    value = raw.strip().lower()
    if value in _TRUE:
        return True
    if value in _FALSE:
        return False
    raise SettingsError(name, raw, "true or false (also 1/0, yes/no)")


def positive_int(env: Mapping[str, str], name: str, default: int, unit: str = "") -> int:
    """A positive integer variable; `unit` names what it counts in the error."""
    raw = env.get(name)
    if raw is None or raw == "":
        return default
    try:
        value = int(raw)
    except ValueError:
        value = -1
    if value <= 0:
        raise SettingsError(name, raw, f"a positive integer{f' ({unit})' if unit else ''}")
    return value


def _id(env: Mapping[str, str], name: str, default: int) -> int:
    """A host uid or gid: 0 (the page's literal recipe) or an unprivileged id below 2^31."""
    raw = env.get(name)
    if raw is None or raw == "":
        return default
    value = int(raw) if raw.isdigit() else -1
    if not 0 <= value < 2**31 - 1 or 0 < value < 1000:
        raise SettingsError(
            name,
            raw,
            "0, or a numeric id from 1000 to 2147483646 that no user or service of this host uses",
            "Jobs under unshare and nsjail own their files as this id on the host; 0 keeps "
            "the page's literal recipe, where the job's root is the host's root.",
        )
    return value
