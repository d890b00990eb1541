"""Where a worker under test runs: one driver class per kind, registered in DRIVERS.

A driver class has two levels. The class owns what a whole pytest run needs of its
kind (can it run here, set-up before the first cell, clean-up after the last, even
an interrupted run) and declares its typed `Options`. An instance is one cell's
platform: it starts workers with a given environment, lists processes by a marker
(to catch a job's survivors) and reports facts about itself. Jobs reach the workers
through the queue in the cell's directory, which every platform shares with the
harness (a sandbox with its own file locks through a relay: `queue_database`). Adding a
kind is one module with one class, plus one line in DRIVERS.
"""

from __future__ import annotations

import importlib
from collections.abc import Iterable, Mapping
from dataclasses import fields
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol

from conformance.canaries import Canaries
from conformance.platforms.spec import COMMON, PlatformSpec, SpecError, read, unknown_keys

if TYPE_CHECKING:
    from runtime.database import Database

DRIVERS = {
    "host": "conformance.platforms.host:HostPlatform",
    "docker": "conformance.platforms.docker:DockerPlatform",
    "podman": "conformance.platforms.podman:PodmanPlatform",
    "uml": "conformance.platforms.uml:UmlPlatform",
}


class WorkerProcess(Protocol):
    def poll(self) -> int | None: ...
    def terminate(self) -> None: ...
    def kill(self) -> None: ...
    def wait(self, timeout: float | None = None) -> int: ...


class Platform(Protocol):
    """One cell's platform: what the harness asks of it."""

    spec: PlatformSpec[Any]

    def start(self, root: Path) -> None:
        """Make the place ready; `root` (the cell's dir) must be reachable at the same path."""

    def base_env(self) -> dict[str, str]:
        """The environment a worker starts from, before the cell's settings and canaries."""

    def listen(self, canaries: Canaries) -> int:
        """Open the canary listener in the workers' network namespace; returns its port."""

    def stop_workers(self) -> None:
        """Ask workers that the harness cannot signal directly to stop."""

    def spawn_worker(
        self, env: dict[str, str], log_path: Path, pass_fds: tuple[int, ...]
    ) -> WorkerProcess:
        """Start `orvanta worker` with exactly this environment, logging to log_path. No value
        of `env` may show on any command line: it holds the canary secret."""

    def survivors(self, marker: str) -> list[str]:
        """Command lines of live processes whose argv contains marker."""

    def probe_env(self) -> dict[str, str]:
        """Canaries only this platform can plant (a victim cgroup on the host)."""

    def cleanup(self, token: str) -> list[str]:
        """Remove what a probe job with this token may have left (files, IPC, cgroups,
        processes) where the harness can reach it; returns what was removed."""

    def facts(self) -> dict[str, Any]:
        """Kernel, capabilities, seccomp... of the place workers run, for the report."""

    def queue_database(self, url: str | None, state_dir: Path) -> Database:
        """The cell's queue as the harness reaches it (runtime.database.connect's arguments):
        directly, unless the workers' file locks are not the host's (queue_relay)."""

    def close(self) -> None: ...


class Driver(Protocol):
    """A driver class, as the registry hands it out: the run-level part of a kind."""

    Options: type[Any]  # a frozen dataclass: the keys matrix.yaml may give this kind

    def __call__(self, spec: PlatformSpec[Any]) -> Platform: ...

    def unavailable(self) -> str | None:
        """Why no cell of this kind can run here (a skip reason), or None."""

    def prepare(self) -> None:
        """Once per run, on the controller, before any cell starts."""

    def finish(self) -> None:
        """Once per run, after the last cell, even an interrupted run."""


def driver_class(kind: str) -> Driver:
    module_name, _, class_name = DRIVERS[kind].partition(":")
    driver: Driver = getattr(importlib.import_module(module_name), class_name)
    return driver


def parse_platform(name: str, raw: Mapping[str, Any]) -> PlatformSpec[Any]:
    """One entry of matrix.yaml's `platforms` (without its `overrides`) as a typed spec."""
    where = f"platforms.{name}"
    kind = raw.get("driver", name)
    if not isinstance(kind, str) or kind not in DRIVERS:
        known = ", ".join(sorted(DRIVERS))
        raise SpecError(
            f"{where}.driver",
            f"{kind!r} is not a driver (without `driver:` a platform's name is its driver); "
            f"name one of: {known}",
        )
    options_type = driver_class(kind).Options
    own = [f.name for f in fields(options_type)]
    unknown_keys(raw, ["driver", *COMMON, *own], where, kind)
    options = read(options_type, {k: v for k, v in raw.items() if k in own}, where)
    common = {k: v for k, v in raw.items() if k in COMMON}
    spec: PlatformSpec[Any] = read(
        PlatformSpec, common, where, name=name, driver=kind, options=options
    )
    return spec


def open_platform(spec: PlatformSpec[Any]) -> Platform:
    return driver_class(spec.driver)(spec)


def unavailable(spec: PlatformSpec[Any]) -> str | None:
    """Why cells of this platform cannot run here at all (a skip reason), or None."""
    problem = driver_class(spec.driver).unavailable()
    if problem is None and spec.mode == "agent":  # the server keeps its queue in PostgreSQL
        from conformance.service import postgres_unavailable

        problem = postgres_unavailable()
    return problem


def prepare(kinds: Iterable[str]) -> None:
    """Once per run, on the controller: each kind's set-up (reaping what dead runs left)."""
    for kind in sorted(set(kinds)):
        driver_class(kind).prepare()


def finish(kinds: Iterable[str]) -> None:
    """After the run, even an interrupted one: each kind's clean-up."""
    for kind in sorted(set(kinds)):
        driver_class(kind).finish()
