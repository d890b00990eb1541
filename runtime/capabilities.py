"""What a worker found it can use on this host: one probe per backend and tool.

Every mechanism is tried for real (unshare with the configured flags, `tini -s
-- true`, a jail running `/bin/true` in the job config), because "the binary
exists" says nothing about whether a container's seccomp profile lets it work.
Backends probe themselves (`Backend.probe`); this module holds what they share.
"""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
from collections.abc import Mapping
from dataclasses import dataclass

PROBE_TIMEOUT = 15.0


@dataclass(frozen=True)
class Probe:
    """The outcome of trying one mechanism: a usable path, or why not."""

    path: str | None
    detail: str

    @property
    def ok(self) -> bool:
        return self.path is not None


@dataclass(frozen=True)
class HostCapabilities:
    """Per backend name, whether it works here; tini is the PID namespace's init."""

    backends: Mapping[str, Probe]
    tini: Probe

    def of(self, backend: str) -> Probe:
        return self.backends.get(backend) or Probe(None, f"{backend}: not probed on this worker")


def run_probe(
    argv: list[str],
    env: dict[str, str] | None = None,
    want_stdout: bool = False,
    pass_fds: tuple[int, ...] = (),
) -> tuple[bool, str]:
    """Run a probe command in a session of its own: on a timeout the whole group dies, not only
    its first process (a helper it forked would otherwise hold the pipes, and live on)."""
    try:
        child = subprocess.Popen(
            argv,
            env=env,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            start_new_session=True,
            pass_fds=pass_fds,
        )
    except OSError as exc:
        return False, str(exc)
    try:
        stdout, stderr = child.communicate(timeout=PROBE_TIMEOUT)
    except subprocess.TimeoutExpired:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(child.pid, signal.SIGKILL)
        child.communicate()
        return False, f"{argv[0]} did not finish within {PROBE_TIMEOUT:g}s"
    finally:  # util-linux leaves its id-map helper waiting when unshare() itself fails
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(child.pid, signal.SIGKILL)
    proc = subprocess.CompletedProcess(argv, child.returncode, stdout, stderr)
    if want_stdout and proc.returncode == 0:
        return True, proc.stdout
    output = (proc.stderr or proc.stdout).strip()
    return proc.returncode == 0, output


def host_euid(text: str) -> int | None:
    """The host uid of a process from its uid_map and status (as `cat` printed them)."""
    maps = []
    euid = None
    for line in text.splitlines():
        parts = line.split()
        if len(parts) == 3 and all(p.isdigit() for p in parts):
            maps.append(tuple(int(p) for p in parts))
        elif line.startswith("Uid:"):
            euid = int(parts[2])
    if euid is None:
        return None
    for inside, outside, count in maps:
        if inside <= euid < inside + count:
            return outside + euid - inside
    return None
