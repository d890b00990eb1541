"""scripts/setup decides by capability: `--dry-run` against a PATH of stand-in executables.

Each test builds a small world: a copy of scripts/ and a matrix.yaml in a temporary repository,
and a bin/ holding only the basic tools the decisions need plus the stand-ins it names. Nothing
is installed, started or changed; the dry run prints one `[setup] NAME: DECISION` line a piece.
"""

from __future__ import annotations

import re
import shutil
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
# What the decisions themselves run, besides the pieces being probed.
BASICS = ("bash", "dirname", "grep", "awk", "timeout", "id", "cat")
# Each piece the setup probes, and the package it installs for it where apt has one.
PACKAGES = {
    "unshare": "util-linux",
    "tini": "tini",
    "ps": "procps",
    "ip": "iproute2",
    "job-python": "python3",
    "psutil": "python3-psutil",
    "venv": "python3-venv",
    "bwrap": "bubblewrap",
    "debootstrap": "debootstrap",
    "postgresql": "postgresql",
    "browser": "chromium",
    "engine": "docker.io",
}
PLATFORM_PACKAGES = ("user-mode-linux", "podman", "runsc")
LINE = re.compile(
    r"^\[setup\] ([\w-]+): (ok|apt|start|named|not needed|note|register|create)\b ?(.*)$"
)


class World:
    def __init__(self, root: Path) -> None:
        self.repo = root / "repo"
        self.bin = root / "bin"
        (self.repo / "scripts").mkdir(parents=True)
        self.bin.mkdir()
        for name in ("setup", "platforms"):
            shutil.copy(ROOT / "scripts" / name, self.repo / "scripts" / name)
        shutil.copy(ROOT / "matrix.yaml", self.repo / "matrix.yaml")
        for tool in BASICS:
            found = shutil.which(tool)
            assert found, f"{tool} is needed to run scripts/setup"
            (self.bin / tool).symlink_to(found)
        self.job_python = root / "job-python3"
        self.lines: list[tuple[str, str, str]] = []  # (piece, decision, detail), in order

    def stub(self, name: str, body: str = "exit 0") -> Path:
        path = self.bin / name
        path.write_text(f"#!/bin/sh\n{body}\n")
        path.chmod(0o755)
        return path

    def tools(self, *names: str) -> None:
        for name in names:
            self.stub(name)

    def python(self, *modules: str) -> None:
        """The jobs' and the venv's interpreter, able to import exactly `modules`."""
        allowed = "|".join(f"'import {m}'" for m in modules) or "'-'"
        body = f'case "$2" in {allowed}) exit 0 ;; *) exit 1 ;; esac'
        self.stub("python3", body)
        self.job_python.write_text(f"#!/bin/sh\n{body}\n")
        self.job_python.chmod(0o755)

    def apt(self, known: dict[str, str]) -> None:
        """apt-get and apt-cache that know `known` (package -> description)."""
        self.stub("apt-get", "echo 'apt-get must not run in a dry run' >&2; exit 99")
        cases = "".join(
            f"  {pkg}) printf 'Package: {pkg}\\nDescription: {desc}\\n' ;;\n"
            for pkg, desc in known.items()
        )
        last = "for pkg; do :; done"  # the package is the last argument
        self.stub("apt-cache", f'{last}\ncase "$pkg" in\n{cases}  *) exit 100 ;;\nesac')

    def debian(self) -> None:
        packages = (*PACKAGES.values(), *PLATFORM_PACKAGES)
        self.apt({pkg: f"{pkg} from Debian" for pkg in packages})

    def present(self) -> None:
        """Everything but the engine, the browser and the platform tools."""
        self.tools("unshare", "tini", "ps", "ip", "bwrap", "debootstrap", "pg_ctlcluster")
        self.python("psutil", "ensurepip, venv")

    def decide(self) -> dict[str, tuple[str, str]]:
        env = {
            "PATH": str(self.bin),
            "ORVANTA_PYTHON": str(self.job_python),
            "LANG": "C",
            "ORVANTA_PODMAN_USER": "orvanta-podman-absent",  # whatever this machine has
        }
        out = subprocess.run(
            ["/bin/bash", str(self.repo / "scripts" / "setup"), "--dry-run"],
            env=env,
            capture_output=True,
            text=True,
            timeout=60,
            check=False,
        )
        assert out.returncode == 0, out.stderr
        decisions = {}
        for line in out.stderr.splitlines():
            match = LINE.match(line)
            assert match, f"not a decision line: {line!r}\n{out.stderr}"
            decisions[match[1]] = (match[2], match[3])
            self.lines.append((match[1], match[2], match[3]))
        return decisions


@pytest.fixture
def world(tmp_path: Path) -> World:
    return World(tmp_path)


def test_nothing_present_and_no_apt_names_every_piece_with_how_to_get_it(world: World) -> None:
    d = world.decide()
    for name in PACKAGES:
        assert d[name][0] == "named", (name, d[name])
    assert "google-chrome" in d["browser"][1]
    assert "docker info" in d["engine"][1]
    assert "start" not in {action for action, _ in d.values()}


def test_nothing_present_on_debian_installs_every_piece_and_starts_dockerd(world: World) -> None:
    world.debian()
    d = world.decide()
    for name, pkg in PACKAGES.items():
        if name != "engine":
            assert d[name] == ("apt", pkg), name
    assert ("engine", "apt", "docker.io") in world.lines
    assert d["engine"][0] == "start" and "dockerd --bridge=none --iptables=false" in d["engine"][1]


def test_engine_that_answers_is_used_as_it_is(world: World) -> None:
    world.debian()
    world.present()
    world.stub("docker", '[ "$1" = info ] && exit 0; exit 1')
    world.stub("dockerd", "echo 'dockerd must not start' >&2; exit 99")
    d = world.decide()
    assert d["engine"][0] == "ok"
    assert [line for line in world.lines if line[0] == "engine"] == [
        ("engine", "ok", "(docker info answers; used as it is, never restarted)")
    ]


def test_engine_installed_but_silent_is_started_not_reinstalled(world: World) -> None:
    world.debian()
    world.stub("docker", "exit 1")  # the CLI is there, no engine answers
    world.stub("dockerd", "exit 99")
    world.decide()
    assert [line for line in world.lines if line[0] == "engine"] == [
        ("engine", "start", "(dockerd --bridge=none --iptables=false; no engine answers)")
    ]


def test_browser_on_path_is_used_and_chromium_not_installed(world: World) -> None:
    world.debian()
    world.present()
    world.stub("google-chrome", '[ "$1" = --version ] && echo "Google Chrome 131.0"')
    d = world.decide()
    assert d["browser"] == ("ok", f"({world.bin / 'google-chrome'})")
    assert [line for line in world.lines if line[0] == "browser"] == [
        ("browser", "ok", f"({world.bin / 'google-chrome'})")
    ]


@pytest.mark.parametrize("name", ["chromium", "chromium-browser"])
def test_either_chromium_name_counts_as_a_browser(world: World, name: str) -> None:
    world.stub(name, "echo Chromium 120")
    assert world.decide()["browser"] == ("ok", f"({world.bin / name})")


def test_snap_shim_is_neither_a_browser_nor_a_package_to_install(world: World) -> None:
    # Ubuntu 24.04: the command only says to install the snap, and apt's chromium is a shim for it.
    world.stub("chromium-browser", "echo 'requires the chromium snap to be installed' >&2; exit 1")
    world.apt({"chromium": "Transitional package - chromium -> chromium snap", "tini": "tini"})
    d = world.decide()
    assert d["browser"][0] == "named"
    assert d["tini"] == ("apt", "tini")


def test_platform_tools_are_not_needed_until_the_matrix_has_their_platforms(world: World) -> None:
    world.debian()
    (world.repo / "matrix.yaml").write_text("platforms:\n  host:\n    description: x\ncells: []\n")
    d = world.decide()
    for group in ("uml", "gvisor", "podman"):
        assert d[group] == ("not needed", f"(no {group} platform in matrix.yaml)")
    assert "runsc-runtime" not in d and "rootless-user" not in d


def test_platform_tools_follow_the_matrix(world: World) -> None:
    # Debian has all three as packages; here apt knows UML and Podman but not runsc (as on Ubuntu).
    world.apt({"user-mode-linux": "User-mode Linux (kernel)", "podman": "podman"})
    (world.repo / "matrix.yaml").write_text(
        "platforms:\n"
        "  host:\n    description: x\n"
        "  uml-cgroup2:\n    description: x\n"
        "  docker-gvisor:\n    driver: docker\n"
        "  rootless:\n    driver: podman\n"
        "cells: []\n"
    )
    d = world.decide()
    assert d["uml"] == ("apt", "user-mode-linux")
    assert d["podman"] == ("apt", "podman")
    assert d["runsc"][0] == "named" and "docker-gvisor" in d["runsc"][1]
    assert d["runsc-runtime"][0] == "register" and "never a restart" in d["runsc-runtime"][1]
    assert d["rootless-user"] == (
        "create",
        "(orvanta-podman-absent, 65536 subordinate ids from 3000000000)",
    )


def test_runsc_registered_with_the_engine_is_left_alone(world: World) -> None:
    world.debian()
    world.present()
    world.tools("runsc", "podman", "newuidmap")
    runtimes = '{"runc":{"path":"runc"},"runsc":{"path":"/usr/bin/runsc"}}'
    world.stub(
        "docker", f'[ "$1" = info ] || exit 1; [ "$2" = --format ] && echo \'{runtimes}\'; exit 0'
    )
    d = world.decide()
    assert d["runsc"] == ("ok", "")
    assert d["runsc-runtime"] == ("ok", "(registered with the engine)")
    assert d["podman"] == ("ok", "") and d["newuidmap"] == ("ok", "")


def test_apparmor_userns_restriction_is_noted(world: World) -> None:
    world.stub("sysctl", "echo 1")
    d = world.decide()
    assert d["userns"][0] == "note" and "rootless Podman" in d["userns"][1]


def platforms(group: str, matrix: Path | None = None) -> subprocess.CompletedProcess[str]:
    argv = ["bash", str(ROOT / "scripts" / "platforms"), group]
    return subprocess.run(
        [*argv, str(matrix)] if matrix else argv,
        capture_output=True,
        text=True,
        timeout=30,
        check=False,
    )


def test_ci_groups_of_today_and_to_come() -> None:
    assert platforms("host").stdout.strip() == "host,host-userns-off,host-agent"
    assert platforms("unprivileged").stdout.strip().split(",") == [
        "docker-unprivileged",
        "docker-unprivileged-seccomp-unconfined",
    ]
    tox = (ROOT / "tox.ini").read_text()
    assert platforms("uml").stdout.strip() == "uml-cgroup2,uml-cgroup2-256m,uml-cgroup2-userns-off"
    for group in ("host", "privileged", "unprivileged", "uml"):
        assert f"--platform={platforms(group).stdout.strip()} " in tox, group
    assert platforms("gvisor").stdout.strip() == "docker-gvisor"
    assert platforms("podman").stdout.strip() == "podman-rootful,podman-rootless"
    for group in ("gvisor", "podman"):
        assert f"--platform={platforms(group).stdout.strip()} " in tox, group


def test_unknown_ci_group_is_refused_by_name(tmp_path: Path) -> None:
    out = platforms("kvm")
    assert out.returncode == 2 and "unknown group 'kvm'" in out.stderr
    out = platforms("uml", tmp_path / "none.yaml")
    assert out.returncode == 2 and "none.yaml" in out.stderr


def test_unknown_setup_argument_is_refused(world: World) -> None:
    out = subprocess.run(
        ["/bin/bash", str(world.repo / "scripts" / "setup"), "--dryrun"],
        env={"PATH": str(world.bin)},
        capture_output=True,
        text=True,
        timeout=30,
        check=False,
    )
    assert out.returncode == 2 and "unknown argument '--dryrun'" in out.stderr


def summary(tmp_path: Path, platforms: str, setup: str) -> str:
    out = subprocess.run(
        ["bash", str(ROOT / "scripts" / "ci-summary"), "uml/nsjail", platforms, setup, tmp_path],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert out.returncode == 0, out.stderr
    return out.stdout


def test_summary_of_a_group_still_to_come_says_so(tmp_path: Path) -> None:
    text = summary(tmp_path, "", "skipped")
    assert text.startswith("### uml/nsjail\n")
    assert "Not run: matrix.yaml at this commit has no `uml` platform yet" in text


def test_summary_of_a_runner_that_cannot_host_names_what_it_lacks(tmp_path: Path) -> None:
    (tmp_path / "setup.log").write_text(
        "[setup] tini: ok\n[setup] uml: named (install user-mode-linux (linux.uml) for uml-v2)\n"
    )
    text = summary(tmp_path, "uml-v2", "failure")
    assert "**Not run: this runner cannot host these cells** (scripts/setup: failure)" in text
    assert "- `uml`: install user-mode-linux (linux.uml) for uml-v2\n" in text


def test_summary_of_a_run_carries_the_audit_markdown(tmp_path: Path) -> None:
    (tmp_path / "audit.md").write_text("| property | none |\n|---|---|\n")
    text = summary(tmp_path, "uml-v2", "success")
    assert "Platforms: `uml-v2`. Runner: kernel " in text
    assert text.endswith("| property | none |\n|---|---|\n")
    (tmp_path / "audit.md").unlink()
    assert "wrote no audit report" in summary(tmp_path, "uml-v2", "success")


def test_dockerd_without_cli_is_named_never_overlaid_with_docker_io(world: World) -> None:
    world.debian()
    world.stub("dockerd", "exit 99")  # e.g. Docker CE's engine without its CLI
    d = world.decide()
    assert d["engine"] == ("named", "(install the docker CLI for the installed dockerd)")
    assert ("engine", "apt", "docker.io") not in world.lines
