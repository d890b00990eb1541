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

import logging

from fastapi import APIRouter, FastAPI, Request
from fastapi.encoders import jsonable_encoder
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse

from runtime.api import admin, agent
from runtime.api.deps import Queue
from runtime.api.limits import BodyLimit, ServerLimits, quiet_errors
from runtime.queue import JobQueue
from runtime.store.errors import Conflict, NotFound

log = logging.getLogger("orvanta.server")

public = APIRouter(prefix="/api")


@public.get("/health")
def health(queue: Queue) -> dict[str, str]:
    return {"status": "ok", "database": queue.db.kind}


async def store_error(request: Request, exc: NotFound | Conflict) -> JSONResponse:
    """A store's refusal (runtime.store.errors) as 404 or 409, with its message."""
    return JSONResponse({"detail": str(exc)}, status_code=404 if isinstance(exc, NotFound) else 409)


async def invalid_request(request: Request, exc: RequestValidationError) -> JSONResponse:
    return JSONResponse({"detail": jsonable_encoder(quiet_errors(exc.errors()))}, status_code=422)


async def server_error(request: Request, exc: Exception) -> JSONResponse:
    log.exception("%s %s failed", request.method, request.url.path)
    return JSONResponse({"detail": f"internal error: {type(exc).__name__}"}, status_code=500)


def create_app(queue: JobQueue, admin_token: str, limits: ServerLimits | None = None) -> FastAPI:
    """The API over one queue: its routers, with what their dependencies read in `app.state`.

    `limits` default to the environment (ORVANTA_MAX_REQUEST_BYTES, ORVANTA_OUTPUT_LIMIT).
    """
    limits = limits or ServerLimits.from_env()
    app = FastAPI(
        title="Orvanta job service",
        version="0.1.0",
        description=__doc__,
        exception_handlers={
            NotFound: store_error,
            Conflict: store_error,
            RequestValidationError: invalid_request,
            Exception: server_error,
        },
    )
    app.state.queue = queue
    app.state.admin_token = admin_token
    app.state.limits = limits
    app.add_middleware(BodyLimit, limit=limits.max_request_bytes)  # before parsing and auth
    app.include_router(public)
    app.include_router(admin.router)
    app.include_router(agent.router)
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
