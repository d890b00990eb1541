"""The next run's reap of a killed run (conformance.leftovers) acts only on what a run of
this user wrote, in the shape it writes: /tmp is everyone's, and the reap runs as root."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from conformance import leftovers
from conformance.platforms.session import owner_of

DEAD = "orvanta-cells-999999999-5-"  # no such pid: a dead run's name


def test_the_reap_acts_only_on_a_ledger_of_its_own_shape_and_user(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr("tempfile.tempdir", str(tmp_path))
    acted: list[tuple[str, str]] = []
    monkeypatch.setattr(leftovers, "cleanup_host", lambda t, v: acted.append(("token", t)) or [])
    monkeypatch.setattr(leftovers, "_remove_job_groups", lambda j: acted.append(("job", j)) or [])
    monkeypatch.setattr(leftovers, "remove_cgroup", lambda g: acted.append(("victim", str(g))))
    monkeypatch.setattr(leftovers, "STOP_SECONDS", 0.5)
    run = tmp_path / f"{DEAD}ours"
    (run / "cell").mkdir(parents=True)
    me = owner_of(os.getpid())  # alive, but pytest, not a worker: never signalled
    (run / "cell" / leftovers.LEDGER).write_text(
        f"worker {me}\ntoken zz\ntoken 0123456789abcdef\njob ../../etc\njob fedcba9876543210\n"
        "victim /etc\nvictim /sys/fs/cgroup/../../etc\n"
    )
    foreign = tmp_path / f"{DEAD}foreign"
    (foreign / "cell").mkdir(parents=True)
    (foreign / "cell" / leftovers.LEDGER).write_text("token aaaaaaaaaaaaaaaa\n")
    os.chown(foreign, 65534, 65534)  # another user's: not read, not removed
    linked = tmp_path / f"{DEAD}link"
    linked.symlink_to(run / "cell")  # a link: never followed
    leftovers.reap_dead_runs()
    assert acted == [("job", "fedcba9876543210"), ("token", "0123456789abcdef")]
    assert not run.exists() and foreign.is_dir() and linked.is_symlink()
