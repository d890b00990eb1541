"""A User-Mode Linux guest on pure cgroup v2, the workers inside it (R-PLT-6).

Debian's `linux.uml` is a Linux kernel run as a user process: no KVM, no image, a boot of
about two seconds. Its root is this machine's filesystem through hostfs, mounted
read-only; the guest's init (INIT below) mounts its own /proc, /sys, cgroup2, tmpfs on
/tmp, /var/tmp, /run and /dev/shm, and the cell root read-write at the same path, which
is all of the host the guest may write. It has no network device: only its loopback.

The driver talks to the guest's agent (conformance.platforms.uml_guest) over the guest's
first serial line, one end of a socketpair: JSON lines for the driver's requests, and the
workers' queue statements, which this side runs on the cell's SQLite queue (hostfs
shares neither locks nor page cache, so the file itself cannot be shared). One guest per
cell, booted at the cell's start; every UML process carries `orvanta.uml=<session>` on
its command line and its files live under RUN_DIR/<session>, so a run's guests are
reaped by pid, even after Ctrl-C, and a dead run's at the next start.
"""

from __future__ import annotations

import contextlib
import itertools
import os
import platform
import queue
import re
import secrets
import shutil
import socket
import subprocess
import sys
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import psutil

from conformance.canaries import Canaries
from conformance.platforms.session import alive, session
from conformance.platforms.spec import PlatformSpec, SpecError
from conformance.platforms.uml_guest import LineChannel, dump, run_statement
from runtime.database import Database, connect

KERNEL = "linux.uml"
# where scripts/uml-kernel puts a newer Debian UML kernel when Debian 12's cannot boot on this
# CPU (AVX-512/AMX hosts); ORVANTA_UML_KERNEL names another
PRIVATE_KERNEL = Path(os.environ.get("ORVANTA_UML_DIR", "/opt/orvanta-uml")) / KERNEL
RUN_DIR = Path("/tmp/orvanta-uml")
TAG = "orvanta.uml="
REPO = Path(__file__).resolve().parents[2]
BOOT_TIMEOUT = 60.0
SLICE, WINDOW = 1024, 3072  # bytes per write to the guest's tty, and at most unread there
INIT = """#!/bin/sh
# PID 1 of an orvanta UML guest: mounts of its own, then the agent (uml_guest.py).
mount -t proc proc /proc
mount -t sysfs sysfs /sys
mountpoint -q /dev || mount -t devtmpfs devtmpfs /dev
if [ "$ORVANTA_CGROUP" = v1 ]; then  # the v1 hierarchies a v1 host has (tests/integration)
    mount -t tmpfs -o mode=0755 cgroup /sys/fs/cgroup
    for controller in cpu,cpuacct memory pids freezer; do
        mkdir -p "/sys/fs/cgroup/$controller"
        mount -t cgroup -o "$controller" cgroup "/sys/fs/cgroup/$controller"
    done
    ln -s cpu,cpuacct /sys/fs/cgroup/cpu && ln -s cpu,cpuacct /sys/fs/cgroup/cpuacct
else
    mount -t cgroup2 cgroup2 /sys/fs/cgroup
    echo "+cpu +io +memory +pids" > /sys/fs/cgroup/cgroup.subtree_control
    if [ -n "$ORVANTA_JOBS_MEMORY" ]; then  # every job's group is below orvanta/
        mkdir -p /sys/fs/cgroup/orvanta
        echo "$ORVANTA_JOBS_MEMORY" > /sys/fs/cgroup/orvanta/memory.max
    fi
fi
mkdir -p /dev/shm /dev/mqueue
for dir in /tmp /var/tmp /run /dev/shm; do mount -t tmpfs -o mode=1777 tmpfs "$dir"; done
# what the agent runs from (the checkout, the Python environment) and the tmpfs just hid
for dir in $(echo "$ORVANTA_HOST_DIRS" | tr : ' '); do
    mkdir -p "$dir" && mount -r -t hostfs -o "$dir" hostfs "$dir"
done
mount -t mqueue mqueue /dev/mqueue
mkdir -p "$ORVANTA_CELL_ROOT"
mount -t hostfs -o "$ORVANTA_CELL_ROOT" hostfs "$ORVANTA_CELL_ROOT"
# volumes hold files of the jobs' own uids, which hostfs cannot own: a tmpfs of the guest
volumes="$ORVANTA_CELL_ROOT/state/volumes"
mkdir -p "$volumes" /run/volumes && cp -a "$volumes/." /run/volumes/
mount -t tmpfs -o mode=0711 tmpfs "$volumes" && cp -a /run/volumes/. "$volumes/"
ip link set lo up
for setting in $(echo "$ORVANTA_SYSCTLS" | tr , ' '); do sysctl -q -w "$setting"; done
cd /
exec env -i PATH=/usr/sbin:/usr/bin:/sbin:/bin HOME=/tmp PYTHONDONTWRITEBYTECODE=1 \
    PYTHONPATH="$ORVANTA_REPO" tini -- "$ORVANTA_PYTHON" -m conformance.platforms.uml_guest
"""


@dataclass(frozen=True)
class UmlOptions:
    mem: str = "1G"  # the guest's memory (UML's mem=)
    sysctls: tuple[str, ...] = ()  # `key=value` set at boot, e.g. user.max_user_namespaces=0
    jobs_memory: str = ""  # memory.max of /sys/fs/cgroup/orvanta, the jobs' parent group
    cgroup: str = "v2"  # v1: the guest mounts cgroup v1 hierarchies instead (tests only)

    def __post_init__(self) -> None:
        if not re.fullmatch(r"[1-9][0-9]*[MG]", self.mem):
            raise SpecError("mem", f"{self.mem!r}: write a size like 512M or 1G")
        if self.jobs_memory and not re.fullmatch(r"[1-9][0-9]*[MG]", self.jobs_memory):
            raise SpecError("jobs_memory", f"{self.jobs_memory!r}: write a size like 256M")
        if self.cgroup not in ("v1", "v2"):
            raise SpecError("cgroup", f"{self.cgroup!r}: write v1 or v2")
        for setting in self.sysctls:
            if not re.fullmatch(r"[a-z0-9_.]+=[0-9a-z]+", setting):
                raise SpecError("sysctls", f"{setting!r}: write key=value, like kernel.x=0")


GUEST_TMPFS = ("/tmp", "/var/tmp", "/run", "/dev/shm")  # the guest's own, over the host's


def hidden_host_dirs() -> list[str]:
    """The checkout and the Python environment the agent runs from, where the guest's own
    tmpfs would hide them (a checkout under /tmp, as CI clones it): mounted back read-only."""
    wanted = {REPO, Path(sys.prefix), Path(sys.base_prefix)}
    wanted.add(Path(os.path.realpath(sys.executable)).parent.parent)
    return sorted(
        str(p)
        for p in wanted
        if any(p == Path(top) or Path(top) in p.parents for top in GUEST_TMPFS)
    )


class GuestGone(RuntimeError):
    """The guest died or stopped answering; the message carries its console's tail."""


class Guest:
    """One booted UML kernel with the agent inside, and the queue channels it opens."""

    def __init__(self, root: Path, options: UmlOptions) -> None:
        self.root = root
        self.dir = session_dir() / f"guest-{secrets.token_hex(4)}"
        self.dir.mkdir(parents=True)
        self.console = self.dir / "console.log"
        here, there = socket.socketpair()
        self.sock = here
        self.line = LineChannel(here.fileno())
        self.in_flight = 0  # bytes sent to the guest that its agent has not read yet
        self.credit = threading.Condition()
        self.send_lock = threading.Lock()
        self.pending: dict[int, tuple[threading.Event, list[dict[str, Any]]]] = {}
        self.ids = itertools.count(1)
        self.channels: dict[int, queue.Queue[dict[str, Any] | None]] = {}
        self.ready = threading.Event()
        self.kernel = ""
        started = time.monotonic()
        with open(self.console, "wb") as console:
            self.proc = subprocess.Popen(
                [
                    kernel() or KERNEL,
                    f"mem={options.mem}",
                    "rootfstype=hostfs",
                    "rootflags=/",
                    "ro",
                    f"init={init_script()}",
                    "con=null",
                    "con0=fd:0,fd:1",
                    f"ssl0=fd:{there.fileno()}",
                    "quiet",
                    f"umid={self.dir.name}",
                    f"uml_dir={self.dir}",
                    f"{TAG}{session()}",
                    f"ORVANTA_CELL_ROOT={root}",
                    f"ORVANTA_REPO={REPO}",
                    f"ORVANTA_HOST_DIRS={':'.join(hidden_host_dirs())}",
                    f"ORVANTA_PYTHON={sys.executable}",
                    f"ORVANTA_SYSCTLS={','.join(options.sysctls)}",
                    f"ORVANTA_JOBS_MEMORY={options.jobs_memory}",
                    f"ORVANTA_CGROUP={options.cgroup}",
                ],
                stdin=subprocess.DEVNULL,
                stdout=console,
                stderr=subprocess.STDOUT,
                pass_fds=(there.fileno(),),
                start_new_session=True,
                env={"PATH": "/usr/bin:/bin", "TMPDIR": str(self.dir)},
            )
        there.close()
        threading.Thread(target=self._read, daemon=True).start()
        if not self.ready.wait(BOOT_TIMEOUT) or self.proc.poll() is not None:
            self.close()
            raise GuestGone(f"UML guest did not boot in {BOOT_TIMEOUT:g}s: {self.tail()}")
        self.boot_seconds = round(time.monotonic() - started, 2)

    def tail(self) -> str:
        return self.console.read_text(errors="replace")[-3000:] if self.console.exists() else ""

    # -- the wire ----------------------------------------------------------------------------
    def _read(self) -> None:
        with contextlib.suppress(OSError, ValueError):
            for message in self.line.lines():
                ch = message.pop("ch")
                if ch == -1:
                    with self.credit:
                        self.in_flight -= int(message["ack"])
                        self.credit.notify_all()
                elif ch == 0 and "ready" in message:
                    self.kernel = str(message["ready"])
                    self.ready.set()
                elif ch == 0:
                    event, box = self.pending.pop(message["id"])
                    box.append(message)
                    event.set()
                else:
                    self._queue_statement(ch, message)
        for event, _ in list(self.pending.values()):
            event.set()  # the guest is gone: nobody waits for it

    def call(self, op: str, timeout: float = 60.0, **args: Any) -> Any:
        """One request to the agent; GuestGone if it cannot answer."""
        event: threading.Event = threading.Event()
        box: list[dict[str, Any]] = []
        request_id = next(self.ids)
        self.pending[request_id] = (event, box)
        try:
            self.send({"ch": 0, "id": request_id, "op": op, "args": args})
        except OSError as exc:
            raise GuestGone(f"{op}: the guest is gone ({exc}): {self.tail()}") from None
        if not event.wait(timeout) or not box:
            raise GuestGone(f"{op}: no answer from the guest in {timeout:g}s: {self.tail()}")
        if "error" in box[0]:
            raise RuntimeError(f"UML guest, {op}: {box[0]['error']}")
        return box[0].get("result")

    def send(self, message: dict[str, Any]) -> None:
        """To the guest in slices it has room for. UML's serial line drops no byte but stalls
        when the guest tty's 4 KiB buffer fills (the rest waits for the next host write), so
        no more than WINDOW bytes are ever unread: the agent acks every read."""
        data = dump(message)
        with self.send_lock:
            for start in range(0, len(data), SLICE):
                piece = data[start : start + SLICE]
                with self.credit:
                    if not self.credit.wait_for(lambda: self.in_flight <= WINDOW - SLICE, 60):
                        raise GuestGone(f"the guest read nothing for 60s: {self.tail()}")
                    self.in_flight += len(piece)
                self.line.write(piece)

    def _queue_statement(self, ch: int, message: dict[str, Any]) -> None:
        if ch not in self.channels:
            self.channels[ch] = queue.Queue()
            threading.Thread(target=self._serve_queue, args=(ch,), daemon=True).start()
        self.channels[ch].put(None if message.get("op") == "close" else message)

    def _serve_queue(self, ch: int) -> None:
        """A worker's queue connection: its statements, in order, on a connection of its own."""
        from runtime.database import SqliteDatabase

        db: SqliteDatabase | None = None
        while (message := self.channels[ch].get()) is not None:
            reply: dict[str, Any] = {"ch": ch}
            if message.get("op") != "open":
                reply.update(
                    run_statement(db, message)
                    if db is not None
                    else {"error": "other", "message": "no queue opened on this channel"}
                )
            else:
                try:
                    db = SqliteDatabase(self._queue_path(str(message["url"])))
                except Exception as exc:
                    reply.update(error="other", message=f"{type(exc).__name__}: {exc}")
            with contextlib.suppress(OSError, GuestGone):
                self.send(reply)
        if db is not None:
            db.close()
        del self.channels[ch]

    def _queue_path(self, url: str) -> Path:
        """Only a SQLite file in the cell's root: the guest names it, the host opens it."""
        path = Path("/" + url.removeprefix("sqlite:///").lstrip("/")).resolve()
        if not url.startswith("sqlite:///") or not path.is_relative_to(self.root.resolve()):
            raise ValueError(
                f"{url!r}: a guest's worker may open only a SQLite queue in {self.root}"
            )
        return path

    def close(self) -> None:
        """Power off (or kill) the guest and remove its files."""
        if self.proc.poll() is None:
            with contextlib.suppress(Exception):
                self.call("halt", timeout=5)
            try:
                self.proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                kill_tree(self.proc.pid)
                self.proc.wait()
        kill_tree(self.proc.pid)  # UML's helper processes, if any outlived it
        with contextlib.suppress(OSError):
            self.sock.close()
        shutil.rmtree(self.dir, ignore_errors=True)


class GuestWorker:
    """A worker in the guest, as the harness's WorkerProcess."""

    def __init__(self, guest: Guest, pid: int) -> None:
        self.guest = guest
        self.pid = pid

    def poll(self) -> int | None:
        if self.guest.proc.poll() is not None:
            return 255  # the guest itself is gone
        code: int | None = self.guest.call("poll", pid=self.pid)
        return code

    def terminate(self) -> None:
        with contextlib.suppress(GuestGone):
            self.guest.call("signal", pid=self.pid, signum=15)

    def kill(self) -> None:
        with contextlib.suppress(GuestGone):
            self.guest.call("signal", pid=self.pid, signum=9)

    def wait(self, timeout: float | None = None) -> int:
        end = None if timeout is None else time.monotonic() + timeout
        while (code := self.poll()) is None:
            if end is not None and time.monotonic() > end:
                raise subprocess.TimeoutExpired(f"worker {self.pid} in the UML guest", timeout or 0)
            time.sleep(0.05)
        return code


class UmlPlatform:
    Options = UmlOptions

    def __init__(self, spec: PlatformSpec[UmlOptions]) -> None:
        self.spec = spec
        self.guest: Guest | None = None
        self.guest_facts: dict[str, Any] = {}

    # -- the run: no guest outlives it ---------------------------------------------------------
    @classmethod
    def unavailable(cls) -> str | None:
        if kernel() is None:
            return f"no {KERNEL}: install Debian's user-mode-linux (scripts/setup does)"
        return None

    @classmethod
    def prepare(cls) -> None:
        reap(dead_only=True)

    @classmethod
    def finish(cls) -> None:
        reap(dead_only=False)

    # -- one cell -----------------------------------------------------------------------------
    def start(self, root: Path) -> None:
        self.guest = Guest(root, self.spec.options)
        self.guest_facts = self.guest.call("facts")

    @property
    def running(self) -> Guest:
        assert self.guest is not None, "guest not started"
        return self.guest

    def base_env(self) -> dict[str, str]:
        path = f"{Path(sys.executable).parent}:/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin"
        return {
            "PATH": f"{path}:/sbin:/bin",
            "LANG": "C.UTF-8",
            "HOME": "/tmp",
            "PYTHONPATH": str(REPO),
            "PYTHONDONTWRITEBYTECODE": "1",
        }

    def listen(self, canaries: Canaries) -> int:
        name = f"orvanta-canary-{secrets.token_hex(6)}"
        port = int(self.running.call("listen", name=name))
        canaries.port, canaries.abstract = port, name
        return port

    def spawn_worker(
        self, env: dict[str, str], log_path: Path, pass_fds: tuple[int, ...]
    ) -> GuestWorker:
        """The secret travels in the request on the serial line, never on a command line."""
        pid = self.running.call("spawn", env=env, log=str(log_path), canary_fd=pass_fds[0])
        return GuestWorker(self.running, int(pid))

    def stop_workers(self) -> None:
        with contextlib.suppress(GuestGone):
            self.running.call("stop_workers")

    def survivors(self, marker: str) -> list[str]:
        found: list[str] = self.running.call("survivors", marker=marker)
        return found

    def probe_env(self) -> dict[str, str]:
        env: dict[str, str] = self.running.call("probe_env")
        return env

    def cleanup(self, token: str) -> list[str]:
        if self.guest is None or self.guest.proc.poll() is not None:
            return []
        removed: list[str] = self.guest.call("cleanup", token=token)
        return removed

    def facts(self) -> dict[str, Any]:
        host_v2 = Path("/sys/fs/cgroup/cgroup.controllers").exists()
        return {
            **self.spec.facts(),
            **self.guest_facts,
            "host_kernel": platform.release(),
            "host_cgroup": "v2" if host_v2 else "v1",
            "boot_seconds": self.guest.boot_seconds if self.guest else None,
        }

    def queue_database(self, url: str | None, state_dir: Path) -> Database:
        return connect(url, state_dir)  # the guest's workers reach this very file through us

    def close(self) -> None:
        if self.guest is not None:
            self.guest.close()
            self.guest = None


def kernel() -> str | None:
    """The UML kernel to boot: ORVANTA_UML_KERNEL, else scripts/uml-kernel's, else Debian's."""
    named = os.environ.get("ORVANTA_UML_KERNEL")
    if named:
        return named
    if os.access(PRIVATE_KERNEL, os.X_OK):
        return str(PRIVATE_KERNEL)
    return shutil.which(KERNEL)


def session_dir() -> Path:
    return RUN_DIR / session().replace(":", "-")


def init_script() -> Path:
    """The guest's init, written once per run (every guest of the run boots the same one)."""
    path = session_dir() / "init.sh"
    if not path.exists():
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(f".{secrets.token_hex(4)}")
        tmp.write_text(INIT)
        tmp.chmod(0o755)
        tmp.replace(path)  # atomic: xdist workers may write it at once
    return path


def kill_tree(pid: int) -> None:
    """SIGKILL a UML kernel and its helper processes, by pid (psutil checks reuse)."""
    with contextlib.suppress(psutil.Error):
        top = psutil.Process(pid)
        for proc in [*top.children(recursive=True), top]:
            with contextlib.suppress(psutil.Error):
                proc.kill()


def reap(dead_only: bool) -> None:
    """Kill this run's guests (or, dead_only, those of runs no longer alive), remove their files."""
    for proc in psutil.process_iter(["cmdline"]):
        owner = next((a[len(TAG) :] for a in proc.info["cmdline"] or () if a.startswith(TAG)), None)
        if owner is None:
            continue
        if (not dead_only and owner == session()) or (dead_only and not alive(owner)):
            kill_tree(proc.pid)
    if not RUN_DIR.is_dir():
        return
    for path in RUN_DIR.iterdir():
        owner = path.name.replace("-", ":", 1)
        if (not dead_only and owner == session()) or (dead_only and not alive(owner)):
            shutil.rmtree(path, ignore_errors=True)
