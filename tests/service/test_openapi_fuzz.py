"""Property-based requests from the published OpenAPI spec: the server never answers 5xx.

Schemathesis generates valid and invalid requests for every operation, once
with the admin token and once with a worker group's token (the agent API
rejects the admin token before reading bodies, so each half needs its own).
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from conformance.service import Service

MAX_EXAMPLES = 50


@pytest.mark.slow
@pytest.mark.parametrize("caller", ["admin", "agent"])
def test_no_request_the_spec_allows_or_forbids_makes_the_server_fail(
    service: Service, caller: str, tmp_path: Path
) -> None:
    token = service.admin_token if caller == "admin" else service.create_group("fuzz", ["fuzz"])
    only = (
        ["--exclude-path-regex", "^/api/agent/"]
        if caller == "admin"
        else [
            "--include-path-regex",
            "^/api/agent/",
        ]
    )
    proc = subprocess.run(
        [
            str(Path(sys.executable).with_name("schemathesis")),
            "run",
            f"{service.url}/openapi.json",
            "--checks",
            "not_a_server_error",
            "--header",
            f"Authorization: Bearer {token}",
            "--max-examples",
            str(MAX_EXAMPLES),
            "--seed",
            "1",
            "--no-color",
            *only,
        ],
        capture_output=True,
        text=True,
        timeout=600,
        check=False,
        cwd=tmp_path,
        env={**os.environ, "SCHEMATHESIS_HOOKS": ""},
    )
    output = proc.stdout + proc.stderr
    assert proc.returncode == 0, f"{output}\n--- server log ---\n{service.output()[-4000:]}"
    counted = re.search(r"(\d+) generated, (\d+) passed", output)
    assert counted and int(counted[1]) == int(counted[2]) > 0, output
    assert "failed" not in output.split("Test cases:")[-1], output
