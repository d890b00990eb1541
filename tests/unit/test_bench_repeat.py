"""`orvanta bench --repeat`: several runs read as their medians, and issue 17's targets."""

from __future__ import annotations

from typing import Any

import pytest

from conformance.bench import combine, markdown, targets


def run(overhead: float, share: float, jobs_per_s: float) -> dict[str, Any]:
    """One bench run's results, as `one_run` returns them (the figures that matter here)."""
    return {
        "runs": 40,
        "floor": {
            "raw_ms": {"median": 2.0, "p95": 2.5, "min": 1.5},
            "guarded_ms": {"median": 3.0, "p95": 3.5, "min": 2.5},
            "ratio": 1.5,
            "overhead_ms": 1.0,
        },
        "per_job": [
            {
                "backend": "none",
                "language": "bash",
                "raw_command": "/bin/bash raw.sh",
                "runtime_ms": {"median": 2.0 + overhead, "p95": 3.0, "min": 1.0},
                "raw_ms": {"median": 2.0, "p95": 2.5, "min": 1.0},
                "ratio": round((2.0 + overhead) / 2.0, 3),
                "overhead_ms": overhead,
            }
        ],
        "throughput": [
            {
                "backend": "none",
                "database": "sqlite",
                "workers": 1,
                "jobs": 300,
                "worker_jobs_per_s": jobs_per_s,
                "raw_jobs_per_s": round(jobs_per_s / share, 1),
                "share": share,
            }
        ],
    }


def test_every_figure_is_the_median_of_the_runs() -> None:
    merged = combine([run(0.9, 0.60, 300.0), run(0.4, 0.85, 420.0), run(0.7, 0.62, 310.0)])
    assert merged["repeat"] == 3
    job = merged["per_job"][0]
    assert job["overhead_ms"] == 0.7 and job["overhead_ms_runs"] == [0.9, 0.4, 0.7]
    assert job["runtime_ms"]["median"] == pytest.approx(2.7)
    assert job["raw_command"] == "/bin/bash raw.sh"
    row = merged["throughput"][0]
    assert row["share"] == 0.62 and row["share_runs"] == [0.60, 0.85, 0.62]
    assert row["workers"] == 1 and row["database"] == "sqlite"


def test_targets_read_the_bash_overhead_and_the_sqlite_share() -> None:
    (missed,) = targets(
        combine([run(0.9, 0.60, 300.0), run(0.4, 0.85, 420.0), run(0.7, 0.62, 310.0)])
    )
    assert missed == {
        "backend": "none",
        "overhead_ms": 0.7,
        "overhead_met": False,
        "share": 0.62,
        "share_met": False,
    }
    (met,) = targets(run(0.5, 0.80, 400.0))  # the bounds themselves meet them
    assert met["overhead_met"] and met["share_met"]


def test_the_markdown_shows_each_run_and_the_targets() -> None:
    results = {
        "date": "2026-12-07",
        "machine": "vm: 2 cores",
        **combine([run(0.9, 0.60, 300.0), run(0.4, 0.85, 420.0)]),
    }
    results["targets"] = targets(results)
    text = markdown(results)
    assert "median of 2 whole bench runs" in text
    assert "+0.65 ms (+0.90, +0.40)" in text
    assert "72% (60%, 85%)" in text
    assert "| none | +0.65 ms not met | 72% not met |" in text
