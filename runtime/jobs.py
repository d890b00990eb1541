"""What a job is, as data: what to run, what came of it, and its record in the queue.

Pure data over the standard library: the executor, the queue, the server and the
agent all import it, and the agent must run without FastAPI, psycopg or the
execution stack (R-AGT-1).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import asdict, dataclass, field
from typing import Any

DEFAULT_TAG = "default"
DEFAULT_WORKSPACE = "default"


@dataclass(frozen=True)
class JobSpec:
    id: str
    language: str
    script: str
    env: Mapping[str, str] = field(default_factory=dict)
    timeout: float | None = None
    workspace: str = DEFAULT_WORKSPACE  # whose persistent volumes the job may mount (R-ANN-4)
    # the instance's job_isolation as the claim read it, in the same statement (R-SEL-7): the
    # worker asks the queue again only where the claim could not say (an older server)
    job_isolation: str | None = None
    job_isolation_read: bool = False


@dataclass
class JobResult:
    job_id: str
    isolation: str
    status: str  # success | failure | timeout | error | canceled
    exit_code: int | None
    duration: float
    stdout: str
    stderr: str
    log: list[str]

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass(frozen=True)
class QueuedJob:
    id: str
    status: str  # queued | running | done
    attempts: int
    result: JobResult | None
    tag: str = DEFAULT_TAG
    workspace: str = DEFAULT_WORKSPACE
    worker: str | None = None
    worker_group: str | None = None
    created: float = 0.0
    finished: float | None = None
