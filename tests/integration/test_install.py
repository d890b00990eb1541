"""Installable as a package (R-OPS-1): the wheel alone, in a fresh venv, audits a host
from an empty directory; without the audit extra it says which extra to install."""

from __future__ import annotations

import shutil
import subprocess
import sys
import venv
from pathlib import Path

import pytest

pytestmark = [pytest.mark.integration, pytest.mark.slow, pytest.mark.xdist_group("install")]

ROOT = Path(__file__).resolve().parents[2]
NOT_SOURCES = (".git", ".venv", "build", "dist", "*.egg-info", "__pycache__", "reports", ".*_cache")


def sh(argv: list[str], cwd: Path, timeout: float = 900) -> subprocess.CompletedProcess[str]:
    env = {"PATH": f"{argv[0].rsplit('/', 1)[0]}:/usr/sbin:/usr/bin:/sbin:/bin", "LANG": "C.UTF-8"}
    return subprocess.run(
        argv, cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout, check=False
    )


@pytest.fixture(scope="module")
def installed(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path, Path]:
    """(venv bin dir, the wheel, an empty working dir outside the checkout)."""
    base = tmp_path_factory.mktemp("install")
    dist = base / "dist"
    # a copy of the working tree: a build writes build/ and *.egg-info beside its sources, and
    # other tests (the worker image) build from the checkout at the same time
    source = base / "source"
    shutil.copytree(ROOT, source, ignore=shutil.ignore_patterns(*NOT_SOURCES))
    built = subprocess.run(
        [sys.executable, "-m", "build", "--wheel", "--outdir", str(dist), str(source)],
        cwd=base,
        capture_output=True,
        text=True,
        timeout=600,
        check=False,
    )
    assert built.returncode == 0, built.stdout[-3000:] + built.stderr[-3000:]
    (wheel,) = dist.glob("orvanta_isolation-*.whl")
    venv.create(base / "venv", with_pip=True)
    empty = base / "elsewhere"
    empty.mkdir()
    return base / "venv" / "bin", wheel, empty


def test_the_wheel_carries_the_suite_and_asks_for_the_audit_extra(
    installed: tuple[Path, Path, Path],
) -> None:
    bin_dir, wheel, empty = installed
    pip = sh([str(bin_dir / "pip"), "install", "-q", str(wheel)], empty)
    assert pip.returncode == 0, pip.stderr[-3000:]
    version = sh([str(bin_dir / "orvanta"), "--version"], empty)
    assert version.stdout.strip() == "orvanta 0.1.0", version
    bare = sh([str(bin_dir / "orvanta"), "audit", "--platform", "host"], empty)
    assert bare.returncode == 2, bare
    lines = (bare.stdout + bare.stderr).strip().splitlines()
    assert lines == [lines[0]] and "pip install 'orvanta-isolation[audit]'" in lines[0], lines
    listing = sh([str(bin_dir / "python"), "-m", "zipfile", "-l", str(wheel)], empty).stdout
    for name in (
        "conformance/data/matrix.yaml",
        "conformance/data/fixtures/probes/proc_environ.py",
    ):
        assert name in listing, f"{name} is not in the wheel"


def test_from_an_empty_directory_the_audit_and_the_suite_run_on_the_host(
    installed: tuple[Path, Path, Path],
) -> None:
    bin_dir, wheel, empty = installed
    pip = sh([str(bin_dir / "pip"), "install", "-q", f"{wheel}[audit]"], empty)
    assert pip.returncode == 0, pip.stderr[-3000:]
    audit = sh([str(bin_dir / "orvanta"), "audit", "--platform", "host", "--out", "reports"], empty)
    assert audit.returncode == 0, audit.stdout[-4000:] + audit.stderr[-2000:]
    assert (empty / "reports" / "audit.html").is_file()
    suite = sh(
        [
            str(bin_dir / "pytest"),
            "--pyargs",
            "conformance",
            "--platform=host",
            "--backend=nsjail",
            "-n",
            "2",
            "-q",
            "-p",
            "no:cacheprovider",
        ],
        empty,
    )
    assert suite.returncode == 0, suite.stdout[-4000:] + suite.stderr[-2000:]
    assert " passed" in suite.stdout and not (empty / "matrix.yaml").exists()
