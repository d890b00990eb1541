"""Platforms as typed specs: matrix.yaml's mistakes caught at load, with where and what to do;
every driver carries its own options and run-level hooks; survivors found through psutil."""

from __future__ import annotations

import secrets
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import yaml

from conformance.matrix import MatrixError, load
from conformance.platforms import DRIVERS, driver_class, parse_platform, unavailable
from conformance.platforms.host import kill_marked, survivors
from conformance.platforms.session import dead_owned, owned_prefix, session
from conformance.platforms.spec import SpecError

MATRIX = Path(__file__).resolve().parents[2] / "matrix.yaml"


def test_the_matrix_platforms_load_as_typed_specs() -> None:
    platforms = load(MATRIX).platforms
    assert platforms["host"].driver == "host"
    assert platforms["host-userns-off"].options.userns_off is True
    agent = platforms["docker-agent"]
    assert (agent.driver, agent.mode, agent.server) == ("docker", "agent", "unix")
    assert platforms["docker-privileged-256m"].options.mem_limit == "256m"
    assert platforms["docker-nsjail-minimal-caps"].options.cap_drop == ("ALL",)
    assert platforms["docker-gvisor"].options.runtime == "runsc"
    assert platforms["docker-privileged"].options.runtime == ""
    assert (platforms["podman-rootless"].driver, platforms["podman-rootless"].options.rootless) == (
        "podman",
        True,
    )
    assert platforms["podman-rootful"].options.rootless is False


@pytest.mark.parametrize(
    ("platform", "entry", "where", "says"),
    [
        ("docker-x", {"driver": "docker", "capadd": ["ALL"]}, "capadd", "did you mean 'cap_add'"),
        ("docker-x", {"driver": "docker", "cap_add": "ALL"}, "cap_add", "not a list of names"),
        ("docker-x", {"driver": "docker", "cap_add": ["CAP_SYS_ADMIN"]}, "cap_add", "no CAP_"),
        ("docker-x", {"driver": "docker", "mem_limit": "1 gig"}, "mem_limit", "like 256m"),
        ("docker-x", {"driver": "docker", "pids_limit": "many"}, "pids_limit", "whole number"),
        ("docker-x", {"driver": "docker", "security_opt": ["secomp=x"]}, "security_opt", "seccomp"),
        ("docker-x", {"driver": "dokker"}, "driver", "name one of: docker, host, podman"),
        ("gvisor", {}, "driver", "a platform's name is its driver"),
        ("docker-x", {"driver": "docker", "runtime": "run sc"}, "runtime", "like runsc"),
        ("podman-x", {"driver": "podman", "rootless": "yes"}, "rootless", "true or false"),
        ("podman-x", {"driver": "podman", "runtime": "runsc"}, "runtime", "not a key of podman"),
        ("host-x", {"driver": "host", "userns_off": "yes"}, "userns_off", "true or false"),
        ("host-x", {"driver": "host", "cap_add": ["ALL"]}, "cap_add", "not a key of host"),
        ("host-x", {"driver": "host", "mode": "agnet"}, "mode", "'worker', 'agent'"),
        ("host-x", {"driver": "host", "server": "unix"}, "server", "add mode: agent"),
        ("host-x", {"driver": "host", "limits": {"cpu_secs": 3}}, "limits.cpu_secs", "one of"),
        ("host-x", {"driver": "host", "limits": {"cpu_seconds": 0}}, "limits.cpu_seconds", ">= 1"),
        ("host-x", {"driver": "host", "limits": [3]}, "limits", "a mapping"),
    ],
)
def test_a_bad_platform_names_itself_its_key_and_the_fix(
    tmp_path: Path, platform: str, entry: dict[str, Any], where: str, says: str
) -> None:
    raw = yaml.safe_load(MATRIX.read_text())
    raw["platforms"][platform] = entry
    path = tmp_path / "matrix.yaml"
    path.write_text(yaml.safe_dump(raw))
    with pytest.raises(MatrixError) as caught:
        load(path)
    assert f"{path}: platforms.{platform}.{where}: " in str(caught.value)
    assert says in str(caught.value)


def test_a_platforms_limits_replace_the_matrix_limits_for_its_cells_alone() -> None:
    """The UML guests' CPU time runs 7x the host's: their jobs get more of it, no one else."""
    matrix = load(MATRIX)
    by_platform = {cell.platform: cell for cell in matrix.cells}
    uml, host = by_platform["uml-cgroup2"], by_platform["host"]
    assert matrix.limits_for(uml) == {**matrix.limits, "cpu_seconds": 3}
    assert matrix.limits_for(host) == matrix.limits


def test_a_platform_without_a_driver_key_is_the_driver_of_its_name() -> None:
    spec = parse_platform("host", {"description": "this machine"})
    assert (spec.driver, spec.mode, spec.options.userns_off) == ("host", "worker", False)
    with pytest.raises(SpecError, match=r"^platforms\.host\.userns_off: 1 is not true or false"):
        parse_platform("host", {"userns_off": 1})


@pytest.mark.parametrize("kind", sorted(DRIVERS))
def test_every_driver_declares_options_and_its_run_hooks(kind: str) -> None:
    driver = driver_class(kind)
    assert parse_platform(f"{kind}-defaults", {"driver": kind}).options == driver.Options()
    for hook in ("unavailable", "prepare", "finish"):
        assert callable(getattr(driver, hook)), f"{kind} lacks {hook}"


def test_the_host_is_always_available_and_agents_need_postgres(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr("conformance.service.postgres_unavailable", lambda: "no PostgreSQL")
    assert unavailable(parse_platform("host", {})) is None
    assert unavailable(parse_platform("host", {"mode": "agent"})) == "no PostgreSQL"


def test_survivors_are_found_by_marker_and_killed() -> None:
    marker = f"orvanta-test-{secrets.token_hex(6)}"
    argv = [sys.executable, "-c", "import time; time.sleep(60)", marker]
    proc = subprocess.Popen(argv)
    try:
        found = survivors(marker)
        assert found == [f"{proc.pid}: {' '.join(argv)}"]
        assert kill_marked(marker) == [f"process {found[0]}"]
        assert proc.wait(timeout=10) == -9
        assert survivors(marker) == []
    finally:
        proc.kill()
        proc.wait()


def test_a_killed_runs_temporary_dirs_are_known_by_their_name(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A run names what it leaves in the temp dir after itself, so the next run can tell a
    killed run's dir (reap it) from a live one's or one of another shape (leave it)."""
    monkeypatch.setattr("tempfile.tempdir", str(tmp_path))
    pid, started = session().split(":")
    ours = tmp_path / f"{owned_prefix('orvanta-cells-')}a1b2"
    killed = tmp_path / "orvanta-cells-999999999-5-x_9"  # no such pid
    reused = tmp_path / f"orvanta-cells-{pid}-{int(started) - 1}-q"  # its pid, not its start
    foreign = [tmp_path / f"orvanta-cells-{n}" for n in ("k3j_x9", "12-ab", "12-ab-c", "x-1-c")]
    for path in (ours, killed, reused, *foreign):
        path.mkdir()
    assert ours.name.startswith(f"orvanta-cells-{pid}-{started}-")
    assert sorted(dead_owned("orvanta-cells-")) == sorted([killed, reused])
