"""The worker thaws a frozen leftover of a job before it kills it (runtime.reaper), and
writes only to a cgroup's own files: on a v1 host /sys/fs/cgroup is a tmpfs, where a write
to the v2 path of a process's unified group made a stray regular file (R-HOST-5)."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from runtime import reaper

ROOT = Path("/sys/fs/cgroup")


def regular_files() -> set[Path]:
    """Regular files where a cgroup filesystem has none: its top and the v1 unified mount's."""
    places = [ROOT, ROOT / "unified"]
    return {p for place in places if place.is_dir() for p in place.iterdir() if p.is_file()}


@pytest.mark.integration
@pytest.mark.req("R-HOST-5")
@pytest.mark.skipif(not ROOT.is_dir(), reason="no /sys/fs/cgroup on this machine")
def test_thawing_makes_no_file() -> None:
    """This test's own process is not frozen: thawing it writes THAWED or 0 where it is
    already so, and must create nothing on the way (the old code made
    /sys/fs/cgroup/cgroup.freeze on this v1 host)."""
    before = regular_files()
    reaper._thaw(os.getpid())
    assert regular_files() == before
