"""The `cpu limit:` note (runtime.executor._cpu_limit_note): the kernel kills at the limit by
its tick-sampled CPU count, and the rusage the worker reads is the scheduler's exact time,
which reads lower on a loaded machine; the note must not hang on the difference."""

from __future__ import annotations

import pytest

from runtime.executor import _cpu_limit_note


@pytest.mark.req("R-TBL-RES")
@pytest.mark.parametrize(
    ("exit_code", "cpu", "noted"),
    [
        (137, 1.01, "probably"),  # SIGKILL at the hard limit, a quiet machine
        (137, 0.70, "perhaps"),  # the same kill read on a loaded one (measured)
        (152, 0.9, "probably"),  # SIGXCPU: nothing else sends it
        (137, 0.03, None),  # a job that killed itself at once
        (1, 5.0, None),  # no kill at all
        (137, None, None),  # no CPU time to read (the launcher was reaped elsewhere)
    ],
)
def test_the_note_survives_the_kernels_tick_count(
    exit_code: int, cpu: float | None, noted: str | None
) -> None:
    notes = _cpu_limit_note(exit_code, cpu, 1)
    assert len(notes) == (noted is not None), notes
    if noted is not None:
        assert f"{noted} the limit" in notes[0], notes
        assert "ORVANTA_JOB_CPU_SECONDS" in notes[0] and "1 s" in notes[0], notes
    if noted == "perhaps":  # short of the limit as read: the other causes are named too
        assert "ORVANTA_JOB_MEMORY_MB" in notes[0], notes
