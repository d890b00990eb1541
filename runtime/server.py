"""`orvanta server`: the HTTP API in front of the queue (OpenAPI at /openapi.json).

Two kinds of caller. An admin (ORVANTA_ADMIN_TOKEN) submits jobs, reads
results and logs, manages worker groups and the job_isolation setting. An
agent worker (MODE=agent) holds only its worker group's token: it can claim
jobs of its group's tags and report on jobs its group holds, nothing else
(R-AGT-1, R-AGT-2). Every client mistake is a 4xx with a message; input
that the database could not store (NUL, lone surrogates) is refused up front,
and a job is checked by the same rules as everywhere else (runtime.submission).

Request limits (R-API-1, R-API-2):
- A body over ORVANTA_MAX_REQUEST_BYTES is refused with 413 before it is
  parsed or its token checked, on every endpoint: a Content-Length over the
  limit is refused unread, a chunked body once the bytes streamed pass it.
  Default: 6 MiB + 12 x ORVANTA_OUTPUT_LIMIT (18 MiB with the default 1 MiB
  output limit). The largest legitimate bodies are a job (a 1 Mi-character
  script and 128 variables of 32 Ki characters: 5 MiB of text plus framing)
  and an agent's result: two streams of at most ORVANTA_OUTPUT_LIMIT bytes of
  output each, and JSON spends at most 6 bytes on one byte of output (a
  control byte or an invalid one, U+FFFD, becomes a \\uXXXX escape).
- A 422 never echoes a large input: `input` values over 200 characters are
  dropped from the error list, and long parts of `loc` (a huge variable name)
  are cut.
- An agent's result is capped like a worker's own output (runtime.executor's
  _Capped): each stream keeps its first ORVANTA_OUTPUT_LIMIT characters and
  gets the same "[output truncated: N more bytes dropped]" note, plus a line in
  the job's log. Truncated, not refused: the job ran, and its result is kept.
"""

# No `from __future__ import annotations`: FastAPI reads the endpoints' annotations at runtime,
# and the dependency aliases below are local to create_app.
import hmac
import json
import logging
import os
from collections.abc import Awaitable, Callable, Iterator, Mapping, MutableMapping
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Annotated, Any, Literal

from fastapi import Depends, FastAPI, HTTPException, Path, Query, Request
from fastapi.encoders import jsonable_encoder
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, PlainTextResponse
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer
from pydantic import AfterValidator, BaseModel, Field, StringConstraints

from runtime.jobs import JobResult, QueuedJob
from runtime.languages import PLAIN_NAME_PATTERN, is_plain_name
from runtime.queue import JobQueue, WorkerGroup
from runtime.settings import positive_int
from runtime.submission import (
    ENV_NAME_PATTERN,
    MAX_ENV_VALUE_CHARS,
    MAX_ENV_VARS,
    MAX_SCRIPT_CHARS,
    storable_problem,
)

log = logging.getLogger("orvanta.server")

MAX_TIMEOUT_SECONDS = 86400.0
MAX_OUTPUT_CHARS = 256 << 20  # per stream, a bound for validation; the real cap is output_limit
MAX_LEASE_SECONDS = 86400.0
DEFAULT_OUTPUT_LIMIT = 1 << 20  # = runtime.settings.Settings.output_limit
MAX_ECHOED_INPUT_CHARS = 200

Scope = MutableMapping[str, Any]
Message = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]
ASGIApp = Callable[[Scope, Receive, Send], Awaitable[None]]


@dataclass(frozen=True)
class ServerLimits:
    """How much one request may carry and how much of an agent's output is kept."""

    max_request_bytes: int
    output_limit: int

    @classmethod
    def from_env(cls, env: Mapping[str, str] | None = None) -> "ServerLimits":
        env = os.environ if env is None else env
        output_limit = positive_int(env, "ORVANTA_OUTPUT_LIMIT", DEFAULT_OUTPUT_LIMIT, "bytes")
        default = (6 << 20) + 12 * output_limit  # see the module docstring
        return cls(positive_int(env, "ORVANTA_MAX_REQUEST_BYTES", default, "bytes"), output_limit)


class BodyLimit:
    """Refuses a body over `limit` bytes with 413 before the app, and so its token check, runs.

    A pure ASGI middleware: a declared Content-Length over the limit is refused
    unread; any other body is read here, counting the bytes as they stream in
    (chunked transfers have no length), and handed to the app only when it fits.
    """

    def __init__(self, app: ASGIApp, limit: int) -> None:
        self.app = app
        self.limit = limit

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        declared = None
        for name, value in scope.get("headers", ()):
            if name.lower() == b"content-length":
                try:
                    declared = int(value)
                except ValueError:
                    declared = None
        if declared is not None and declared > self.limit:
            await self._refuse(scope, send, declared)
            return
        chunks: list[bytes] = []
        size = 0
        while True:
            message = await receive()
            if message["type"] != "http.request":
                return  # the client went away before its body was complete
            chunk = message.get("body", b"")
            size += len(chunk)
            if size > self.limit:
                chunks.clear()
                await self._refuse(scope, send, None)
                return
            chunks.append(chunk)
            if not message.get("more_body", False):
                break
        body = b"".join(chunks)
        chunks.clear()
        replayed = False

        async def replay() -> Message:
            nonlocal replayed
            if not replayed:
                replayed = True
                return {"type": "http.request", "body": body, "more_body": False}
            return await receive()

        await self.app(scope, replay, send)

    async def _refuse(self, scope: Scope, send: Send, declared: int | None) -> None:
        size = f"{declared} bytes" if declared is not None else "a streamed body"
        log.warning(
            "%s %s: refused %s over ORVANTA_MAX_REQUEST_BYTES=%d",
            scope.get("method"),
            scope.get("path"),
            size,
            self.limit,
        )
        body = json.dumps(
            {
                "detail": f"request body too large: {size} over the server's limit of "
                f"{self.limit} bytes (ORVANTA_MAX_REQUEST_BYTES)"
            }
        ).encode()
        await send(
            {
                "type": "http.response.start",
                "status": 413,
                # No `connection: close`: the server discards the rest of the body unread and
                # unbuffered, so a client that sends it all before reading (http.client, the
                # agent) still gets this answer instead of a reset connection.
                "headers": [
                    (b"content-type", b"application/json"),
                    (b"content-length", str(len(body)).encode()),
                ],
            }
        )
        await send({"type": "http.response.body", "body": body})


def _small(value: Any, budget: int = MAX_ECHOED_INPUT_CHARS) -> bool:
    """True when `value` is short enough to echo: its text parts fit in `budget` characters."""

    def size(item: Any, left: int) -> int:
        if isinstance(item, str | bytes):
            return len(item)
        if isinstance(item, Mapping):
            total = 0
            for key, inner in item.items():
                total += size(key, left - total) + size(inner, left - total)
                if total > left:
                    break
            return total
        if isinstance(item, list | tuple | set):
            total = 0
            for inner in item:
                total += size(inner, left - total) + 1
                if total > left:
                    break
            return total
        return 8

    return size(value, budget) <= budget


def _cut(part: Any) -> Any:
    if isinstance(part, str) and len(part) > MAX_ECHOED_INPUT_CHARS:
        return f"{part[:64]}... ({len(part)} characters)"
    return part


def quiet_errors(errors: Any) -> list[dict[str, Any]]:
    """Validation errors without large inputs: a 422 never echoes what it refused (R-API-1)."""
    quiet = []
    for error in errors:
        error = dict(error)
        if "input" in error and not _small(error["input"]):
            del error["input"]
        error["loc"] = [_cut(part) for part in error.get("loc", ())]
        quiet.append(error)
    return quiet


def cap_output(text: str, limit: int) -> tuple[str, int]:
    """At most `limit` characters of an agent's stream, noted as the executor notes its own cap.

    Returns the kept text and how many UTF-8 bytes were dropped (0: unchanged).
    A stream a worker capped itself (`limit` characters and its own note) passes.
    """
    if len(text) <= limit + 100:  # room for the agent's own truncation note
        return text, 0
    dropped = len(text[limit:].encode("utf-8", "surrogatepass"))
    return text[:limit] + f"\n[output truncated: {dropped} more bytes dropped]\n", dropped


def _storable(text: str) -> str:
    """Text both databases can store: no NUL, valid UTF-8 (no lone surrogates)."""
    problem = storable_problem(text)
    if problem:
        raise ValueError(f"must be storable: it {problem}")
    return text


Text = Annotated[str, AfterValidator(_storable)]


def _plain(name: str) -> str:
    if not is_plain_name(name):
        raise ValueError("must not contain '..' (a name, not a path)")
    return name


# the patterns document the rules in the OpenAPI spec; runtime.submission checks the job whole
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


def create_app(queue: JobQueue, admin_token: str, limits: ServerLimits | None = None) -> FastAPI:
    """The API over one queue; the admin token is compared in constant time.

    `limits` default to the environment (ORVANTA_MAX_REQUEST_BYTES, ORVANTA_OUTPUT_LIMIT).
    """
    limits = limits or ServerLimits.from_env()
    app = FastAPI(
        title="Orvanta job service",
        version="0.1.0",
        description=__doc__,
    )
    app.add_middleware(BodyLimit, limit=limits.max_request_bytes)
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

    @app.exception_handler(RequestValidationError)
    async def invalid_request(request: Request, exc: RequestValidationError) -> JSONResponse:
        errors = quiet_errors(exc.errors())
        return JSONResponse({"detail": jsonable_encoder(errors)}, status_code=422)

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
        try:
            job_id = queue.submit(
                job.language, job.script, job.env, job.timeout, job.tag, job.workspace
            )
        except ValueError as exc:  # SubmissionError: a refused variable, a bad header, ...
            raise HTTPException(422, str(exc)) from None
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
    limits = ServerLimits.from_env()
    log.info("server: queue in %s (%s), listening on %s", queue.path, queue.db.kind, where)
    log.info(
        "server: request bodies up to %d bytes (ORVANTA_MAX_REQUEST_BYTES), agent output "
        "capped at %d characters per stream (ORVANTA_OUTPUT_LIMIT)",
        limits.max_request_bytes,
        limits.output_limit,
    )
    app = create_app(queue, admin_token, limits)
    if uds:
        uvicorn.run(app, uds=uds, log_level="warning")
    else:
        uvicorn.run(app, host=host, port=port, log_level="warning")
