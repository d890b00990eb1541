"""What the remote audit submits: the probe plan per tag, and the canary jobs it plants.

A remote audit reaches workers only through the job service's API, so its canaries are jobs
too: a concurrent neighbour (the secret in its environment, a file and an fd in its job dir,
/tmp, /dev/shm, SysV and POSIX IPC, a loopback TCP listener and an abstract unix socket) and
an earlier job's leftovers (the two-stage probes). What only the worker's host can plant (its
own secret file, a victim cgroup, its state dir) is "not measured remotely", with the reason;
the worker's own secrets are looked for by shape instead (conformance/credential_scan.py).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from conformance.canaries import PLANT_NEIGHBOUR
from conformance.matrix import Matrix, Probe

SCAN_SCRIPT = Path(__file__).resolve().parent / "credential_scan.py"
AUDIT_WORKSPACE = "orvanta-audit"  # volumes of probe jobs never touch a real workspace's
MARK_VAR = "ORVANTA_AUDIT_SESSION"  # every job the audit submits carries it: found, cleaned
PROBE_TIMEOUT = 60.0
NEIGHBOUR_SECONDS = 300  # the neighbour's own deadline; the audit stops it much earlier
UNKNOWN_VOLUME = "/orvanta-audit/volume-path-unknown"  # {volume}: the API does not say where

# Probes whose canary only the host can plant: never guessed, reported with the reason.
NOT_MEASURED = {
    "read_secret_file": "the worker's own secret file (CANARY_FILE) is planted by the local "
    "harness only; credentials_files looks for credential files by name instead",
    "read_host_file": "needs a marked world-readable file on the worker host outside every "
    "sandbox (CANARY_PUBLIC_FILE), which no job can plant",
    "write_outside": "needs a world-writable directory on the worker host outside every sandbox "
    "(CANARY_WRITE_DIR); /tmp is not one (nsjail gives each job its own)",
    "cgroup_write": "the host's victim cgroup (CANARY_CGROUP) is made by the local harness only",
    "cgroup_join": "the host's victim cgroup (CANARY_CGROUP) is made by the local harness only",
    "state_queue": "the worker's state dir (CANARY_STATE_DIR) is on its host; the API does not "
    "say where",
    "state_other_volume": "another workspace's volume lies in the worker's state dir, which the "
    "API does not name",
    "state_jobs": "the worker's state and jobs dirs (CANARY_STATE_DIR) are not named by the API",
    "outlive": "whether the job's daemon outlived it is read from the worker host's process "
    "table (the harness's survivors check), which no sandboxed job can see",
    "outlive_cgroup_escape": "survivors are read from the worker host's process table",
    "outlive_freeze": "survivors are read from the worker host's process table",
    "volume_poison": "needs the host path of the job's volume (PROBE_VOLUME_HOST) and a "
    "root-only directory on the worker host (CANARY_POISON_DIR)",
}
# Probes that read what the remote neighbour holds (its secret, files, IPC, listeners, argv)
NEEDS_NEIGHBOUR = (
    "proc_environ",
    "proc_mem",
    "proc_fd",
    "ps_listing",
    "neighbour_process",
    "proc_uncover",
    "neighbour_files",
    "neighbour_ipc",
    "canary_tcp",
    "abstract_socket",
    "launcher_argv",
)
# Two-stage probes whose attack removes what the plant left: only where it can. Under unshare
# jobs share the host's /tmp, /dev/shm and IPC, each job under host ids of its own, so a later
# job may find the plant's files and queues but never remove them (locally the harness does,
# as root). The audit leaves nothing behind: there they are not measured.
LEFTOVERS = ("leftover_tmp", "leftover_shm", "leftover_sysv", "leftover_mqueue")
LITTERS = ("unshare",)
LITTER_REASON = (
    "jobs of this isolation share the host's /tmp, /dev/shm and IPC under host ids of their "
    "own: a later job could not remove what the plant leaves (a POSIX queue left behind even "
    "counts against root's message-queue quota); neighbour_ipc measures the same channels"
)
# What the remote audit adds: the worker's own secrets, found by shape (names, never values).
SCANS = {"credentials_env": "environment", "credentials_files": "filesystem"}


@dataclass(frozen=True)
class PlannedProbe:
    """One probe of a tag's plan: the matrix's probe, or a credential scan (probe is None)."""

    name: str
    row: str
    req: tuple[str, ...]
    language: str
    script: str
    stages: int = 1
    attack_env: tuple[tuple[str, str], ...] = ()
    refused_with: tuple[str, ...] = ()
    refusal_only: bool = False  # its attack names the volume's host path: only a refusal counts
    matrix_probe: Probe | None = None


def plan(matrix: Matrix, agent: bool) -> tuple[list[PlannedProbe], dict[str, str]]:
    """The probes a tag gets, and the ones not measured remotely with why."""
    planned, skipped = [], {}
    for probe in matrix.probes.values():
        if probe.needs and probe.needs != ("agent" if agent else "worker"):
            continue
        if probe.name in NOT_MEASURED:
            skipped[probe.name] = NOT_MEASURED[probe.name]
            continue
        refusal_only = any("{volume}" in v for _, v in probe.attack_env)
        planned.append(
            PlannedProbe(
                probe.name,
                probe.row,
                probe.req,
                probe.language,
                probe.script.read_text(),
                probe.stages,
                probe.attack_env,
                probe.refused_with,
                refusal_only,
                probe,
            )
        )
    scan = SCAN_SCRIPT.read_text()
    for name, row in SCANS.items():
        planned.append(PlannedProbe(name, row, (matrix.table[row].req,), "python3", scan))
    return planned, skipped


# The concurrently running job. It binds first (a port taken fails it before it plants
# anything), plants, then execs itself under a marked argv
# (ps_listing, neighbour_process look for `orvanta-neighbour`) and serves until the audit's
# stop file appears in its /tmp or its deadline passes; then it removes what it planted.
NEIGHBOUR = (
    r"""import ctypes, ctypes.util, os, socket, sys
nb = os.environ["NB_ID"]
tcp = socket.create_server(("127.0.0.1", int(os.environ["NB_PORT"])))
unix = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
unix.bind("\0" + os.environ["NB_ABSTRACT"])
unix.listen(8)
token = nb
"""
    + PLANT_NEIGHBOUR
    + r"""held = os.open("neighbour.txt", os.O_RDONLY)
for fd in (tcp.fileno(), unix.fileno(), held):
    os.set_inheritable(fd, True)
os.environ.update(NB_FDS=f"{tcp.fileno()},{unix.fileno()},{held}", NB_SHM=str(shm))
os.execv(sys.executable, [sys.executable, "-c", NB_SERVE, "orvanta-neighbour"])
"""
)
NEIGHBOUR_SERVE = r"""import ctypes, ctypes.util, os, select, socket, time
nb = os.environ["NB_ID"]
tcp, unix, held = (int(x) for x in os.environ["NB_FDS"].split(","))
listeners = [socket.socket(fileno=tcp), socket.socket(fileno=unix)]
end = time.monotonic() + float(os.environ["NB_SECONDS"])
stop = f"/tmp/orvanta-audit-stop-{nb}"
while time.monotonic() < end and not os.path.exists(stop):
    for sock in select.select(listeners, [], [], 0.2)[0]:
        try:
            conn, _ = sock.accept()
            conn.sendall(b"ORVANTA_CANARY listener\n")
            conn.close()
        except OSError:
            pass
for path in (f"/tmp/orvanta-neighbour-{nb}", f"/dev/shm/orvanta-neighbour-{nb}"):
    try:
        os.unlink(path)
    except OSError:
        pass
libc = ctypes.CDLL(None, use_errno=True)
if int(os.environ["NB_SHM"]) >= 0:
    libc.shmctl(int(os.environ["NB_SHM"]), 0, None)
rt = ctypes.CDLL(ctypes.util.find_library("rt") or None, use_errno=True)
rt.mq_unlink(f"/orvanta-neighbour-{nb}".encode())
print("neighbour stopped")
"""
# The last job of a tag: tells the neighbour to stop (where they share /tmp) and removes the
# stop file once the neighbour has removed its own files.
STOPPER = r"""import json, os, time
nb = os.environ["NB_ID"]
stop, planted = f"/tmp/orvanta-audit-stop-{nb}", f"/tmp/orvanta-neighbour-{nb}"
with open(stop, "w"):
    pass
end = time.monotonic() + 5
while os.path.exists(planted) and time.monotonic() < end:
    time.sleep(0.1)
os.unlink(stop)
print(json.dumps({"stopper": "done", "neighbour_files_left": os.path.exists(planted)}))
"""


def neighbour_env(nb: str, secret: str, port: int, abstract: str) -> dict[str, str]:
    """The neighbour's variables: the secret among them, as a worker's secret would be."""
    return {
        "NB_ID": nb,
        "NB_CANARY": secret,
        "NB_PORT": str(port),
        "NB_ABSTRACT": abstract,
        "NB_SECONDS": str(NEIGHBOUR_SECONDS),
        "NEIGHBOUR_TOKEN": nb,  # what launcher_argv looks for on a launcher's command line
    }


def neighbour_script() -> str:
    """The neighbour's script, with the code it execs into."""
    return f"NB_SERVE = {NEIGHBOUR_SERVE!r}\n" + NEIGHBOUR


def probe_env(nb: str, port: int, abstract: str, limits: dict[str, int]) -> dict[str, str]:
    """What a probe job is told: where the neighbour's canaries are, and the limits."""
    env = {
        "CANARY_PORT": str(port),
        "CANARY_ABSTRACT": abstract,
        "CANARY_NEIGHBOUR_TMP": f"/tmp/orvanta-neighbour-{nb}",
        "CANARY_NEIGHBOUR_SHM": f"/dev/shm/orvanta-neighbour-{nb}",
        "CANARY_NEIGHBOUR_SYSV_KEY": str(int(nb[:7], 16) | 0x4F000000),
        "CANARY_NEIGHBOUR_MQ": f"/orvanta-neighbour-{nb}",
        # a root-owned file no job may open for writing; opened O_APPEND, never written
        "CANARY_ROOT_FILE": "/etc/shadow",
    }
    env.update({f"PROBE_LIMIT_{k.upper()}": str(v) for k, v in limits.items()})
    return env
