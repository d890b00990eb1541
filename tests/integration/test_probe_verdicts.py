"""Probes say "exposed" where their attack works, and "blocked" only where it is held off.

Each case builds, in a mount namespace of its own (`unshare --mount`, every mount private),
a place where a probe's attack succeeds although something else stops it at last: a shared
filesystem only a little larger than the quota, which ends the fill with ENOSPC past the
limit; an engine socket at a path the old list lacked. Each has its control too, where the
limit really holds. Nothing reaches the host: the tmpfs mounts live and die with the
namespace.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import textwrap

import pytest

from conformance.remote_jobs import SCAN_SCRIPT
from conformance.resources import suite_file

pytestmark = [
    pytest.mark.integration,
    pytest.mark.skipif(os.geteuid() != 0, reason="mounting a tmpfs in a namespace needs root"),
    pytest.mark.skipif(shutil.which("unshare") is None, reason="unshare (util-linux) is missing"),
    pytest.mark.skipif(not os.access("/usr/bin/python3", os.X_OK), reason="no /usr/bin/python3"),
]
# The scenarios cover /tmp, where the checkout and its venv may lie (a CI clone does): each
# reads the probe first, writes it into its own /tmp, and runs it with the system's Python
# (probes need the stdlib only), as a job would.

# Run in the private namespace: mounts, then the probe as a child; its verdict on stdout.
SCENARIO = textwrap.dedent(
    """
    import os, socket, subprocess, sys
    mounts, probe, env = sys.argv[1], sys.argv[2], dict(a.split("=", 1) for a in sys.argv[3:])
    source = open(probe).read()
    for spec in filter(None, mounts.split(",")):
        place, size = spec.split(":")
        os.makedirs(place, exist_ok=True)
        subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}m", "tmpfs", place], check=True)
    assert mounts.startswith("/tmp:"), "the job dir is made in the namespace's own /tmp"
    os.makedirs("/tmp/job", exist_ok=True)
    with open("/tmp/probe.py", "w") as f:
        f.write(source)
    listener = None
    if env.pop("LISTEN", None):
        path = "/run/k3s/containerd/containerd.sock"
        os.makedirs(os.path.dirname(path))
        listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        listener.bind(path)
        listener.listen(4)
    out = subprocess.run(
        ["/usr/bin/python3", "/tmp/probe.py"], cwd="/tmp/job", env={**os.environ, **env},
        capture_output=True, text=True, timeout=60,
    ).stdout
    print(out.strip().splitlines()[-1])
    """
)


def last_verdict(argv: list[str], env: dict[str, str] | None = None) -> dict[str, object]:
    """The JSON verdict on the last stdout line of `argv`."""
    done = subprocess.run(argv, env=env, capture_output=True, text=True, timeout=120, check=True)
    result: dict[str, object] = json.loads(done.stdout.strip().splitlines()[-1])
    return result


def verdict(probe: str, mounts: str, **env: str) -> dict[str, object]:
    """The probe run in a mount namespace of its own, with the tmpfs `mounts` (place:MiB)."""
    script = str(suite_file(f"fixtures/probes/{probe}.py"))
    variables = [f"{k}={v}" for k, v in env.items()]
    private = ["unshare", "--mount", "--propagation=private"]
    return last_verdict([*private, sys.executable, "-c", SCENARIO, mounts, script, *variables])


SHARED = "/tmp:30,/var/tmp:30,/dev/shm:30"  # each filesystem fills up past the 20 MiB quota
QUOTA = "/tmp:30,/tmp/job:20,/var/tmp:20,/dev/shm:20"  # each no larger than the quota


@pytest.mark.req("R-DISK-1")
@pytest.mark.parametrize(
    ("probe", "mounts", "expected"),
    [
        ("disk_fill", SHARED, "exposed"),
        ("disk_fill", QUOTA, "blocked"),
        ("disk_fill_tmp", SHARED, "exposed"),
        ("disk_fill_tmp", "/tmp:20,/var/tmp:20,/dev/shm:20", "blocked"),
    ],
)
def test_a_full_shared_filesystem_is_no_quota(probe: str, mounts: str, expected: str) -> None:
    """ENOSPC after 30 MiB against a 20 MiB quota: the job wrote past its limit; what
    stopped it was a shared filesystem filling up (the old probes said "blocked")."""
    result = verdict(
        probe, mounts, PROBE_LIMIT_DISK_MB="20", PROBE_LIMIT_FILE_MB="40", PROBE_TOKEN="t35"
    )
    assert result["outcome"] == expected, result


@pytest.mark.req("R-TBL-RES")
@pytest.mark.parametrize(("size", "expected"), [("30", "exposed"), ("16", "blocked")])
def test_file_size_counts_only_a_stop_within_the_limit(size: str, expected: str) -> None:
    result = verdict("file_size", f"/tmp:{size}", PROBE_LIMIT_FILE_MB="20")
    assert result["outcome"] == expected, result


@pytest.mark.req("R-HOST-1")
@pytest.mark.parametrize(("listen", "expected"), [("1", "exposed"), ("", "blocked")])
def test_engine_socket_finds_k3s_containerd(listen: str, expected: str) -> None:
    """On a k3s node containerd listens at /run/k3s/containerd/containerd.sock, which the
    old list lacked: it said "blocked, no engine socket exists here"."""
    env = {"LISTEN": listen} if listen else {}
    result = verdict("engine_socket", "/tmp:8,/run:8", **env)
    assert result["outcome"] == expected, result


def among_processes(probe: str, argv: list[str], env: dict[str, str]) -> dict[str, object]:
    """The probe run in a PID namespace of its own beside one process, `argv` with `env`: the
    only other process it can see."""
    script = suite_file(f"fixtures/probes/{probe}.py")
    if probe.startswith("credentials_"):  # the remote audit's scan, not a matrix probe
        script = SCAN_SCRIPT
    # through variables: sh's own argv (a process the probe sees too) must not hold them
    args = {f"BESIDE_ARG{i}": arg for i, arg in enumerate(argv)}
    beside = " ".join(f'"${name}"' for name in args)
    run = f"{beside} & sleep 0.3; SCAN=env '{sys.executable}' '{script}'; kill $!"
    in_own_pid_namespace = ["unshare", "--pid", "--fork", "--mount", "--mount-proc"]
    return last_verdict(
        [*in_own_pid_namespace, "sh", "-c", run], {"PATH": "/usr/bin:/bin", **args, **env}
    )


SLEEPER = [sys.executable, "-c", "import time; time.sleep(10)"]


@pytest.mark.req("R-JOB-1")
@pytest.mark.parametrize(
    ("argument", "expected"),
    [
        ("NEIGHBOUR_TOKEN=v0123", "exposed"),
        ("-ENEIGHBOUR_TOKEN=v0123", "exposed"),  # nsjail's -E, glued: the old probe missed it
        ("--env=NEIGHBOUR_TOKEN=v0123", "exposed"),
        ("--setenv NEIGHBOUR_TOKEN v0123", "exposed"),  # bwrap's form, in one argument here
        ("orvanta-neighbour-v0123", "blocked"),  # the neighbour's own name holds no variable
    ],
)
def test_launcher_argv_finds_the_variable_in_any_form(argument: str, expected: str) -> None:
    result = among_processes("launcher_argv", [*SLEEPER, argument], {})
    assert result["outcome"] == expected, result


@pytest.mark.req("R-TBL-ENV")
@pytest.mark.parametrize(
    ("variable", "expected"),
    [
        ("REDIS_URL=redis://:pw@cache:6379/0", "exposed"),  # a password in a URL
        ("DB_PASS=x", "exposed"),
        ("AWS_SECRET_ACCESS_KEY=x", "exposed"),
        ("GOOGLE_APPLICATION_CREDENTIALS=/k.json", "exposed"),
        ("HOMEPAGE_URL=https://example.com/x", "blocked"),
    ],
)
def test_credentials_env_knows_the_usual_names(variable: str, expected: str) -> None:
    name, value = variable.split("=", 1)
    result = among_processes("credentials_env", SLEEPER, {name: value})
    assert result["outcome"] == expected, result


@pytest.mark.req("R-JOB-1", "R-AGT-2")
@pytest.mark.parametrize(
    ("variable", "expected"),
    [
        ("ORVANTA_AGENT_TOKEN", "exposed"),  # an agent's: the old probe saw only DATABASE_URL
        ("ORVANTA_ADMIN_TOKEN", "exposed"),
        ("DATABASE_URL", "exposed"),
        ("ORVANTA_JOB_ID", "blocked"),  # every job's own
    ],
)
def test_own_env_knows_the_workers_secrets(variable: str, expected: str) -> None:
    own_env = [sys.executable, str(suite_file("fixtures/probes/own_env.py"))]
    result = last_verdict(own_env, {"PATH": "/usr/bin:/bin", variable: "x"})
    assert result["outcome"] == expected, result


# A jobs root with many job-dir mounts older than the neighbour's, whose dir a regression
# left readable (0755): the probe, as an unprivileged uid, must still get to it.
MANY_MOUNTS = textwrap.dedent(
    """
    import os, subprocess, sys
    probe, count = sys.argv[1], int(sys.argv[2])
    source = open(probe).read()
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=8m", "tmpfs", "/tmp"], check=True)
    with open("/tmp/probe.py", "w") as f:
        f.write(source)
    os.chmod("/tmp/probe.py", 0o644)
    base = "/tmp/state-jobs-test"
    os.makedirs(base + "/state", mode=0o700)
    root = base + "/state-jobs"
    os.makedirs(root, mode=0o711)
    def job_dir(name, mode):
        path = f"{root}/{name}/job"
        os.makedirs(path)
        subprocess.run(["mount", "-t", "tmpfs", "-o", f"size=1m,mode={mode}", "tmpfs", path],
                       check=True)
        os.chmod(f"{root}/{name}", 0o711)
        return path
    for i in range(count):
        job_dir(f"old{i:04d}", "0700")
    with open(job_dir("neighbour", "0755") + "/neighbour.txt", "w") as f:
        f.write("ORVANTA_CANARY neighbour data\\n")
    own = job_dir("own", "0755")
    os.chown(own, 65534, 65534)
    as_nobody = ["setpriv", "--reuid=65534", "--regid=65534", "--clear-groups"]
    env = {"PATH": "/usr/bin:/bin", "CANARY_STATE_DIR": base + "/state"}
    out = subprocess.run([*as_nobody, "/usr/bin/python3", "/tmp/probe.py"], cwd=own, env=env,
                         capture_output=True, text=True, timeout=60).stdout
    print(out.strip().splitlines()[-1])
    """
)


@pytest.mark.req("R-HOST-4")
@pytest.mark.skipif(shutil.which("setpriv") is None, reason="setpriv (util-linux) is missing")
def test_state_jobs_reaches_the_newest_job_mount_past_many_older_ones() -> None:
    """The old probe tried the first 50 `.../job` mount points in mountinfo (oldest first):
    with 60 older job mounts it never reached the neighbour's."""
    script = str(suite_file("fixtures/probes/state_jobs.py"))
    private = ["unshare", "--mount", "--propagation=private"]
    result = last_verdict([*private, sys.executable, "-c", MANY_MOUNTS, script, "60"])
    assert result["outcome"] == "exposed", result
