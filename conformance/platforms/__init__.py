"""Where a worker under test runs: a registry of platforms, one small module each.

A platform starts worker processes with a given environment, lists processes by
a marker (to catch a job's survivors) and reports facts about itself. Jobs reach
the workers through the queue in the cell's state dir, which every platform
shares with the harness.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Protocol

from conformance.canaries import Canaries


class WorkerProcess(Protocol):
    def poll(self) -> int | None: ...
    def terminate(self) -> None: ...
    def kill(self) -> None: ...
    def wait(self, timeout: float | None = None) -> int: ...


class Platform(Protocol):
    name: str

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
        """Start `orvanta worker` with exactly this environment, logging to log_path."""

    def survivors(self, marker: str) -> list[str]:
        """Command lines of live processes whose argv contains marker."""

    def probe_env(self) -> dict[str, str]:
        """Canaries only this platform can plant (a victim cgroup on the host)."""

    def cleanup(self, token: str) -> list[str]:
        """Remove what a probe job with this token may have left (files, IPC, cgroups,
        processes) where the harness can reach it; returns what was removed."""

    def facts(self) -> dict[str, Any]:
        """Kernel, capabilities, seccomp... of the place workers run, for the report."""

    def close(self) -> None: ...


PLATFORMS = {
    "host": "conformance.platforms.host:HostPlatform",
    "docker": "conformance.platforms.docker:DockerPlatform",
}


class UnknownPlatformError(ValueError):
    def __init__(self, name: str) -> None:
        super().__init__(f"unknown platform {name!r}; known: {', '.join(sorted(PLATFORMS))}")


def open_platform(name: str, options: dict[str, Any]) -> Platform:
    """The platform `name` of matrix.yaml; its `driver` (default: the name) picks the code."""
    try:
        target = PLATFORMS[options.get("driver", name)]
    except KeyError:
        raise UnknownPlatformError(options.get("driver", name)) from None
    module_name, _, class_name = target.partition(":")
    module = __import__(module_name, fromlist=[class_name])
    platform: Platform = getattr(module, class_name)({"name": name, **options})
    return platform


def driver_of(name: str, options: dict[str, Any]) -> str:
    return str(options.get("driver", name))


def unavailable(name: str, options: dict[str, Any]) -> str | None:
    """Why cells of this platform cannot run here at all (a skip reason), or None."""
    if driver_of(name, options) == "docker":
        from conformance.platforms.docker import engine_problem

        problem = engine_problem()
        if problem:
            return problem
    if options.get("mode") == "agent":  # the server under test keeps its queue in PostgreSQL
        from conformance.service import postgres_unavailable

        return postgres_unavailable()
    return None


def prepare(drivers: set[str]) -> None:
    """Once per run, on the controller: reap containers that dead sessions left behind."""
    if "docker" in drivers:
        from conformance.platforms.docker import engine_problem, reap

        if engine_problem() is None:
            reap(dead_only=True)


def finish(drivers: set[str]) -> None:
    """After the run, even an interrupted one: none of this session's containers outlives it."""
    if "docker" in drivers:
        from conformance.platforms.docker import engine_problem, reap

        if engine_problem() is None:
            reap(dead_only=False)
