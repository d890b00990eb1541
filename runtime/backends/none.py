"""No isolation: the job is a plain child of the worker (the page's "None" column)."""

from __future__ import annotations

from runtime.backends import Launch, PreparedJob
from runtime.settings import Settings


class NoIsolation:
    name = "none"

    def __init__(self, settings: Settings) -> None:
        self.settings = settings

    def inner_dir(self, job: PreparedJob) -> str:
        return str(job.job_dir)

    def launch(self, job: PreparedJob, env: dict[str, str]) -> Launch:
        """The job itself is what the worker spawns: there is no launcher to protect."""
        script = f"{self.inner_dir(job)}/{job.language.filename}"
        return Launch(job.language.argv(script, self.settings.python_path), env)
