"""The isolation-comparison table, asserted cell by cell and probe by probe (matrix.yaml).

Five functions cover every kind of check; cells and probes are data.
"""

from __future__ import annotations

import json
from typing import Any

import pytest

from conformance.harness import CellSession
from conformance.matrix import JOBS_DIR, Matrix, Probe


@pytest.mark.cell_kind("table")
@pytest.mark.req("R-JOB-3", "R-SEL-6")
def test_probe(
    cell: CellSession, probe: Probe, matrix: Matrix, record: list[dict[str, Any]]
) -> None:
    """The probe's outcome is what the table (or a reasoned override) says for this cell."""
    run = cell.run_probe(probe)
    expected, override = matrix.expected(cell.cell, probe)
    raw = run.verdict or {
        "stdout": run.result.stdout[-800:],
        "stderr": run.result.stderr[-800:],
        "log": run.result.log,
        "exit_code": run.result.exit_code,  # an empty output says nothing: how it ended does
        "duration": round(run.result.duration, 3),
    }
    if run.survivors:
        raw = {**raw, "survivors": run.survivors}
    evidence = cell.canaries.mask(json.dumps(raw))
    record.append(
        {
            "probe": probe.name,
            "property": probe.row,
            "req": list(probe.req),
            "documented": matrix.documented(cell.cell, probe),
            "expected": expected,
            "measured": run.outcome,
            "override": {"kind": override.kind, "reason": override.reason} if override else None,
            "evidence": evidence,
            "isolation": run.result.isolation,
            "exit_code": run.result.exit_code,
            "duration": round(run.result.duration, 4),
        }
    )
    refused = bool(run.verdict and run.verdict.get("refused"))  # never ran: no isolation to check
    assert refused or run.result.isolation == cell.cell.backend, (
        f"job ran under {run.result.isolation!r}, cell expects {cell.cell.backend!r}: "
        f"{run.result.log}"
    )
    assert run.outcome != "error", f"probe {probe.name} could not run: {evidence}"
    why = f" ({override.kind}: {override.reason})" if override else ""
    assert run.outcome == expected, (
        f"{probe.name} [{probe.row}] was {run.outcome}, expected {expected}{why}: {evidence}"
    )
    # survivors are the evidence only where the matrix records (an override on an outlive
    # probe) that a job's processes outlive it on this platform; anywhere else they fail
    documented = expected == "exposed" and override is not None and "outlive" in probe.name
    assert documented or not run.survivors, (
        f"processes of the job outlived it (R-JOB-3): {run.survivors}"
    )


@pytest.mark.cell_kind("refuses_start")
def test_refuses_start(cell: CellSession, record: list[dict[str, Any]]) -> None:
    """The worker exits at start with the documented message (R-PID-3, R-CFG-7)."""
    log = cell.startup_log()
    assert cell.exit_code not in (None, 0), f"worker started; expected a refusal:\n{log}"
    assert cell.cell.message in log, f"refusal lacks {cell.cell.message!r}:\n{log}"


@pytest.mark.cell_kind("job_error")
def test_jobs_fail_clearly(cell: CellSession, record: list[dict[str, Any]]) -> None:
    """Every job fails with a clear error and the worker keeps running (R-SEL-5, R-ANN-2)."""
    result = cell.run_script("bash", "echo ran-unsandboxed\n")
    assert result.status == "error", f"job was not refused: {result}"
    assert "ran-unsandboxed" not in result.stdout, "the job ran although it must not"
    assert cell.cell.message in result.stderr, f"error lacks {cell.cell.message!r}: {result.stderr}"
    assert cell.workers_alive(), f"the worker died:\n{cell.startup_log()}"


@pytest.mark.cell_kind("job_exit")
@pytest.mark.req("R-PID-2", "R-NSJ-3")
def test_job_exit(cell: CellSession, record: list[dict[str, Any]]) -> None:
    """A job killed by the platform is reported as documented (e.g. OOM -> 137 under tini)."""
    script = (JOBS_DIR / f"{cell.cell.job}.py").read_text()
    result = cell.run_script("python3", script)
    seen = f"exit_code={result.exit_code}\n{result.stderr}"
    assert cell.cell.message in seen, f"expected {cell.cell.message!r} in: {seen[-1500:]}"
    assert cell.workers_alive(), f"the worker died, not the job:\n{cell.startup_log()}"


@pytest.mark.cell_kind("startup_log")
@pytest.mark.req("R-OPS-1")
def test_startup_log(cell: CellSession, record: list[dict[str, Any]]) -> None:
    """The worker says at start which isolation is active, and what it found (R-OPS-1)."""
    log = cell.startup_log()
    missing = [line for line in cell.cell.startup_log if line not in log]
    assert not missing, f"start-up log lacks {missing}:\n{log}"
