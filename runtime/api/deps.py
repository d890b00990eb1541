"""What a route needs, as FastAPI dependencies: the stores it uses and its caller's scope.

create_app keeps the queue, the admin token and the limits in `app.state`;
routes reach them only through these, so the same routers serve any queue.
"""

# No `from __future__ import annotations`: FastAPI reads these annotations at runtime.
import hmac
from typing import Annotated, Any

from fastapi import Depends, HTTPException, Request
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer

from runtime.api.limits import ServerLimits
from runtime.queue import JobQueue
from runtime.store.claims import ClaimStore
from runtime.store.groups import GroupStore, WorkerGroup
from runtime.store.instance_settings import InstanceSettings
from runtime.store.jobs import JobStore
from runtime.store.workers import WorkerRegistry


def get_queue(request: Request) -> JobQueue:
    queue: JobQueue = request.app.state.queue
    return queue


def get_limits(request: Request) -> ServerLimits:
    limits: ServerLimits = request.app.state.limits
    return limits


# The one queue, typed as the store a route uses: its signature says what it touches.
Queue = Annotated[JobQueue, Depends(get_queue)]
Jobs = Annotated[JobStore, Depends(get_queue)]
Claims = Annotated[ClaimStore, Depends(get_queue)]
Workers = Annotated[WorkerRegistry, Depends(get_queue)]
Groups = Annotated[GroupStore, Depends(get_queue)]
Instance = Annotated[InstanceSettings, Depends(get_queue)]
Limits = Annotated[ServerLimits, Depends(get_limits)]

bearer = HTTPBearer(auto_error=False)  # a missing token gets our own 401 and message
Credentials = Annotated[HTTPAuthorizationCredentials | None, Depends(bearer)]
UNAUTHORIZED: dict[int | str, dict[str, Any]] = {
    401: {"description": "no token"},
    403: {"description": "wrong token"},
}


def require_admin(request: Request, credentials: Credentials) -> None:
    """Admin scope: the admin token, compared in constant time."""
    if credentials is None:
        raise HTTPException(401, "missing Authorization: Bearer <admin token>")
    admin_token: str = request.app.state.admin_token
    if not hmac.compare_digest(credentials.credentials.encode(), admin_token.encode()):
        raise HTTPException(403, "this token may not manage the service (admin token needed)")


def agent_group(credentials: Credentials, groups: Groups) -> WorkerGroup:
    """Agent scope: the worker group whose token this is; its jobs are all the agent sees."""
    if credentials is None:
        raise HTTPException(401, "missing Authorization: Bearer <worker group token>")
    group = groups.group_for_token(credentials.credentials)
    if group is None:
        raise HTTPException(403, "unknown worker group token (rotated or never issued?)")
    return group


AgentGroup = Annotated[WorkerGroup, Depends(agent_group)]
