"""The two databases a queue can live in, behind one small interface.

SQLite is the zero-set-up default (one file in ORVANTA_STATE_DIR, workers on one
host). PostgreSQL (`DATABASE_URL=postgresql://...`) lets workers on many
machines share one queue. The queue's SQL is written once with `?`
placeholders; what differs between the two (row locks for claiming, reading
a table's columns, serialising schema changes, duplicate-key errors) lives
here, behind the `Database` protocol, so the stores never ask which one they
have.
"""

from __future__ import annotations

import contextlib
import os
import re
import sqlite3
import threading
from collections.abc import Iterator, Sequence
from contextlib import AbstractContextManager, contextmanager
from pathlib import Path
from typing import Any, Protocol

Row = tuple[Any, ...]

POSTGRES_SCHEMES = ("postgresql://", "postgres://")
SQLITE_SCHEME = "sqlite:///"
_SQLITE_DUPLICATE = (sqlite3.SQLITE_CONSTRAINT_PRIMARYKEY, sqlite3.SQLITE_CONSTRAINT_UNIQUE)
SCHEMA_LOCK = 5617  # PostgreSQL advisory lock held while a queue's tables are made or changed


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


class DuplicateKeyError(Exception):
    """A row whose primary or unique key another row holds; both databases raise this one."""


class Database(Protocol):
    kind: str  # sqlite | postgresql
    display: str  # where it is, password redacted
    # ends a claim's inner SELECT: concurrent claimers skip a row another one is taking
    # (PostgreSQL); empty on SQLite, whose writers take turns anyway
    skip_locked: str
    # a DELETE ... RETURNING may feed an INSERT in one statement (WITH): a finished job moves
    # in one round trip (PostgreSQL); SQLite, in-process, runs the statements one by one
    moves_in_one_statement: bool

    def query(self, sql: str, params: Sequence[Any] = ()) -> list[Row]:
        """Run one statement; the rows it returns (RETURNING included)."""

    def execute(self, sql: str, params: Sequence[Any] = ()) -> int:
        """Run one statement; how many rows it changed. DuplicateKeyError on a taken key."""

    def script(self, sql: str) -> None:
        """Run `;`-separated statements (schema) in the current transaction, if any."""

    def columns(self, table: str) -> set[str]:
        """The column names `table` has now: an older queue gains new ones in place."""

    def transaction(self) -> AbstractContextManager[None]:
        """One write transaction."""

    def schema_transaction(self) -> AbstractContextManager[None]:
        """A transaction no other process changes the schema in: workers start together."""

    def close(self) -> None: ...


def statements(sql: str) -> list[str]:
    """The statements of a schema script (no `;` inside a statement)."""
    return [statement for statement in sql.split(";") if statement.strip()]


class SqliteDatabase:
    kind = "sqlite"
    skip_locked = ""
    moves_in_one_statement = False

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
        with self._lock, self._duplicates():
            return self._db.execute(sql, tuple(params)).fetchall()

    def execute(self, sql: str, params: Sequence[Any] = ()) -> int:
        with self._lock, self._duplicates():
            return self._db.execute(sql, tuple(params)).rowcount

    def script(self, sql: str) -> None:
        with self._lock:  # not executescript: it commits the transaction it runs in
            for statement in statements(sql):
                self._db.execute(statement)

    def columns(self, table: str) -> set[str]:
        return {row[1] for row in self.query(f"PRAGMA table_info({table})")}

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

    def schema_transaction(self) -> AbstractContextManager[None]:
        return self.transaction()  # BEGIN IMMEDIATE: one writer at a time already

    @staticmethod
    @contextmanager
    def _duplicates() -> Iterator[None]:
        try:
            yield
        except sqlite3.IntegrityError as exc:
            if exc.sqlite_errorcode in _SQLITE_DUPLICATE:
                raise DuplicateKeyError(str(exc)) from exc
            raise

    def close(self) -> None:
        with self._lock:
            self._db.close()


class PostgresDatabase:
    kind = "postgresql"
    skip_locked = " FOR UPDATE SKIP LOCKED"
    moves_in_one_statement = True

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
        with self._lock, self._duplicates(), self._live().cursor() as cur:
            cur.execute(self._sql(sql), tuple(params))
            return list(cur.fetchall()) if cur.description else []

    def execute(self, sql: str, params: Sequence[Any] = ()) -> int:
        with self._lock, self._duplicates(), self._live().cursor() as cur:
            cur.execute(self._sql(sql), tuple(params))
            return int(cur.rowcount)

    def script(self, sql: str) -> None:
        with self._lock:
            for statement in statements(sql):
                self._live().execute(statement)

    def columns(self, table: str) -> set[str]:
        rows = self.query(
            "SELECT column_name FROM information_schema.columns "
            "WHERE table_schema = current_schema() AND table_name = ?",
            (table,),
        )
        return {row[0] for row in rows}

    @contextmanager
    def transaction(self) -> Iterator[None]:
        with self._lock, self._live().transaction():
            yield

    @contextmanager
    def schema_transaction(self) -> Iterator[None]:
        # CREATE TABLE IF NOT EXISTS races itself in PostgreSQL: queues opened at once wait here
        with self.transaction():
            self.query(f"SELECT pg_advisory_xact_lock({SCHEMA_LOCK})")
            yield

    @staticmethod
    @contextmanager
    def _duplicates() -> Iterator[None]:
        from psycopg.errors import UniqueViolation

        try:
            yield
        except UniqueViolation as exc:
            raise DuplicateKeyError(str(exc)) from exc

    def close(self) -> None:
        with self._lock:
            self._db.close()


def connect(url: str | None, state_dir: Path) -> Database:
    """The queue database DATABASE_URL names, or the SQLite file in the state dir."""
    if not url:
        return SqliteDatabase(state_dir / "queue.sqlite3")
    if url.startswith(POSTGRES_SCHEMES):
        return PostgresDatabase(url)
    if url.startswith(SQLITE_SCHEME) and len(url) > len(SQLITE_SCHEME):
        return SqliteDatabase(Path("/" + url[len(SQLITE_SCHEME) :].lstrip("/")))
    raise DatabaseURLError(url)
