"""The API in-process (FastAPI's TestClient over a SQLite queue): status codes by cause.

What the stores refuse maps to one status each: a missing job, group or
setting is 404, a taken name 409. Every route but the health check needs a
token of its scope, and the body limit answers before any of that.
"""

from __future__ import annotations

import re
import warnings
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from runtime.api.limits import ServerLimits
from runtime.queue import JobQueue
from runtime.server import create_app

with warnings.catch_warnings():  # starlette's TestClient asks for httpx2; httpx works
    warnings.simplefilter("ignore")
    from fastapi.testclient import TestClient

ADMIN = "admin-token-0123456789"
MISSING = "0000000000000000"


@pytest.fixture
def queue(tmp_path: Path) -> Iterator[JobQueue]:
    q = JobQueue.in_state_dir(tmp_path)
    yield q
    q.close()


@pytest.fixture
def client(queue: JobQueue) -> TestClient:
    app = create_app(queue, ADMIN, ServerLimits(max_request_bytes=4096, output_limit=64))
    return TestClient(app, headers={"Authorization": f"Bearer {ADMIN}"})


def call(client: TestClient, method: str, path: str, body: Any = None, **kw: Any) -> Any:
    return client.request(method, path, json=body, **kw)


@pytest.mark.parametrize(
    ("method", "path", "says"),
    [
        ("GET", f"/api/jobs/{MISSING}", f"no job '{MISSING}'"),
        ("GET", f"/api/jobs/{MISSING}/logs", f"no job '{MISSING}'"),
        ("POST", f"/api/jobs/{MISSING}/cancel", f"no job '{MISSING}'"),
        ("DELETE", "/api/groups/nope", "no worker group 'nope'"),
        ("POST", "/api/groups/nope/token", "no worker group 'nope'"),
    ],
)
def test_what_does_not_exist_is_a_404_that_names_it(
    client: TestClient, method: str, path: str, says: str
) -> None:
    answer = call(client, method, path)
    assert (answer.status_code, answer.json()) == (404, {"detail": says})


def test_a_taken_group_name_is_a_409_not_a_404(client: TestClient) -> None:
    assert call(client, "POST", "/api/groups", {"name": "dup", "tags": ["x"]}).status_code == 201
    answer = call(client, "POST", "/api/groups", {"name": "dup", "tags": ["y"]})
    assert answer.status_code == 409
    assert answer.json() == {"detail": "worker group 'dup' already exists"}
    # the first group, and its token, are untouched
    assert call(client, "GET", "/api/groups").json() == [{"name": "dup", "tags": ["x"]}]


@pytest.mark.req("R-AGT-2")
def test_an_agent_asking_about_another_groups_job_or_an_unknown_setting_gets_404(
    client: TestClient, queue: JobQueue
) -> None:
    mine = {"Authorization": f"Bearer {queue.create_group('a', ('a',))}"}
    theirs = {"Authorization": f"Bearer {queue.create_group('b', ('b',))}"}
    job_id = queue.submit("bash", "echo b", tag="b")
    claimed = call(client, "POST", "/api/agent/claim", {"worker": "w"}, headers=theirs).json()
    assert claimed["job"]["id"] == job_id
    answer = call(client, "GET", f"/api/agent/jobs/{job_id}/cancel", headers=mine)
    assert answer.status_code == 404
    assert answer.json() == {"detail": f"no job '{job_id}' held by worker group 'a'"}
    answer = call(client, "GET", f"/api/agent/jobs/{MISSING}/cancel", headers=mine)
    assert answer.status_code == 404
    assert call(client, "GET", f"/api/agent/jobs/{job_id}/cancel", headers=theirs).json() == {
        "cancel": False
    }
    answer = call(client, "GET", "/api/agent/settings/other", headers=mine)
    assert answer.status_code == 404 and "known: job_isolation" in answer.json()["detail"]


@pytest.mark.req("R-AGT-2")
def test_an_agent_hands_back_only_a_job_its_own_worker_holds(
    client: TestClient, queue: JobQueue
) -> None:
    """What a stopping agent does with the job it claimed ahead (runtime.pipeline)."""
    mine = {"Authorization": f"Bearer {queue.create_group('a', ('a',))}"}
    job_id = queue.submit("bash", "echo a", tag="a")
    claimed = call(client, "POST", "/api/agent/claim", {"worker": "w"}, headers=mine).json()
    assert claimed["job"]["id"] == job_id
    release = f"/api/agent/jobs/{job_id}/release"
    assert call(client, "POST", release, {"worker": "v"}, headers=mine).json() == {
        "released": False
    }
    assert call(client, "POST", release, {"worker": "w"}, headers=mine).json() == {"released": True}
    job = queue.get(job_id)
    assert job is not None and (job.status, job.attempts) == ("queued", 0)


def test_canceling_twice_says_done_and_is_not_an_error(client: TestClient, queue: JobQueue) -> None:
    job_id = queue.submit("bash", "echo hi")
    first = call(client, "POST", f"/api/jobs/{job_id}/cancel").json()
    again = call(client, "POST", f"/api/jobs/{job_id}/cancel").json()
    assert (first["outcome"], again["outcome"]) == ("canceled before it ran", "already done")


def routes(client: TestClient) -> list[tuple[str, str]]:
    """Every operation of the published spec but the health check, its path filled in."""
    paths = client.get("/openapi.json").json()["paths"]
    return [
        (method.upper(), re.sub(r"\{[^}]+\}", "job_isolation", path))
        for path, operations in paths.items()
        if path != "/api/health"
        for method in operations
    ]


def test_every_route_but_health_needs_a_token(client: TestClient) -> None:
    assert len(routes(client)) == 20
    for method, path in routes(client):
        answer = call(client, method, path, headers={"Authorization": ""})
        assert answer.status_code == 401, (method, path, answer.text)
    assert call(client, "GET", "/api/health", headers={"Authorization": ""}).json() == {
        "status": "ok",
        "database": "sqlite",
    }


@pytest.mark.req("R-AGT-2")
def test_each_scope_is_refused_the_others_routes(client: TestClient, queue: JobQueue) -> None:
    group = {"Authorization": f"Bearer {queue.create_group('g', ('g',))}"}
    for method, path in routes(client):
        token = None if path.startswith("/api/agent/") else group
        answer = call(client, method, path, headers=token)  # None: the admin token
        assert answer.status_code == 403, (method, path, answer.text)


@pytest.mark.req("R-API-1")
def test_the_body_limit_answers_before_the_token_is_checked(client: TestClient) -> None:
    big = {"language": "bash", "script": "x" * 5000}
    answer = call(client, "POST", "/api/jobs", big, headers={"Authorization": "Bearer wrong"})
    assert answer.status_code == 413 and "ORVANTA_MAX_REQUEST_BYTES" in answer.json()["detail"]
