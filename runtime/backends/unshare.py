"""PID namespace via `unshare <flags> -- [tini -s --] <job>` (R-PID-1, R-PID-2)."""

from __future__ import annotations

from runtime.backends import PreparedJob
from runtime.settings import Settings
from runtime.startup import HostCapabilities


class PidNamespace:
    name = "unshare"

    def __init__(self, settings: Settings, caps: HostCapabilities) -> None:
        if caps.unshare.path is None:
            raise RuntimeError(
                f"unshare backend chosen but unshare is unusable: {caps.unshare.detail}"
            )
        self.settings = settings
        self.unshare = caps.unshare.path
        self.tini = caps.tini.path  # None: run without tini (warned at startup)

    def inner_dir(self, job: PreparedJob) -> str:
        return str(job.job_dir)

    def argv(self, job: PreparedJob) -> list[str]:
        script = f"{self.inner_dir(job)}/{job.language.filename}"
        command = job.language.argv(script, self.settings.python_path)
        init = [self.tini, "-s", "--"] if self.tini else []
        return [self.unshare, *self.settings.unshare_flags, "--", *init, *command]
