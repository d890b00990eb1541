"""`orvanta doctor` run for real on this host, and in a user namespace whose own
user.max_user_namespaces is 0, the way Bottlerocket ships (R-OPS-2, R-PLT-5).

The limit is lowered only inside a fresh user namespace (the sysctl is per user
namespace); the host's /proc/sys is only ever read here, never written.
"""

from __future__ import annotations

import re
import subprocess
from pathlib import Path

import pytest
from cli_helpers import ROOT, cli_command

pytestmark = pytest.mark.integration

HOST_LIMIT = Path("/proc/sys/user/max_user_namespaces")
# Runs the rest of argv in a new user namespace that may create no further ones.
USERNS_OFF = [
    "unshare",
    "--user",
    "--map-root-user",
    "sh",
    "-c",
    'echo 0 > /proc/sys/user/max_user_namespaces && exec "$@"',
    "sh",
]
LINE = re.compile(r"^\[( OK |WARN|FAIL|INFO)\] (\S.*?)  +(\S.*)$")
SUMMARY = re.compile(r"^(\d+) ok, (\d+) warnings, (\d+) failures$")
UNSHARE_SOLUTIONS = [
    "Check if user namespaces are enabled: 'sysctl kernel.unprivileged_userns_clone'",
    "For Docker: Requires 'privileged: true' in docker-compose for --mount-proc flag",
    "For Kubernetes/Helm: Requires 'privileged: true' in securityContext for --mount-proc flag",
    "Try different flags via UNSHARE_ISOLATION_FLAGS env var (remove --mount-proc for "
    "unprivileged)",
    "Alternative: Use NSJAIL instead",
    "Disable: Set ENABLE_UNSHARE_PID=false",
]
BOTTLEROCKET_ADVICE = [
    "Switch to a different AMI (recommended): Amazon Linux 2023 or Amazon Linux 2",
    "Disable PID isolation: disableUnsharePid: true in Helm values (reduces isolation)",
    "Or a Bottlerocket launch template with user data:",
]
BOTTLEROCKET_SYSCTL = '[settings.kernel.sysctl] "user.max_user_namespaces" = "65536"'


class Report:
    """The doctor's output split into checks: name -> (tag, detail, fix lines)."""

    def __init__(self, proc: subprocess.CompletedProcess[str]) -> None:
        self.proc = proc
        self.lines = proc.stdout.splitlines()
        self.checks: dict[str, tuple[str, str, list[str]]] = {}
        current: list[str] = []
        for line in self.lines[:-1]:
            if m := LINE.match(line):
                current = []
                self.checks[m[2].strip()] = (m[1].strip(), m[3], current)
            else:
                assert line.startswith(" " * 9), f"stray line {line!r}\n{self}"
                current.append(line[9:])
        summary = SUMMARY.match(self.lines[-1]) if self.lines else None
        assert summary, f"no summary line\n{self}"
        self.counts = tuple(int(n) for n in summary.groups())

    def __str__(self) -> str:
        return f"rc={self.proc.returncode}\n{self.proc.stdout}\nstderr:\n{self.proc.stderr}"

    def tag(self, name: str) -> str:
        assert name in self.checks, f"no {name!r} check\n{self}"
        return self.checks[name][0]

    def detail(self, name: str) -> str:
        self.tag(name)
        return self.checks[name][1]

    def fixes(self, name: str) -> list[str]:
        """The "→ " lines of a check, without the arrow (continuation lines kept as they are)."""
        self.tag(name)
        return [f.removeprefix("→ ") for f in self.checks[name][2]]


def doctor(env: dict[str, str], prefix: list[str] | None = None) -> Report:
    proc = subprocess.run(
        [*(prefix or []), *cli_command("doctor")],
        env=env,
        cwd=ROOT,
        stdin=subprocess.DEVNULL,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    return Report(proc)


def host_limit() -> str:
    return HOST_LIMIT.read_text().strip()


@pytest.mark.req("R-OPS-2")
def test_doctor_passes_on_this_host(base_env: dict[str, str]) -> None:
    report = doctor(base_env)
    assert report.proc.returncode == 0, report
    assert report.proc.stderr == "", report
    for name in ("platform", "user namespace", "unshare", "tini", "nsjail", "cgroups"):
        assert report.tag(name) == "OK", f"{name}\n{report}"
    assert report.detail("user namespace") == "unshare --user true: ok"
    assert report.detail("unshare").endswith(
        "with flags --user --map-root-user --pid --fork --mount-proc: ok (ENABLE_UNSHARE_PID=false)"
    ), report
    assert "-s -- true: ok" in report.detail("tini")
    assert "live probe ok; not enabled (DISABLE_NSJAIL=true)" in report.detail("nsjail")
    assert report.detail("platform").startswith("Linux ")
    # both of the page's sysctls are reported, whatever this kernel has of them
    assert report.tag("kernel.unprivileged_userns_clone") in ("OK", "INFO")
    assert report.tag("user.max_user_namespaces") == "OK"
    assert report.detail("user.max_user_namespaces") == host_limit()
    for name in ("capabilities", "seccomp", "no_new_privs", "container", "/proc masks"):
        report.tag(name)
    # beyond the page: one check per further backend of the registry (bwrap)
    assert report.detail("bwrap") == "/usr/bin/bwrap: live probe ok; not chosen"
    assert len(report.checks) == 14, report
    ok, warnings, failures = report.counts
    assert failures == 0
    assert ok == sum(tag == "OK" for tag, _, _ in report.checks.values())
    assert warnings == sum(tag == "WARN" for tag, _, _ in report.checks.values())


@pytest.mark.req("R-OPS-2")
def test_doctor_with_unshare_enabled_still_passes_here(base_env: dict[str, str]) -> None:
    report = doctor({**base_env, "ENABLE_UNSHARE_PID": "true"})
    assert report.proc.returncode == 0, report
    assert report.tag("unshare") == "OK"
    assert report.detail("unshare").endswith("ok (ENABLE_UNSHARE_PID=true)"), report


@pytest.mark.req("R-OPS-2", "R-PLT-5")
def test_doctor_fails_with_the_bottlerocket_advice_when_user_namespaces_are_off(
    base_env: dict[str, str],
) -> None:
    before = host_limit()
    assert before != "0", "this host itself allows no user namespaces"
    report = doctor(base_env, prefix=USERNS_OFF)
    assert host_limit() == before  # only the new namespace's own limit changed
    assert report.proc.returncode == 1, report
    assert report.tag("user.max_user_namespaces") == "FAIL", report
    detail = report.detail("user.max_user_namespaces")
    assert detail.startswith("0: no user namespaces (as on Bottlerocket, R-PLT-5)"), report
    fixes = report.fixes("user.max_user_namespaces")
    assert fixes[:3] == BOTTLEROCKET_ADVICE, report
    assert fixes[3].strip() == BOTTLEROCKET_SYSCTL, report
    assert fixes[3].startswith("  "), report  # shown under its launch-template line
    # the live try fails too, and points back at the sysctl rather than at seccomp
    assert report.tag("user namespace") == "FAIL"
    assert "unshare --user true:" in report.detail("user namespace")
    assert report.fixes("user namespace") == ["Fix user.max_user_namespaces first (above)"]
    # unshare is not enabled: it cannot work here, but the worker would not need it
    assert report.tag("unshare") == "WARN", report
    assert report.detail("unshare").endswith("(ENABLE_UNSHARE_PID=false)")
    assert report.counts[2] == 2, report
    assert report.tag("platform") == "OK"


@pytest.mark.req("R-OPS-2", "R-PLT-5", "R-PID-3")
def test_doctor_fails_unshare_with_the_page_solutions_when_it_is_enabled(
    base_env: dict[str, str],
) -> None:
    before = host_limit()
    report = doctor({**base_env, "ENABLE_UNSHARE_PID": "true"}, prefix=USERNS_OFF)
    assert host_limit() == before
    assert report.proc.returncode == 1, report
    assert report.tag("unshare") == "FAIL", report
    detail = report.detail("unshare")
    assert detail.startswith("flags --user --map-root-user --pid --fork --mount-proc: "), report
    assert detail.endswith("(ENABLE_UNSHARE_PID=true)"), report
    fixes = report.fixes("unshare")
    assert fixes[0].startswith("User namespaces cannot be created here: fix that first"), report
    assert fixes[1:] == UNSHARE_SOLUTIONS, report  # then the page's own list
    assert report.fixes("nsjail")[0].startswith(
        "User namespaces cannot be created here: set DISABLE_NUSER=true"
    ), report
    assert report.tag("user.max_user_namespaces") == "FAIL"
    assert report.counts[2] == 3, report
    assert report.lines[-1].endswith(", 3 failures")
