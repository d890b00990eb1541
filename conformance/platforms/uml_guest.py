"""Inside a User-Mode Linux guest: the agent the host's driver talks to, and the worker launcher.

The guest's init (conformance/platforms/uml.py writes it) mounts its own /proc, /sys,
cgroup2, tmpfs /tmp and the cell root, then execs `python -m conformance.platforms.uml_guest
agent`. The agent owns the guest's first serial line, a raw tty that the host sees as one
end of a socketpair, and speaks JSON lines on it, each tagged with a channel:

- channel 0: the driver's requests (spawn a worker, poll or signal it, list processes by
  marker, clean up a probe token, facts) and the agent's replies;
- channel N > 0: one queue connection of a worker. The host's SQLite queue cannot be
  shared through hostfs (no locks cross it, and the guest caches pages), so a worker in
  the guest reaches it through this channel: `launch_worker` swaps runtime.database's
  `connect` for `RemoteDatabase`, and the host runs each statement on its own connection.

Nothing here runs on the host; the wire format (`dump`, `load`) is shared with it.
"""

from __future__ import annotations

import base64
import contextlib
import json
import os
import platform
import select
import signal
import socket
import subprocess
import sys
import threading
import tty
from collections.abc import Iterator, Sequence
from contextlib import AbstractContextManager, contextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:  # the guest imports runtime only once a worker is launched
    from runtime.database import Database

TTY = "/dev/ttyS0"
DB_SOCKET = "/run/orvanta-uml/db.sock"
LISTENER_PORT = 47047


def _enc(value: Any) -> Any:
    if isinstance(value, bytes):
        return {"$b": base64.b64encode(value).decode()}
    if isinstance(value, (list, tuple)):
        return [_enc(v) for v in value]
    return value


def _dec(value: Any) -> Any:
    if isinstance(value, dict) and "$b" in value:
        return base64.b64decode(value["$b"])
    if isinstance(value, list):
        return [_dec(v) for v in value]
    return value


def dump(message: dict[str, Any]) -> bytes:
    """One wire line: ASCII JSON (a tty passes it unchanged), bytes as base64."""
    return json.dumps({k: _enc(v) for k, v in message.items()}).encode() + b"\n"


def load(line: bytes) -> dict[str, Any]:
    message: dict[str, Any] = json.loads(line)
    return {k: _dec(v) for k, v in message.items()}


class LineChannel:
    """Lines in and out of a file descriptor, writes from any thread."""

    def __init__(self, fd: int, acks: bool = False, timeout: float | None = None) -> None:
        self.fd = fd
        self.acks = acks  # the guest's tty: tell the host how much was read (see uml.Guest)
        self.timeout = timeout  # for each line read: TimeoutError once it passes
        self._buffer = b""
        self._lock = threading.Lock()

    def send(self, message: dict[str, Any]) -> None:
        self.write(dump(message))

    def write(self, data: bytes) -> None:
        with self._lock:
            while data:
                data = data[os.write(self.fd, data) :]

    def lines(self) -> Iterator[dict[str, Any]]:
        while True:
            while b"\n" not in self._buffer:
                if (
                    self.timeout is not None
                    and not select.select([self.fd], [], [], self.timeout)[0]
                ):
                    raise TimeoutError(f"nothing read in {self.timeout:g}s")
                chunk = os.read(self.fd, 65536)
                if not chunk:
                    return
                if self.acks:
                    self.send({"ch": -1, "ack": len(chunk)})
                self._buffer += chunk
            line, _, self._buffer = self._buffer.partition(b"\n")
            if line.strip():
                yield load(line)


# -- the worker's queue, through the agent ----------------------------------------------------
class RemoteDatabase:
    """runtime.database.Database over a socket whose other end runs every statement: the
    UML host for a guest's worker, or a relay in a sandbox for the harness (queue_relay)."""

    kind = "sqlite"
    skip_locked = ""
    moves_in_one_statement = False  # the host's SQLite, statement by statement

    def __init__(
        self,
        url: str,
        sock: socket.socket | None = None,
        where: str = "a UML guest",
        timeout: float | None = None,
    ) -> None:
        """Over `sock` where given (a connected stream socket), else the agent's DB_SOCKET;
        `timeout`: seconds an answer may take, after which the connection is given up."""
        self.display = f"{url} (from {where})"
        if sock is None:
            sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            sock.connect(DB_SOCKET)
        self._sock = sock
        self._closed = False
        self._channel = LineChannel(self._sock.fileno(), timeout=timeout)
        self._replies = self._channel.lines()
        self._lock = threading.RLock()
        self._call("open", url=url)

    def _call(self, op: str, **args: Any) -> Any:
        with self._lock:
            if self._closed:
                raise RuntimeError(f"{self.display}: {op} after the connection was closed")
            try:
                self._channel.send({"op": op, **args})
                reply = next(self._replies, None)
            except TimeoutError as exc:  # a late answer would be read as the next one's
                self.close()
                raise RuntimeError(f"{self.display}: no answer to {op} ({exc}); closed") from exc
            except OSError:  # e.g. EPIPE: nobody reads it any more
                reply = None
        if reply is None:
            raise RuntimeError(f"{self.display}: the other end closed the connection ({op})")
        if "error" in reply:
            from runtime.database import DuplicateKeyError

            if reply["error"] == "duplicate":
                raise DuplicateKeyError(reply["message"])
            raise RuntimeError(f"queue {self.display}: {reply['message']}")
        return reply.get("result")

    def query(self, sql: str, params: Sequence[Any] = ()) -> list[tuple[Any, ...]]:
        return [tuple(row) for row in self._call("query", sql=sql, params=list(params))]

    def execute(self, sql: str, params: Sequence[Any] = ()) -> int:
        return int(self._call("execute", sql=sql, params=list(params)))

    def script(self, sql: str) -> None:
        self._call("script", sql=sql)

    def columns(self, table: str) -> set[str]:
        return {row[1] for row in self.query(f"PRAGMA table_info({table})")}

    @contextmanager
    def transaction(self) -> Iterator[None]:
        with self._lock:
            self.execute("BEGIN IMMEDIATE")
            try:
                yield
            except BaseException:
                self.execute("ROLLBACK")
                raise
            self.execute("COMMIT")

    def schema_transaction(self) -> AbstractContextManager[None]:
        return self.transaction()

    def close(self) -> None:
        self._closed = True
        with contextlib.suppress(OSError):
            self._sock.close()


def run_statement(db: Database, message: dict[str, Any]) -> dict[str, Any]:
    """A reply's fields for one statement of the wire (script, query or execute) run on `db`:
    its result, or the error RemoteDatabase raises again on the other side."""
    from runtime.database import DuplicateKeyError

    try:
        op = message["op"]
        if op == "script":
            db.script(message["sql"])
            return {}
        if op == "query":
            return {"result": [list(row) for row in db.query(message["sql"], message["params"])]}
        if op == "execute":
            return {"result": db.execute(message["sql"], message["params"])}
        raise ValueError(f"{op!r} is not a statement (script, query or execute)")
    except DuplicateKeyError as exc:
        return {"error": "duplicate", "message": str(exc)}
    except Exception as exc:
        return {"error": "other", "message": f"{type(exc).__name__}: {exc}"}


def remote_connect(url: str | None, state_dir: Path) -> Database:
    """runtime.database.connect's stand-in (typed as its Database: mypy checks the fit)."""
    return RemoteDatabase(url or f"sqlite:///{state_dir}/queue.sqlite3")


def remote_sqlite(path: Path) -> Database:
    return RemoteDatabase(f"sqlite:///{path}")


def launch_worker() -> int:
    """`orvanta worker`, its queue on the host."""
    import runtime.database
    import runtime.queue
    from runtime.cli import main

    swaps = {"connect": remote_connect, "SqliteDatabase": remote_sqlite}
    for module, name in ((runtime.database, "connect"), *((runtime.queue, n) for n in swaps)):
        setattr(module, name, swaps[name])
    return main(["worker"])


# -- the agent ------------------------------------------------------------------------------
class Agent:
    def __init__(self, line: LineChannel) -> None:
        self.line = line
        self.workers: dict[int, subprocess.Popen[bytes]] = {}
        self.conns: dict[int, socket.socket] = {}
        self.next_channel = 1
        self.victim: Path | None = None
        self.spawning = threading.Lock()

    def serve(self) -> None:
        os.makedirs(os.path.dirname(DB_SOCKET), mode=0o700, exist_ok=True)
        server = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        server.bind(DB_SOCKET)
        server.listen(64)
        threading.Thread(target=self._accept, args=(server,), daemon=True).start()
        from conformance.platforms.host import make_victim_cgroup

        self.victim = make_victim_cgroup()
        self.line.send({"ch": 0, "ready": platform.release()})
        for message in self.line.lines():
            ch = message.pop("ch")
            if ch == 0:
                threading.Thread(target=self._control, args=(message,), daemon=True).start()
            elif ch in self.conns:
                with contextlib.suppress(OSError):
                    self.conns[ch].sendall(dump(message))

    def _accept(self, server: socket.socket) -> None:
        while True:
            conn, _ = server.accept()
            ch, self.next_channel = self.next_channel, self.next_channel + 1
            self.conns[ch] = conn
            threading.Thread(target=self._forward, args=(ch, conn), daemon=True).start()

    def _forward(self, ch: int, conn: socket.socket) -> None:
        with contextlib.suppress(OSError):
            for message in LineChannel(conn.fileno()).lines():
                self.line.send({**message, "ch": ch})
        self.line.send({"ch": ch, "op": "close"})
        self.conns.pop(ch, None)
        conn.close()

    def _control(self, message: dict[str, Any]) -> None:
        try:
            result = getattr(self, "op_" + message["op"])(**message.get("args", {}))
            reply: dict[str, Any] = {"ch": 0, "id": message["id"], "result": result}
        except Exception as exc:  # the driver shows it
            reply = {"ch": 0, "id": message["id"], "error": f"{type(exc).__name__}: {exc}"}
        self.line.send(reply)

    def op_spawn(self, env: dict[str, str], log: str, canary_fd: int) -> int:
        """The worker holds an fd on the canary file, at the number it has on the host."""
        with self.spawning, open(log, "ab") as out:
            canary = os.open(env["CANARY_FILE"], os.O_RDONLY)
            if canary != canary_fd:
                os.dup2(canary, canary_fd)
                os.close(canary)
            try:
                proc = subprocess.Popen(
                    [sys.executable, "-m", "conformance.platforms.uml_guest", "worker"],
                    env=env,
                    stdin=subprocess.DEVNULL,
                    stdout=out,
                    stderr=subprocess.STDOUT,
                    pass_fds=(canary_fd,),
                    start_new_session=True,
                )
            finally:
                os.close(canary_fd)
        self.workers[proc.pid] = proc
        return proc.pid

    def op_poll(self, pid: int) -> int | None:
        return self.workers[pid].poll()

    def op_signal(self, pid: int, signum: int) -> None:
        if self.workers[pid].poll() is None:
            self.workers[pid].send_signal(signum)

    def op_stop_workers(self) -> None:
        for pid in self.workers:
            self.op_signal(pid, signal.SIGTERM)

    def op_survivors(self, marker: str) -> list[str]:
        from conformance.platforms.host import survivors

        return survivors(marker)

    def op_cleanup(self, token: str) -> list[str]:
        from conformance.platforms.host import cleanup_host

        return cleanup_host(token, self.victim)

    def op_probe_env(self) -> dict[str, str]:
        return {"CANARY_CGROUP": str(self.victim)} if self.victim else {}

    def op_listen(self, name: str) -> int:
        """The canary listeners (TCP, abstract unix) in the guest's network namespace."""
        tcp = socket.create_server(("127.0.0.1", LISTENER_PORT))
        abstract = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        abstract.bind("\0" + name)
        abstract.listen(8)
        for sock in (tcp, abstract):
            threading.Thread(target=_hand_out_marker, args=(sock,), daemon=True).start()
        return LISTENER_PORT

    def op_facts(self) -> dict[str, Any]:
        from conformance.platforms.host import own_status

        controllers = Path("/sys/fs/cgroup/cgroup.controllers")
        sysctls = {}
        for name in ("user/max_user_namespaces", "kernel/unprivileged_userns_clone"):
            path = Path("/proc/sys") / name
            sysctls[name.replace("/", ".")] = path.read_text().strip() if path.exists() else "-"
        return {
            "kernel": f"{platform.release()} (User-Mode Linux guest)",
            "cgroup": "v2" if controllers.exists() else "v1",
            "cgroup_controllers": controllers.read_text().split() if controllers.exists() else [],
            **sysctls,
            **own_status("CapEff", "CapBnd", "Seccomp", "NoNewPrivs"),
        }

    def op_run(
        self, argv: list[str], env: dict[str, str], cwd: str, log: str, seconds: float
    ) -> int:
        """A command in the guest (tests/integration runs pytest here), its output in `log`;
        its exit status, or -9 when it ran past `seconds` and was killed."""
        with open(log, "ab") as out:
            proc = subprocess.Popen(
                argv,
                env=env,
                cwd=cwd,
                stdin=subprocess.DEVNULL,
                stdout=out,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )
            try:
                return proc.wait(seconds)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()
                return -9

    def op_halt(self) -> None:
        self.op_stop_workers()
        Path("/proc/sysrq-trigger").write_text("o")  # power off at once: nothing to sync


def _hand_out_marker(sock: socket.socket) -> None:
    from conformance.canaries import MARKER

    while True:
        conn, _ = sock.accept()
        with conn:
            conn.sendall(f"{MARKER} listener\n".encode())


def agent() -> None:
    fd = os.open(TTY, os.O_RDWR | os.O_NOCTTY)
    tty.setraw(fd)
    Agent(LineChannel(fd, acks=True)).serve()


if __name__ == "__main__":
    if sys.argv[1:] == ["worker"]:
        sys.exit(launch_worker())
    agent()
