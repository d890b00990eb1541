"""The two databases a queue can live in, behind one small interface.

SQLite is the zero-set-up default (one file in ORVANTA_STATE_DIR, workers on one
host). PostgreSQL (`DATABASE_URL=postgresql://...`) lets workers on many
machines share one queue. The queue's SQL is written once with `?`
placeholders; only claiming differs (`FOR UPDATE SKIP LOCKED` on PostgreSQL).
"""

from __future__ import annotations

import contextlib
import os
import re
import sqlite3
import threading
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Protocol

Row = tuple[Any, ...]

POSTGRES_SCHEMES = ("postgresql://", "postgres://")
SQLITE_SCHEME = "sqlite:///"


class DatabaseURLError(ValueError):
    """DATABASE_URL names a database this runtime cannot use."""

    def __init__(self, url: str) -> None:
        super().__init__(
            f"DATABASE_URL={redact(url)!r} is not valid; accepted: postgresql://USER:PASSWORD@HOST"
            f"/DB, postgres://..., or sqlite:///ABSOLUTE/PATH. Leave it unset for the SQLite "
            f"queue in ORVANTA_STATE_DIR."
        )


def redact(url: str) -> str:
    """The URL with its password (user-info or ?password=) replaced, for logs and errors.

    Parsed by hand: libpq accepts unencoded '?', '#', '/' or brackets in a password,
    where a URL parser would leave it visible or raise.
    """
    start = url.find("://")
    at = url.rfind("@")
    if start >= 0 and at > start:
        colon = url.find(":", start + 3, at)
        if colon >= 0:
            url = url[: colon + 1] + "***" + url[at:]
    return re.sub(r"(?i)([?&]password=)[^&#]*", r"\1***", url)


class Database(Protocol):
    kind: str  # sqlite | postgresql
    display: str  # where it is, password redacted

    def query(self, sql: str, params: Sequence[Any] = ()) -> list[Row]:
        """Run one statement; the rows it returns (RETURNING included)."""

    def execute(self, sql: str, params: Sequence[Any] = ()) -> int:
        """Run one statement; how many rows it changed."""

    def transaction(self) -> Any:
        """A context manager holding one write transaction."""

    def close(self) -> None: ...


class SqliteDatabase:
    kind = "sqlite"

    def __init__(self, path: Path) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        self.display = str(path)
        self._lock = threading.RLock()
        # 0600 before SQLite opens it: the queue holds every job's script and variables, and
        # its -wal and -shm files take the database file's mode (R-HOST-4)
        os.close(os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600))
        with contextlib.suppress(PermissionError):
            if path.stat().st_uid == os.geteuid():
                path.chmod(0o600)
        self._db = sqlite3.connect(
            path, timeout=30.0, isolation_level=None, check_same_thread=False
        )
        self._db.execute("PRAGMA journal_mode=WAL")
        self._db.execute("PRAGMA synchronous=NORMAL")

    def query(self, sql: str, params: Sequence[Any] = ()) -> list[Row]:
        with self._lock:
            return self._db.execute(sql, tuple(params)).fetchall()

    def execute(self, sql: str, params: Sequence[Any] = ()) -> int:
        with self._lock:
            return self._db.execute(sql, tuple(params)).rowcount

    def script(self, sql: str) -> None:
        with self._lock:
            self._db.executescript(sql)

    @contextmanager
    def transaction(self) -> Iterator[None]:
        with self._lock:
            self._db.execute("BEGIN IMMEDIATE")
            try:
                yield
            except BaseException:
                self._db.execute("ROLLBACK")
                raise
            self._db.execute("COMMIT")

    def close(self) -> None:
        with self._lock:
            self._db.close()


class PostgresDatabase:
    kind = "postgresql"

    def __init__(self, url: str) -> None:
        self.display = redact(url)
        self._url = url
        self._lock = threading.RLock()
        self._db = self._connect()

    def _connect(self) -> Any:
        import psycopg  # only workers and servers that use PostgreSQL need it

        try:
            return psycopg.connect(self._url, autocommit=True, connect_timeout=10)
        except psycopg.OperationalError as exc:
            raise ConnectionError(
                f"cannot connect to DATABASE_URL={self.display}: "
                f"{redact(str(exc)).strip()}; check that PostgreSQL runs there and that the "
                f"user, password and database exist"
            ) from None

    def _live(self) -> Any:
        """The connection, made again if PostgreSQL restarted or dropped it."""
        if self._db.closed or self._db.broken:
            self._db = self._connect()
        return self._db

    @staticmethod
    def _sql(sql: str) -> str:
        return sql.replace("?", "%s")

    def query(self, sql: str, params: Sequence[Any] = ()) -> list[Row]:
        with self._lock, self._live().cursor() as cur:
            cur.execute(self._sql(sql), tuple(params))
            return list(cur.fetchall()) if cur.description else []

    def execute(self, sql: str, params: Sequence[Any] = ()) -> int:
        with self._lock, self._live().cursor() as cur:
            cur.execute(self._sql(sql), tuple(params))
            return int(cur.rowcount)

    def script(self, sql: str) -> None:
        with self._lock:
            for statement in filter(str.strip, sql.split(";")):
                self._live().execute(statement)

    @contextmanager
    def transaction(self) -> Iterator[None]:
        with self._lock, self._live().transaction():
            yield

    def close(self) -> None:
        with self._lock:
            self._db.close()


def connect(url: str | None, state_dir: Path) -> SqliteDatabase | PostgresDatabase:
    """The queue database DATABASE_URL names, or the SQLite file in the state dir."""
    if not url:
        return SqliteDatabase(state_dir / "queue.sqlite3")
    if url.startswith(POSTGRES_SCHEMES):
        return PostgresDatabase(url)
    if url.startswith(SQLITE_SCHEME) and len(url) > len(SQLITE_SCHEME):
        return SqliteDatabase(Path("/" + url[len(SQLITE_SCHEME) :].lstrip("/")))
    raise DatabaseURLError(url)
