"""The secrets a worker under test holds, which a leak would reveal.

One random secret, planted where the page says a job must not reach it: the
worker's environment (a SUPERADMIN_SECRET token beside its DATABASE_URL, hence
also its memory), a file outside the job dir, an fd the worker keeps open on
that file, and a loopback TCP listener. On agent cells the secret is the
password in the server's PostgreSQL DATABASE_URL, which the agent never holds.
Probes look for the public marker; reports mask the random part.
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
    _listener: socket.socket | None = field(default=None, repr=False)

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
        canaries = cls(secret, secret_file, write_dir)
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
        }
        env.update({f"PROBE_LIMIT_{k.upper()}": str(v) for k, v in limits.items()})
        return env

    @staticmethod
    def mask(text: str) -> str:
        """Every canary secret, this cell's or another's (a probe may see a neighbour cell's)."""
        return SECRET.sub(f"{MARKER}_***", text)

    def close(self) -> None:
        if self._listener is not None:
            self._listener.close()
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1
