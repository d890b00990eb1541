"""Worker start-up refusals through the real CLI (R-PID-3, R-CFG-7)."""

from __future__ import annotations

from collections.abc import Callable

import pytest
from cli_helpers import CliRun, tool_missing

from runtime.cli import EXIT_STARTUP

pytestmark = pytest.mark.integration

HELLO = "print('hello from the job')\n"
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
def test_unshare_failing_at_startup_stops_the_worker(run_job: Callable[..., CliRun]) -> None:
    rc, result, stderr = run_job(
        HELLO,
        env={"ENABLE_UNSHARE_PID": "true", "UNSHARE_ISOLATION_FLAGS": "--bogus-flag --pid --fork"},
    )
    assert rc == EXIT_STARTUP == 2
    assert result is None  # no job ran
    assert "ENABLE_UNSHARE_PID is set but unshare test failed." in stderr
    error_lines = [line for line in stderr.splitlines() if line.startswith("Error: ")]
    assert error_lines, stderr
    # unshare's own words about the bad option
    assert "--bogus-flag" in error_lines[0]
    assert "unrecognized option" in error_lines[0] or "invalid option" in error_lines[0]
    assert "Flags: --bogus-flag --pid --fork" in stderr.splitlines()
    assert "Solutions:" in stderr.splitlines()
    for bullet in SOLUTIONS:
        assert bullet in stderr.splitlines(), bullet


@pytest.mark.req("R-CFG-7", "R-CFG-1")
def test_enable_unshare_pid_maybe_stops_the_worker(run_job: Callable[..., CliRun]) -> None:
    rc, result, stderr = run_job(HELLO, env={"ENABLE_UNSHARE_PID": "maybe"})
    assert rc == EXIT_STARTUP
    assert result is None
    assert "ENABLE_UNSHARE_PID" in stderr
    assert "'maybe'" in stderr
    assert "true or false" in stderr


@pytest.mark.req("R-CFG-7", "R-PID-1")
def test_pid_without_fork_stops_the_worker(run_job: Callable[..., CliRun]) -> None:
    rc, result, stderr = run_job(
        HELLO, env={"ENABLE_UNSHARE_PID": "true", "UNSHARE_ISOLATION_FLAGS": "--user --pid"}
    )
    assert rc == EXIT_STARTUP
    assert result is None
    assert "UNSHARE_ISOLATION_FLAGS='--user --pid'" in stderr
    assert "--fork" in stderr


@pytest.mark.req("R-CFG-7", "R-CFG-6")
def test_unknown_job_isolation_stops_the_worker(run_job: Callable[..., CliRun]) -> None:
    rc, result, stderr = run_job(HELLO, env={"JOB_ISOLATION": "strict"})
    assert rc == EXIT_STARTUP
    assert result is None
    assert "JOB_ISOLATION='strict'" in stderr
    assert "none, nsjail_sandboxing" in stderr


@pytest.mark.req("R-PID-3", "R-SEL-3", "R-CFG-1")
@pytest.mark.parametrize("enable", [None, "false"])
def test_bogus_flags_are_ignored_when_unshare_is_not_enabled(
    run_job: Callable[..., CliRun], enable: str | None
) -> None:
    env = {"UNSHARE_ISOLATION_FLAGS": "--bogus-flag --pid --fork"}
    if enable is not None:
        env["ENABLE_UNSHARE_PID"] = enable
    rc, result, stderr = run_job(HELLO, env=env)
    assert rc == 0, stderr
    assert result is not None
    assert result["isolation"] == "none"
    assert result["status"] == "success"
    assert result["stdout"] == "hello from the job\n"
    assert "unshare test failed" not in stderr


@pytest.mark.req("R-PID-3", "R-PLT-1")
def test_unshare_missing_stops_the_worker(run_job: Callable[..., CliRun]) -> None:
    # no unshare (nor tini, nor nsjail on PATH) to be found
    rc, result, stderr = run_job(HELLO, env={"ENABLE_UNSHARE_PID": "true", "PATH": "/nonexistent"})
    assert rc == EXIT_STARTUP
    assert result is None
    assert "ENABLE_UNSHARE_PID is set but unshare test failed." in stderr
    assert "Error: unshare: command not found" in stderr
    assert "Flags: --user --map-root-user --pid --fork --mount-proc" in stderr
    assert SOLUTIONS[-1] in stderr.splitlines()


@pytest.mark.req("R-OPS-1", "R-SEL-4")
def test_startup_logs_one_line_per_mechanism(run_job: Callable[..., CliRun]) -> None:
    missing = tool_missing("nsjail") or tool_missing("unshare")
    if missing:
        pytest.skip(missing)
    rc, _result, stderr = run_job(HELLO)  # DISABLE_NSJAIL unset: nsjail is probed anyway
    assert rc == 0, stderr
    lines = stderr.splitlines()
    for needle in (
        "isolation: none active",
        "nsjail: available: ",
        "live probe ok",
        "unshare: works: ",
        "tini: found: ",
    ):
        assert any(needle in line for line in lines), (needle, stderr)


@pytest.mark.req("R-OPS-1", "R-PID-2")
def test_startup_says_when_tini_and_nsjail_are_missing(run_job: Callable[..., CliRun]) -> None:
    env = {
        "ENABLE_UNSHARE_PID": "true",
        "UNSHARE_TINI_PATH": "/nonexistent/tini",
        "NSJAIL_PATH": "/nonexistent/nsjail",
    }
    rc, result, stderr = run_job(HELLO, env=env)
    assert rc == 0, stderr
    assert result is not None and result["isolation"] == "unshare"
    lines = stderr.splitlines()
    assert any("isolation: unshare active" in line for line in lines), stderr
    assert any("tini: not available" in line and "/nonexistent/tini" in line for line in lines)
    assert any("nsjail: not available" in line and "/nonexistent/nsjail" in line for line in lines)
