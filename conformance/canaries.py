"""The secrets a worker under test holds, which a leak would reveal, and the decoys a hostile
job goes after beyond the page's table.

One random secret, planted where the page says a job must not reach it: the
worker's environment (a SUPERADMIN_SECRET token beside its DATABASE_URL, hence
also its memory), a file outside the job dir, an fd the worker keeps open on
that file, and a loopback TCP listener. On agent cells the secret is the
password in the server's PostgreSQL DATABASE_URL, which the agent never holds.
Beyond the table: a root-owned 0600 decoy to open for writing, a world-readable
file, another workspace's volume, a directory a poisoned volume would point at,
and an abstract unix socket. Probes look for the public marker; reports mask
the random part.
"""

from __future__ import annotations

import os
import re
import secrets
import socket
import threading
from dataclasses import dataclass, field
from pathlib import Path

MARKER = "ORVANTA_CANARY"
SECRET = re.compile(MARKER + r"_[0-9a-f]{8,}")


@dataclass
class Canaries:
    secret: str
    secret_file: Path
    write_dir: Path
    fd: int = -1
    port: int = 0
    abstract: str = ""  # abstract unix socket name, without the leading NUL
    extra: dict[str, str] = field(default_factory=dict)  # more CANARY_* for probe jobs
    _listener: socket.socket | None = field(default=None, repr=False)
    _abstract: socket.socket | None = field(default=None, repr=False)

    @classmethod
    def plant(cls, root: Path) -> Canaries:
        secret = f"{MARKER}_{secrets.token_hex(12)}"
        vault = root / "vault"
        vault.mkdir(parents=True, exist_ok=True)
        secret_file = vault / "credentials.txt"
        secret_file.write_text(f"{MARKER} file: db_password={secret}\n")
        secret_file.chmod(0o600)
        write_dir = root / "outside"
        write_dir.mkdir(exist_ok=True)
        write_dir.chmod(0o777)
        decoy = vault / "root-only.conf"
        decoy.write_text(f"{MARKER} root-only decoy\n")
        decoy.chmod(0o600)
        public = root / "public.txt"
        public.write_text(f"{MARKER} public file\n")
        public.chmod(0o644)
        poison = root / "poison"  # root only: a poisoned volume must not make it reachable
        poison.mkdir(mode=0o700, exist_ok=True)
        (poison / "marker.txt").write_text(f"{MARKER} poisoned volume target\n")
        state = root / "state"
        other = state / "volumes" / "other" / "secret"
        other.mkdir(parents=True, exist_ok=True)
        (other / "data.txt").write_text(f"{MARKER} another workspace's volume: {secret}\n")
        canaries = cls(secret, secret_file, write_dir)
        canaries.extra = {
            "CANARY_ROOT_FILE": str(decoy),
            "CANARY_PUBLIC_FILE": str(public),
            "CANARY_POISON_DIR": str(poison),
            "CANARY_STATE_DIR": str(state),
            "CANARY_OTHER_VOLUME": str(other / "data.txt"),
        }
        canaries.fd = os.open(secret_file, os.O_RDONLY)
        os.set_inheritable(canaries.fd, True)
        return canaries

    def worker_env(self, state_dir: Path) -> dict[str, str]:
        """The worker's credentials: its real queue and a secret token it holds."""
        return {
            "DATABASE_URL": f"sqlite:///{state_dir}/queue.sqlite3",
            "SUPERADMIN_SECRET": self.secret,
        }

    def listen(self) -> int:
        """A loopback listener in this network namespace that hands out the marker."""
        sock = socket.create_server(("127.0.0.1", 0))
        self._listener = sock
        self.port = sock.getsockname()[1]
        threading.Thread(target=self._serve, args=(sock,), daemon=True).start()
        return self.port

    def listen_abstract(self) -> str:
        """An abstract unix socket in this network namespace that hands out the marker."""
        name = f"orvanta-canary-{secrets.token_hex(6)}"
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        sock.bind("\0" + name)
        sock.listen(8)
        self._abstract = sock
        self.abstract = name
        threading.Thread(target=self._serve, args=(sock,), daemon=True).start()
        return name

    def _serve(self, sock: socket.socket) -> None:
        while True:
            try:
                conn, _ = sock.accept()
            except OSError:
                return
            with conn:
                conn.sendall(f"{MARKER} listener\n".encode())

    def job_env(self, token: str, limits: dict[str, int]) -> dict[str, str]:
        """What a probe job is told: where the canaries are (not what they hold)."""
        env = {
            "CANARY_FILE": str(self.secret_file),
            "CANARY_WRITE_DIR": str(self.write_dir),
            "CANARY_PORT": str(self.port),
            "PROBE_TOKEN": token,
            **self.extra,
        }
        if self.abstract:
            env["CANARY_ABSTRACT"] = self.abstract
        env.update({f"PROBE_LIMIT_{k.upper()}": str(v) for k, v in limits.items()})
        return env

    @staticmethod
    def mask(text: str) -> str:
        """Every canary secret, this cell's or another's (a probe may see a neighbour cell's)."""
        return SECRET.sub(f"{MARKER}_***", text)

    def close(self) -> None:
        for sock in (self._listener, self._abstract):
            if sock is not None:
                sock.close()
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1


# What a neighbour job plants, for the local harness and the remote audit alike: a script
# fragment that expects `token`. Data in its job dir and, where its sandbox lets it, in /tmp,
# /dev/shm, a SysV segment and a POSIX queue (neighbour_files, neighbour_ipc). A plant refused
# by the sandbox (no /dev/shm in a jail) is that channel's answer for every job; one that found
# no room is not: what a probe then fails to find proves nothing. So the neighbour then removes
# what it did plant, says which found no room, and exits 3 (NEIGHBOUR_NO_ROOM) instead of
# reading as a neighbour whose every channel is closed.
PLANT_NEIGHBOUR = r"""import ctypes, ctypes.util, errno, json, os, sys
mark = b"ORVANTA_CANARY neighbour data\n"
room = (errno.ENOSPC, errno.EDQUOT, errno.ENOMEM, errno.EMFILE, errno.ENFILE)
no_room, planted = {}, []
open("neighbour.txt", "wb").write(mark)
for path in (f"/tmp/orvanta-neighbour-{token}", f"/dev/shm/orvanta-neighbour-{token}"):
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
        planted.append(path)
        try:
            os.write(fd, mark)
        finally:
            os.close(fd)
    except OSError as exc:
        if exc.errno in room:
            no_room[path] = errno.errorcode[exc.errno]
libc = ctypes.CDLL(None, use_errno=True)
libc.shmat.restype = ctypes.c_void_p
shm = libc.shmget(int(token[:7], 16) | 0x4F000000, 4096, 0o1000 | 0o644)
if shm >= 0:
    addr = libc.shmat(shm, None, 0)
    if addr not in (None, ctypes.c_void_p(-1).value):
        ctypes.memmove(addr, mark, len(mark))
    elif ctypes.get_errno() in room:
        no_room["sysv"] = errno.errorcode[ctypes.get_errno()]
elif ctypes.get_errno() in room:
    no_room["sysv"] = errno.errorcode[ctypes.get_errno()]
rt = ctypes.CDLL(ctypes.util.find_library("rt") or None, use_errno=True)
# one 64-byte message at most: a default queue (10 x 8 KiB) takes a tenth of its uid's
# RLIMIT_MSGQUEUE, and a few cells at once (root in each, under none) used it all up
attr = (ctypes.c_long * 8)(0, 1, 64, 0)  # struct mq_attr: flags, maxmsg, msgsize, curmsgs
queue = f"/orvanta-neighbour-{token}".encode()
if rt.mq_open(queue, os.O_CREAT | os.O_RDWR, 0o644, attr) < 0:
    if ctypes.get_errno() in room:
        no_room["mqueue"] = errno.errorcode[ctypes.get_errno()]
if no_room:  # nothing of it stays behind: the remote audit has no other way to remove it
    for path in planted:
        os.unlink(path)
    if shm >= 0:
        libc.shmctl(shm, 0, None)  # IPC_RMID
    rt.mq_unlink(queue)
    print(json.dumps({"neighbour": "no room to plant", "no_room": no_room}), flush=True)
    sys.exit(3)
"""
NEIGHBOUR_NO_ROOM = 3  # the neighbour's exit status when a plant found no room
