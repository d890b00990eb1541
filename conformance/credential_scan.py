"""Probe credentials_env / credentials_files: the worker's own secrets, found by their shape.

A job script of the remote audit (`orvanta audit --server`), which cannot plant a canary in
the worker itself. Standalone like fixtures/probes/: the Python stdlib only, one JSON verdict
line. It reports names and places, never a value.

SCAN=env: every visible /proc/PID/environ (and the parent's) for credential-shaped variables:
DATABASE_URL, *_TOKEN, *SECRET*, *PASSWORD*, *_PASS, *_PASSWD, *API_KEY*, *ACCESS_KEY*,
*PRIVATE_KEY*, *CREDENTIALS*, and any variable whose value is a URL with a password in it
(scheme://user:password@). Processes of the audit itself (they carry ORVANTA_AUDIT_SESSION)
are skipped. exposed: another process's such variable was read.
SCAN=files: well-known credential files (.pgpass, .my.cnf, cloud and engine credentials,
.netrc, /etc/orvanta, .env files of the usual app dirs). exposed: one was readable.
blocked: nothing readable (evidence: what exists but refused, by errno).
"""

import errno
import glob
import json
import os
import re
from typing import Any

SHAPE = re.compile(
    r"^(DATABASE_URL|.*_TOKEN|.*SECRET.*|.*PASSWORD.*|.*_PASS|.*_PASSWD|.*(API|ACCESS|PRIVATE)_KEY.*"
    r"|.*CREDENTIALS.*)$",
    re.IGNORECASE,
)
URL_PASSWORD = re.compile(rb"^[a-z][a-z0-9+.-]*://[^/@:\s]*:[^/@\s]+@", re.IGNORECASE)
OURS = ("PROBE_", "CANARY_", "NB_")
AUDIT_MARK = b"ORVANTA_AUDIT_SESSION="
FILES = (
    "/root/.pgpass",
    "/home/*/.pgpass",
    "/var/lib/postgresql/.pgpass",
    "/root/.my.cnf",
    "/home/*/.my.cnf",
    "/etc/mysql/debian.cnf",
    "/root/.netrc",
    "/home/*/.netrc",
    "/root/.aws/credentials",
    "/home/*/.aws/credentials",
    "/root/.docker/config.json",
    "/home/*/.docker/config.json",
    "/root/.config/gcloud/credentials.db",
    "/etc/orvanta/*",
    "/etc/default/orvanta*",
    "/app/.env",
    "/srv/*/.env",
    "/opt/*/.env",
    "/root/.env",
)


def scan_env() -> tuple[str, Any]:
    me = os.getpid()
    pids = [int(p) for p in os.listdir("/proc") if p.isdigit() and int(p) != me]
    if os.getppid() > 0 and os.getppid() not in pids:
        pids.insert(0, os.getppid())
    found: list[dict[str, Any]] = []
    refused: dict[str, int] = {}
    for pid in pids:
        try:
            with open(f"/proc/{pid}/environ", "rb") as f:
                data = f.read()
        except OSError as exc:
            name = errno.errorcode.get(exc.errno or 0, str(exc.errno))
            refused[name] = refused.get(name, 0) + 1
            continue
        if AUDIT_MARK in data:
            continue
        entries = dict(entry.split(b"=", 1) for entry in data.split(b"\0") if b"=" in entry)
        named = {name.decode(errors="replace"): value for name, value in entries.items()}
        hits = sorted(
            name
            for name, value in named.items()
            if not name.startswith(OURS) and (SHAPE.match(name) or URL_PASSWORD.match(value))
        )
        if hits:
            found.append({"pid": pid, "comm": comm(pid), "names": hits})
    if found:
        return "exposed", {"variables": found[:20]}
    return "blocked", {"pids_visible": len(pids), "environ_refused": refused}


def comm(pid: int) -> str:
    try:
        with open(f"/proc/{pid}/comm") as f:
            return f.read().strip()
    except OSError:
        return "?"


def scan_files() -> tuple[str, Any]:
    readable: list[dict[str, Any]] = []
    refused: list[dict[str, str]] = []
    for pattern in FILES:
        for path in sorted(glob.glob(pattern))[:20]:
            if os.path.isdir(path):
                continue
            try:
                with open(path, "rb") as f:
                    size = len(f.read(4096))
            except OSError as exc:
                refused.append({"path": path, "error": errno.errorcode.get(exc.errno or 0, "?")})
                continue
            readable.append({"path": path, "bytes_readable": size})
    if readable:
        return "exposed", {"readable": readable[:20], "refused": refused[:10]}
    return "blocked", {"readable": [], "refused": refused[:20], "patterns": len(FILES)}


if __name__ == "__main__":
    scan = os.environ.get("SCAN", "env")
    name = f"credentials_{scan}"
    try:
        outcome, evidence = scan_files() if scan == "files" else scan_env()
    except Exception as exc:
        outcome, evidence = "error", f"{type(exc).__name__}: {exc}"
    if len(json.dumps(evidence)) > 1500:
        evidence = json.dumps(evidence)[:1500] + "..."
    print(json.dumps({"probe": name, "outcome": outcome, "evidence": evidence}), flush=True)
