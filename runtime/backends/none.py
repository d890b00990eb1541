"""No isolation: the job is a plain child of the worker (the page's "None" column)."""

from __future__ import annotations

from runtime.backends import PreparedJob
from runtime.settings import Settings


class NoIsolation:
    name = "none"

    def __init__(self, settings: Settings) -> None:
        self.settings = settings

    def inner_dir(self, job: PreparedJob) -> str:
        return str(job.job_dir)

    def argv(self, job: PreparedJob) -> list[str]:
        script = f"{self.inner_dir(job)}/{job.language.filename}"
        return job.language.argv(script, self.settings.python_path)
