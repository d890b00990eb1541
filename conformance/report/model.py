"""The audit report model: one dict, built once from a conformance run, rendered four ways.

Inputs are what the pytest plugin gathered from every test report (so it works
the same under pytest-xdist): per test its outcome, the requirement IDs it
cites, and the user properties the suite attached (probe runs, cell records).
The JSON form of this dict is the documented schema `audit.schema.json`.
"""

from __future__ import annotations

import datetime as dt
import platform
from dataclasses import dataclass, field
from importlib import resources
from typing import Any

import yaml

from conformance.canaries import Canaries
from conformance.matrix import Matrix
from runtime.backends import backend_class

SCHEMA_ID = "orvanta-audit/1"


@dataclass
class TestRecord:
    nodeid: str
    outcome: str  # passed | failed | skipped | error
    req: list[str]
    message: str = ""
    props: dict[str, Any] = field(default_factory=dict)


def mask(text: str) -> str:
    """No secret is ever written in clear: every canary value is replaced by its marker."""
    return Canaries.mask(text)


def requirements() -> dict[str, str]:
    text = resources.files("conformance").joinpath("requirements.yaml").read_text()
    reqs: dict[str, str] = yaml.safe_load(text)["requirements"]
    return reqs


def build(matrix: Matrix, tests: list[TestRecord], facts: dict[str, Any]) -> dict[str, Any]:
    cells = _cells(matrix, tests)
    host = {"hostname": platform.node(), **facts}
    host["platforms"] = platforms_ran_on(cells, host)
    deviations = [
        {"cell": c["id"], **p}
        for c in cells
        for p in c["probes"]
        if p["documented"] != p["expected"] or p["status"] == "fail"
    ]
    failed = [t for t in tests if t.outcome in ("failed", "error")]
    not_run = [t for t in tests if could_not_run(t)]
    weaker = [t for t in tests if t.outcome == "failed"]
    return {
        "schema": SCHEMA_ID,
        "generated": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
        "host": host,
        "summary": {
            "verdict": "fail" if weaker else ("could not run" if not_run else "pass"),
            "tests": len(tests),
            "could_not_run": [
                {"test": t.nodeid, "why": mask(t.message).strip().splitlines()[-1][:300]}
                for t in not_run[:50]
            ],
            "failed": len(failed),
            "weaker": len(weaker),  # a check failed; a set-up error is not counted here
            "skipped": sum(t.outcome == "skipped" for t in tests),
            "cells": len(cells),
            "probe_runs": sum(len(c["probes"]) for c in cells),
            "deviations": len(deviations),
            "findings": sum(1 for c in matrix.cells if c.finding),
        },
        "table": _table(matrix, cells),
        "cells": cells,
        "deviations": deviations,
        "findings": [
            {"cell": c.id, "finding": c.finding}
            for c in matrix.cells
            if c.finding and any(cell["id"] == c.id for cell in cells)
        ],
        "failures": [{"test": t.nodeid, "message": mask(t.message)[:2000]} for t in failed],
        "coverage": _coverage(tests),
    }


def platforms_ran_on(cells: list[dict[str, Any]], host: dict[str, Any]) -> list[dict[str, Any]]:
    """For every platform that ran: the kernel and cgroup version its cells ran on (a UML guest
    has its own; a container, the host's, unless its platform says otherwise) and its cells."""
    rows: dict[str, dict[str, Any]] = {}
    for cell in cells:
        facts = cell.get("platform_facts") or {}
        row = rows.setdefault(
            cell["platform"],
            {
                "platform": cell["platform"],
                "driver": str(facts.get("driver", "")),
                "kernel": str(facts.get("kernel") or host.get("kernel") or "unknown"),
                "cgroup": str(facts.get("cgroup") or host.get("cgroup") or "unknown"),
                "cells": [],
            },
        )
        row["cells"].append(cell["id"])
    return list(rows.values())


PLATFORM_MISSING = "platform missing here"  # in the skip reason of such a cell's tests


def could_not_run(test: TestRecord) -> bool:
    """An error outside the test's own check (its cell's worker or container did not start),
    or a cell skipped because its platform is missing here: no isolation was measured."""
    if test.outcome == "error":
        return True
    return test.outcome == "skipped" and PLATFORM_MISSING in test.message


def _cells(matrix: Matrix, tests: list[TestRecord]) -> list[dict[str, Any]]:
    by_id: dict[str, dict[str, Any]] = {}
    for spec in matrix.cells:
        by_id[spec.id] = {
            "id": spec.id,
            "platform": spec.platform,
            "backend": spec.backend,
            "env": spec.env,
            "kind": spec.kind,
            "expectation": spec.message or "table",
            "status": "not run",
            "not_measured": spec.not_measured,
            "startup_log": [],
            "probes": [],
        }
    for test in tests:
        cell_info = test.props.get("orvanta_cell")
        if not cell_info or cell_info["id"] not in by_id:
            continue
        cell = by_id[cell_info["id"]]
        cell["startup_log"] = [mask(line) for line in cell_info["startup_log"]]
        cell["platform_facts"] = cell_info.get("facts", {})
        failed = test.outcome in ("failed", "error")
        if cell["status"] != "fail":
            cell["status"] = (
                "fail" if failed else ("pass" if test.outcome == "passed" else cell["status"])
            )
        run = test.props.get("orvanta_run")
        if run:
            run = {**run, "status": "fail" if failed else "pass", "test": test.nodeid}
            run["evidence"] = mask(str(run["evidence"]))[:1500]
            cell["probes"].append(run)
    return [c for c in by_id.values() if c["status"] != "not run"]


def _table(matrix: Matrix, cells: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """The page's table: per backend and property, the reference cell (the current
    environment's cell, else the table cell with the fewest overrides, in matrix order,
    that probed the property: agent_scope is probed on agent cells only)."""
    # the least special cell stands for its backend: fewest overrides, no annotation
    weight = {c.id: len(c.overrides) + (100 if c.annotate else 0) for c in matrix.cells}
    # the worker as this environment configures it (orvanta audit) comes first
    ordered = sorted(cells, key=lambda c: ("/current-env/" not in c["id"], weight[c["id"]]))
    candidates = [c for c in ordered if c["kind"] == "table" and c["probes"]]
    rows = []
    for name, row in matrix.table.items():
        entry: dict[str, Any] = {"property": name, "req": row.req, "backends": {}}
        for backend, documented in row.values.items():
            ref = next(
                (
                    c
                    for c in candidates
                    if c["backend"] == backend and any(p["property"] == name for p in c["probes"])
                ),
                None,
            )
            runs = [p for p in ref["probes"] if p["property"] == name] if ref else []
            if not runs:
                measured, status = "not measured", "not measured"
            else:
                exposed = [p for p in runs if p["measured"] == "exposed"]
                measured = "not protected" if exposed else "protected"
                expected = (
                    "not protected"
                    if any(p["expected"] == "exposed" for p in runs)
                    else "protected"
                )
                status = (
                    "match"
                    if measured == expected
                    else ("weaker" if measured == "not protected" else "stronger")
                )
            entry["backends"][backend] = {
                "on_the_page": backend_class(backend).on_the_page,
                "documented": documented,
                "measured": measured,
                "status": status,
                "cell": ref["id"] if ref else None,
                "probes": {p["probe"]: p["measured"] for p in runs},
            }
        rows.append(entry)
    return rows


def column_title(report: dict[str, Any], backend: str) -> str:
    """A backend's column heading: its name, marked where it is none of the page's levels."""
    first = report["table"][0]["backends"][backend] if report["table"] else {}
    return backend if first.get("on_the_page", True) else f"{backend} (not on the page)"


def _coverage(tests: list[TestRecord]) -> list[dict[str, Any]]:
    rows = []
    for req, text in requirements().items():
        citing = [t for t in tests if req in t.req]
        if not citing:
            status = "uncovered"
        elif any(t.outcome in ("failed", "error") for t in citing):
            status = "fail"
        elif all(t.outcome == "skipped" for t in citing):
            status = "skipped"
        else:
            status = "pass"
        rows.append(
            {
                "req": req,
                "text": text,
                "status": status,
                "tests": len(citing),
                "failed": [t.nodeid for t in citing if t.outcome in ("failed", "error")][:10],
            }
        )
    return rows
