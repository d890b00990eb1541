"""Live workers and the tags they serve (R-GRP-1): a job no live worker serves is reported."""

from __future__ import annotations

import json
import time
from typing import Any

from runtime.store import Store

SCHEMA = """
CREATE TABLE IF NOT EXISTS workers (
    name         TEXT PRIMARY KEY,
    mode         TEXT NOT NULL,
    worker_group TEXT,
    tags         TEXT NOT NULL,
    last_seen    DOUBLE PRECISION NOT NULL
)
"""
WORKER_LIVE_SECONDS = 15.0  # a worker not seen for this long serves no tag


class WorkerRegistry(Store):
    def heartbeat(self, worker: str, mode: str, tags: tuple[str, ...], group: str | None) -> None:
        self.db.execute(
            "INSERT INTO workers (name, mode, worker_group, tags, last_seen) VALUES (?,?,?,?,?) "
            "ON CONFLICT (name) DO UPDATE SET mode=excluded.mode, "
            "worker_group=excluded.worker_group, tags=excluded.tags, last_seen=excluded.last_seen",
            (worker, mode, group, json.dumps(list(tags)), time.time()),
        )

    def live_workers(self) -> list[dict[str, Any]]:
        rows = self.db.query(
            "SELECT name, mode, worker_group, tags, last_seen FROM workers WHERE last_seen > ? "
            "ORDER BY name",
            (time.time() - WORKER_LIVE_SECONDS,),
        )
        return [
            {"name": n, "mode": m, "group": g, "tags": json.loads(t), "last_seen": s}
            for n, m, g, t, s in rows
        ]

    def served_tags(self) -> set[str]:
        """The tags some live worker serves."""
        return {tag for worker in self.live_workers() for tag in worker["tags"]}

    def waiting_reason(self, tag: str, served: set[str] | None = None) -> str | None:
        """Why a job of this tag would wait forever: no live worker serves it."""
        if tag in (self.served_tags() if served is None else served):
            return None
        return (
            f"no live worker serves tag {tag!r} (none seen in the last "
            f"{WORKER_LIVE_SECONDS:g}s); the job waits until one does"
        )
