"""Which pytest run owns a container: one id per run, `<controller pid>:<its start time>`.

The controller sets it before xdist starts its workers, which inherit it; a nested run
(the audit tests start `orvanta audit`) sets its own, so it never reaps the outer run's
containers, and a reused pid is not mistaken for a live run.
"""

from __future__ import annotations

import os
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


def _start_time(pid: int) -> str:
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return "gone"
    return stat[stat.rfind(")") + 2 :].split()[19]
