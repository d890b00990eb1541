"""The worker takes job_isolation from the claim (R-SEL-7): no settings query of its own per
job; a claim that could not say (an older server's, through the agent API) is asked apart."""

from __future__ import annotations

import types

import pytest

from runtime.jobs import JobSpec
from runtime.settings import Settings
from runtime.worker import Worker


class Source:
    """Answers the settings query with `value`, and counts how often it is asked."""

    path = "test"

    def __init__(self, value: str | None) -> None:
        self.value, self.asked = value, 0

    def setting(self, key: str) -> str | None:
        assert key == "job_isolation"
        self.asked += 1
        return self.value


def current(spec: JobSpec, source: Source) -> str | None:
    nsjail = types.SimpleNamespace(ok=True, detail="")  # looked up for nsjail_sandboxing
    runner = types.SimpleNamespace(
        settings=Settings.from_env({}), caps=types.SimpleNamespace(of=lambda name: nsjail)
    )
    worker = Worker(runner, source)  # type: ignore[arg-type]
    return worker._current_settings(spec).job_isolation


@pytest.mark.req("R-SEL-7")
def test_the_setting_read_with_the_claim_is_used_without_a_query() -> None:
    source = Source("none")  # what a query of its own would read: must not be asked
    read = JobSpec(
        "j", "bash", "true\n", job_isolation="nsjail_sandboxing", job_isolation_read=True
    )
    unset = JobSpec("j", "bash", "true\n", job_isolation=None, job_isolation_read=True)
    assert current(read, source) == "nsjail_sandboxing"
    assert current(unset, source) is None
    assert source.asked == 0


@pytest.mark.req("R-SEL-7")
def test_a_claim_that_could_not_say_is_asked_apart() -> None:
    source = Source(None)
    assert current(JobSpec("j", "bash", "true\n"), source) is None
    assert source.asked == 1
