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
        (137, 1.01, True),  # SIGKILL at the hard limit, a quiet machine
        (137, 0.81, True),  # the same kill read on a loaded one (measured)
        (152, 0.9, True),  # SIGXCPU
        (137, 0.03, False),  # a job that killed itself at once
        (1, 5.0, False),  # no kill at all
        (137, None, False),  # no CPU time to read (the launcher was reaped elsewhere)
    ],
)
def test_the_note_survives_the_kernels_tick_count(
    exit_code: int, cpu: float | None, noted: bool
) -> None:
    notes = _cpu_limit_note(exit_code, cpu, 1)
    assert bool(notes) == noted, notes
    if noted:
        assert "ORVANTA_JOB_CPU_SECONDS" in notes[0] and "1 s" in notes[0], notes
