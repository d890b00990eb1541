"""Isolation backends: one small class each behind the `Backend` protocol.

A backend only turns "run this script" into the argv that runs it isolated and
says where the job directory appears inside; the executor does everything
common to all backends (job dir, environment, fds, timeout, cleanup).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

from runtime.languages import Language
from runtime.settings import Settings
from runtime.startup import HostCapabilities

BACKEND_NAMES = ("none", "unshare", "nsjail")


@dataclass(frozen=True)
class PreparedJob:
    job_id: str
    language: Language
    job_dir: Path  # on the host
    control_dir: Path  # beside job_dir, never visible to the job (configs, logs)
    timeout: float
    cgroup_parent: str | None = "orvanta"  # where nsjail makes its cgroups; None: no cgroups
    # volumes nsjail binds itself, (source, name under /job), where the worker could not
    volumes: tuple[tuple[str, str], ...] = ()
    # the host uid and gid the job's root maps to, its own while it runs (runtime.idmap);
    # None: the worker may not map ids, and the configured flags apply as written
    host_ids: tuple[int, int] | None = None


@dataclass(frozen=True)
class Launch:
    """What the worker spawns: the command and its whole environment. A launcher that runs
    as root outside the sandbox gets the worker's fixed environment, never the job's."""

    argv: list[str]
    env: dict[str, str]


class Backend(Protocol):
    name: str

    def inner_dir(self, job: PreparedJob) -> str:
        """Where the job directory appears to the job itself."""

    def launch(self, job: PreparedJob, env: dict[str, str]) -> Launch:
        """How to run the job's script under this isolation with `env` as the job's own
        environment, applied inside the sandbox."""


class UnknownBackendError(ValueError):
    def __init__(self, name: str) -> None:
        super().__init__(f"unknown isolation backend {name!r}; known: {', '.join(BACKEND_NAMES)}")


def make_backend(name: str, settings: Settings, caps: HostCapabilities) -> Backend:
    if name == "none":
        from runtime.backends.none import NoIsolation

        return NoIsolation(settings)
    if name == "unshare":
        from runtime.backends.unshare import PidNamespace

        return PidNamespace(settings, caps)
    if name == "nsjail":
        from runtime.backends.nsjail import Nsjail

        return Nsjail(settings, caps)
    raise UnknownBackendError(name)
