"""The job service end to end: real server, real workers and agents, both databases."""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from conftest import WorkerProcess

from conformance.service import Service

SHOW_ENV = "import json, os; print(json.dumps(sorted(os.environ)))\n"


def agent_facts(worker: WorkerProcess) -> tuple[set[str], str]:
    """The agent process's own environment names and its memory map, read from the host."""
    pid = worker.proc.pid
    environ = Path(f"/proc/{pid}/environ").read_bytes().split(b"\0")
    names = {entry.split(b"=", 1)[0].decode() for entry in environ if entry}
    return names, Path(f"/proc/{pid}/maps").read_text()


def test_a_job_round_trips_through_the_api(
    service: Service, normal_worker: Callable[..., WorkerProcess]
) -> None:
    normal_worker()
    job_id = service.submit("print('hello from the queue')\n", env={"GREETING": "hi"})
    job = service.wait(job_id)
    assert job["result"]["status"] == "success", job
    assert job["result"]["stdout"] == "hello from the queue\n"
    assert job["attempts"] == 1
    status, logs = service.call("GET", f"/api/jobs/{job_id}/logs")
    assert status == 200
    assert "[orvanta] isolation: none" in logs and "hello from the queue" in logs
    status, listed = service.call("GET", "/api/jobs?status=done")
    assert status == 200 and [j["id"] for j in listed] == [job_id]


@pytest.mark.req("R-GRP-1", "R-AGT-3")
def test_tags_route_jobs_only_to_workers_of_a_matching_group(
    service: Service,
    normal_worker: Callable[..., WorkerProcess],
    agent_worker: Callable[..., WorkerProcess],
) -> None:
    token = service.create_group("strict", ["untrusted"])
    agent_worker("agent-1", token, ENABLE_UNSHARE_PID="true")
    normal_worker("plain")
    untrusted = [service.submit(f"print({i})\n", tag="untrusted") for i in range(3)]
    plain = [service.submit(f"print({i})\n") for i in range(3)]
    for job_id in untrusted:
        job = service.wait(job_id)
        assert job["worker_group"] == "strict" and job["worker"] == "strict/agent-1", job
        assert job["result"]["isolation"] == "unshare", job  # agents combine with PID isolation
    for job_id in plain:
        job = service.wait(job_id)
        assert job["worker_group"] is None and job["worker"] == "plain", job
    status, workers = service.call("GET", "/api/workers")
    assert status == 200
    assert {(w["name"], tuple(w["tags"])) for w in workers} == {
        ("strict/agent-1", ("untrusted",)),
        ("plain", ("default",)),
    }


@pytest.mark.req("R-GRP-1")
def test_a_job_no_live_worker_serves_is_reported_not_silently_stuck(
    service: Service, normal_worker: Callable[..., WorkerProcess]
) -> None:
    normal_worker()
    status, created = service.call(
        "POST", "/api/jobs", {"language": "bash", "script": "echo gpu", "tag": "gpu"}
    )
    assert status == 201
    assert "no live worker serves tag 'gpu'" in created["waiting"]
    time.sleep(1)
    status, job = service.call("GET", f"/api/jobs/{created['id']}")
    assert job["status"] == "queued" and "gpu" in job["waiting"], job
    status, served = service.call("POST", "/api/jobs", {"language": "bash", "script": "echo"})
    assert served["waiting"] is None


@pytest.mark.req("R-AGT-2")
def test_a_group_token_reaches_only_its_own_groups_jobs(service: Service) -> None:
    token_a = service.create_group("team-a", ["a"])
    token_b = service.create_group("team-b", ["b"])
    job_b = service.submit("print('b secret')\n", tag="b", env={"B_SECRET": "only-b"})
    # a's agent is never handed b's job
    status, claimed = service.call("POST", "/api/agent/claim", {"worker": "x"}, token=token_a)
    assert (status, claimed) == (200, {"job": None})
    # nor may it read jobs, results, groups or settings through the admin API
    for method, path, body in (
        ("GET", f"/api/jobs/{job_b}", None),
        ("GET", f"/api/jobs/{job_b}/logs", None),
        ("GET", "/api/jobs", None),
        ("POST", "/api/jobs", {"language": "bash", "script": "id"}),
        ("GET", "/api/groups", None),
        ("PUT", "/api/settings/job_isolation", {"value": None}),
    ):
        status, answer = service.call(method, path, body, token=token_a)
        assert status == 403, (method, path, status, answer)
    status, claimed = service.call("POST", "/api/agent/claim", {"worker": "y"}, token=token_b)
    assert claimed["job"]["id"] == job_b and claimed["job"]["env"] == {"B_SECRET": "only-b"}
    # a cannot see, hold, cancel-poll or answer for b's running job
    status, _ = service.call("GET", f"/api/agent/jobs/{job_b}/cancel", token=token_a)
    assert status == 404
    status, beat = service.call(
        "POST", f"/api/agent/jobs/{job_b}/heartbeat", {"worker": "y"}, token=token_a
    )
    assert beat == {"held": False, "cancel": False}
    forged = {
        "isolation": "none",
        "status": "success",
        "exit_code": 0,
        "duration": 0.1,
        "stdout": "forged",
        "stderr": "",
        "log": [],
    }
    status, answer = service.call(
        "POST", f"/api/agent/jobs/{job_b}/result", {"worker": "y", "result": forged}, token=token_a
    )
    assert answer == {"recorded": False}
    genuine = {**forged, "stdout": "b secret\n"}
    for expected in (True, False):  # recorded exactly once
        status, answer = service.call(
            "POST",
            f"/api/agent/jobs/{job_b}/result",
            {"worker": "y", "result": genuine},
            token=token_b,
        )
        assert answer == {"recorded": expected}
    assert service.wait(job_b)["result"]["stdout"] == "b secret\n"
    # no token, or a rotated one, is refused
    assert service.call("POST", "/api/agent/claim", {"worker": "x"}, token="")[0] == 401
    status, rotated = service.call("POST", "/api/groups/team-a/token")
    assert service.call("GET", "/api/agent/whoami", token=token_a)[0] == 403
    assert service.call("GET", "/api/agent/whoami", token=rotated["token"])[1]["name"] == "team-a"


@pytest.mark.req("R-AGT-1")
def test_an_agent_holds_no_database_credentials_and_refuses_them(
    service: Service,
    agent_worker: Callable[..., WorkerProcess],
    database_url: str,
) -> None:
    token = service.create_group("agents", ["default"])
    agent = agent_worker("agent-ok", token)
    names, maps = agent_facts(agent)
    assert "DATABASE_URL" not in names
    assert "psycopg" not in maps and "libpq" not in maps and "sqlite" not in maps.lower()
    job = service.wait(service.submit(SHOW_ENV))
    assert "DATABASE_URL" not in json.loads(job["result"]["stdout"])
    refused = agent_worker("agent-db", token, wait=False, DATABASE_URL=database_url)
    assert refused.proc.wait(30) == 2
    assert "DATABASE_URL='***' is not valid" in refused.output()
    assert "R-AGT-1" in refused.output()
    assert database_url.split("@")[0] not in refused.output()  # the secret is never logged
    bad = agent_worker("agent-bad-token", "orv_nope", wait=False)
    assert bad.proc.wait(30) == 2
    assert "refused ORVANTA_AGENT_TOKEN" in bad.output()


@pytest.mark.req("R-SEL-7", "R-AGT-3")
def test_job_isolation_set_through_the_api_reaches_running_workers_and_agents(
    service: Service,
    normal_worker: Callable[..., WorkerProcess],
    agent_worker: Callable[..., WorkerProcess],
) -> None:
    token = service.create_group("iso", ["iso"])
    normal_worker("plain")
    agent_worker("agent-iso", token)

    def isolations() -> tuple[str, str]:
        plain = service.wait(service.submit("print(1)\n"))
        agent = service.wait(service.submit("print(1)\n", tag="iso"))
        return plain["result"]["isolation"], agent["result"]["isolation"]

    assert isolations() == ("none", "none")
    status, setting = service.call(
        "PUT", "/api/settings/job_isolation", {"value": "nsjail_sandboxing"}
    )
    assert (status, setting) == (200, {"value": "nsjail_sandboxing"})
    assert isolations() == ("nsjail", "nsjail")
    status, answer = service.call("PUT", "/api/settings/job_isolation", {"value": "chroot"})
    assert status == 422 and "nsjail_sandboxing" in json.dumps(answer)
    service.call("PUT", "/api/settings/job_isolation", {"value": None})
    assert isolations() == ("none", "none")


VOLUME_JOB = """# volume: cache data
# sandbox
import json, os
path = "data/counter.txt"
count = int(open(path).read()) + 1 if os.path.exists(path) else 1
open(path, "w").write(str(count))
print(json.dumps({"count": count, "parent": sorted(os.listdir("data/..")),
                  "real": os.path.realpath("data")}))
"""


@pytest.mark.req("R-ANN-4", "R-ANN-1")
def test_a_volume_keeps_files_across_jobs_of_its_workspace_only(
    service: Service, normal_worker: Callable[..., WorkerProcess]
) -> None:
    normal_worker()

    def run(workspace: str) -> dict[str, Any]:
        job = service.wait(service.submit(VOLUME_JOB, workspace=workspace))
        assert job["result"]["status"] == "success", job
        assert job["result"]["isolation"] == "nsjail", job
        return dict(json.loads(job["result"]["stdout"]))

    first, second, other = run("ws-a"), run("ws-a"), run("ws-b")
    assert (first["count"], second["count"], other["count"]) == (1, 2, 1)
    # mounted inside the sandbox's own /job: its parent is the job dir, not the host
    assert first["real"] == "/job/data" and first["parent"] == ["data", "main.py"]


@pytest.mark.req("R-ANN-4")
@pytest.mark.parametrize(
    "header",
    ["# volume: ../../etc", "# volume: cache /etc", "# volume: a/b", "# volume: c main.py"],
)
def test_a_volume_name_that_is_a_path_is_refused(
    service: Service, normal_worker: Callable[..., WorkerProcess], header: str
) -> None:
    normal_worker()
    job = service.wait(service.submit(f"{header}\nprint('ran')\n"))
    assert job["result"]["status"] == "error" and job["result"]["stdout"] == "", job
    stderr = job["result"]["stderr"]
    assert ("is not valid" in stderr and "a name, not a path" in stderr) or "own script" in stderr


BAD_REQUESTS: list[tuple[str, str, Any, int, str]] = [
    ("POST", "/api/jobs", {"language": "cobol", "script": "x"}, 422, "python3"),
    ("POST", "/api/jobs", {"language": "bash", "script": "x" * ((1 << 20) + 1)}, 422, "at most"),
    ("POST", "/api/jobs", {"language": "bash", "script": "echo\u0000"}, 422, "NUL"),
    ("POST", "/api/jobs", {"language": "bash", "script": ""}, 422, "at least 1"),
    ("POST", "/api/jobs", {"language": "bash", "script": "x", "tag": "../etc"}, 422, "pattern"),
    ("POST", "/api/jobs", {"language": "bash", "script": "x", "tag": "a..b"}, 422, "not a path"),
    ("POST", "/api/groups", {"name": "g", "tags": ["x..y"]}, 422, "not a path"),
    ("POST", "/api/jobs", {"language": "bash", "script": "x", "timeout": -1}, 422, "greater"),
    ("POST", "/api/jobs", {"language": "bash", "script": "x", "env": {"1BAD": "v"}}, 422, "1BAD"),
    ("POST", "/api/jobs", {"script": "x"}, 422, "language"),
    ("POST", "/api/jobs", "not an object", 422, "object"),
    ("GET", "/api/jobs/0000000000000000", None, 404, "no job"),
    ("GET", "/api/jobs?limit=100000", None, 422, "less than or equal"),
    ("POST", "/api/groups", {"name": "g", "tags": []}, 422, "at least 1"),
    ("DELETE", "/api/groups/nope", None, 404, "no worker group"),
    ("POST", "/api/jobs/0000000000000000/cancel", None, 404, "no job"),
    ("GET", "/api/jobs/%00", None, 422, "pattern"),
    ("DELETE", "/api/groups/%00", None, 422, "pattern"),
]


@pytest.mark.parametrize(("method", "path", "body", "code", "says"), BAD_REQUESTS)
def test_bad_input_is_a_4xx_that_says_what_was_wrong(
    service: Service, method: str, path: str, body: Any, code: int, says: str
) -> None:
    status, answer = service.call(method, path, body)
    assert status == code, answer
    assert says in json.dumps(answer), answer


def test_malformed_json_and_bad_tokens_are_4xx(service: Service) -> None:
    assert service.call("POST", "/api/jobs", raw=b"{not json")[0] == 422
    assert service.call("GET", "/api/jobs", token="")[0] == 401
    status, answer = service.call("GET", "/api/jobs", token="wrong-token")
    assert status == 403 and "admin token" in answer["detail"]
    service.create_group("dup", ["x"])
    status, answer = service.call("POST", "/api/groups", {"name": "dup", "tags": ["x"]})
    assert status == 409 and "already exists" in answer["detail"]


def test_output_no_database_can_store_still_gives_a_readable_result(
    service: Service,
    normal_worker: Callable[..., WorkerProcess],
    agent_worker: Callable[..., WorkerProcess],
) -> None:
    """A NUL byte in a job's output is kept visible as U+FFFD, on both kinds of worker."""
    normal_worker()
    agent_worker("agent-nul", service.create_group("nul", ["nul"]))
    for tag in ("default", "nul"):
        job = service.wait(service.submit("printf 'a\\0b'", language="bash", tag=tag))
        assert job["result"]["status"] == "success" and job["attempts"] == 1, job
        assert job["result"]["stdout"] == "a\ufffdb"
    assert service.call("GET", "/api/jobs")[0] == 200


@pytest.mark.req("R-AGT-2")
def test_an_agent_whose_token_was_rotated_stops(
    service: Service, agent_worker: Callable[..., WorkerProcess]
) -> None:
    agent = agent_worker("agent-rotated", service.create_group("rot", ["rot"]))
    assert service.call("POST", "/api/groups/rot/token")[0] == 200
    assert agent.proc.wait(20) == 1
    assert "stopping" in agent.output() and "403" in agent.output()


def test_a_worker_outlives_a_dropped_database_connection(
    database_url: str, normal_worker: Callable[..., WorkerProcess], service: Service
) -> None:
    """PostgreSQL restarted or the backend killed: the next call connects again."""
    worker = normal_worker()
    assert service.wait(service.submit("print(1)\n"))["result"]["status"] == "success"
    if database_url.startswith("postgresql"):
        import psycopg

        database = database_url.rsplit("/", 1)[1]
        with psycopg.connect(database_url, autocommit=True) as admin:
            admin.execute(
                "SELECT pg_terminate_backend(pid) FROM pg_stat_activity "
                "WHERE datname = %s AND pid <> pg_backend_pid()",
                (database,),
            )
    for _ in range(3):  # the server and the worker both lost theirs
        status, _ = service.call("GET", "/api/health")
        assert status == 200
        job_id = None
        status, created = service.call("POST", "/api/jobs", {"language": "bash", "script": "echo"})
        if status == 201:
            job_id = created["id"]
            break
    assert job_id is not None, "the server did not reconnect"
    assert service.wait(job_id)["result"]["stdout"] == "\n"
    assert worker.proc.poll() is None


@pytest.mark.req("R-AGT-1")
def test_an_agent_reaches_a_server_on_a_unix_socket(
    database_url: str, spawn_worker: Callable[..., WorkerProcess], tmp_path: Path
) -> None:
    """For agents with no network at all (a container with network none and the socket mounted)."""
    service = Service.start(database_url, tmp_path / "uds", unix_socket=True)
    try:
        assert service.url == f"unix://{tmp_path / 'uds' / 'api.sock'}"
        token = service.create_group("sock", ["sock"])
        spawn_worker(
            "agent-uds",
            {"MODE": "agent", "ORVANTA_SERVER_URL": service.url, "ORVANTA_AGENT_TOKEN": token},
        )
        job = service.wait(service.submit("echo over the socket", language="bash", tag="sock"))
        assert job["result"]["stdout"] == "over the socket\n" and job["worker"] == "sock/agent-uds"
    finally:
        service.stop()
