"""A cell's SQLite queue as the harness reaches it when the workers run under gVisor.

runsc's Sentry keeps its processes' file locks, and its view of SQLite's WAL index, to
itself (checked: an fcntl lock taken in a runsc container does not stop the host). A
harness on the host and workers in the sandbox sharing the queue file are then two
writers that do not see each other's locks: a host write could lose a worker's commit, or
a read miss a job (about one probe job in 130 was lost so). So the host never opens the
file: every statement goes, as a JSON line (uml_guest's wire format), to

    docker exec -i CONTAINER python3 -m conformance.platforms.queue_relay QUEUE_FILE

which runs it on a connection of its own inside the sandbox, under the workers' locks,
and answers on the same line. The harness's side is a `RemoteDatabase` over that pipe
(`RelayDatabase`).
"""

from __future__ import annotations

import contextlib
import socket
import subprocess
import sys
from pathlib import Path
from typing import Any

from conformance.platforms.uml_guest import LineChannel, RemoteDatabase, run_statement

ANSWER_SECONDS = 120.0  # a statement may wait 30 s for SQLite's lock; beyond this, it is stuck


class RelayDatabase(RemoteDatabase):
    """runtime.database.Database whose statements run in a relay: `python` (an interpreter's
    argv, e.g. `docker exec -i CONTAINER python3`) running this module on `path`."""

    def __init__(self, python: list[str], path: Path, log: Path, where: str) -> None:
        here, there = socket.socketpair()
        self._log = log
        try:
            with open(log, "ab") as err:
                self._relay = subprocess.Popen(
                    [*python, "-m", "conformance.platforms.queue_relay", str(path)],
                    stdin=there.fileno(),
                    stdout=there.fileno(),
                    stderr=err,
                    start_new_session=True,  # a Ctrl-C reaches the harness, which closes it
                )
        except BaseException:
            here.close()
            raise
        finally:
            there.close()
        try:
            super().__init__(f"sqlite:///{path}", here, where, timeout=ANSWER_SECONDS)
        except Exception:
            self.close()
            raise

    def _call(self, op: str, **args: Any) -> Any:
        try:
            return super()._call(op, **args)
        except RuntimeError as exc:
            if self._relay.poll() is None:
                raise
            raise RuntimeError(
                f"{exc}; the relay exited with {self._relay.returncode}: {self.said()}"
            ) from exc

    def said(self) -> str:
        """The end of the relay's stderr: why it stopped, if it did."""
        with contextlib.suppress(OSError):
            return self._log.read_text(errors="replace")[-800:] or "nothing"
        return "nothing"

    def close(self) -> None:
        super().close()  # end of input: the relay exits at once, unless it is stuck
        try:
            self._relay.wait(timeout=5)
        except subprocess.TimeoutExpired:
            self._relay.kill()
            self._relay.wait()


def serve(path: Path) -> int:
    """Inside the sandbox: statements from stdin, run on `path`, answered on stdout."""
    from runtime.database import SqliteDatabase

    channel_in, channel_out = LineChannel(0), LineChannel(1)
    db: SqliteDatabase | None = None
    try:
        for message in channel_in.lines():
            if message.get("op") == "open":
                url = str(message.get("url", ""))
                wanted = Path("/" + url.removeprefix("sqlite:///").lstrip("/"))
                if wanted != path:
                    channel_out.send({"error": "other", "message": f"this relay serves {path}"})
                    continue
                db = db or SqliteDatabase(path)
                channel_out.send({})
            elif db is None:
                channel_out.send({"error": "other", "message": "no queue opened yet"})
            else:
                channel_out.send(run_statement(db, message))
    finally:
        if db is not None:
            db.close()
    return 0


if __name__ == "__main__":
    if len(sys.argv) != 2:
        sys.exit("usage: python3 -m conformance.platforms.queue_relay QUEUE_FILE")
    sys.exit(serve(Path(sys.argv[1])))
