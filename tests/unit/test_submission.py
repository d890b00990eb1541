"""What a job may carry into the queue (runtime.submission): one rule set for API, CLI and queue."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from runtime.queue import JobQueue
from runtime.submission import (
    MAX_ENV_NAME_CHARS,
    MAX_ENV_VALUE_CHARS,
    MAX_ENV_VARS,
    MAX_SCRIPT_CHARS,
    REFUSED_NAMES,
    REFUSED_PREFIXES,
    SubmissionError,
    refused_reason,
    validate_job,
)

ROOT = Path(__file__).resolve().parents[2]

# sysdeps/generic/unsecvars.h (UNSECURE_ENVVARS), glibc 2.35 and later
GLIBC_UNSECURE_ENVVARS = [
    "GCONV_PATH",
    "GETCONF_DIR",
    "GLIBC_TUNABLES",
    "HOSTALIASES",
    "LD_AUDIT",
    "LD_DEBUG",
    "LD_DEBUG_OUTPUT",
    "LD_DYNAMIC_WEAK",
    "LD_HWCAP_MASK",
    "LD_LIBRARY_PATH",
    "LD_ORIGIN_PATH",
    "LD_PRELOAD",
    "LD_PROFILE",
    "LD_SHOW_AUXV",
    "LD_USE_LOAD_BIAS",
    "LOCALDOMAIN",
    "LOCPATH",
    "MALLOC_TRACE",
    "NIS_PATH",
    "NLSPATH",
    "RESOLV_HOST_CONF",
    "RES_OPTIONS",
    "TMPDIR",
    "TZDIR",
]

REFUSED_BY_PREFIX = [
    "LD_BIND_NOW",
    "LD_PREFER_MAP_32BIT_EXEC",
    "LD_ANYTHING_NEW",
    "MALLOC_CHECK_",
    "MALLOC_ARENA_MAX",
    "MALLOC_PERTURB_",
]

ACCEPTED_ENV = {
    "MY_VAR": "1",
    "_private": "x",
    "PATH": "/usr/bin:/bin",
    "PYTHONPATH": "/job/lib",  # the job's own interpreter, inside its isolation
    "BASH_ENV": "/job/env.sh",
    "TZ": "Europe/Berlin",
    "LANG": "C.UTF-8",
    "LDAP_URI": "ldap://x",  # LD without the underscore
    "EMPTY": "",
    "UNICODE": "gr\u00fc\u00dfe \U0001f600",
    "X" * MAX_ENV_NAME_CHARS: "long name, at the limit",
}


def refusal(env: dict[str, str], script: str = "echo hi\n") -> str:
    with pytest.raises(SubmissionError) as info:
        validate_job("bash", script, env)
    return str(info.value)


def test_the_refused_list_holds_all_of_glibcs_unsecure_variables() -> None:
    assert set(GLIBC_UNSECURE_ENVVARS) | {"PCPROFILE_OUTPUT"} <= set(REFUSED_NAMES)
    assert set(REFUSED_PREFIXES) == {"LD_", "MALLOC_"}
    assert all(REFUSED_NAMES.values()) and all(REFUSED_PREFIXES.values())  # each says why


@pytest.mark.parametrize("name", [*GLIBC_UNSECURE_ENVVARS, "PCPROFILE_OUTPUT"])
def test_every_listed_variable_is_refused_with_why_and_what_to_do(name: str) -> None:
    message = refusal({"MY_VAR": "1", name: "/tmp/x.so"})
    assert message.startswith(f"job variable {name!r} is refused: ")
    assert "(runtime.submission.REFUSED_NAMES)" in message
    assert message.endswith("set it inside your script instead, where it affects only your job")
    assert "/tmp/x.so" not in message  # the name, never the value


def test_ld_preload_says_it_is_the_loader() -> None:
    assert refusal({"LD_PRELOAD": "/x.so"}) == (
        "job variable 'LD_PRELOAD' is refused: it changes how the dynamic loader loads code "
        "into every program started with it (runtime.submission.REFUSED_NAMES); set it inside "
        "your script instead, where it affects only your job"
    )


@pytest.mark.parametrize("name", REFUSED_BY_PREFIX)
def test_every_ld_and_malloc_name_is_refused(name: str) -> None:
    prefix = name.split("_", 1)[0] + "_"
    assert f"REFUSED_PREFIXES: {prefix}*" in refusal({name: "1"})


@pytest.mark.parametrize("name", ["ld_preload", "Ld_Library_Path", "tmpdir", "malloc_check_"])
def test_names_are_compared_ignoring_case(name: str) -> None:
    assert refused_reason(name) is not None
    assert "is refused" in refusal({name: "x"})


@pytest.mark.parametrize("value", ["/etc/shadow", ":/etc/shadow", "../../etc/passwd", "a/../b"])
def test_a_tz_naming_a_file_is_refused(value: str) -> None:
    message = refusal({"TZ": value})
    assert message.startswith("job variable 'TZ' is refused") and "Europe/Berlin" in message


def test_ordinary_variables_are_accepted() -> None:
    validate_job("python3", "print(1)\n", ACCEPTED_ENV)
    validate_job(
        "bash", "echo\n", {f"V{i}": "x" * MAX_ENV_VALUE_CHARS for i in range(MAX_ENV_VARS)}
    )
    for name in ACCEPTED_ENV:
        assert refused_reason(name) is None, name


@pytest.mark.parametrize(
    "name",
    [
        "1BAD",
        "A-B",
        "A=B",
        "",
        "A B",
        "BASH_FUNC_f%%",  # an exported bash function
        "X" * (MAX_ENV_NAME_CHARS + 1),
        "A\x00B",
        "A\ud800",
        "\u00c4RGER",
        "TRAILING_NEWLINE\n",  # a regex `$` matches before it: the whole name must match
    ],
)
def test_names_the_environment_or_the_database_cannot_hold_are_refused(name: str) -> None:
    message = refusal({name: "v"})
    assert message.startswith("job variable name ") and "is not valid" in message
    assert "letters, digits and '_'" in message
    assert len(message) < 400  # a huge name is quoted only in part


def test_a_huge_name_is_not_echoed() -> None:
    message = refusal({"N" * 1_000_000: "v"})
    assert len(message) < 400 and "(1000000 characters)" in message


@pytest.mark.parametrize(
    ("value", "says"),
    [
        ("x" * (MAX_ENV_VALUE_CHARS + 1), f"over the limit of {MAX_ENV_VALUE_CHARS}"),
        ("a\x00b", "NUL"),
        ("a\udc80b", "lone surrogate"),
    ],
)
def test_values_over_the_limit_or_unstorable_are_refused_without_echo(
    value: str, says: str
) -> None:
    message = refusal({"MY_VAR": value})
    assert message.startswith("job variable 'MY_VAR': its value ") and says in message
    assert value not in message


def test_more_than_the_maximum_number_of_variables_is_refused() -> None:
    env = {f"V{i}": "1" for i in range(MAX_ENV_VARS + 1)}
    assert refusal(env).startswith(f"{MAX_ENV_VARS + 1} job variables, over the limit of 128")


@pytest.mark.parametrize(
    ("script", "says"),
    [
        ("", "the script is empty"),
        ("x" * (MAX_SCRIPT_CHARS + 1), f"over the limit of {MAX_SCRIPT_CHARS}"),
        ("echo \x00", "NUL"),
        ("echo \ud800", "lone surrogate"),
    ],
)
def test_scripts_no_database_can_store_are_refused(script: str, says: str) -> None:
    message = refusal({}, script)
    assert says in message and len(message) < 400


@pytest.mark.req("R-ANN-1", "R-ANN-2")
def test_a_header_near_miss_is_refused_at_submission() -> None:
    message = refusal({}, "#!/bin/bash\n# sandbox: yes\necho hi\n")
    assert message.startswith("script line 2: '# sandbox: yes' looks like a header annotation")
    assert "'# volume: NAME [TARGET]'" in message


def test_an_unknown_language_is_refused() -> None:
    with pytest.raises(SubmissionError, match="unknown job language 'ruby'; accepted: bash"):
        validate_job("ruby", "puts 1", {})


def test_the_queue_refuses_before_storing_anything(tmp_path: Path) -> None:
    """Every path into the queue goes through JobQueue.submit, and so through the rules."""
    queue = JobQueue.in_state_dir(tmp_path)
    try:
        for language, script, env in (
            ("bash", "echo\n", {"LD_PRELOAD": "/x.so"}),
            ("bash", "# Sandbox please\necho\n", {}),
            ("bash", "echo\n", {"V": "\x00"}),
            ("cobol", "x", {}),
        ):
            with pytest.raises(SubmissionError):
                queue.submit(language, script, env)
        assert queue.jobs() == []
        assert queue.submit("bash", "# SANDBOX\necho\n", {"MY_VAR": "1"})
    finally:
        queue.close()


def cli(tmp_path: Path, *args: str) -> subprocess.CompletedProcess[str]:
    env = {
        "PATH": os.environ.get("PATH", "/usr/bin:/bin"),
        "LANG": "C.UTF-8",
        "ORVANTA_STATE_DIR": str(tmp_path / "state"),
    }
    return subprocess.run(
        [sys.executable, "-m", "runtime.cli", *args],
        env=env,
        cwd=ROOT,
        stdin=subprocess.DEVNULL,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )


@pytest.mark.parametrize("command", ["run", "submit"])
@pytest.mark.parametrize(
    ("script", "args", "says"),
    [
        ("echo hi\n", ["--env", "LD_PRELOAD=/x.so"], "job variable 'LD_PRELOAD' is refused"),
        ("echo hi\n", ["--env", "MALLOC_CHECK_=3"], "job variable 'MALLOC_CHECK_' is refused"),
        ("echo hi\n", ["--env", "1BAD=x"], "job variable name '1BAD' is not valid"),
        ("echo hi\n", ["--env", "NOEQUALS"], "--env 'NOEQUALS' is not KEY=VALUE"),
        ("# sandbx\necho hi\n", [], "script line 1: '# sandbx' looks like a header annotation"),
    ],
)
def test_run_and_submit_refuse_with_exit_2_and_one_line(
    tmp_path: Path, command: str, script: str, args: list[str], says: str
) -> None:
    path = tmp_path / "job.sh"
    path.write_text(script)
    out = cli(tmp_path, command, str(path), *args)
    assert out.returncode == 2, out.stderr
    assert out.stderr.startswith(f"orvanta: {says}"), out.stderr
    assert "Traceback" not in out.stderr and out.stdout == ""
    assert not (tmp_path / "state" / "queue.sqlite3").exists()  # nothing was queued


def test_a_script_that_is_not_utf8_is_an_input_error(tmp_path: Path) -> None:
    path = tmp_path / "job.sh"
    path.write_bytes(b"echo \xff\xfe\n")
    out = cli(tmp_path, "run", str(path))
    assert out.returncode == 2 and "not UTF-8 text" in out.stderr
    assert "Traceback" not in out.stderr
