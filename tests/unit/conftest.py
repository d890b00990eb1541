"""The queue on both databases, for the store tests.

PostgreSQL runs where the machine has it (ORVANTA_TEST_POSTGRES_URL or
.venv/postgres.url, as for tests/service) and is skipped with the reason otherwise.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

import pytest

from conformance.service import postgres_unavailable, scratch_postgres
from runtime.queue import JobQueue


@pytest.fixture(params=["sqlite", "postgresql"])
def database_url(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[str]:
    if request.param == "sqlite":
        yield f"sqlite:///{tmp_path}/queue.sqlite3"
        return
    why = postgres_unavailable()
    if why:
        if os.environ.get("CI"):
            pytest.fail(f"CI must run the PostgreSQL half (run scripts/setup): {why}")
        pytest.skip(why)
    with scratch_postgres() as url:
        yield url


@pytest.fixture
def queue(database_url: str, tmp_path: Path) -> Iterator[JobQueue]:
    q = JobQueue.open(database_url, tmp_path)
    yield q
    q.close()
