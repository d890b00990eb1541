"""The job service end to end: real server, real workers and agents, both databases."""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from service_helpers import WorkerProcess

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
    status, back = service.call(
        "POST", f"/api/agent/jobs/{job_b}/release", {"worker": "y"}, token=token_a
    )
    assert back == {"released": False}  # nor hand it back to the queue
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


@pytest.mark.req("R-SEL-7")
def test_an_agents_claim_carries_the_live_job_isolation(service: Service) -> None:
    """Read with the claim: an agent asks for it apart only from a server that cannot say."""
    token = service.create_group("claims", ["claims"])
    service.call("PUT", "/api/settings/job_isolation", {"value": "nsjail_sandboxing"})
    try:
        job = service.submit("print(1)\n", tag="claims")
        status, claimed = service.call("POST", "/api/agent/claim", {"worker": "c"}, token=token)
        assert status == 200 and claimed["job"]["id"] == job, claimed
        assert claimed["job"]["job_isolation"] == "nsjail_sandboxing", claimed
    finally:
        service.call("PUT", "/api/settings/job_isolation", {"value": None})


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
@pytest.mark.parametrize("header", ["# volume: ../../etc", "# volume: cache /etc", "# volume: a/b"])
def test_a_volume_name_that_is_a_path_is_refused(service: Service, header: str) -> None:
    """Refused at submission: the header is read by the same parser as on the worker."""
    status, answer = service.call(
        "POST", "/api/jobs", {"language": "python3", "script": f"{header}\nprint('ran')\n"}
    )
    assert status == 422, answer
    assert "is not valid" in answer["detail"] and "a name, not a path" in answer["detail"]


@pytest.mark.req("R-ANN-4")
def test_a_volume_over_the_script_fails_the_job(
    service: Service, normal_worker: Callable[..., WorkerProcess]
) -> None:
    """Only the worker knows the script's file name: this one is refused when the job runs."""
    normal_worker()
    job = service.wait(service.submit("# volume: c main.py\nprint('ran')\n"))
    assert job["result"]["status"] == "error" and job["result"]["stdout"] == "", job
    assert "own script" in job["result"]["stderr"]


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


# -- submission rules (runtime.submission) and request limits (R-API-1, R-API-2) -----------
MiB = 1 << 20


def test_a_refused_job_variable_is_a_422_and_an_ordinary_one_is_accepted(
    service: Service,
) -> None:
    job = {"language": "bash", "script": "echo hi"}
    status, answer = service.call("POST", "/api/jobs", {**job, "env": {"LD_PRELOAD": "/x.so"}})
    assert status == 422, answer
    assert answer["detail"].startswith("job variable 'LD_PRELOAD' is refused: ")
    assert "runtime.submission.REFUSED_NAMES" in answer["detail"]
    assert "/x.so" not in json.dumps(answer)
    for env in ({"ld_preload": "/x.so"}, {"MALLOC_CHECK_": "3"}, {"TMPDIR": "/tmp"}):
        assert service.call("POST", "/api/jobs", {**job, "env": env})[0] == 422, env
    status, created = service.call("POST", "/api/jobs", {**job, "env": {"MY_VAR": "1"}})
    assert status == 201, created
    assert service.call("GET", "/api/jobs?status=queued")[1][0]["id"] == created["id"]


@pytest.mark.req("R-ANN-1", "R-ANN-2")
@pytest.mark.parametrize("header", ["# sandbox: yes", "# sandbx", "# volumes: x", "# sandboxed"])
def test_a_header_near_miss_is_refused_at_submission(service: Service, header: str) -> None:
    script = f"#!/bin/bash\n{header}\necho hi\n"
    status, answer = service.call("POST", "/api/jobs", {"language": "bash", "script": script})
    assert status == 422, answer
    assert answer["detail"].startswith(f"script line 2: {header!r} looks like a header annotation")
    assert "'# sandbox'" in answer["detail"]
    assert service.call("GET", "/api/jobs")[1] == []  # nothing was queued


def rss(service: Service) -> int:
    """The server process's resident memory in bytes."""
    for line in Path(f"/proc/{service.proc.pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    raise AssertionError("no VmRSS")


def raw_post(
    service: Service,
    path: str,
    size: int,
    chunked: bool = False,
    headers: dict[str, str] | None = None,
) -> tuple[int, Any]:
    """POST `size` bytes over a bare socket, reading the answer while the body is still sent.

    A server that refuses early closes the connection; http.client would fail on the send
    and never see the answer.
    """
    import contextlib
    import socket
    import threading
    import urllib.parse

    url = urllib.parse.urlsplit(service.url)
    sock = socket.create_connection((url.hostname, url.port), timeout=30)
    framing = {"Transfer-Encoding": "chunked"} if chunked else {"Content-Length": str(size)}
    head = {"Host": "test", "Content-Type": "application/json", **framing, **(headers or {})}
    sock.sendall(
        f"POST {path} HTTP/1.1\r\n".encode()
        + "".join(f"{k}: {v}\r\n" for k, v in head.items()).encode()
        + b"\r\n"
    )

    def pump() -> None:
        chunk = b"x" * (256 << 10)
        left = size
        try:
            while left > 0:
                part = chunk[: min(left, len(chunk))]
                sock.sendall(b"%x\r\n%s\r\n" % (len(part), part) if chunked else part)
                left -= len(part)
            if chunked:
                sock.sendall(b"0\r\n\r\n")
        except OSError:
            pass  # the server stopped reading: what we want

    sender = threading.Thread(target=pump, daemon=True)
    sender.start()
    data = b""
    try:
        while b"\r\n\r\n" not in data:
            more = sock.recv(65536)
            assert more, f"connection closed without an answer: {data!r}"
            data += more
        head_text, _, body = data.partition(b"\r\n\r\n")
        lines = head_text.decode().split("\r\n")
        fields = {k.lower(): v.strip() for k, _, v in (h.partition(":") for h in lines[1:])}
        length = int(fields.get("content-length", "0"))
        while len(body) < length:
            more = sock.recv(65536)
            if not more:
                break
            body += more
    finally:
        with contextlib.suppress(OSError):  # the server may have closed it already
            sock.shutdown(socket.SHUT_RDWR)
        sock.close()
        sender.join(30)
    return int(lines[0].split()[1]), json.loads(body)


@pytest.mark.req("R-API-1")
@pytest.mark.parametrize("chunked", [False, True], ids=["content-length", "chunked"])
@pytest.mark.parametrize("token", [None, "wrong-token"], ids=["no-token", "wrong-token"])
def test_a_40_mb_post_is_refused_before_parsing_or_auth_and_costs_no_memory(
    service: Service, chunked: bool, token: str | None
) -> None:
    headers = {"Authorization": f"Bearer {token}"} if token else {}
    raw_post(service, "/api/jobs", 1000, headers=headers)  # warm up the request path
    before = rss(service)
    status, answer = raw_post(service, "/api/jobs", 40 * MiB, chunked, headers)
    grown = rss(service) - before
    assert status == 413, answer  # not 401/403: the token is never looked at
    assert "ORVANTA_MAX_REQUEST_BYTES" in answer["detail"]
    assert str(6 * MiB + 12 * MiB) in answer["detail"]  # the default limit, named
    assert grown < 64 * MiB, f"server grew by {grown / MiB:.1f} MiB"
    assert service.call("GET", "/api/health")[0] == 200
    assert "refused" in service.output()


@pytest.fixture
def small_limits(database_url: str, tmp_path: Path) -> Any:
    """A server with a 20000-byte request limit and a 1000-character output cap."""
    svc = Service.start(
        database_url,
        tmp_path / "small",
        env={"ORVANTA_MAX_REQUEST_BYTES": "20000", "ORVANTA_OUTPUT_LIMIT": "1000"},
    )
    yield svc
    svc.stop()


@pytest.mark.req("R-API-1")
@pytest.mark.parametrize(
    ("method", "path"),
    [
        ("GET", "/api/health"),
        ("POST", "/api/jobs"),
        ("PUT", "/api/settings/job_isolation"),
        ("POST", "/api/groups"),
        ("POST", "/api/agent/claim"),
        ("POST", "/api/agent/jobs/0000000000000000/result"),
        ("POST", "/api/nowhere"),
    ],
)
def test_every_endpoint_refuses_a_body_over_the_limit(
    small_limits: Service, method: str, path: str
) -> None:
    status, answer = small_limits.call(method, path, raw=b"{" + b" " * 19999 + b"}")
    assert status == 413, answer
    assert "limit of 20000 bytes (ORVANTA_MAX_REQUEST_BYTES)" in answer["detail"]
    status, _ = small_limits.call(method, path, raw=b"{" + b" " * 19998 + b"}")
    assert status != 413  # under the limit: the endpoint answers as usual


@pytest.mark.req("R-API-1")
def test_a_chunked_body_under_the_limit_still_reaches_the_endpoint(small_limits: Service) -> None:
    status, answer = raw_post(small_limits, "/api/jobs", 20001, chunked=True)
    assert status == 413, answer
    status, answer = raw_post(small_limits, "/api/jobs", 20000, chunked=True)
    assert status == 422, answer  # read in full and parsed: not JSON
    assert answer["detail"][0]["type"] == "json_invalid"


@pytest.mark.req("R-API-1")
@pytest.mark.parametrize(
    "body",
    [
        {"language": "bash", "script": "S" * (MiB + 1)},
        {"script": "S" * 100_000},  # `missing` errors carry the whole body as their input
        {"language": "bash", "script": "echo", "env": {"1" + "S" * 100_000: "v"}},
        {"language": "bash", "script": "echo", "env": {"V": "S" * 100_000}},
        {"language": "bash", "script": "echo", "tag": "S" * 100_000},
        ["S" * 100_000],
    ],
    ids=["script", "missing-field", "env-name", "env-value", "tag", "not-an-object"],
)
def test_a_422_never_echoes_a_large_input(service: Service, body: Any) -> None:
    status, answer = service.call("POST", "/api/jobs", body)
    assert status == 422, str(answer)[:500]
    text = json.dumps(answer)
    assert len(text) < 4000 and "S" * 100 not in text, text[:500]
    assert answer["detail"]


@pytest.mark.req("R-API-1")
def test_a_422_still_echoes_a_small_input(service: Service) -> None:
    status, answer = service.call("POST", "/api/jobs", {"language": "cobol", "script": "x"})
    assert status == 422 and answer["detail"][0]["input"] == "cobol", answer


def result_body(stdout: str, stderr: str = "") -> dict[str, Any]:
    result = {
        "isolation": "none",
        "status": "success",
        "exit_code": 0,
        "duration": 0.1,
        "stdout": stdout,
        "stderr": stderr,
        "log": ["isolation: none"],
    }
    return {"worker": "w", "result": result}


@pytest.mark.req("R-API-2")
def test_an_agents_result_is_capped_like_a_workers_own_output(small_limits: Service) -> None:
    token = small_limits.create_group("cap", ["cap"])
    job_id = small_limits.submit("print(1)\n", tag="cap")
    status, claimed = small_limits.call("POST", "/api/agent/claim", {"worker": "w"}, token=token)
    assert claimed["job"]["id"] == job_id
    status, answer = small_limits.call(
        "POST", f"/api/agent/jobs/{job_id}/result", result_body("é" * 1500, "ok\n"), token=token
    )
    assert (status, answer) == (200, {"recorded": True})
    result = small_limits.wait(job_id)["result"]
    # the first 1000 characters, then the executor's own note (the 500 dropped are 2 bytes each)
    assert result["stdout"] == "é" * 1000 + "\n[output truncated: 1000 more bytes dropped]\n"
    assert result["stderr"] == "ok\n"
    assert result["log"] == [
        "isolation: none",
        "stdout truncated by the server at 1000 characters (1000 bytes dropped; "
        "ORVANTA_OUTPUT_LIMIT)",
    ]
    assert "stdout truncated by the server" in small_limits.output()


@pytest.mark.req("R-API-2", "R-AGT-1")
def test_a_real_agents_output_is_capped_and_an_oversized_result_still_ends_the_job(
    database_url: str, spawn_worker: Callable[..., WorkerProcess], tmp_path: Path
) -> None:
    """The agent keeps its own 1 MiB cap; the server keeps 1000 characters, 413s over 64 KiB.

    A 413 on the result is what runtime.worker's _complete expects: it reports the job
    as an error without its output instead of retrying forever. The agent sends all of a
    1 MiB body before it reads the answer, so the server must still deliver the 413.
    """
    svc = Service.start(
        database_url,
        tmp_path / "capped",
        env={"ORVANTA_MAX_REQUEST_BYTES": str(64 << 10), "ORVANTA_OUTPUT_LIMIT": "1000"},
    )
    try:
        token = svc.create_group("agents", ["default"])
        spawn_worker(
            "agent-cap",
            {"MODE": "agent", "ORVANTA_SERVER_URL": svc.url, "ORVANTA_AGENT_TOKEN": token},
        )
        capped = svc.wait(svc.submit("print('x' * 20000)\n"))["result"]
        assert capped["status"] == "success", capped
        assert capped["stdout"] == "x" * 1000 + "\n[output truncated: 19001 more bytes dropped]\n"
        refused = svc.wait(svc.submit("print('y' * 3000000)\n"))["result"]  # 1 MiB kept
        assert refused["status"] == "error" and refused["stdout"] == "", refused
        assert any("the server refused the job's result" in line for line in refused["log"])
        assert "413" in refused["log"][-1]
    finally:
        svc.stop()
