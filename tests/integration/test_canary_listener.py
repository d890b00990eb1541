"""The canary listener in a container answers before any probe may find it closed.

canary_tcp and abstract_socket read a refused connection as a network that holds. The
listener a container cell starts (`docker exec -d`) may not be up yet, or may have died:
the cell's start waits until both of its sockets greet, and fails where they never do.
"""

from __future__ import annotations

import subprocess
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from conformance.canaries import Canaries
from conformance.platforms.docker import await_listener, docker_cli

pytestmark = [pytest.mark.integration, pytest.mark.slow]


@pytest.mark.req("R-TBL-NET")
def test_a_cell_starts_only_once_its_canary_listener_greets(
    tmp_path: Path, platform_of: Callable[[str], Any]
) -> None:
    platform = platform_of("docker-unprivileged")
    canaries = Canaries.plant(tmp_path)
    try:
        platform.start(tmp_path)
        port = platform.listen(canaries)  # returns once it greets (the control)
        inside = [docker_cli(), "exec", platform.id]
        await_listener(inside, port, canaries.abstract, seconds=1)
        subprocess.run([*inside, "pkill", "-f", canaries.abstract], check=True)
        with pytest.raises(RuntimeError, match="does not answer"):
            await_listener(inside, port, canaries.abstract, seconds=1)
    finally:
        canaries.close()
        platform.close()
