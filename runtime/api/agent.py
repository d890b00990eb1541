"""The agent workers' routes (/api/agent/*, a worker group's token): their group's jobs only.

Every route takes the caller's group (runtime.api.deps.agent_group); for a job
the group does not hold, every answer is "not found" or "not held" (R-AGT-2).
Workers are named within their group (`group/worker`), so two groups' workers
never share a lease.
"""

# No `from __future__ import annotations`: FastAPI reads the routes' annotations at runtime.
import logging

from fastapi import APIRouter

from runtime.api.deps import UNAUTHORIZED, AgentGroup, Claims, Instance, Limits, Workers
from runtime.api.limits import cap_output
from runtime.api.models import (
    AgentClaim,
    AgentClaimed,
    AgentHeartbeat,
    AgentJob,
    AgentResult,
    AgentWorker,
    GroupOut,
    JobId,
    PathName,
)
from runtime.jobs import JobResult
from runtime.store.errors import JobNotFound, NotFound
from runtime.store.groups import WorkerGroup

log = logging.getLogger("orvanta.server")

router = APIRouter(prefix="/api/agent", responses=UNAUTHORIZED)


def qualified(group: WorkerGroup, worker: str) -> str:
    return f"{group.name}/{worker}"


@router.get("/whoami")
def whoami(group: AgentGroup) -> GroupOut:
    return GroupOut(name=group.name, tags=list(group.tags))


@router.post("/heartbeat")
def agent_heartbeat(body: AgentWorker, group: AgentGroup, workers: Workers) -> dict[str, bool]:
    workers.heartbeat(qualified(group, body.worker), "agent", group.tags, group.name)
    return {"ok": True}


@router.post("/claim")
def agent_claim(body: AgentClaim, group: AgentGroup, claims: Claims) -> AgentClaimed:
    spec = claims.claim(qualified(group, body.worker), body.lease, group.tags, group.name)
    if spec is None:
        return AgentClaimed(job=None)
    return AgentClaimed(
        job=AgentJob(
            id=spec.id,
            language=spec.language,
            script=spec.script,
            env=dict(spec.env),
            timeout=spec.timeout,
            workspace=spec.workspace,
            job_isolation=spec.job_isolation,
        )
    )


@router.post("/jobs/{job_id}/heartbeat")
def agent_job_heartbeat(
    job_id: JobId, body: AgentHeartbeat, group: AgentGroup, claims: Claims
) -> dict[str, bool]:
    held = claims.renew(job_id, qualified(group, body.worker), body.lease)
    return {"held": held, "cancel": held and claims.cancel_requested(job_id)}


@router.post("/jobs/{job_id}/release")
def agent_release(
    job_id: JobId, body: AgentWorker, group: AgentGroup, claims: Claims
) -> dict[str, bool]:
    """A job the agent claimed ahead and will not run (it is stopping): queued again."""
    return {"released": claims.release(job_id, qualified(group, body.worker))}


@router.get("/jobs/{job_id}/cancel", responses={404: {}})
def agent_cancel(job_id: JobId, group: AgentGroup, claims: Claims) -> dict[str, bool]:
    if not claims.held_by_group(job_id, group.name):
        raise JobNotFound(job_id, f" held by worker group {group.name!r}")
    return {"cancel": claims.cancel_requested(job_id)}


@router.post("/jobs/{job_id}/result")
def agent_result(
    job_id: JobId, body: AgentResult, group: AgentGroup, claims: Claims, limits: Limits
) -> dict[str, bool]:
    result = JobResult(job_id=job_id, **body.result.model_dump())
    for stream in ("stdout", "stderr"):  # capped like a worker's own output (R-API-2)
        text, dropped = cap_output(getattr(result, stream), limits.output_limit)
        if dropped:
            setattr(result, stream, text)
            note = (
                f"{stream} truncated by the server at {limits.output_limit} characters "
                f"({dropped} bytes dropped; ORVANTA_OUTPUT_LIMIT)"
            )
            result.log.append(note)
            log.warning("job %s: %s", job_id, note)
    return {"recorded": claims.complete(result, qualified(group, body.worker))}


@router.get("/settings/{key}", responses={404: {}})
def agent_setting(key: PathName, group: AgentGroup, instance: Instance) -> dict[str, str | None]:
    if key != "job_isolation":
        raise NotFound(f"no instance setting {key!r}; known: job_isolation")
    return {"key": key, "value": instance.setting(key)}
