"""Plain helpers for the service tests (fixtures live in conftest.py, which tests must not
import by name: with tests/unit collected too, `conftest` may be the other one)."""

from __future__ import annotations

import subprocess
from dataclasses import dataclass
from pathlib import Path


@dataclass
class WorkerProcess:
    name: str
    proc: subprocess.Popen[bytes]
    log: Path

    def output(self) -> str:
        return self.log.read_text(errors="replace")
