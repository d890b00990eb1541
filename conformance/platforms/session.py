"""Which pytest run owns a container, a cells dir or a victim cgroup: one id per run,
`<controller pid>:<its start time>`.

The controller sets it before xdist starts its workers, which inherit it; a nested run
(the audit tests start `orvanta audit`) sets its own, so it never reaps the outer run's
containers, and a reused pid is not mistaken for a live run.
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

SESSION_ENV = "ORVANTA_SESSION"


def start_session() -> None:
    """On the controller, before workers start: this run's id."""
    os.environ[SESSION_ENV] = f"{os.getpid()}:{_start_time(os.getpid())}"


def session() -> str:
    if SESSION_ENV not in os.environ:
        start_session()
    return os.environ[SESSION_ENV]


def alive(owner: str) -> bool:
    pid, _, started = owner.partition(":")
    return pid.isdigit() and _start_time(int(pid)) == started


def owner_of(pid: int) -> str:
    """A live process's id in the form `alive` checks: its pid and its start time."""
    return f"{pid}:{_start_time(pid)}"


def owned_prefix(kind: str) -> str:
    """A name prefix that says which run made the file: `<kind><pid>-<start>-`."""
    return f"{kind}{session().replace(':', '-')}-"


def dead_owned(kind: str) -> list[Path]:
    """Temporary directories named by owned_prefix(kind) whose run is gone (killed: kill -9
    runs no teardown). Names of another shape are not ours to judge and are left alone."""
    found = []
    for path in Path(tempfile.gettempdir()).glob(f"{kind}*"):
        pid, _, rest = path.name[len(kind) :].partition("-")
        started, dash, _ = rest.partition("-")
        if pid.isdigit() and started.isdigit() and dash and not alive(f"{pid}:{started}"):
            found.append(path)
    return found


def _start_time(pid: int) -> str:
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return "gone"
    fields = stat[stat.rfind(")") + 2 :].split()
    # a zombie has ended: whoever should reap it (a subreaper that never waits) may not
    return "gone" if fields[0] == "Z" else fields[19]
