"""Each running job's own host ids (R-HOST-4): taken from ORVANTA_JOB_UID/GID +
ORVANTA_JOB_ID_COUNT, never two at once, given back when the job ends."""

from __future__ import annotations

from pathlib import Path

import pytest

from runtime.idmap import JobIdsExhaustedError, take_ids
from runtime.settings import Settings, SettingsError


def settings(count: int) -> Settings:
    return Settings.from_env(
        {"ORVANTA_JOB_UID": "70000", "ORVANTA_JOB_GID": "80000", "ORVANTA_JOB_ID_COUNT": str(count)}
    )


@pytest.mark.req("R-HOST-4")
def test_running_jobs_never_share_ids_and_the_last_id_is_given_back(tmp_path: Path) -> None:
    s = settings(3)
    held = [take_ids(s, tmp_path) for _ in range(3)]
    assert sorted(ids.uid for ids in held) == [70000, 70001, 70002]
    assert all(ids.gid - 80000 == ids.uid - 70000 for ids in held)
    with pytest.raises(JobIdsExhaustedError, match="raise ORVANTA_JOB_ID_COUNT"):
        take_ids(s, tmp_path)
    freed = held.pop(1)
    freed.release()
    assert take_ids(s, tmp_path).uid == freed.uid
    for ids in held:
        ids.release()
        ids.release()  # twice is harmless


def test_a_released_id_leaves_no_lock_file_behind(tmp_path: Path) -> None:
    ids = take_ids(settings(10), tmp_path)
    assert [p.name for p in tmp_path.iterdir()] == [str(ids.uid)]
    ids.release()
    assert list(tmp_path.iterdir()) == []


def test_a_lock_file_left_by_a_killed_worker_is_reused(tmp_path: Path) -> None:
    (tmp_path / "70000").touch()  # its holder died: nobody has it locked
    ids = take_ids(settings(1), tmp_path)
    assert ids.uid == 70000
    ids.release()


@pytest.mark.req("R-CFG-7")
@pytest.mark.parametrize(
    ("env", "message"),
    [
        ({"ORVANTA_JOB_ID_COUNT": "0"}, "a positive integer"),
        ({"ORVANTA_JOB_UID": "2147483000", "ORVANTA_JOB_ID_COUNT": "1000"}, "below 2147483647"),
    ],
)
def test_an_id_range_past_the_last_id_is_refused(env: dict[str, str], message: str) -> None:
    with pytest.raises(SettingsError, match=message):
        Settings.from_env(env)
