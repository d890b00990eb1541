"""The runtime's cgroup tests on the cgroup version this host does not have (R-PLT-6).

The tests of CGROUP_TESTS are version-neutral (paths from runtime.cgroups): on this host
they run on its version; here they run again, unchanged, inside a User-Mode Linux guest
(conformance.platforms.uml) booted on the other version. The guest's root is this
machine's filesystem read-only; it writes only its tmpfs and the cell dir, where the inner
pytest leaves its JUnit file. Under CI=true a version that cannot be tested fails.
"""

from __future__ import annotations

import os
import sys
import time
import xml.etree.ElementTree as ET
from pathlib import Path

import pytest
from cli_helpers import ROOT, cannot_test, cgroup_version

pytestmark = [pytest.mark.integration, pytest.mark.slow]

CGROUP_TESTS = (
    "tests/integration/test_cleanup.py",
    "tests/integration/test_oom.py",
    "tests/integration/test_job_host_limits.py",
)
GUEST_SECONDS = 900.0  # the inner run's own limit; measured: see the README's results


def junit_counts(path: Path) -> tuple[dict[str, int], list[str]]:
    """Counts of the inner run (tests, failures, errors, skipped) and what went wrong."""
    suite = ET.parse(path).getroot()
    suite = suite if suite.tag == "testsuite" else suite[0]
    counts = {k: int(suite.get(k, "0")) for k in ("tests", "failures", "errors", "skipped")}
    problems = []
    for case in suite.iter("testcase"):
        for child in case:
            if child.tag in ("failure", "error", "skipped"):
                what = (child.get("message") or "").splitlines()[:1]
                problems.append(f"{child.tag}: {case.get('name')}: {' '.join(what)[:300]}")
    return counts, problems


@pytest.mark.req("R-PLT-6", "R-JOB-3")
@pytest.mark.parametrize("version", ["v1", "v2"])
def test_cgroup_tests_pass_on_the_other_version_in_a_uml_guest(
    version: str, tmp_path: Path
) -> None:
    if cgroup_version() == version:
        pytest.skip(f"this host is on cgroup {version}: the cgroup tests ran here directly")
    if os.geteuid() != 0:
        cannot_test(f"cgroup {version}: the guest's tests need root, like the host's")
    from conformance.platforms.uml import Guest, UmlOptions, UmlPlatform, reap, session_dir

    missing = UmlPlatform.unavailable()
    if missing:
        cannot_test(f"cgroup {version} cannot be tested here: {missing}")
    reap(dead_only=True)  # guests of runs that died
    cell = tmp_path / "cell"
    cell.mkdir()
    junit, log = cell / "junit.xml", cell / "pytest.log"
    guest = Guest(cell, UmlOptions(cgroup=version))
    try:
        facts = guest.call("facts")
        assert facts["cgroup"] == version, facts
        bin_dir = Path(sys.executable).parent
        env = {
            "PATH": f"{bin_dir}:/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin",
            "LANG": "C.UTF-8",
            "HOME": "/tmp",
            "TMPDIR": "/tmp",
            "PYTHONPATH": str(ROOT),
            "PYTHONDONTWRITEBYTECODE": "1",
            "CI": os.environ.get("CI", ""),
        }
        argv = [
            sys.executable,
            "-m",
            "pytest",
            *CGROUP_TESTS,
            "-p",
            "no:orvanta",
            "-p",
            "no:cacheprovider",
            "-p",
            "no:xdist",
            "-q",
            "--basetemp=/tmp/guest-pytest",
            f"--junitxml={junit}",
        ]
        started = time.monotonic()
        code = guest.call(
            "run",
            timeout=GUEST_SECONDS + 30,
            argv=argv,
            env=env,
            cwd=str(ROOT),
            log=str(log),
            seconds=GUEST_SECONDS,
        )
        took = time.monotonic() - started
        output = log.read_text(errors="replace") if log.exists() else "(no output)"
        assert junit.exists(), f"the inner pytest wrote no JUnit file (exit {code}):\n{output}"
        counts, problems = junit_counts(junit)
        print(f"cgroup {version} in UML ({facts['kernel']}): {counts} in {took:.0f}s")
        for line in problems:
            print(" ", line)
        assert code == 0, f"exit {code}, {counts}\n" + "\n".join(problems) + f"\n{output[-4000:]}"
        assert counts["failures"] == counts["errors"] == 0, problems
        ran = counts["tests"] - counts["skipped"]
        assert ran >= 20, f"only {ran} cgroup tests ran on {version}: {problems}"
    finally:
        guest.close()
        if [p.name for p in session_dir().iterdir()] == ["init.sh"]:
            (session_dir() / "init.sh").unlink()
            session_dir().rmdir()
