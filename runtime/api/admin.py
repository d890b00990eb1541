"""The admin's routes (ORVANTA_ADMIN_TOKEN): jobs, the job_isolation setting, worker groups.

Every route of this router requires the admin token; a group's token gets 403
here (R-AGT-2).
"""

# No `from __future__ import annotations`: FastAPI reads the routes' annotations at runtime.
import logging
from typing import Annotated, Any, Literal

from fastapi import APIRouter, Depends, HTTPException, Query
from fastapi.responses import PlainTextResponse

from runtime.api.deps import UNAUTHORIZED, Groups, Instance, Jobs, Workers, require_admin
from runtime.api.models import (
    GroupCreated,
    GroupOut,
    GroupRequest,
    JobCreated,
    JobId,
    JobOut,
    JobRequest,
    PathName,
    ResultOut,
    SettingOut,
    SettingValue,
)
from runtime.jobs import QueuedJob
from runtime.store.workers import WorkerRegistry

log = logging.getLogger("orvanta.server")

router = APIRouter(prefix="/api", dependencies=[Depends(require_admin)], responses=UNAUTHORIZED)


def job_out(job: QueuedJob, workers: WorkerRegistry, served: set[str] | None = None) -> JobOut:
    result = None
    if job.result is not None:
        fields = job.result.to_dict()
        fields.pop("job_id")
        result = ResultOut.model_validate(fields)
    return JobOut(
        id=job.id,
        status=job.status,
        tag=job.tag,
        workspace=job.workspace,
        attempts=job.attempts,
        worker=job.worker,
        worker_group=job.worker_group,
        created=job.created,
        finished=job.finished,
        waiting=workers.waiting_reason(job.tag, served) if job.status == "queued" else None,
        result=result,
    )


# -- jobs ----------------------------------------------------------------------------------
@router.post("/jobs", status_code=201)
def submit(job: JobRequest, jobs: Jobs, workers: Workers) -> JobCreated:
    try:
        job_id = jobs.submit(job.language, job.script, job.env, job.timeout, job.tag, job.workspace)
    except ValueError as exc:  # SubmissionError: a refused variable, a bad header, ...
        raise HTTPException(422, str(exc)) from None
    waiting = workers.waiting_reason(job.tag)
    if waiting:
        log.warning("job %s: %s", job_id, waiting)
    return JobCreated(id=job_id, tag=job.tag, workspace=job.workspace, waiting=waiting)


@router.get("/jobs")
def list_jobs(
    jobs: Jobs,
    workers: Workers,
    status: Literal["queued", "running", "done"] | None = None,
    limit: Annotated[int, Query(ge=1, le=1000)] = 100,
) -> list[JobOut]:
    served = workers.served_tags()  # once per listing, not once per job
    return [job_out(job, workers, served) for job in jobs.jobs(status, limit)]


@router.get("/jobs/{job_id}", responses={404: {}})
def get_job(job_id: JobId, jobs: Jobs, workers: Workers) -> JobOut:
    return job_out(jobs.job(job_id), workers)


@router.get("/jobs/{job_id}/logs", response_class=PlainTextResponse, responses={404: {}})
def job_logs(job_id: JobId, jobs: Jobs) -> str:
    job = jobs.job(job_id)
    if job.result is None:
        return f"job {job_id} is {job.status}; no output yet\n"
    r = job.result
    return "".join(f"[orvanta] {line}\n" for line in r.log) + r.stdout + r.stderr


@router.post("/jobs/{job_id}/cancel", responses={404: {}})
def cancel(job_id: JobId, jobs: Jobs) -> dict[str, str]:
    return {"id": job_id, "outcome": jobs.cancel(job_id)}


# -- settings, groups, workers -------------------------------------------------------------
@router.get("/settings/job_isolation")
def get_isolation(instance: Instance) -> SettingOut:
    return SettingOut(value=instance.setting("job_isolation"))


@router.put("/settings/job_isolation")
def set_isolation(setting: SettingValue, instance: Instance) -> SettingOut:
    instance.set_setting("job_isolation", setting.value)
    log.info("job_isolation set to %s", setting.value or "unset")
    return SettingOut(value=instance.setting("job_isolation"))


@router.post("/groups", status_code=201, responses={409: {"description": "exists"}})
def create_group(group: GroupRequest, groups: Groups) -> GroupCreated:
    token = groups.create_group(group.name, tuple(group.tags))
    return GroupCreated(name=group.name, tags=sorted(set(group.tags)), token=token)


@router.get("/groups")
def list_groups(groups: Groups) -> list[GroupOut]:
    return [GroupOut(name=g.name, tags=list(g.tags)) for g in groups.groups()]


@router.delete("/groups/{name}", status_code=204, responses={404: {}})
def delete_group(name: PathName, groups: Groups) -> None:
    groups.delete_group(name)


@router.post("/groups/{name}/token", responses={404: {}})
def rotate_token(name: PathName, groups: Groups) -> dict[str, str]:
    return {"name": name, "token": groups.rotate_group_token(name)}


@router.get("/workers")
def workers(registry: Workers) -> list[dict[str, Any]]:
    return registry.live_workers()
