"""A two-stage probe whose plant found no room measured nothing: it must say so (an error with
`not_measured`), never "blocked". A full /tmp or a used-up queue budget would otherwise read as
isolation that holds (R-XJOB-1), which is false assurance.

Each probe runs directly, as root, in namespaces this test makes (a mount or an IPC namespace
of its own), where the room is taken away; nothing on the host changes. The same command with
the room left is the control: there the plant works.
"""

from __future__ import annotations

import json
import shutil
import subprocess
from pathlib import Path

import pytest

from conformance.canaries import NEIGHBOUR_NO_ROOM, PLANT_NEIGHBOUR
from conformance.platforms.host import cleanup_host

pytestmark = pytest.mark.integration

PROBES = Path(__file__).resolve().parents[2] / "fixtures" / "probes"
MOUNT = "mount -t tmpfs -o"
FULL, ROOM = f"{MOUNT} size=4k,nr_inodes=1 orvanta-full", f"{MOUNT} size=1m orvanta-room"
# probe: (its namespace, the shell that takes its room away, the control's: room, never
# the host's own /tmp or IPC)
NO_ROOM = {
    "leftover_tmp": (
        ["--mount", "--propagation", "private"],
        f"{FULL} /tmp && {FULL} /var/tmp",
        f"{ROOM} /tmp && {ROOM} /var/tmp",
    ),
    "leftover_shm": (
        ["--mount", "--propagation", "private"],
        f"{FULL} /dev/shm",
        f"{ROOM} /dev/shm",
    ),
    "leftover_sysv": (["--ipc"], "echo 0 > /proc/sys/kernel/shmmni", "true"),
    "leftover_mqueue": (["--ipc"], "ulimit -q 0", "true"),  # the uid's RLIMIT_MSGQUEUE, used up
}


def plant(probe: str, take_room: bool) -> dict[str, object]:
    """The probe's plant stage, read from stdin by the host's python3: the checkout (and its
    venv) may itself be under the /tmp this test mounts over."""
    namespace, no_room, room = NO_ROOM[probe]
    python = shutil.which("python3", path="/usr/bin:/bin") or "python3"
    script = f"{no_room if take_room else room} && exec {python} -"
    proc = subprocess.run(
        ["unshare", *namespace, "bash", "-c", script],
        input=(PROBES / f"{probe}.py").read_text(),
        env={"PROBE_TOKEN": "0123456789abcdef", "PROBE_STAGE": "plant", "PATH": "/usr/bin:/bin"},
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert proc.returncode == 0, proc.stderr
    verdict: dict[str, object] = json.loads(proc.stdout.strip().splitlines()[-1])
    return verdict


@pytest.fixture(autouse=True)
def _root() -> None:
    if shutil.which("unshare") is None:
        pytest.skip("util-linux unshare is not installed (scripts/setup installs it)")
    assert subprocess.run(["id", "-u"], capture_output=True, text=True).stdout.strip() == "0", (
        "these namespaces need root, as the suite does"
    )


@pytest.mark.req("R-XJOB-1")
@pytest.mark.parametrize("probe", sorted(NO_ROOM))
def test_a_plant_with_no_room_is_not_measured_not_blocked(probe: str) -> None:
    control = plant(probe, take_room=False)
    assert control["outcome"] == "blocked", control  # planted: the attack stage would look
    assert "not_measured" not in json.dumps(control), control
    full = plant(probe, take_room=True)
    assert full["outcome"] == "error", full
    evidence = full["evidence"]
    assert isinstance(evidence, dict) and "no room" in str(evidence.get("not_measured")), full


# The neighbour's plant (conformance.canaries.PLANT_NEIGHBOUR), with the room of one channel
# taken away as above: which channel's plant says so.
NEIGHBOUR_CHANNEL = {
    "leftover_tmp": "/tmp/orvanta-neighbour-0123456789abcdef",
    "leftover_shm": "/dev/shm/orvanta-neighbour-0123456789abcdef",
    "leftover_sysv": "sysv",
    "leftover_mqueue": "mqueue",
}


@pytest.mark.req("R-XJOB-1")
@pytest.mark.parametrize("room", sorted(NEIGHBOUR_CHANNEL))
def test_a_neighbour_with_no_room_to_plant_exits_and_says_which(room: str, tmp_path: Path) -> None:
    """A neighbour job whose canary found no room exits NEIGHBOUR_NO_ROOM, naming the channel,
    where before it slept on: probes then read its missing canary as a closed channel."""
    namespace, no_room, with_room = NO_ROOM[room]
    python = shutil.which("python3", path="/usr/bin:/bin") or "python3"
    script = 'token = "0123456789abcdef"\n' + PLANT_NEIGHBOUR + 'print("planted")\n'

    def neighbour(take_room: bool) -> subprocess.CompletedProcess[str]:
        shell = f"{no_room if take_room else with_room} && exec {python} -"
        return subprocess.run(
            ["unshare", *namespace, "bash", "-c", shell],
            input=script,
            cwd=tmp_path,  # its neighbour.txt: the job dir stands here
            env={"PATH": "/usr/bin:/bin"},
            capture_output=True,
            text=True,
            timeout=60,
            check=False,
        )

    control = neighbour(take_room=False)
    try:
        assert control.returncode == 0 and control.stdout.strip() == "planted", control
    finally:  # its plants in the host's /tmp, /dev/shm or IPC where this namespace has none
        cleanup_host("0123456789abcdef", None)
    try:
        full = neighbour(take_room=True)
        # what it did plant in the host's /tmp or /dev/shm it removed itself (the remote
        # audit has no other way to)
        left = [p for p in NEIGHBOUR_CHANNEL.values() if p.startswith("/") and Path(p).exists()]
    finally:
        cleanup_host("0123456789abcdef", None)
    assert full.returncode == NEIGHBOUR_NO_ROOM, full
    report = json.loads(full.stdout.strip().splitlines()[-1])
    assert list(report["no_room"]) == [NEIGHBOUR_CHANNEL[room]], report
    assert not left, f"a neighbour with no room left its plants: {left}"
