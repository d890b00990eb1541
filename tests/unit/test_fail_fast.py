"""Start-up refusals: the R-PID-3 message word for word, and R-PID-4 off Linux."""

from __future__ import annotations

import sys

import pytest

from runtime.settings import Settings
from runtime.startup import UNSHARE_FAILURE, StartupError, probe_host

# Copied verbatim from SPEC.md R-PID-3.
SOLUTIONS = [
    "• Check if user namespaces are enabled: 'sysctl kernel.unprivileged_userns_clone'",
    "• For Docker: Requires 'privileged: true' in docker-compose for --mount-proc flag",
    "• For Kubernetes/Helm: Requires 'privileged: true' in securityContext for --mount-proc flag",
    "• Try different flags via UNSHARE_ISOLATION_FLAGS env var (remove --mount-proc for "
    "unprivileged)",
    "• Alternative: Use NSJAIL instead",
    "• Disable: Set ENABLE_UNSHARE_PID=false",
]


@pytest.mark.req("R-PID-3")
def test_message_formats_error_and_flags() -> None:
    error = "unshare: unshare failed: Operation not permitted"
    flags = "--user --map-root-user --pid --fork --mount-proc"
    text = UNSHARE_FAILURE.format(error=error, flags=flags)
    expected = "\n".join(
        [
            "ENABLE_UNSHARE_PID is set but unshare test failed.",
            f"Error: {error}",
            f"Flags: {flags}",
            "",
            "Solutions:",
            *SOLUTIONS,
        ]
    )
    assert text == expected


@pytest.mark.req("R-PID-3")
def test_every_solution_bullet_is_present_on_its_own_line() -> None:
    lines = UNSHARE_FAILURE.format(error="x", flags="y").splitlines()
    for bullet in SOLUTIONS:
        assert bullet in lines
    assert len([line for line in lines if line.startswith("•")]) == len(SOLUTIONS)


@pytest.mark.req("R-PID-4", "R-PLT-4")
@pytest.mark.parametrize("platform", ["darwin", "win32"])
def test_unshare_on_other_platforms_refuses_to_start(
    monkeypatch: pytest.MonkeyPatch, platform: str
) -> None:
    monkeypatch.setattr(sys, "platform", platform)
    with pytest.raises(StartupError) as info:
        probe_host(Settings.from_env({"ENABLE_UNSHARE_PID": "true"}))
    message = str(info.value)
    assert platform in message
    assert "Linux only" in message
    assert "Set ENABLE_UNSHARE_PID=false" in message
