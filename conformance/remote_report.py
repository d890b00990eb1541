"""The remote audit's report: the local audit's model and files, one cell `remote/<tag>` a tag.

Each probe run becomes the test record the pytest plugin would have made, so
conformance/report/model.py builds the same dict (schema orvanta-audit/1) and renders it the
same ways; junit.xml is written here (locally pytest writes it). A cell also carries
`remote`: the tag, its live workers, the isolation its jobs reported, the one expected, and
the probes not measured remotely with why.
"""

from __future__ import annotations

import dataclasses
import platform
import xml.etree.ElementTree as ET
from pathlib import Path
from typing import Any

from conformance.matrix import Cell, Matrix, Override
from conformance.remote import RemoteRun, TagResult, evidence
from conformance.report import model, write


def cell_for(tag: TagResult, expect: str | None) -> Cell:
    """The tag as a cell of the table: the backend its operator expects, else the one its
    jobs reported (the table's column for it is the expectation)."""
    backend = expect or tag.isolation or "none"
    return Cell(
        id=f"remote/{tag.tag}",
        platform="remote",
        backend=backend,
        env={},
        kind="table",
        message="",
        req=(),
    )


def expectation(matrix: Matrix, cell: Cell, run: RemoteRun) -> tuple[str, str, Override | None]:
    """(documented, expected, override) for the run, from the table and the matrix's probe
    overrides; a credential scan follows its row."""
    if run.probe.matrix_probe is not None:
        expected, override = matrix.expected(cell, run.probe.matrix_probe)
        return matrix.documented(cell, run.probe.matrix_probe), expected, override
    value = matrix.table[run.probe.row].values[cell.backend]
    documented = "blocked" if value in matrix.protected else "exposed"
    return documented, documented, None


def status(expected: str, measured: str) -> str:
    """fail when weaker than expected or the probe could not say; stronger is reported (the
    table shows it) but passes: a remote platform may hold more than the backend alone."""
    if measured == "error" or (measured == "exposed" and expected == "blocked"):
        return "fail"
    return "pass"


def records(
    matrix: Matrix, tags: list[TagResult], expects: dict[str, str], server: str
) -> tuple[list[Cell], list[model.TestRecord]]:
    cells, tests = [], []
    for tag in tags:
        cell = cell_for(tag, expects.get(tag.tag))
        cells.append(cell)
        info = {
            "id": cell.id,
            "startup_log": _log(tag),
            "facts": {"server": server, "tag": tag.tag, "workers": tag.workers},
        }
        if tag.could_not_run:
            tests.append(_record(cell, "setup", "error", tag.could_not_run, info))
        wanted = expects.get(tag.tag)
        if wanted and tag.isolation and tag.isolation != wanted:
            why = f"jobs of tag {tag.tag!r} ran under {tag.isolation!r}, expected {wanted!r}"
            tests.append(_record(cell, "expect", "failed", why, info))
        for run in tag.runs:
            documented, expected, override = expectation(matrix, cell, run)
            outcome = "failed" if status(expected, run.measured) == "fail" else "passed"
            ev = evidence(run)
            record = _record(cell, run.probe.name, outcome, "", info, list(run.probe.req))
            if outcome == "failed":
                record.message = f"{run.probe.name} was {run.measured}, expected {expected}: {ev}"
            record.props["orvanta_run"] = {
                "probe": run.probe.name,
                "property": run.probe.row,
                "req": list(run.probe.req),
                "documented": documented,
                "expected": expected,
                "measured": run.measured,
                "override": {"kind": override.kind, "reason": override.reason}
                if override
                else None,
                "evidence": ev,
                "isolation": run.isolation,
                "exit_code": run.exit_code,
                "duration": run.duration,
                "worker": run.worker,
                "job": run.job,
            }
            tests.append(record)
        for name, why in tag.not_measured.items():
            tests.append(_record(cell, name, "skipped", f"not measured remotely: {why}", info))
    return cells, tests


def build(
    matrix: Matrix, tags: list[TagResult], expects: dict[str, str], server: str
) -> tuple[dict[str, Any], list[model.TestRecord]]:
    cells, tests = records(matrix, tags, expects, server)
    remote_matrix = dataclasses.replace(matrix, cells=cells)
    facts = {"auditor": platform.node(), "mode": "remote", "server": server}
    report = model.build(remote_matrix, tests, facts)
    by_id = {f"remote/{t.tag}": t for t in tags}
    for cell in report["cells"]:
        tag = by_id[cell["id"]]
        cell["remote"] = {
            "tag": tag.tag,
            "workers": [w.get("name", "?") for w in tag.workers],
            "agent": tag.agent,
            "reported_isolation": tag.isolation or None,
            "expected_isolation": expects.get(tag.tag),
            "not_measured": [{"probe": p, "why": w} for p, w in tag.not_measured.items()],
            "notes": tag.notes,
        }
    return report, tests


def write_all(report: dict[str, Any], tests: list[model.TestRecord], out: Path) -> list[Path]:
    files = write(report, out)
    junit = out / "junit.xml"
    junit.write_text(junit_xml(tests))
    return [*files, junit]


def junit_xml(tests: list[model.TestRecord]) -> str:
    suite = ET.Element(
        "testsuite",
        name="orvanta-remote-audit",
        tests=str(len(tests)),
        failures=str(sum(t.outcome == "failed" for t in tests)),
        errors=str(sum(t.outcome == "error" for t in tests)),
        skipped=str(sum(t.outcome == "skipped" for t in tests)),
    )
    for test in tests:
        cell, _, name = test.nodeid.partition("::")
        case = ET.SubElement(suite, "testcase", classname=cell, name=name)
        run = test.props.get("orvanta_run")
        if run:
            case.set("time", str(run["duration"]))
        if test.outcome in ("failed", "error"):
            tag = "failure" if test.outcome == "failed" else "error"
            ET.SubElement(case, tag, message=model.mask(test.message)[:300]).text = model.mask(
                test.message
            )
        elif test.outcome == "skipped":
            ET.SubElement(case, "skipped", message=test.message[:300])
    return '<?xml version="1.0" encoding="utf-8"?>\n' + ET.tostring(suite, encoding="unicode")


def _record(
    cell: Cell, name: str, outcome: str, message: str, info: dict[str, Any], req: Any = None
) -> model.TestRecord:
    return model.TestRecord(
        f"{cell.id}::{name}", outcome, list(req or []), message, {"orvanta_cell": info}
    )


def _log(tag: TagResult) -> list[str]:
    """What the tag's jobs said about their isolation (their job log's first lines)."""
    seen = {line for r in tag.runs for line in r.raw.get("job_log", [])}
    return [*sorted(line for line in seen if line.startswith("isolation:")), *tag.notes]
