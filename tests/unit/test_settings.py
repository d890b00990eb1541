"""Settings.from_env: defaults, every variable, and refusals that name variable, value, accepted."""

from __future__ import annotations

from pathlib import Path

import pytest

from runtime.settings import JobLimits, Settings, SettingsError

# The defaults as SPEC.md states them (not the module's constants, so a changed constant fails).
SPEC_DEFAULT_FLAGS = ("--user", "--map-root-user", "--pid", "--fork", "--mount-proc")


@pytest.mark.req("R-CFG-1", "R-CFG-2", "R-CFG-3", "R-CFG-4", "R-CFG-5", "R-CFG-6")
def test_defaults_from_an_empty_environment() -> None:
    s = Settings.from_env({})
    assert s.enable_unshare_pid is False  # R-CFG-1
    assert s.unshare_flags == SPEC_DEFAULT_FLAGS  # R-CFG-2
    assert s.tini_path == "tini"  # R-CFG-3
    assert s.disable_nsjail is True  # R-CFG-4
    assert s.disable_nuser is False  # R-CFG-5
    assert s.job_isolation is None  # R-CFG-6
    assert s.force_nsjail is False
    assert s.jobs_tmpfs is True  # a serving root worker's job dirs in memory


@pytest.mark.req("R-CFG-1", "R-CFG-4", "R-CFG-5")
def test_empty_values_mean_the_default() -> None:
    s = Settings.from_env(
        {
            "ENABLE_UNSHARE_PID": "",
            "DISABLE_NSJAIL": "",
            "DISABLE_NUSER": "",
            "UNSHARE_TINI_PATH": "",
            "JOB_ISOLATION": "",
        }
    )
    assert (s.enable_unshare_pid, s.disable_nsjail, s.disable_nuser) == (False, True, False)
    assert s.tini_path == "tini"
    assert s.job_isolation is None


@pytest.mark.req("R-CFG-1", "R-CFG-2", "R-CFG-3", "R-CFG-4", "R-CFG-5", "R-CFG-6")
def test_every_variable_is_parsed() -> None:
    s = Settings.from_env(
        {
            "ENABLE_UNSHARE_PID": "true",
            "UNSHARE_ISOLATION_FLAGS": "--user --map-root-user --pid --fork",
            "UNSHARE_TINI_PATH": "/opt/tini/bin/tini",
            "DISABLE_NSJAIL": "false",
            "DISABLE_NUSER": "true",
            "NSJAIL_PATH": "/opt/nsjail/nsjail",
            "JOB_ISOLATION": "nsjail_sandboxing",
            "ORVANTA_NSJAIL_NETWORK": "shared",
            "ORVANTA_PYTHON": "/opt/py/bin/python3",
            "ORVANTA_STATE_DIR": "/srv/orvanta",
            "ORVANTA_JOB_TIMEOUT": "42",
            "ORVANTA_OUTPUT_LIMIT": "4096",
            "ORVANTA_LEASE_SECONDS": "7",
            "ORVANTA_JOB_RETENTION_SECONDS": "3600",
            "ORVANTA_JOB_MEMORY_MB": "300",
            "ORVANTA_JOB_PIDS": "33",
            "ORVANTA_JOB_CPU_SECONDS": "9",
            "ORVANTA_JOB_FILE_SIZE_MB": "5",
        }
    )
    assert s.enable_unshare_pid is True
    assert s.unshare_flags == ("--user", "--map-root-user", "--pid", "--fork")
    assert s.tini_path == "/opt/tini/bin/tini"
    assert s.disable_nsjail is False
    assert s.disable_nuser is True
    assert s.nsjail_path == "/opt/nsjail/nsjail"
    assert s.job_isolation == "nsjail_sandboxing"
    assert s.force_nsjail is True
    assert s.nsjail_network == "shared"
    assert s.python_path == "/opt/py/bin/python3"
    assert s.state_dir == Path("/srv/orvanta")
    assert s.job_timeout == 42.0
    assert s.output_limit == 4096
    assert s.lease_seconds == 7.0
    assert s.job_retention == 3600.0
    assert s.limits.memory_mb == 300
    assert s.limits.pids == 33
    assert s.limits.cpu_seconds == 9
    assert s.limits.file_size_mb == 5


@pytest.mark.req("R-CFG-6")
def test_job_isolation_none_is_accepted_and_does_not_force_nsjail() -> None:
    s = Settings.from_env({"JOB_ISOLATION": "none"})
    assert s.job_isolation == "none"
    assert s.force_nsjail is False


@pytest.mark.req("R-CFG-1", "R-CFG-4", "R-CFG-5")
@pytest.mark.parametrize(
    ("raw", "expected"),
    [
        ("true", True),
        ("TRUE", True),
        (" True ", True),
        ("1", True),
        ("yes", True),
        ("YES", True),
        ("false", False),
        ("False", False),
        ("0", False),
        ("no", False),
        (" NO ", False),
    ],
)
@pytest.mark.parametrize(
    ("variable", "attribute"),
    [
        ("ENABLE_UNSHARE_PID", "enable_unshare_pid"),
        ("DISABLE_NSJAIL", "disable_nsjail"),
        ("DISABLE_NUSER", "disable_nuser"),
        ("ORVANTA_JOBS_TMPFS", "jobs_tmpfs"),
    ],
)
def test_bool_forms(variable: str, attribute: str, raw: str, expected: bool) -> None:
    assert getattr(Settings.from_env({variable: raw}), attribute) is expected


@pytest.mark.req("R-CFG-7", "R-CFG-1")
def test_enable_unshare_pid_maybe_is_refused_naming_variable_value_and_accepted() -> None:
    with pytest.raises(SettingsError) as info:
        Settings.from_env({"ENABLE_UNSHARE_PID": "maybe"})
    message = str(info.value)
    assert info.value.variable == "ENABLE_UNSHARE_PID"
    assert info.value.value == "maybe"
    assert "ENABLE_UNSHARE_PID" in message
    assert "maybe" in message
    assert "true" in message and "false" in message


@pytest.mark.req("R-CFG-7", "R-CFG-4", "R-CFG-5")
@pytest.mark.parametrize("variable", ["DISABLE_NSJAIL", "DISABLE_NUSER", "ORVANTA_JOBS_TMPFS"])
def test_other_bad_bools_are_refused(variable: str) -> None:
    with pytest.raises(SettingsError) as info:
        Settings.from_env({variable: "perhaps"})
    assert info.value.variable == variable
    assert "perhaps" in str(info.value)
    assert "true or false" in str(info.value)


@pytest.mark.req("R-CFG-7", "R-PID-1", "R-CFG-2")
@pytest.mark.parametrize("enable", ["true", "1", "yes"])
def test_pid_without_fork_is_refused_when_unshare_is_enabled(enable: str) -> None:
    with pytest.raises(SettingsError) as info:
        Settings.from_env(
            {"ENABLE_UNSHARE_PID": enable, "UNSHARE_ISOLATION_FLAGS": "--user --pid --mount-proc"}
        )
    message = str(info.value)
    assert info.value.variable == "UNSHARE_ISOLATION_FLAGS"
    assert "UNSHARE_ISOLATION_FLAGS" in message
    assert "--user --pid --mount-proc" in message
    assert "--fork" in message


@pytest.mark.req("R-CFG-7", "R-PID-3")
@pytest.mark.parametrize("enable", [None, "", "false", "0", "no"])
def test_pid_without_fork_is_accepted_when_unshare_is_not_enabled(enable: str | None) -> None:
    env = {"UNSHARE_ISOLATION_FLAGS": "--user --pid"}
    if enable is not None:
        env["ENABLE_UNSHARE_PID"] = enable
    s = Settings.from_env(env)
    assert s.enable_unshare_pid is False
    assert s.unshare_flags == ("--user", "--pid")


@pytest.mark.req("R-CFG-7", "R-CFG-2")
@pytest.mark.parametrize("flags", ["", "   "])
def test_empty_flags_are_refused_when_unshare_is_enabled(flags: str) -> None:
    with pytest.raises(SettingsError) as info:
        Settings.from_env({"ENABLE_UNSHARE_PID": "true", "UNSHARE_ISOLATION_FLAGS": flags})
    assert info.value.variable == "UNSHARE_ISOLATION_FLAGS"


@pytest.mark.req("R-CFG-7", "R-CFG-6")
@pytest.mark.parametrize("value", ["nsjail", "sandbox", "NSJAIL_SANDBOXING", "unshare"])
def test_unknown_job_isolation_is_refused(value: str) -> None:
    with pytest.raises(SettingsError) as info:
        Settings.from_env({"JOB_ISOLATION": value})
    message = str(info.value)
    assert info.value.variable == "JOB_ISOLATION"
    assert info.value.value == value
    assert repr(value) in message
    assert "nsjail_sandboxing" in message
    assert "none" in message


@pytest.mark.req("R-CFG-7")
def test_unknown_nsjail_network_is_refused() -> None:
    with pytest.raises(SettingsError) as info:
        Settings.from_env({"ORVANTA_NSJAIL_NETWORK": "open"})
    assert info.value.variable == "ORVANTA_NSJAIL_NETWORK"
    assert "isolated" in str(info.value) and "shared" in str(info.value)


@pytest.mark.req("R-CFG-2")
@pytest.mark.parametrize(
    ("raw", "expected"),
    [
        ("--user --pid --fork", ("--user", "--pid", "--fork")),
        ("  --user\t--pid \n --fork  ", ("--user", "--pid", "--fork")),
        ("--user  --map-root-user   --net", ("--user", "--map-root-user", "--net")),
    ],
)
def test_flags_are_split_on_whitespace(raw: str, expected: tuple[str, ...]) -> None:
    assert Settings.from_env({"UNSHARE_ISOLATION_FLAGS": raw}).unshare_flags == expected
    enabled = Settings.from_env({"ENABLE_UNSHARE_PID": "true", "UNSHARE_ISOLATION_FLAGS": raw})
    assert enabled.unshare_flags == expected


@pytest.mark.req("R-CFG-7")
@pytest.mark.parametrize(
    "variable",
    [
        "ORVANTA_JOB_TIMEOUT",
        "ORVANTA_OUTPUT_LIMIT",
        "ORVANTA_LEASE_SECONDS",
        "ORVANTA_JOB_RETENTION_SECONDS",
        "ORVANTA_JOB_MEMORY_MB",
        "ORVANTA_JOB_PIDS",
        "ORVANTA_JOB_CPU_SECONDS",
        "ORVANTA_JOB_FILE_SIZE_MB",
    ],
)
@pytest.mark.parametrize("raw", ["abc", "0", "-5", "1.5", "12MB"])
def test_bad_integers_are_refused(variable: str, raw: str) -> None:
    with pytest.raises(SettingsError) as info:
        Settings.from_env({variable: raw})
    assert info.value.variable == variable
    assert info.value.value == raw
    assert variable in str(info.value)
    assert "positive integer" in str(info.value)


@pytest.mark.req("R-TBL-RES")
def test_limit_defaults() -> None:
    assert Settings.from_env({}).limits == JobLimits()
    assert JobLimits().memory_mb > 0 and JobLimits().pids > 0
