"""The agent worker's only way to the queue: the server's HTTP API with its group's token.

An agent (MODE=agent) holds no database credentials (R-AGT-1). It claims jobs,
keeps their lease, reads job_isolation and pushes results through
/api/agent/*, and the server lets its token see only its own group's jobs
(R-AGT-2). Standard library only, so an agent image needs nothing more.
"""

from __future__ import annotations

import json
import logging
import urllib.error
import urllib.request
from typing import Any

from runtime.executor import JobResult, JobSpec

log = logging.getLogger("orvanta.agent")

REQUEST_TIMEOUT = 15.0


class AgentAPIError(RuntimeError):
    """The server refused a request; the message carries its status and reason."""

    def __init__(self, status: int, detail: str) -> None:
        self.status = status
        self.fatal = status in (401, 403)  # the token is gone: retrying cannot help
        super().__init__(f"server answered {status}: {detail}")


class AgentClient:
    def __init__(self, server_url: str, token: str) -> None:
        self.base = server_url.rstrip("/")
        self.path = f"{self.base} (agent API)"
        self._token = token

    def _call(self, method: str, path: str, body: dict[str, Any] | None = None) -> Any:
        data = None if body is None else json.dumps(body).encode()
        request = urllib.request.Request(
            self.base + path,
            data=data,
            method=method,
            headers={"Authorization": f"Bearer {self._token}", "Content-Type": "application/json"},
        )
        try:
            with urllib.request.urlopen(request, timeout=REQUEST_TIMEOUT) as response:
                return json.loads(response.read() or b"null")
        except urllib.error.HTTPError as exc:
            detail = exc.read().decode(errors="replace")[:500]
            raise AgentAPIError(exc.code, detail) from None

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
            job["id"], job["language"], job["script"], job["env"], job["timeout"], job["workspace"]
        )

    def _beat(self, job_id: str, worker: str, lease: float) -> dict[str, Any]:
        answer: dict[str, Any] = self._call(
            "POST", f"/api/agent/jobs/{job_id}/heartbeat", {"worker": worker, "lease": lease}
        )
        return answer

    def renew(self, job_id: str, worker: str, lease: float) -> bool:
        return bool(self._beat(job_id, worker, lease)["held"])

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
