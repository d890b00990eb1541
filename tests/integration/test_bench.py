"""`orvanta bench` end to end, small: every section present and self-consistent."""

from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path

import pytest
from cli_helpers import ROOT, cli_command


def test_bench_writes_per_job_floor_and_throughput(tmp_path: Path) -> None:
    """Throughput on SQLite, and through PostgreSQL with one and two workers where it runs."""
    from conformance.service import postgres_unavailable, postgres_url

    out = tmp_path / "bench.json"
    env = {k: v for k, v in os.environ.items() if k != "DATABASE_URL"}
    postgres = None if postgres_unavailable() else postgres_url()
    if postgres:
        env["DATABASE_URL"] = postgres
    proc = bench(
        "--runs", "3", "--backend", "none", "--throughput-jobs", "10",
        "--json", str(out), "--markdown",
        env=env,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    results = json.loads(out.read_text())
    assert [(r["backend"], r["language"]) for r in results["per_job"]] == [
        ("none", "bash"),
        ("none", "python3"),
    ]
    for row in results["per_job"]:
        assert row["runtime_ms"]["median"] > 0 and row["raw_ms"]["median"] > 0
        assert row["ratio"] == pytest.approx(
            row["runtime_ms"]["median"] / row["raw_ms"]["median"], rel=0.01
        )
    floor = results["floor"]
    assert floor["guarded_ms"]["median"] > 0 and floor["raw_ms"]["median"] > 0
    setups = [(row["database"], row["workers"]) for row in results["throughput"]]
    assert setups == [("sqlite", 1)] + ([("postgresql", 1), ("postgresql", 2)] if postgres else [])
    for row in results["throughput"]:
        assert row["backend"] == "none" and row["share"] > 0
    assert "(floor: guarantees only)" in proc.stdout and "| none | bash |" in proc.stdout
    (target,) = results["targets"]  # issue 17's, read on the bash rows
    assert (
        target["backend"] == "none"
        and target["overhead_ms"] == results["per_job"][0]["overhead_ms"]
    )
    assert "target at least 80%" in proc.stdout


def bench(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    """`orvanta bench ARGS` from the checkout; without `env`, on SQLite alone."""
    if env is None:
        env = {k: v for k, v in os.environ.items() if k != "DATABASE_URL"}
    return subprocess.run(
        cli_command("bench", *args),
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )


def test_bench_repeat_reports_the_median_of_whole_runs(tmp_path: Path) -> None:
    out = tmp_path / "bench.json"
    proc = bench(
        "--repeat", "2", "--runs", "2", "--backend", "none", "--throughput-jobs", "5",
        "--json", str(out),
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    assert "run 2 of 2" in proc.stderr
    results = json.loads(out.read_text())
    assert results["repeat"] == 2
    for row in results["per_job"]:
        assert len(row["overhead_ms_runs"]) == 2
        assert row["overhead_ms"] == pytest.approx(sum(row["overhead_ms_runs"]) / 2, abs=0.001)
    assert len(results["throughput"][0]["share_runs"]) == 2


def test_bench_refuses_a_repeat_it_cannot_do() -> None:
    proc = bench("--repeat", "0")
    assert proc.returncode != 0
    assert "--repeat must be 1 or more, not 0" in proc.stderr
    proc = bench("--queue", "--repeat", "3")
    assert proc.returncode != 0
    assert "--repeat is for the per-job and throughput runs, not --queue" in proc.stderr
