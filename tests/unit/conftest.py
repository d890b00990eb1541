"""The queue on both databases, for the store tests.

PostgreSQL runs where the machine has it (ORVANTA_TEST_POSTGRES_URL or
.venv/postgres.url, as for tests/service) and is skipped with the reason otherwise.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from runtime.queue import JobQueue


@pytest.fixture
def queue(database_url: str, tmp_path: Path) -> Iterator[JobQueue]:
    q = JobQueue.open(database_url, tmp_path)
    yield q
    q.close()
