"""The agent worker's only way to the queue: the server's HTTP API with its group's token.

An agent (MODE=agent) holds no database credentials (R-AGT-1). It claims jobs,
keeps their lease, reads job_isolation and pushes results through
/api/agent/*, and the server lets its token see only its own group's jobs
(R-AGT-2). Standard library only, so an agent image needs nothing more.

The server is reached over TCP (http://, https://) or a unix socket
(unix:///path/api.sock): a container with no network at all can still be an
agent when the server's socket is mounted into it.
"""

from __future__ import annotations

import http.client
import json
import logging
import socket
import urllib.parse
from typing import Any

from runtime.jobs import JobResult, JobSpec

log = logging.getLogger("orvanta.agent")

REQUEST_TIMEOUT = 15.0


class AgentAPIError(RuntimeError):
    """The server refused a request; the message carries its status and reason."""

    def __init__(self, status: int, detail: str) -> None:
        self.status = status
        self.fatal = status in (401, 403)  # the token is gone: retrying cannot help
        super().__init__(f"server answered {status}: {detail}")


class UnixHTTPConnection(http.client.HTTPConnection):
    """HTTP over a unix socket: the server's `--uds` path."""

    def __init__(self, path: str, timeout: float) -> None:
        super().__init__("localhost", timeout=timeout)
        self.socket_path = path

    def connect(self) -> None:
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        sock.settimeout(self.timeout)
        sock.connect(self.socket_path)
        self.sock = sock


def connection(server_url: str, timeout: float = REQUEST_TIMEOUT) -> http.client.HTTPConnection:
    """A connection to the server at http://HOST:PORT, https://... or unix:///PATH."""
    parts = urllib.parse.urlsplit(server_url)
    if parts.scheme == "unix":
        return UnixHTTPConnection(parts.path, timeout)
    if parts.scheme == "https":
        return http.client.HTTPSConnection(parts.netloc, timeout=timeout)
    return http.client.HTTPConnection(parts.netloc, timeout=timeout)


def request(
    server_url: str, method: str, path: str, token: str, body: Any = None
) -> tuple[int, bytes]:
    """One API call: (status, body); a bytes body is sent as it is. Errors raise OSError."""
    prefix = "" if server_url.startswith("unix:") else urllib.parse.urlsplit(server_url).path
    headers = {"Content-Type": "application/json"}
    if token:
        headers["Authorization"] = f"Bearer {token}"
    conn = connection(server_url)
    try:
        data = body if isinstance(body, bytes) or body is None else json.dumps(body).encode()
        conn.request(method, prefix.rstrip("/") + path, body=data, headers=headers)
        response = conn.getresponse()
        return response.status, response.read()
    finally:
        conn.close()


class AgentClient:
    def __init__(self, server_url: str, token: str) -> None:
        self.base = server_url.rstrip("/")
        self.path = f"{self.base} (agent API)"
        self._token = token

    def _call(self, method: str, path: str, body: dict[str, Any] | None = None) -> Any:
        status, data = request(self.base, method, path, self._token, body)
        if status >= 400:
            raise AgentAPIError(status, data.decode(errors="replace")[:500])
        return json.loads(data or b"null")

    def whoami(self) -> dict[str, Any]:
        """The group this token belongs to; fails fast on a bad token or an unreachable server."""
        result: dict[str, Any] = self._call("GET", "/api/agent/whoami")
        return result

    def claim(self, worker: str, lease: float, tags: tuple[str, ...] = ()) -> JobSpec | None:
        """The next job of this group's tags (the server decides the tags, not the agent)."""
        answer = self._call("POST", "/api/agent/claim", {"worker": worker, "lease": lease})
        job = answer.get("job")
        if job is None:
            return None
        return JobSpec(
            job["id"],
            job["language"],
            job["script"],
            job["env"],
            job["timeout"],
            job["workspace"],
            job.get("job_isolation"),
            job_isolation_read="job_isolation" in job,  # an older server's: asked apart
        )

    def _beat(self, job_id: str, worker: str, lease: float) -> dict[str, Any]:
        answer: dict[str, Any] = self._call(
            "POST", f"/api/agent/jobs/{job_id}/heartbeat", {"worker": worker, "lease": lease}
        )
        return answer

    def renew(self, job_id: str, worker: str, lease: float) -> bool:
        return bool(self._beat(job_id, worker, lease)["held"])

    def release(self, job_id: str, worker: str) -> bool:
        answer = self._call("POST", f"/api/agent/jobs/{job_id}/release", {"worker": worker})
        return bool(answer["released"])

    def cancel_requested(self, job_id: str) -> bool:
        answer: dict[str, Any] = self._call("GET", f"/api/agent/jobs/{job_id}/cancel")
        return bool(answer["cancel"])

    def complete(self, result: JobResult, worker: str) -> bool:
        answer = self._call(
            "POST",
            f"/api/agent/jobs/{result.job_id}/result",
            {"worker": worker, "result": result.to_dict()},
        )
        return bool(answer["recorded"])

    def setting(self, key: str) -> str | None:
        answer = self._call("GET", f"/api/agent/settings/{key}")
        value = answer.get("value")
        return None if value is None else str(value)

    def heartbeat(self, worker: str, mode: str, tags: tuple[str, ...], group: str | None) -> None:
        self._call("POST", "/api/agent/heartbeat", {"worker": worker})
