"""The nsjail configs shipped in runtime/nsjail/, as rendered for one job (R-NSJ-1, R-NSJ-2)."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from runtime import cgroups
from runtime.backends.nsjail import render_config
from runtime.settings import Settings, SettingsError

LANGS = ["python3", "bash"]
# Bind mounts the job may write to: its own directory, and /dev/null.
WRITABLE_BINDS = {"/job", "/dev/null"}

_MOUNT = re.compile(r"^mount\s*\{(.*)\}\s*$", re.M)
_FIELD = re.compile(r'(\w+):\s*("(?:[^"\\]|\\.)*"|\S+)')
_TOP = re.compile(r"^(\w+):\s*(.+?)\s*$", re.M)


def _value(raw: str) -> str:
    return raw[1:-1] if raw.startswith('"') else raw


def mounts(config: str) -> list[dict[str, str]]:
    return [{k: _value(v) for k, v in _FIELD.findall(body)} for body in _MOUNT.findall(config)]


def top_level(config: str) -> dict[str, str]:
    return {k: _value(v) for k, v in _TOP.findall(config)}


@pytest.fixture
def job_dir(tmp_path: Path) -> Path:
    path = tmp_path / "state" / "jobs" / "0123456789abcdef" / "job"
    path.mkdir(parents=True)
    return path


def render(lang: str, job_dir: Path, *, timeout: float = 30, **env: str) -> str:
    return render_config(lang, Settings.from_env(env), job_dir, timeout=timeout)


@pytest.mark.req("R-NSJ-1", "R-TBL-FS")
@pytest.mark.parametrize("lang", LANGS)
def test_job_dir_is_mounted_at_job_read_write(lang: str, job_dir: Path) -> None:
    config = render(lang, job_dir)
    job_mounts = [m for m in mounts(config) if m.get("dst") == "/job"]
    assert job_mounts == [{"src": str(job_dir), "dst": "/job", "is_bind": "true", "rw": "true"}]
    assert top_level(config)["cwd"] == "/job"


@pytest.mark.req("R-NSJ-1", "R-TBL-FS")
@pytest.mark.parametrize("lang", LANGS)
def test_nothing_above_the_job_dir_and_no_home_is_mounted(lang: str, job_dir: Path) -> None:
    state_dir = job_dir.parents[2]
    for m in mounts(render(lang, job_dir, ORVANTA_STATE_DIR=str(state_dir))):
        src = m.get("src")
        if src is None:
            continue
        assert src != "/", m
        assert src != "/root" and not src.startswith("/root/"), m
        assert src != "/home" and not src.startswith("/home/"), m
        # the state dir (queue, other jobs' dirs), /tmp, ... : any ancestor of the job dir
        assert Path(src) not in job_dir.parents, m
        assert not src.startswith(str(state_dir) + "/") or src == str(job_dir), m


@pytest.mark.req("R-NSJ-1", "R-TBL-FS")
@pytest.mark.parametrize("lang", LANGS)
def test_system_paths_are_read_only(lang: str, job_dir: Path) -> None:
    ms = mounts(render(lang, job_dir))
    binds = [m for m in ms if m.get("is_bind") == "true"]
    assert {m["dst"] for m in binds} >= {"/usr", "/lib", "/bin", "/job"}
    for m in binds:
        if m["dst"] not in WRITABLE_BINDS:
            assert m.get("rw", "false") == "false", m
    # a private /tmp and a /proc of the jail's own
    assert any(m.get("dst") == "/tmp" and m.get("fstype") == "tmpfs" for m in ms)
    assert any(m.get("dst") == "/proc" and m.get("fstype") == "proc" for m in ms)


@pytest.mark.req("R-NSJ-2", "R-CFG-5")
@pytest.mark.parametrize("lang", LANGS)
def test_user_namespace_by_default_maps_to_uid_1000(lang: str, job_dir: Path) -> None:
    config = render(lang, job_dir)
    assert top_level(config)["clone_newuser"] == "true"
    uidmap = re.search(r"^uidmap\s*\{(.*)\}\s*$", config, re.M)
    gidmap = re.search(r"^gidmap\s*\{(.*)\}\s*$", config, re.M)
    assert uidmap is not None and gidmap is not None
    assert dict(_FIELD.findall(uidmap.group(1)))["inside_id"] == '"1000"'
    assert dict(_FIELD.findall(gidmap.group(1)))["inside_id"] == '"1000"'


@pytest.mark.req("R-NSJ-2", "R-CFG-5")
@pytest.mark.parametrize("lang", LANGS)
def test_disable_nuser_means_no_user_namespace_and_no_id_maps(lang: str, job_dir: Path) -> None:
    config = render(lang, job_dir, DISABLE_NUSER="true")
    assert top_level(config)["clone_newuser"] == "false"
    assert "uidmap" not in config
    assert "gidmap" not in config


@pytest.mark.req("R-TBL-NET", "R-NSJ-1")
@pytest.mark.parametrize("lang", LANGS)
def test_network_isolated_by_default_and_shared_on_request(lang: str, job_dir: Path) -> None:
    assert top_level(render(lang, job_dir))["clone_newnet"] == "true"
    isolated = render(lang, job_dir, ORVANTA_NSJAIL_NETWORK="isolated")
    assert top_level(isolated)["clone_newnet"] == "true"
    shared = render(lang, job_dir, ORVANTA_NSJAIL_NETWORK="shared")
    assert top_level(shared)["clone_newnet"] == "false"


@pytest.mark.req("R-TBL-RES", "R-NSJ-1")
@pytest.mark.parametrize("lang", LANGS)
def test_limits_are_rendered(lang: str, job_dir: Path) -> None:
    config = render(
        lang,
        job_dir,
        timeout=12.5,
        ORVANTA_JOB_MEMORY_MB="300",
        ORVANTA_JOB_PIDS="17",
        ORVANTA_JOB_CPU_SECONDS="9",
        ORVANTA_JOB_FILE_SIZE_MB="5",
    )
    top = top_level(config)
    assert top["cgroup_mem_max"] == str(300 * 1024 * 1024)
    assert top["cgroup_pids_max"] == "17"
    assert top["rlimit_cpu"] == "9"
    assert top["rlimit_fsize"] == "5"
    assert int(top["time_limit"]) >= 12.5  # nsjail never kills before the worker's deadline
    assert int(top["rlimit_nofile"]) > 0
    if cgroups.is_v2():
        assert top["use_cgroupv2"] == "true"
    else:
        assert top["cgroup_mem_parent"] == cgroups.PARENT
        assert top["cgroup_pids_parent"] == cgroups.PARENT


@pytest.mark.req("R-NSJ-1")
@pytest.mark.parametrize("lang", LANGS)
@pytest.mark.parametrize(
    "env",
    [
        {},
        {"DISABLE_NUSER": "true", "ORVANTA_NSJAIL_NETWORK": "shared"},
        {"ORVANTA_PYTHON": "/opt/py311/bin/python3"},
    ],
)
def test_no_placeholder_is_left(lang: str, job_dir: Path, env: dict[str, str]) -> None:
    config = render_config(lang, Settings.from_env(env), job_dir, timeout=30)
    assert "${" not in config
    assert not re.search(r"\$[A-Za-z_]", config)
    assert top_level(config)["name"] == f"orvanta-{lang}"
    assert top_level(config)["mode"] == "ONCE"


@pytest.mark.req("R-NSJ-1")
def test_a_python_outside_usr_gets_a_read_only_mount(job_dir: Path) -> None:
    config = render("python3", job_dir, ORVANTA_PYTHON="/opt/py311/bin/python3")
    extra = [m for m in mounts(config) if m.get("src") == "/opt/py311"]
    assert extra == [{"src": "/opt/py311", "dst": "/opt/py311", "is_bind": "true"}]
    assert extra[0].get("rw", "false") == "false"


@pytest.mark.req("R-NSJ-1")
@pytest.mark.parametrize("python", ["/usr/bin/python3", "/usr/local/bin/python3"])
def test_a_python_under_usr_needs_no_extra_mount(job_dir: Path, python: str) -> None:
    default = {m.get("src") for m in mounts(render("python3", job_dir))}
    other = {m.get("src") for m in mounts(render("python3", job_dir, ORVANTA_PYTHON=python))}
    assert other == default


@pytest.mark.req("R-NSJ-1", "R-TBL-FS")
@pytest.mark.parametrize("python", ["/opt/python3", "/python3"])
def test_interpreter_mount_never_exposes_the_root_filesystem(job_dir: Path, python: str) -> None:
    """A prefix as shallow as / or /opt would hand the job the host's files: refused."""
    with pytest.raises(ValueError, match="mount whole"):
        render("python3", job_dir, ORVANTA_PYTHON=python)


@pytest.mark.req("R-NSJ-1", "R-CFG-7")
def test_relative_interpreter_is_refused(job_dir: Path) -> None:
    with pytest.raises(SettingsError, match="ORVANTA_PYTHON='python3' is not valid"):
        render("python3", job_dir, ORVANTA_PYTHON="python3")


@pytest.mark.req("R-JOB-1")
@pytest.mark.parametrize("lang", LANGS)
def test_the_jobs_variables_reach_only_the_jail_escaped(lang: str, job_dir: Path) -> None:
    """nsjail runs with the worker's environment (keep_env: false); each job variable is an
    `envar` of the jailed process, quoted so that no value can add a config line."""
    env = {"PLAIN": "1", "TRICKY": 'a"b\\c\nmount { src: "/" dst: "/host" rw: true }'}
    config = render_config(lang, Settings(), job_dir, 30, env=env)
    assert top_level(config)["keep_env"] == "false"
    envars = [line for line in config.splitlines() if line.startswith("envar:")]
    assert envars == [
        'envar: "PLAIN=1"',
        'envar: "TRICKY=a\\"b\\\\c\\012mount { src: \\"/\\" dst: \\"/host\\" rw: true }"',
    ]
    assert not any(m.get("dst") == "/host" for m in mounts(config))


@pytest.mark.req("R-HOST-1", "R-HOST-3")
@pytest.mark.parametrize(("job_uid", "outside"), [("70000", "70000"), ("0", "")])
def test_the_jails_uid_is_the_job_uid_never_root(job_dir: Path, job_uid: str, outside: str) -> None:
    """With a root worker the jail's uid 1000 maps to ORVANTA_JOB_UID; 0 keeps the literal
    mapping to nsjail's own uid (the host's root), for the page-literal comparison cell."""
    import os

    if os.geteuid() != 0:
        pytest.skip("the mapping to ORVANTA_JOB_UID applies to a root worker only")
    config = render("bash", job_dir, ORVANTA_JOB_UID=job_uid)
    for kind in ("uidmap", "gidmap"):
        line = next(line for line in config.splitlines() if line.startswith(kind))
        assert f'outside_id: "{outside}"' in line, line


@pytest.mark.req("R-VOL-2")
def test_volumes_the_jail_binds_itself_are_nosuid_nodev(job_dir: Path) -> None:
    config = render_config("bash", Settings(), job_dir, 30, volumes=(("/proc/1/fd/7", "data"),))
    (volume,) = [m for m in mounts(config) if m.get("dst") == "/job/data"]
    assert volume == {
        "src": "/proc/1/fd/7",
        "dst": "/job/data",
        "is_bind": "true",
        "rw": "true",
        "nosuid": "true",
        "nodev": "true",
    }
