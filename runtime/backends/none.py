"""No isolation: the job is a plain child of the worker (the page's "None" column)."""

from __future__ import annotations

from typing import ClassVar

from runtime.backends import Launch, PreparedJob
from runtime.capabilities import HostCapabilities, Probe
from runtime.settings import Settings


class NoIsolation:
    name: ClassVar[str] = "none"
    on_the_page: ClassVar[bool] = True
    own_cgroups: ClassVar[bool] = False
    rlimits: ClassVar[bool] = False
    own_mounts: ClassVar[bool] = False
    copies_mounts: ClassVar[bool] = False  # the job sees the worker's own mount table

    @classmethod
    def probe(cls, settings: Settings) -> Probe:
        return Probe("builtin", "always available")

    @classmethod
    def describe(cls, settings: Settings, probe: Probe) -> list[tuple[int, str]]:
        return []  # the isolation line says it, with its warning

    def __init__(self, settings: Settings, caps: HostCapabilities) -> None:
        self.settings = settings

    def own_ids(self) -> bool:
        return False

    def inner_dir(self, job: PreparedJob) -> str:
        return str(job.job_dir)

    def launch(self, job: PreparedJob, env: dict[str, str]) -> Launch:
        """The job itself is what the worker spawns: there is no launcher to protect."""
        script = f"{self.inner_dir(job)}/{job.language.filename}"
        return Launch(job.language.argv(script, self.settings.python_path), env)
