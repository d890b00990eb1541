"""Worker groups: the tags an agent serves, and its token, shown once and stored hashed."""

from __future__ import annotations

import hashlib
import json
import secrets
import time
from dataclasses import dataclass

from runtime.database import DuplicateKeyError
from runtime.store import Store
from runtime.store.errors import GroupExists, GroupNotFound, check_name

SCHEMA = """
CREATE TABLE IF NOT EXISTS worker_groups (
    name       TEXT PRIMARY KEY,
    tags       TEXT NOT NULL,
    token_hash TEXT NOT NULL UNIQUE,
    created    DOUBLE PRECISION NOT NULL
)
"""


@dataclass(frozen=True)
class WorkerGroup:
    name: str
    tags: tuple[str, ...]


def hash_token(token: str) -> str:
    return hashlib.sha256(token.encode()).hexdigest()


def new_token(group: str) -> str:
    return f"orv_{group}_{secrets.token_urlsafe(24)}"


class GroupStore(Store):
    def create_group(self, name: str, tags: tuple[str, ...]) -> str:
        """A worker group and its agent token; GroupExists if the name is taken."""
        check_name("worker group", name)
        for tag in tags:
            check_name("tag", tag)
        token = new_token(name)
        try:
            self.db.execute(
                "INSERT INTO worker_groups (name, tags, token_hash, created) VALUES (?,?,?,?)",
                (name, json.dumps(sorted(set(tags))), hash_token(token), time.time()),
            )
        except DuplicateKeyError:
            raise GroupExists(name) from None
        return token

    def rotate_group_token(self, name: str) -> str:
        """A new token for the group; the old one stops working at once."""
        token = new_token(name)
        if not self.db.execute(
            "UPDATE worker_groups SET token_hash=? WHERE name=?", (hash_token(token), name)
        ):
            raise GroupNotFound(name)
        return token

    def delete_group(self, name: str) -> None:
        if not self.db.execute("DELETE FROM worker_groups WHERE name=?", (name,)):
            raise GroupNotFound(name)

    def groups(self) -> list[WorkerGroup]:
        rows = self.db.query("SELECT name, tags FROM worker_groups ORDER BY name")
        return [WorkerGroup(n, tuple(json.loads(t))) for n, t in rows]

    def group_for_token(self, token: str) -> WorkerGroup | None:
        rows = self.db.query(
            "SELECT name, tags FROM worker_groups WHERE token_hash=?", (hash_token(token),)
        )
        return WorkerGroup(rows[0][0], tuple(json.loads(rows[0][1]))) if rows else None
