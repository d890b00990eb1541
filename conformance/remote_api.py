"""The remote audit's only way to workers: the job service's admin API (stdlib HTTP).

Every job it submits is remembered, so whatever is still queued or running when the audit
ends (or is interrupted) is canceled: no probe outlives the audit in the queue.
"""

from __future__ import annotations

import json
import threading
import time
from dataclasses import dataclass
from typing import Any

from runtime.agent import request

POLL = 0.05


class RemoteError(RuntimeError):
    """The server could not be used; the message says what it answered and what to do."""


@dataclass
class Submitted:
    """A submission: the job's id, or the server's refusal (a 422's detail)."""

    id: str | None
    refusal: str = ""


class AdminAPI:
    def __init__(self, url: str, token: str) -> None:
        self.url = url.rstrip("/")
        self._token = token
        self._lock = threading.Lock()
        self.submitted: list[str] = []

    def call(self, method: str, path: str, body: Any = None) -> tuple[int, Any]:
        try:
            status, data = request(self.url, method, path, self._token, body)
        except OSError as exc:
            raise RemoteError(f"server {self.url} unreachable: {exc}; check --server") from exc
        text = data.decode(errors="replace")
        try:
            return status, json.loads(text) if text else None
        except ValueError:
            return status, text

    def check(self) -> None:
        """Fails with one clear line on a wrong token or an unreachable server."""
        status, body = self.call("GET", "/api/workers")
        if status in (401, 403):
            raise RemoteError(
                f"server {self.url} refused the admin token ({status}: {body}); "
                "set ORVANTA_ADMIN_TOKEN to the server's admin token"
            )
        if status != 200:
            raise RemoteError(f"server {self.url} answered {status} to GET /api/workers: {body}")

    def workers(self) -> list[dict[str, Any]]:
        status, body = self.call("GET", "/api/workers")
        return list(body) if status == 200 else []

    def submit(
        self,
        language: str,
        script: str,
        env: dict[str, str],
        timeout: float,
        tag: str,
        workspace: str,
    ) -> Submitted:
        body = {
            "language": language,
            "script": script,
            "env": env,
            "timeout": timeout,
            "tag": tag,
            "workspace": workspace,
        }
        status, answer = self.call("POST", "/api/jobs", body)
        if status == 201:
            with self._lock:
                self.submitted.append(str(answer["id"]))
            return Submitted(str(answer["id"]))
        if status == 422:
            return Submitted(None, json.dumps(answer)[:1500])
        raise RemoteError(f"POST /api/jobs answered {status}: {str(answer)[:500]}")

    def job(self, job_id: str) -> dict[str, Any]:
        status, body = self.call("GET", f"/api/jobs/{job_id}")
        if status != 200:
            raise RemoteError(f"GET /api/jobs/{job_id} answered {status}: {body}")
        return dict(body)

    def wait(self, job_id: str, timeout: float, until: str = "done") -> dict[str, Any] | None:
        """The job once it left `queued` (until="running") or is done; None after timeout."""
        end = time.monotonic() + timeout
        while True:
            job = self.job(job_id)
            if job["status"] == "done" or (until == "running" and job["status"] != "queued"):
                return job
            if time.monotonic() > end:
                return None
            time.sleep(POLL)

    def cancel(self, job_id: str) -> None:
        self.call("POST", f"/api/jobs/{job_id}/cancel")

    def cancel_unfinished(self) -> list[str]:
        """Cancels every job of this audit that is not done; returns their ids."""
        with self._lock:
            ids = list(self.submitted)
        left = []
        for job_id in ids:
            status, body = self.call("GET", f"/api/jobs/{job_id}")
            if status == 200 and body["status"] != "done":
                self.cancel(job_id)
                left.append(job_id)
        return left
