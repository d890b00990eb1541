"""`orvanta audit`'s exit code comes from what was collected, not from pytest's code:
0 every expectation holds, 1 isolation is weaker, 2 a cell could not run (R-OPS-1)."""

from __future__ import annotations

import pytest

from conformance.cli import EXIT_COULD_NOT_RUN, EXIT_OK, EXIT_WEAKER, exit_code
from conformance.matrix import load
from conformance.report import model
from conformance.resources import suite_file

MATRIX = load(suite_file("matrix.yaml"))


def summary(*records: model.TestRecord) -> dict[str, object]:
    report = model.build(MATRIX, list(records), {})
    summary: dict[str, object] = report["summary"]
    return summary


def record(outcome: str, message: str = "") -> model.TestRecord:
    return model.TestRecord(f"conformance/test_isolation.py::t[{outcome}]", outcome, [], message)


@pytest.mark.req("R-OPS-1")
@pytest.mark.parametrize(
    ("records", "code", "verdict"),
    [
        ([record("passed"), record("skipped", "Skipped: needs two CPUs")], EXIT_OK, "pass"),
        ([record("passed"), record("failed", "assert exposed == blocked")], EXIT_WEAKER, "fail"),
        (
            [record("passed"), record("error", "HarnessError: worker did not start")],
            EXIT_COULD_NOT_RUN,
            "could not run",
        ),
        # weaker isolation measured anywhere is never hidden behind a cell that could not run
        (
            [record("failed"), record("error", "HarnessError: worker did not start")],
            EXIT_WEAKER,
            "fail",
        ),
        (
            [
                record("passed"),
                record("skipped", f"Skipped: {model.PLATFORM_MISSING}: docker: no engine"),
            ],
            EXIT_COULD_NOT_RUN,
            "could not run",
        ),
    ],
    ids=["holds", "weaker", "set-up-error", "weaker-and-set-up-error", "platform-missing"],
)
def test_the_exit_code_follows_the_collected_results(
    records: list[model.TestRecord], code: int, verdict: str
) -> None:
    s = summary(*records)
    assert s["verdict"] == verdict
    assert exit_code(s) == code
