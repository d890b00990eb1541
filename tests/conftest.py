"""Shared pytest set-up for tests/unit and tests/integration."""

from __future__ import annotations

import pytest

REQ_MARKER = "req(*ids): SPEC.md requirement IDs this test covers"


def pytest_configure(config: pytest.Config) -> None:
    """Register the `req` marker unless the conformance plugin already did (--strict-markers)."""
    declared = config.getini("markers")
    if not any(line.split(":", 1)[0].split("(", 1)[0].strip() == "req" for line in declared):
        config.addinivalue_line("markers", REQ_MARKER)
