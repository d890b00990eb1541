"""Isolation backends: one module each, one registry, one small protocol.

A backend probes the host for itself, says what the executor must know about it
(traits, below), turns "run this script" into the argv that runs it isolated,
and describes itself at start. The executor does everything common to all
backends (job dir, ids, environment, fds, timeout, cleanup) and never asks for
a backend by name. Adding one is a module here and a line in REGISTRY.
"""

from __future__ import annotations

import fcntl
import importlib
import logging
import os
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import ClassVar, Protocol

from runtime.capabilities import HostCapabilities, Probe
from runtime.languages import Language
from runtime.settings import Settings

# name -> "module:class"; the first three are the page's levels, in its order
REGISTRY = {
    "none": "runtime.backends.none:NoIsolation",
    "unshare": "runtime.backends.unshare:PidNamespace",
    "nsjail": "runtime.backends.nsjail:Nsjail",
    "bwrap": "runtime.backends.bwrap:Bubblewrap",
}
BACKEND_NAMES = tuple(REGISTRY)


@dataclass(frozen=True)
class PreparedJob:
    job_id: str
    language: Language
    job_dir: Path  # on the host
    timeout: float
    cgroup_parent: str | None = "orvanta"  # where nsjail makes its cgroups; None: no cgroups
    # volumes the backend binds itself, (source, name in the job dir), where the worker could not
    volumes: tuple[tuple[str, str], ...] = ()
    # the host uid and gid the job's root maps to, its own while it runs (runtime.idmap);
    # None: the worker may not map ids, and the configured flags apply as written
    host_ids: tuple[int, int] | None = None


@dataclass(frozen=True)
class Launch:
    """What the worker spawns: the command and its whole environment. A launcher that runs
    as root outside the sandbox gets the worker's fixed environment, never the job's.
    `inputs` are data a launcher reads from an fd, not from its command line (which every
    user of the host can read): each is an anonymous memory file (memfd) of the worker's,
    passed to the child, and `{fd0}`, `{fd1}`... in argv become their numbers. No file is
    made for them, so none is left to remove. `stdin`, likewise, is what the launcher reads
    on its stdin; it must give the job /dev/null as stdin, as the worker does without it."""

    argv: list[str]
    env: dict[str, str]
    inputs: tuple[bytes, ...] = ()
    stdin: bytes | None = None  # the launcher's stdin; the job's own is /dev/null

    def argv_for(self, fds: list[int]) -> list[str]:
        argv = self.argv
        for i, fd in enumerate(fds):
            argv = [arg.replace(f"{{fd{i}}}", str(fd)) for arg in argv]
        return argv


def records(values: list[str]) -> bytes:
    """NUL-separated records: what a launcher reads from an fd (`Launch.inputs`)."""
    return b"".join(value.encode() + b"\0" for value in values)


def memory_file(data: bytes, name: str = "orvanta-launch") -> int:
    """`data` in an anonymous memory file, read from its start, sealed against any change;
    close-on-exec. Where the kernel has no memfd (a seccomp filter that refuses it), an
    unlinked file of root's alone (0600) instead: no path either."""
    sealed = True
    try:
        fd = os.memfd_create(name, os.MFD_CLOEXEC | os.MFD_ALLOW_SEALING)
    except OSError:
        sealed = False
        fd, path = tempfile.mkstemp(prefix=f"{name}-")
        try:
            os.unlink(path)
        except BaseException:
            os.close(fd)
            raise
    try:
        view = memoryview(data)
        while view:
            view = view[os.write(fd, view) :]
        os.lseek(fd, 0, os.SEEK_SET)
        if sealed:  # read-only from here on, for whoever holds it
            seals = fcntl.F_SEAL_WRITE | fcntl.F_SEAL_GROW | fcntl.F_SEAL_SHRINK | fcntl.F_SEAL_SEAL
            fcntl.fcntl(fd, fcntl.F_ADD_SEALS, seals)
    except BaseException:
        os.close(fd)
        raise
    return fd


class Backend(Protocol):
    name: ClassVar[str]
    on_the_page: ClassVar[bool]  # one of the page's three levels; else this runtime's own
    own_cgroups: ClassVar[bool]  # makes cgroups of its own below the job's (limits, R-TBL-RES)
    rlimits: ClassVar[bool]  # applies the job limits as rlimits (ORVANTA_JOB_CPU_SECONDS...)
    own_mounts: ClassVar[bool]  # mounts in a namespace of its own: may bind a volume by path
    # its jobs' mount namespace starts as a copy of the worker's (every mount in it then)
    copies_mounts: ClassVar[bool]

    @classmethod
    def probe(cls, settings: Settings) -> Probe:
        """Try the mechanism for real, as jobs will use it."""

    @classmethod
    def describe(cls, settings: Settings, probe: Probe) -> list[tuple[int, str]]:
        """(log level, line) for the worker's start-up log (R-OPS-1)."""

    def __init__(self, settings: Settings, caps: HostCapabilities) -> None: ...

    def own_ids(self) -> bool:
        """The job's root is not the host's: it gets unprivileged host ids of its own."""

    def inner_dir(self, job: PreparedJob) -> str:
        """Where the job directory appears to the job itself."""

    def launch(self, job: PreparedJob, env: dict[str, str]) -> Launch:
        """How to run the job's script under this isolation with `env` as the job's own
        environment, applied inside the sandbox."""


class UnknownBackendError(ValueError):
    def __init__(self, name: str) -> None:
        super().__init__(f"unknown isolation backend {name!r}; known: {', '.join(BACKEND_NAMES)}")


def backend_class(name: str) -> type[Backend]:
    try:
        target = REGISTRY[name]
    except KeyError:
        raise UnknownBackendError(name) from None
    module_name, _, class_name = target.partition(":")
    cls: type[Backend] = getattr(importlib.import_module(module_name), class_name)
    return cls


def make_backend(name: str, settings: Settings, caps: HostCapabilities) -> Backend:
    return backend_class(name)(settings, caps)


def tool_path(name: str, caps: HostCapabilities) -> str:
    """The path the start-up probe found for backend `name`; an error if it found none."""
    path = caps.of(name).path
    if path is None:
        raise RuntimeError(f"{name} backend chosen but {name} is unusable: {caps.of(name).detail}")
    return path


INFO, WARNING = logging.INFO, logging.WARNING
