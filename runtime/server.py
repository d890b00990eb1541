"""`orvanta server`: the HTTP API in front of the queue (OpenAPI at /openapi.json).

Two kinds of caller. An admin (ORVANTA_ADMIN_TOKEN) submits jobs, reads
results and logs, manages worker groups and the job_isolation setting. An
agent worker (MODE=agent) holds only its worker group's token: it can claim
jobs of its group's tags and report on jobs its group holds, nothing else
(R-AGT-1, R-AGT-2). Every client mistake is a 4xx with a message; input
that the database could not store (NUL, lone surrogates) is refused up front.
"""

# No `from __future__ import annotations`: FastAPI reads the endpoints' annotations at runtime,
# and the dependency aliases below are local to create_app.
import hmac
import logging
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Annotated, Any, Literal

from fastapi import Depends, FastAPI, HTTPException, Path, Query, Request
from fastapi.responses import JSONResponse, PlainTextResponse
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer
from pydantic import AfterValidator, BaseModel, Field, StringConstraints

from runtime.executor import JobResult
from runtime.languages import PLAIN_NAME_PATTERN, is_plain_name
from runtime.queue import JobQueue, QueuedJob, WorkerGroup

log = logging.getLogger("orvanta.server")

MAX_SCRIPT_CHARS = 1 << 20
MAX_ENV_VARS = 128
MAX_ENV_VALUE_CHARS = 32 << 10
MAX_TIMEOUT_SECONDS = 86400.0
MAX_OUTPUT_CHARS = 256 << 20  # per stream; far above any sane ORVANTA_OUTPUT_LIMIT
MAX_LEASE_SECONDS = 86400.0
ENV_NAME_PATTERN = r"^[A-Za-z_][A-Za-z0-9_]{0,127}$"


def _storable(text: str) -> str:
    """Text both databases can store: no NUL, valid UTF-8 (no lone surrogates)."""
    if "\x00" in text:
        raise ValueError("must not contain NUL characters")
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        raise ValueError("must be valid Unicode (no lone surrogates)") from None
    return text


Text = Annotated[str, AfterValidator(_storable)]


def _plain(name: str) -> str:
    if not is_plain_name(name):
        raise ValueError("must not contain '..' (a name, not a path)")
    return name


# the pattern documents the rule in the OpenAPI spec; the validator adds what a regex here cannot
Name = Annotated[str, StringConstraints(pattern=PLAIN_NAME_PATTERN), AfterValidator(_plain)]
EnvName = Annotated[str, StringConstraints(pattern=ENV_NAME_PATTERN)]
EnvValue = Annotated[Text, StringConstraints(max_length=MAX_ENV_VALUE_CHARS)]
Language = Literal["bash", "python3"]  # = runtime.languages.LANGUAGES (a unit test checks)
Isolation = Literal["none", "nsjail_sandboxing"]  # = JOB_ISOLATION_VALUES (checked too)
JobId = Annotated[str, Path(pattern=r"^[A-Za-z0-9_-]{1,64}$")]
PathName = Annotated[str, Path(pattern=PLAIN_NAME_PATTERN)]


class JobRequest(BaseModel):
    language: Language = Field(description="the job's language")
    script: Annotated[Text, StringConstraints(min_length=1, max_length=MAX_SCRIPT_CHARS)]
    env: dict[EnvName, EnvValue] = Field(default_factory=dict, max_length=MAX_ENV_VARS)
    timeout: float | None = Field(default=None, gt=0, le=MAX_TIMEOUT_SECONDS)
    tag: Name = "default"
    workspace: Name = "default"


class JobCreated(BaseModel):
    id: str
    tag: str
    workspace: str
    waiting: str | None = Field(description="why no worker will take it yet, if none will")


class ResultModel(BaseModel):
    isolation: Annotated[Text, StringConstraints(max_length=64)]
    status: Literal["success", "failure", "timeout", "error", "canceled"]
    exit_code: int | None = Field(ge=-255, le=255)
    duration: float = Field(ge=0, le=10 * MAX_TIMEOUT_SECONDS)
    stdout: Annotated[Text, StringConstraints(max_length=MAX_OUTPUT_CHARS)]
    stderr: Annotated[Text, StringConstraints(max_length=MAX_OUTPUT_CHARS)]
    log: list[Annotated[Text, StringConstraints(max_length=64 << 10)]] = Field(max_length=1000)


class ResultOut(BaseModel):
    """A stored result as it is: no input limits on the way out (a stored job always reads)."""

    isolation: str
    status: str
    exit_code: int | None
    duration: float
    stdout: str
    stderr: str
    log: list[str]


class JobOut(BaseModel):
    id: str
    status: str
    tag: str
    workspace: str
    attempts: int
    worker: str | None
    worker_group: str | None
    created: float
    finished: float | None
    waiting: str | None
    result: ResultOut | None


class SettingValue(BaseModel):
    value: Isolation | None = Field(description="nsjail_sandboxing, none, or null to unset")


class SettingOut(BaseModel):
    value: str | None


class GroupRequest(BaseModel):
    name: Name
    tags: list[Name] = Field(min_length=1, max_length=64)


class GroupOut(BaseModel):
    name: str
    tags: list[str]


class GroupCreated(GroupOut):
    token: str = Field(description="the group's agent token; shown only now")


class AgentClaim(BaseModel):
    worker: Name
    lease: float = Field(default=30.0, gt=0, le=MAX_LEASE_SECONDS)


class AgentJob(BaseModel):
    id: str
    language: str
    script: str
    env: dict[str, str]
    timeout: float | None
    workspace: str


class AgentClaimed(BaseModel):
    job: AgentJob | None


class AgentHeartbeat(BaseModel):
    worker: Name
    lease: float = Field(default=30.0, gt=0, le=MAX_LEASE_SECONDS)


class AgentResult(BaseModel):
    worker: Name
    result: ResultModel


class AgentWorker(BaseModel):
    worker: Name


def _job_out(queue: JobQueue, job: QueuedJob, served: set[str] | None = None) -> JobOut:
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
        waiting=queue.waiting_reason(job.tag, served) if job.status == "queued" else None,
        result=result,
    )


def create_app(queue: JobQueue, admin_token: str) -> FastAPI:
    """The API over one queue; the admin token is compared in constant time."""
    app = FastAPI(
        title="Orvanta job service",
        version="0.1.0",
        description=__doc__,
    )
    bearer = HTTPBearer(auto_error=False)
    Credentials = Annotated[HTTPAuthorizationCredentials | None, Depends(bearer)]
    unauthorized: dict[int | str, dict[str, Any]] = {
        401: {"description": "no token"},
        403: {"description": "wrong token"},
    }

    def admin(credentials: Credentials) -> None:
        if credentials is None:
            raise HTTPException(401, "missing Authorization: Bearer <admin token>")
        if not hmac.compare_digest(credentials.credentials.encode(), admin_token.encode()):
            raise HTTPException(403, "this token may not manage the service (admin token needed)")

    def agent(credentials: Credentials) -> WorkerGroup:
        if credentials is None:
            raise HTTPException(401, "missing Authorization: Bearer <worker group token>")
        group = queue.group_for_token(credentials.credentials)
        if group is None:
            raise HTTPException(403, "unknown worker group token (rotated or never issued?)")
        return group

    Admin = Depends(admin)
    Group = Annotated[WorkerGroup, Depends(agent)]

    @contextmanager
    def missing_as_404() -> Iterator[None]:
        try:
            yield
        except KeyError as exc:
            raise HTTPException(404, str(exc.args[0])) from None

    @app.exception_handler(Exception)
    async def server_error(request: Request, exc: Exception) -> JSONResponse:
        log.exception("%s %s failed", request.method, request.url.path)
        return JSONResponse({"detail": f"internal error: {type(exc).__name__}"}, status_code=500)

    @app.get("/api/health")
    def health() -> dict[str, str]:
        return {"status": "ok", "database": queue.db.kind}

    # -- admin: jobs -------------------------------------------------------------------
    @app.post("/api/jobs", status_code=201, dependencies=[Admin], responses=unauthorized)
    def submit(job: JobRequest) -> JobCreated:
        job_id = queue.submit(
            job.language, job.script, job.env, job.timeout, job.tag, job.workspace
        )
        waiting = queue.waiting_reason(job.tag)
        if waiting:
            log.warning("job %s: %s", job_id, waiting)
        return JobCreated(id=job_id, tag=job.tag, workspace=job.workspace, waiting=waiting)

    @app.get("/api/jobs", dependencies=[Admin], responses=unauthorized)
    def list_jobs(
        status: Literal["queued", "running", "done"] | None = None,
        limit: Annotated[int, Query(ge=1, le=1000)] = 100,
    ) -> list[JobOut]:
        served = queue.served_tags()  # once per listing, not once per job
        return [_job_out(queue, job, served) for job in queue.jobs(status, limit)]

    @app.get("/api/jobs/{job_id}", dependencies=[Admin], responses={404: {}, **unauthorized})
    def get_job(job_id: JobId) -> JobOut:
        job = queue.get(job_id)
        if job is None:
            raise HTTPException(404, f"no job {job_id!r}")
        return _job_out(queue, job)

    @app.get(
        "/api/jobs/{job_id}/logs",
        dependencies=[Admin],
        response_class=PlainTextResponse,
        responses={404: {}, **unauthorized},
    )
    def job_logs(job_id: JobId) -> str:
        job = queue.get(job_id)
        if job is None:
            raise HTTPException(404, f"no job {job_id!r}")
        if job.result is None:
            return f"job {job_id} is {job.status}; no output yet\n"
        r = job.result
        return "".join(f"[orvanta] {line}\n" for line in r.log) + r.stdout + r.stderr

    @app.post(
        "/api/jobs/{job_id}/cancel", dependencies=[Admin], responses={404: {}, **unauthorized}
    )
    def cancel(job_id: JobId) -> dict[str, str]:
        try:
            return {"id": job_id, "outcome": queue.cancel(job_id)}
        except KeyError:
            raise HTTPException(404, f"no job {job_id!r}") from None

    # -- admin: settings, groups, workers ----------------------------------------------
    @app.get("/api/settings/job_isolation", dependencies=[Admin], responses=unauthorized)
    def get_isolation() -> SettingOut:
        return SettingOut(value=queue.setting("job_isolation"))

    @app.put("/api/settings/job_isolation", dependencies=[Admin], responses=unauthorized)
    def set_isolation(setting: SettingValue) -> SettingOut:
        queue.set_setting("job_isolation", setting.value)
        log.info("job_isolation set to %s", setting.value or "unset")
        return SettingOut(value=queue.setting("job_isolation"))

    @app.post(
        "/api/groups",
        status_code=201,
        dependencies=[Admin],
        responses={409: {"description": "exists"}, **unauthorized},
    )
    def create_group(group: GroupRequest) -> GroupCreated:
        try:
            token = queue.create_group(group.name, tuple(group.tags))
        except KeyError as exc:
            raise HTTPException(409, str(exc.args[0])) from None
        return GroupCreated(name=group.name, tags=sorted(set(group.tags)), token=token)

    @app.get("/api/groups", dependencies=[Admin], responses=unauthorized)
    def list_groups() -> list[GroupOut]:
        return [GroupOut(name=g.name, tags=list(g.tags)) for g in queue.groups()]

    @app.delete("/api/groups/{name}", status_code=204, dependencies=[Admin], responses={404: {}})
    def delete_group(name: PathName) -> None:
        with missing_as_404():
            queue.delete_group(name)

    @app.post("/api/groups/{name}/token", dependencies=[Admin], responses={404: {}})
    def rotate_token(name: PathName) -> dict[str, str]:
        with missing_as_404():
            return {"name": name, "token": queue.rotate_group_token(name)}

    @app.get("/api/workers", dependencies=[Admin], responses=unauthorized)
    def workers() -> list[dict[str, Any]]:
        return queue.live_workers()

    # -- agent workers: their own group's jobs only (R-AGT-2) --------------------------
    def qualified(group: WorkerGroup, worker: str) -> str:
        return f"{group.name}/{worker}"

    @app.get("/api/agent/whoami", responses=unauthorized)
    def whoami(group: Group) -> GroupOut:
        return GroupOut(name=group.name, tags=list(group.tags))

    @app.post("/api/agent/heartbeat", responses=unauthorized)
    def agent_heartbeat(body: AgentWorker, group: Group) -> dict[str, bool]:
        queue.heartbeat(qualified(group, body.worker), "agent", group.tags, group.name)
        return {"ok": True}

    @app.post("/api/agent/claim", responses=unauthorized)
    def agent_claim(body: AgentClaim, group: Group) -> AgentClaimed:
        spec = queue.claim(qualified(group, body.worker), body.lease, group.tags, group.name)
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
            )
        )

    @app.post("/api/agent/jobs/{job_id}/heartbeat", responses=unauthorized)
    def agent_job_heartbeat(job_id: JobId, body: AgentHeartbeat, group: Group) -> dict[str, bool]:
        held = queue.renew(job_id, qualified(group, body.worker), body.lease)
        return {"held": held, "cancel": held and queue.cancel_requested(job_id)}

    @app.get("/api/agent/jobs/{job_id}/cancel", responses={404: {}, **unauthorized})
    def agent_cancel(job_id: JobId, group: Group) -> dict[str, bool]:
        job = queue.get(job_id)
        if job is None or job.worker_group != group.name:
            raise HTTPException(404, f"no job {job_id!r} held by worker group {group.name!r}")
        return {"cancel": queue.cancel_requested(job_id)}

    @app.post("/api/agent/jobs/{job_id}/result", responses=unauthorized)
    def agent_result(job_id: JobId, body: AgentResult, group: Group) -> dict[str, bool]:
        result = JobResult(job_id=job_id, **body.result.model_dump())
        return {"recorded": queue.complete(result, qualified(group, body.worker))}

    @app.get("/api/agent/settings/{key}", responses={404: {}, **unauthorized})
    def agent_setting(key: PathName, group: Group) -> dict[str, str | None]:
        if key != "job_isolation":
            raise HTTPException(404, f"no instance setting {key!r}; known: job_isolation")
        return {"key": key, "value": queue.setting(key)}

    return app


def serve(queue: JobQueue, admin_token: str, host: str, port: int, uds: str | None = None) -> None:
    """Serve on HOST:PORT, or on a unix socket (`uds`) for agents with no network at all."""
    import uvicorn

    where = f"unix://{uds}" if uds else f"http://{host}:{port}"
    log.info("server: queue in %s (%s), listening on %s", queue.path, queue.db.kind, where)
    app = create_app(queue, admin_token)
    if uds:
        uvicorn.run(app, uds=uds, log_level="warning")
    else:
        uvicorn.run(app, host=host, port=port, log_level="warning")
