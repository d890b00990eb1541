"""The canary listener in a container answers before any probe may find it closed.

canary_tcp and abstract_socket read a refused connection as a network that holds. The
listener a container cell starts (`docker exec -d`) may not be up yet, or may have died:
the cell's start waits until both of its sockets greet, and fails where they never do.
"""

from __future__ import annotations

import subprocess
from pathlib import Path

import pytest

from conformance.canaries import Canaries
from conformance.matrix import load
from conformance.platforms import open_platform, unavailable
from conformance.platforms.docker import await_listener, docker_cli

MATRIX = Path(__file__).resolve().parents[2] / "matrix.yaml"

pytestmark = [pytest.mark.integration, pytest.mark.slow]


@pytest.mark.req("R-TBL-NET")
def test_a_cell_starts_only_once_its_canary_listener_greets(tmp_path: Path) -> None:
    spec = load(MATRIX).platforms["docker-unprivileged"]
    reason = unavailable(spec)
    if reason:
        pytest.skip(f"platform docker-unprivileged: {reason}")
    platform = open_platform(spec)
    canaries = Canaries.plant(tmp_path)
    try:
        platform.start(tmp_path)
        port = platform.listen(canaries)  # returns once it greets (the control)
        inside = [docker_cli(), "exec", platform.id]  # type: ignore[attr-defined]
        await_listener(inside, port, canaries.abstract, seconds=1)
        subprocess.run([*inside, "pkill", "-f", canaries.abstract], check=True)
        with pytest.raises(RuntimeError, match="does not answer"):
            await_listener(inside, port, canaries.abstract, seconds=1)
    finally:
        canaries.close()
        platform.close()
