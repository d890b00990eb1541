"""Shared pytest set-up for tests/unit and tests/integration."""

from __future__ import annotations

import os
import re
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from runtime.jobdir import remove_tree

REQ_MARKER = "req(*ids): SPEC.md requirement IDs this test covers"


def pytest_configure(config: pytest.Config) -> None:
    """Register the `req` marker unless the conformance plugin already did (--strict-markers)."""
    declared = config.getini("markers")
    if not any(line.split(":", 1)[0].split("(", 1)[0].strip() == "req" for line in declared):
        config.addinivalue_line("markers", REQ_MARKER)


@pytest.fixture(scope="session")
def _passable_tmp() -> Iterator[Path]:
    """One directory per test process that jobs may pass through (0711), outside pytest's own.

    Jobs under unshare run as the unprivileged ORVANTA_JOB_UID and reach their job dirs, and
    the files a test puts beside them, by path. pytest keeps its temporary directories under
    a 0700 /tmp/pytest-of-USER, and every pytest that starts (the audit tests start one)
    resets it to 0700: a job could not pass through it.
    """
    base = Path(tempfile.mkdtemp(prefix="orvanta-tests-"))
    base.chmod(0o711)
    yield base
    remove_tree(base)  # unmounts what a killed worker left, then deletes


@pytest.fixture
def tmp_path(request: pytest.FixtureRequest, _passable_tmp: Path) -> Path:
    """A fresh directory per test, like pytest's, but one that jobs may pass through."""
    name = re.sub(r"[^A-Za-z0-9_.-]", "_", request.node.name)[:40]
    path = Path(tempfile.mkdtemp(prefix=f"{name}-", dir=_passable_tmp))
    path.chmod(0o711)
    return path


@pytest.fixture(params=["sqlite", "postgresql"])
def database_url(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[str]:
    """Each queue test on both databases; PostgreSQL may be absent only outside CI."""
    if request.param == "sqlite":
        yield f"sqlite:///{tmp_path}/queue.sqlite3"
        return
    from conformance.service import postgres_unavailable, scratch_postgres

    why = postgres_unavailable()
    if why:
        if os.environ.get("CI"):
            pytest.fail(f"CI must run the PostgreSQL half (run scripts/setup): {why}")
        pytest.skip(why)
    with scratch_postgres() as url:
        yield url


MATRIX = Path(__file__).resolve().parents[1] / "matrix.yaml"


@pytest.fixture
def platform_of() -> Callable[[str], Any]:
    """Opens (does not start) a platform of matrix.yaml by name; the test is skipped, with
    the reason, where this machine cannot run it."""
    from conformance.matrix import load
    from conformance.platforms import open_platform, unavailable

    def opened(name: str) -> Any:
        spec = load(MATRIX).platforms[name]
        reason = unavailable(spec)
        if reason:
            pytest.skip(f"platform {name}: {reason}")
        return open_platform(spec)

    return opened
