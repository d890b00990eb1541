"""The remote audit (`orvanta audit --server URL --tag TAG`) against a real job service.

One server (SQLite) and three worker groups of different isolation on this host: a none
group and an nsjail group of normal workers, an unshare group of agent workers. Each is
audited through the API alone, and each `remote/<tag>` verdict must match, probe by probe,
what the local audit asserts for the same configuration (its matrix cell's expectation).
"""

from __future__ import annotations

import argparse
import json
import time
from collections.abc import Callable
from pathlib import Path

import jsonschema
import pytest
from service_helpers import WorkerProcess

from conformance.cli import exit_code
from conformance.harness import LIMIT_VARS
from conformance.matrix import Matrix, load
from conformance.remote_api import AdminAPI
from conformance.remote_cli import audit, main
from conformance.remote_jobs import NOT_MEASURED, SCANS
from conformance.remote_report import build, write_all
from conformance.resources import suite_file
from conformance.service import Service

# tag -> (the local audit's cell of the same configuration, the group's worker variables)
GROUPS = {
    "plain": ("host/none/default", {}),
    "pid": ("host-agent/unshare/default-flags", {"ENABLE_UNSHARE_PID": "true"}),
    "jail": ("host/nsjail/default", {"DISABLE_NSJAIL": "false"}),
}
AGENTS = {"pid"}
BUDGET = 60.0


@pytest.fixture(scope="module")
def matrix() -> Matrix:
    return load(suite_file("matrix.yaml"))


def start_groups(
    service: Service, database_url: str, tmp: Path, spawn: Callable[..., WorkerProcess]
) -> None:
    """Two workers a group (one holds the neighbour, one takes the probes), one state dir."""
    matrix = load(suite_file("matrix.yaml"))
    limits = {var: str(matrix.limits[k]) for k, var in LIMIT_VARS.items() if k in matrix.limits}
    for tag, (_, env) in GROUPS.items():
        common = {
            **limits,
            **env,
            "ORVANTA_STATE_DIR": str(tmp / f"{tag}-state"),
            "ORVANTA_JOB_TIMEOUT": "60",
        }
        if tag in AGENTS:
            token = service.create_group(tag, [tag])
            common.update(
                {"MODE": "agent", "ORVANTA_SERVER_URL": service.url, "ORVANTA_AGENT_TOKEN": token}
            )
        else:
            common.update({"DATABASE_URL": database_url, "WORKER_TAGS": tag})
        for name in ("a", "b"):
            spawn(f"{tag}-{name}", dict(common))


def test_remote_audit_matches_the_local_audit(
    tmp_path: Path,
    spawn_worker: Callable[..., WorkerProcess],
    matrix: Matrix,
) -> None:
    database_url = f"sqlite:///{tmp_path}/queue.sqlite3"
    service = Service.start(database_url, tmp_path / "server")
    try:
        start_groups(service, database_url, tmp_path, spawn_worker)
        api = AdminAPI(service.url, service.admin_token)
        started = time.monotonic()
        results = audit(api, matrix, list(GROUPS))
        elapsed = time.monotonic() - started
        assert not api.cancel_unfinished()
    finally:
        service.stop()
    expects = {"jail": "nsjail"}
    report, tests = build(matrix, results, expects, service.url)
    write_all(report, tests, tmp_path / "report")
    schema = json.loads(suite_file("conformance/report/audit.schema.json").read_text())
    jsonschema.validate(report, schema)

    cells = {c.id: c for c in matrix.cells}
    mismatches, compared = [], 0
    for cell in report["cells"]:
        tag = cell["remote"]["tag"]
        local = cells[GROUPS[tag][0]]
        assert cell["backend"] == local.backend, cell["remote"]
        measured = {p["probe"]: p for p in cell["probes"]}
        wanted = [p for p in matrix.probes_for(local) if p.name not in NOT_MEASURED]
        missing = sorted(
            {p.name for p in wanted}
            - set(measured)
            - {n["probe"] for n in cell["remote"]["not_measured"]}
        )
        assert not missing, f"{tag}: neither measured nor reported as not measured: {missing}"
        for probe in wanted:
            run = measured.get(probe.name)
            if run is None:
                continue
            compared += 1
            expected, _ = matrix.expected(local, probe)
            assert run["isolation"] in (local.backend, "refused"), run  # refused: never ran
            assert run["worker"] or run["isolation"] == "refused", run
            if run["measured"] != expected:
                why = f"{run['measured']} != local {expected}: {run['evidence'][:300]}"
                mismatches.append(f"{tag} {probe.name}: {why}")
        assert set(SCANS) <= set(measured)
    assert not mismatches, "\n".join(mismatches)
    assert compared >= 3 * 25, compared
    print(f"remote audit of {list(GROUPS)}: {elapsed:.1f}s, {report['summary']['probe_runs']} runs")
    assert exit_code(report["summary"]) == 0, report["failures"]
    assert elapsed < BUDGET, f"the remote audit of three groups took {elapsed:.1f}s"

    # an operator who believes the none group is nsjail gets exit 1
    wrong, _ = build(matrix, results, {"plain": "nsjail"}, service.url)
    assert exit_code(wrong["summary"]) == 1


def test_dry_run_submits_nothing(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    args = argparse.Namespace(
        server="http://127.0.0.1:9",
        tag=["a", "b"],
        expect=["b=nsjail"],
        dry_run=True,
        matrix=None,
        out=tmp_path,
    )
    assert main(args) == 0
    out = capsys.readouterr().out
    assert "tag b: expect nsjail" in out and "not measured remotely: cgroup_join" in out
    assert not list(tmp_path.iterdir())
