"""The PID-namespace command line: `unshare <flags> -- [setpriv <drop all> --] dash -s --
[tini -s --] <job>`.

R-PID-1, R-PID-2; the flags as configured when ORVANTA_JOB_UID=0 (the page's literal
recipe), hardened so that the job's root is an unprivileged host uid otherwise
(`hardened_flags`); the job's variables only through a sealed memfd of the worker's, read
inside the namespace (dash's stdin, else Perl's fd), never on a command line (which every host user
can read).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from runtime.backends import PreparedJob, make_backend
from runtime.backends import unshare as unshare_module
from runtime.backends.unshare import (
    APPLY_ENV,
    DASH,
    DROP_CAPS,
    PERL,
    SETPRIV,
    PidNamespace,
    UnshareFlagError,
    drop_caps,
    env_script,
    hardened_flags,
    makes_user_namespace,
)
from runtime.capabilities import HostCapabilities, Probe
from runtime.languages import language
from runtime.settings import Settings

JOB_DIR = Path("/var/lib/orvanta/jobs/0123456789abcdef/job")


def host(tini: bool = True, unshare: bool = True) -> HostCapabilities:
    return HostCapabilities(
        {
            "nsjail": Probe(None, "nsjail binary not found"),
            "unshare": Probe("/usr/bin/unshare", "ok")
            if unshare
            else Probe(None, "unshare failed"),
        },
        Probe("/usr/bin/tini", "ok") if tini else Probe(None, "tini not found"),
    )


@pytest.fixture(autouse=True)
def dash_installed(monkeypatch: pytest.MonkeyPatch) -> None:
    """The argv must not depend on the machine: dash is taken as installed unless a test
    says otherwise."""
    monkeypatch.setattr(unshare_module, "_has_dash", lambda: True)


def prepared(lang: str) -> PreparedJob:
    return PreparedJob("0123456789abcdef", language(lang), JOB_DIR, 5.0)


def settings(**env: str) -> Settings:
    """The page's literal recipe (job uid 0), so the argv does not depend on who runs the test."""
    return Settings.from_env({"ENABLE_UNSHARE_PID": "true", "ORVANTA_JOB_UID": "0", **env})


JOB_ENV = {"HOME": str(JOB_DIR), "MINE": "a b"}
NO_CAPS = [SETPRIV, *DROP_CAPS, "--"]  # the job's root in its user namespace: no capability
INNER_ENV = [*NO_CAPS, DASH, "-s", "--"]


def argv(backend: PidNamespace, lang: str) -> list[str]:
    return backend.launch(prepared(lang), JOB_ENV).argv


@pytest.mark.req("R-PID-1", "R-PID-2", "R-CFG-2")
def test_python_job_with_tini() -> None:
    assert argv(PidNamespace(settings(), host()), "python3") == [
        "/usr/bin/unshare",
        *("--user", "--map-root-user", "--pid", "--fork", "--mount-proc"),
        "--",
        *INNER_ENV,
        *("/usr/bin/tini", "-s", "--"),
        *("/usr/bin/python3", "-u", f"{JOB_DIR}/main.py"),
    ]


@pytest.mark.req("R-PID-1", "R-PID-2")
def test_python_job_without_tini() -> None:
    line = argv(PidNamespace(settings(), host(tini=False)), "python3")
    assert line == [
        "/usr/bin/unshare",
        *("--user", "--map-root-user", "--pid", "--fork", "--mount-proc"),
        "--",
        *INNER_ENV,
        *("/usr/bin/python3", "-u", f"{JOB_DIR}/main.py"),
    ]
    assert not any("tini" in part for part in line)


@pytest.mark.req("R-PID-1", "R-CFG-2", "R-CFG-3")
def test_bash_job_with_custom_flags_and_python() -> None:
    s = settings(UNSHARE_ISOLATION_FLAGS="--user --map-root-user --pid --fork --net")
    assert argv(PidNamespace(s, host()), "bash") == [
        "/usr/bin/unshare",
        *("--user", "--map-root-user", "--pid", "--fork", "--net"),
        "--",
        *INNER_ENV,
        *("/usr/bin/tini", "-s", "--"),
        *("/bin/bash", f"{JOB_DIR}/main.sh"),
    ]


@pytest.mark.req("R-JOB-1")
def test_the_launchers_get_the_workers_environment_not_the_jobs() -> None:
    """unshare runs as root outside the sandbox: none of the job's variables in its
    environment, nor on any command line; they are data the worker gives it on its stdin
    (a memfd, runtime.executor), which dash reads inside the namespace."""
    job_env = {"LD_PRELOAD": "/x.so", "TOKEN": "s3cret\nline two"}
    launch = PidNamespace(settings(), host()).launch(prepared("bash"), job_env)
    assert set(launch.env) == {"PATH", "LANG"}
    assert not [arg for arg in launch.argv if "s3cret" in arg or "/x.so" in arg]
    assert launch.inputs == ()
    assert launch.stdin is not None
    assert launch.stdin.decode() == (
        "unset LANG OLDPWD PATH PWD\n"
        "export LD_PRELOAD='/x.so'\n"
        "export TOKEN='s3cret\nline two'\n"
        'exec "$@" </dev/null\n'
    )


@pytest.mark.req("R-JOB-1")
@pytest.mark.parametrize(
    ("why", "job_env"),
    [
        ("no dash", {"A": "1"}),
        ("a name dash refuses as a plain variable", {"OPTIND": "not a number"}),
    ],
)
def test_perl_reads_the_variables_where_dash_cannot(
    why: str, job_env: dict[str, str], monkeypatch: pytest.MonkeyPatch
) -> None:
    if why == "no dash":
        monkeypatch.setattr(unshare_module, "_has_dash", lambda: False)
    launch = PidNamespace(settings(), host()).launch(prepared("bash"), job_env)
    after = launch.argv.index("--") + 1 + len(NO_CAPS)
    assert launch.argv[after - len(NO_CAPS) : after] == NO_CAPS, why
    assert launch.argv[after : after + 4] == [PERL, "-e", APPLY_ENV, "{fd0}"], why
    assert launch.stdin is None
    (records,) = launch.inputs
    assert records == b"".join(f"{k}={v}\0".encode() for k, v in job_env.items())


HOSTILE_VALUES = {
    "QUOTE": "it's 'quoted' ''",
    "SUBST": "$(touch /tmp/pwned) `id` ${HOME} $$",
    "LINES": "one\ntwo\n\nexec /bin/false\n",
    "BACKSLASH": "\\ \\' \\n",
    "SPACES": "  lead and trail  ",
    "EMPTY": "",
    "UNICODE": "\u00e9\u2603 \U0001f600",
    "IFS": " :",
    "PATH": "/job/bin:/usr/bin",
    "PWD": "/not/the/real/one",
}


SHOW_ENVIRONMENT = "import json, os; print(json.dumps(dict(os.environ)))"


@pytest.mark.req("R-JOB-1")
@pytest.mark.skipif(not os.access(DASH, os.X_OK), reason="dash is not installed on this machine")
def test_dash_gives_the_job_exactly_its_variables_whatever_their_values(tmp_path: Path) -> None:
    """The script run by the real dash, from the launcher's environment: the job's
    environment is exactly its variables, byte for byte, and no value ran as code."""
    script = tmp_path / "vars"
    script.write_text(env_script(HOSTILE_VALUES, {"PATH": "/usr/bin:/bin", "LANG": "C.UTF-8"}))
    with open(script, "rb") as stdin:
        shown = subprocess.run(
            [DASH, "-s", "--", sys.executable, "-c", SHOW_ENVIRONMENT],
            stdin=stdin,
            env={"PATH": "/usr/bin:/bin", "LANG": "C.UTF-8"},
            cwd=tmp_path,
            capture_output=True,
            text=True,
            check=True,
            timeout=30,
        )
    seen = json.loads(shown.stdout)
    seen.pop("LC_CTYPE", None)  # Python's own C-locale coercion, not dash's
    assert seen == HOSTILE_VALUES
    assert not Path("/tmp/pwned").exists()


def test_a_name_that_is_no_variable_name_is_refused_not_quoted() -> None:
    with pytest.raises(ValueError, match="not a variable name"):
        env_script({"A; rm -rf /": "x"}, {"PATH": "/bin"})


@pytest.mark.req("R-TBL-PROC", "R-HOST-2")
@pytest.mark.parametrize(
    ("flags", "userns"),
    [
        ("--user --map-root-user --pid --fork --mount-proc", True),
        ("-Urpf --mount-proc", True),
        ("--map-root-user --pid --fork", True),  # a mapping implies --user
        ("--map-users=70000,0,1 --map-groups=70001,0,1 --setuid=0 --pid --fork", True),
        ("--pid --fork --mount-proc --setuid=70000 --setgid=70001", False),
        ("--pid --fork", False),
    ],
)
def test_capabilities_are_dropped_wherever_the_job_is_root_of_a_user_namespace(
    flags: str, userns: bool
) -> None:
    """Root of a user namespace that owns the job's mount namespace could unmount the /proc
    --mount-proc made and see the host's beneath it (probe proc_uncover): setpriv drops every
    capability first. Without a user namespace the job is a plain host uid with none."""
    assert makes_user_namespace(flags.split()) is userns
    assert drop_caps(flags.split()) == (NO_CAPS if userns else [])


HARDENED = ["--user", "--map-users=70000,0,1", "--map-groups=70001,0,1", "--setuid=0", "--setgid=0"]


@pytest.mark.req("R-HOST-1", "R-HOST-2")
@pytest.mark.parametrize(
    ("flags", "expected"),
    [
        ("--user --map-root-user --pid --fork --mount-proc", ["--pid", "--fork", "--mount-proc"]),
        ("-Urpf --mount-proc", ["--pid", "--fork", "--mount-proc"]),
        ("--user --map-user 5 --map-group=5 --pid --fork", ["--pid", "--fork"]),
        # what getopt_long also accepts: unambiguous prefixes, values glued to a short option
        ("--user --map-root --pid --fork", ["--pid", "--fork"]),
        ("-U --map-r -pf", ["--pid", "--fork"]),
        ("--user --map-current --mount-pr", ["--mount-proc"]),
        ("-U -rw/ -pf", ["--wd=/", "--pid", "--fork"]),
        ("-rS0 -G 0 -pf", ["--pid", "--fork"]),
    ],
)
def test_hardened_flags_map_the_jobs_root_to_the_job_uid(flags: str, expected: list[str]) -> None:
    """Every mapping the flags ask for, in any spelling unshare accepts, becomes root ->
    ORVANTA_JOB_UID: never the host's root."""
    assert hardened_flags(tuple(flags.split()), 70000, 70001, colon_maps=False) == [
        *HARDENED,
        *expected,
    ]


@pytest.mark.req("R-HOST-1")
def test_without_a_user_namespace_the_job_runs_as_the_job_uid() -> None:
    flags = hardened_flags(("--pid", "--fork", "--mount-proc"), 70000, 70001, colon_maps=False)
    assert flags == ["--pid", "--fork", "--mount-proc", "--setuid=70000", "--setgid=70001"]


@pytest.mark.req("R-HOST-1", "R-PID-3")
@pytest.mark.parametrize("flags", ["--map", "--user --frobnicate", "-Ux", "--pid --fork sh"])
def test_a_flag_the_worker_cannot_read_as_unshare_would_is_refused(flags: str) -> None:
    """Ambiguous prefixes, unknown options and a program hidden in the flags: no guessing."""
    with pytest.raises(UnshareFlagError):
        hardened_flags(tuple(flags.split()), 70000, 70001, colon_maps=False)


@pytest.mark.req("R-HOST-1")
def test_hardened_flags_in_util_linux_239_syntax() -> None:
    """util-linux 2.39 reads --map-users as inner:outer:count."""
    flags = hardened_flags(("--user", "--map-root-user"), 70000, 70001, colon_maps=True)
    assert flags[1:3] == ["--map-users=0:70000:1", "--map-groups=0:70001:1"]


@pytest.mark.req("R-PID-1")
def test_python_path_setting_is_used() -> None:
    s = settings(ORVANTA_PYTHON="/opt/py/bin/python3")
    assert argv(PidNamespace(s, host()), "python3")[-3:] == [
        "/opt/py/bin/python3",
        "-u",
        f"{JOB_DIR}/main.py",
    ]


@pytest.mark.req("R-PID-1")
def test_job_sees_its_directory_at_the_host_path() -> None:
    assert PidNamespace(settings(), host()).inner_dir(prepared("python3")) == str(JOB_DIR)


@pytest.mark.req("R-PID-3")
def test_backend_refuses_an_unusable_unshare() -> None:
    with pytest.raises(RuntimeError, match="unshare failed"):
        PidNamespace(settings(), host(unshare=False))


@pytest.mark.req("R-SEL-6", "R-PID-1")
def test_make_backend_returns_the_pid_namespace() -> None:
    backend = make_backend("unshare", settings(), host())
    assert backend.name == "unshare"
    assert backend.launch(prepared("python3"), {}).argv[0] == "/usr/bin/unshare"


def status(uid: int, eff: str, bnd: str) -> str:
    """What `cat /proc/self/status` prints inside the namespace, the lines that matter."""
    return f"Uid:\t{uid}\t{uid}\t{uid}\t{uid}\nCapPrm:\t{eff}\nCapEff:\t{eff}\nCapBnd:\t{bnd}\n"


@pytest.mark.req("R-TBL-PROC", "R-HOST-2")
@pytest.mark.parametrize(
    ("shown", "refused"),
    [
        (status(0, "0" * 16, "0" * 16), False),
        (status(0, "0" * 16, "000001ffffffffff"), True),  # root inside, an exec gives them back
        (status(0, "000001ffffffffff", "0" * 16), True),
        (status(1000, "0" * 16, "000001ffffffffff"), False),  # not root inside: nothing to give
        (status(1000, "0000000000200000", "0" * 16), True),  # CAP_SYS_ADMIN held
    ],
)
def test_the_worker_proves_the_jobs_capabilities_are_gone(
    shown: str, refused: bool, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(unshare_module, "run_probe", lambda *a, **k: (True, shown))
    monkeypatch.setattr(os, "access", lambda *a: True)
    problem = unshare_module.caps_problem("/usr/bin/unshare", ["--user", "--pid"], settings())
    assert (problem is not None) is refused, problem
