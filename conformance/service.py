"""A real job service under test: `orvanta server` on a loopback port, over SQLite or PostgreSQL.

PostgreSQL is the machine's own server (scripts/setup starts it and writes the
URL of a role that may create databases to .venv/postgres.url); every user
gets a throw-away database of its own, dropped afterwards.
"""

from __future__ import annotations

import contextlib
import json
import os
import secrets
import socket
import subprocess
import sys
import time
import urllib.parse
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
POSTGRES_URL_FILE = ROOT / ".venv" / "postgres.url"
START_TIMEOUT = 30.0


class ServiceError(RuntimeError):
    """The server did not come up; the message carries its log."""


def postgres_url() -> str | None:
    """A PostgreSQL URL whose role may create databases, or None when there is none here."""
    url = os.environ.get("ORVANTA_TEST_POSTGRES_URL")
    if url:
        return url
    with contextlib.suppress(OSError):
        return POSTGRES_URL_FILE.read_text().strip() or None
    return None


def postgres_unavailable() -> str | None:
    """Why PostgreSQL cannot be used here, or None when it can."""
    url = postgres_url()
    if url is None:
        return f"no PostgreSQL URL in ORVANTA_TEST_POSTGRES_URL or {POSTGRES_URL_FILE}"
    try:
        import psycopg

        psycopg.connect(url, connect_timeout=5).close()
    except Exception as exc:
        return f"PostgreSQL at {url.split('@')[-1]} does not answer: {exc}"
    return None


@contextlib.contextmanager
def scratch_postgres(prefix: str = "orvanta_t", password: str | None = None) -> Iterator[str]:
    """A fresh database on the local PostgreSQL, dropped afterwards; yields its URL.

    With `password`, the database belongs to a fresh role of that password (dropped too):
    a worker's real credentials, which a conformance cell makes its canary secret.
    """
    import psycopg
    from psycopg import sql

    base = postgres_url()
    if base is None:
        raise ServiceError(postgres_unavailable() or "no PostgreSQL")
    name = f"{prefix}_{secrets.token_hex(6)}"
    parts = urllib.parse.urlsplit(base)
    user, host = parts.username or "", parts.hostname or "127.0.0.1"
    netloc = f"{user}:{parts.password}@{host}:{parts.port or 5432}"
    db = sql.Identifier(name)
    with psycopg.connect(base, autocommit=True) as admin:
        if password is not None:
            admin.execute(sql.SQL("CREATE ROLE {} LOGIN PASSWORD {}").format(db, password))
            admin.execute(sql.SQL("GRANT {} TO {}").format(db, sql.Identifier(user)))
            admin.execute(sql.SQL("CREATE DATABASE {} OWNER {}").format(db, db))
            netloc = f"{name}:{urllib.parse.quote(password)}@{host}:{parts.port or 5432}"
        else:
            admin.execute(sql.SQL("CREATE DATABASE {}").format(db))
    try:
        yield urllib.parse.urlunsplit((parts.scheme, netloc, f"/{name}", "", ""))
    finally:
        with psycopg.connect(base, autocommit=True) as admin:
            admin.execute(sql.SQL("DROP DATABASE IF EXISTS {} WITH (FORCE)").format(db))
            if password is not None:
                admin.execute(sql.SQL("DROP ROLE IF EXISTS {}").format(db))


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


@dataclass
class Service:
    """One `orvanta server` process; `call` speaks to it as admin unless given a token."""

    url: str
    admin_token: str = field(repr=False)
    proc: subprocess.Popen[bytes]
    log: Path

    @classmethod
    def start(
        cls,
        database_url: str,
        workdir: Path,
        env: dict[str, str] | None = None,
        unix_socket: bool = False,
    ) -> Service:
        """The server on a free loopback port, or (unix_socket) on WORKDIR/api.sock."""
        workdir.mkdir(parents=True, exist_ok=True)
        token = f"admin-{secrets.token_hex(16)}"
        port = free_port()
        sock = workdir / "api.sock"
        where = ["--uds", str(sock)] if unix_socket else ["--port", str(port)]
        log = workdir / "server.log"
        full_env = {
            "PATH": os.environ.get("PATH", "/usr/bin:/bin"),
            "LANG": "C.UTF-8",
            "DATABASE_URL": database_url,
            "ORVANTA_ADMIN_TOKEN": token,
            "ORVANTA_STATE_DIR": str(workdir / "server-state"),
            **(env or {}),
        }
        with open(log, "wb") as out:
            proc = subprocess.Popen(
                [sys.executable, "-m", "runtime.cli", "server", *where],
                env=full_env,
                cwd=ROOT,
                stdin=subprocess.DEVNULL,
                stdout=out,
                stderr=subprocess.STDOUT,
            )
        url = f"unix://{sock}" if unix_socket else f"http://127.0.0.1:{port}"
        service = cls(url, token, proc, log)
        service.wait_ready()
        return service

    def wait_ready(self) -> None:
        end = time.monotonic() + START_TIMEOUT
        while time.monotonic() < end:
            if self.proc.poll() is not None:
                raise ServiceError(f"server exited with {self.proc.returncode}:\n{self.output()}")
            with contextlib.suppress(OSError):
                if self.call("GET", "/api/health")[0] == 200:
                    return
            time.sleep(0.05)
        raise ServiceError(f"server not ready after {START_TIMEOUT:g}s:\n{self.output()}")

    def output(self) -> str:
        return self.log.read_text(errors="replace")

    def call(
        self,
        method: str,
        path: str,
        body: Any = None,
        token: str | None = None,
        raw: bytes | None = None,
    ) -> tuple[int, Any]:
        """(status, decoded JSON or text); `token=""` sends no Authorization header."""
        from runtime.agent import request

        token = self.admin_token if token is None else token
        status, data = request(self.url, method, path, token, raw if raw is not None else body)
        text = data.decode(errors="replace")
        try:
            return status, json.loads(text) if text else None
        except ValueError:
            return status, text

    def submit(self, script: str, language: str = "python3", **fields: Any) -> str:
        status, body = self.call(
            "POST", "/api/jobs", {"language": language, "script": script, **fields}
        )
        if status != 201:
            raise ServiceError(f"submit refused with {status}: {body}")
        return str(body["id"])

    def wait(self, job_id: str, timeout: float = 60.0) -> dict[str, Any]:
        """The job record once it is done."""
        end = time.monotonic() + timeout
        while True:
            status, job = self.call("GET", f"/api/jobs/{job_id}")
            if status == 200 and job["status"] == "done":
                return dict(job)
            if time.monotonic() > end:
                raise TimeoutError(f"job {job_id} not done after {timeout:g}s: {job}")
            time.sleep(0.05)

    def create_group(self, name: str, tags: list[str]) -> str:
        status, body = self.call("POST", "/api/groups", {"name": name, "tags": tags})
        if status != 201:
            raise ServiceError(f"group {name} refused with {status}: {body}")
        return str(body["token"])

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
