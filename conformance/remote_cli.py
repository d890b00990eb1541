"""`orvanta audit --server URL --tag TAG ...`: the remote audit as a command.

Exit codes are the local audit's (conformance/cli.py's exit_code): 0 every expectation
holds, 1 weaker than expected (or than `--expect TAG=BACKEND` states), 2 could not run.
"""

from __future__ import annotations

import argparse
import os
import secrets
import threading
import time
from concurrent.futures import ThreadPoolExecutor

from conformance.matrix import BACKENDS, Matrix, MatrixError, load
from conformance.remote import TagAudit, TagResult
from conformance.remote_api import AdminAPI, RemoteError
from conformance.remote_jobs import AUDIT_WORKSPACE, MARK_VAR, NEEDS_NEIGHBOUR, plan
from conformance.remote_report import build, write_all
from conformance.resources import suite_file

TOKEN_VAR = "ORVANTA_ADMIN_TOKEN"


class UsageError(ValueError):
    pass


def parse_expects(values: list[str], tags: list[str]) -> dict[str, str]:
    """`--expect TAG=BACKEND` pairs; each names one of the audited tags and a known backend."""
    expects = {}
    for value in values:
        tag, sep, backend = value.partition("=")
        if not sep or tag not in tags or backend not in BACKENDS:
            raise UsageError(
                f"--expect {value!r}: use TAG=BACKEND with TAG one of the --tag values {tags} "
                f"and BACKEND one of {list(BACKENDS)}"
            )
        expects[tag] = backend
    return expects


def main(args: argparse.Namespace) -> int:
    from conformance.cli import EXIT_COULD_NOT_RUN, exit_code

    try:
        if not args.server or not args.tag:
            raise UsageError("a remote audit needs --server URL and at least one --tag TAG")
        tags = list(dict.fromkeys(args.tag))
        expects = parse_expects(args.expect or [], tags)
        matrix = load(args.matrix or suite_file("matrix.yaml"))
    except (UsageError, MatrixError) as exc:
        print(f"orvanta audit: {exc}")
        return EXIT_COULD_NOT_RUN
    if args.dry_run:
        dry_run(matrix, args.server, tags, expects)
        return 0
    token = os.environ.get(TOKEN_VAR, "")
    if not token:
        print(f"orvanta audit: {TOKEN_VAR} is not set; export the server's admin token")
        return EXIT_COULD_NOT_RUN
    api = AdminAPI(args.server, token)
    try:
        api.check()
        results = audit(api, matrix, tags)
    except RemoteError as exc:
        print(f"orvanta audit: {exc}")
        return EXIT_COULD_NOT_RUN
    finally:
        left = api.cancel_unfinished()
        if left:
            print(f"orvanta audit: canceled {len(left)} unfinished job(s) of this audit: {left}")
    report, tests = build(matrix, results, expects, api.url)
    files = write_all(report, tests, args.out)
    s = report["summary"]
    print(
        f"orvanta audit: {s['verdict']}: {s['probe_runs']} probe runs over {len(tags)} tag(s), "
        f"{s['failed']} failed, {s['skipped']} not measured remotely; "
        f"report: {', '.join(str(f) for f in files)}"
    )
    return exit_code(s)


def audit(api: AdminAPI, matrix: Matrix, tags: list[str]) -> list[TagResult]:
    """Every tag at once (each its own workers), each tag's probes one after another."""
    session = secrets.token_hex(6)
    lock = threading.Lock()
    started = time.monotonic()

    def log(line: str) -> None:
        with lock:
            print(f"[{time.monotonic() - started:6.1f}s] {line}", flush=True)

    audits = [TagAudit(api, matrix, tag, session) for tag in tags]
    with ThreadPoolExecutor(max_workers=len(tags)) as pool:
        futures = [pool.submit(a.run, log) for a in audits]
        try:
            return [f.result() for f in futures]
        except BaseException:  # Ctrl-C: each tag ends its current probe and stops
            for a in audits:
                a.stopping.set()
            raise


def dry_run(matrix: Matrix, server: str, tags: list[str], expects: dict[str, str]) -> None:
    """What would be submitted, per tag, without contacting the server."""
    probes, skipped = plan(matrix, agent=True)
    print(f"orvanta audit --dry-run: nothing is submitted to {server}")
    print(
        f"every job: workspace {AUDIT_WORKSPACE!r}, variable {MARK_VAR}=<session>, timeout "
        f"60 s; bombs bounded at 2x {matrix.limits}"
    )
    for tag in tags:
        wanted = expects.get(tag)
        print(f"tag {tag}: expect {wanted or 'the isolation its jobs report'}")
        print("  job  neighbour (python3): canary secret in its env, files, fd, IPC, listeners")
        print("  job  another tag's job holding the secret (only if the tag's workers are agents)")
        for p in probes:
            stages = "plant + attack" if p.stages == 2 else "one job"
            if p.refusal_only:
                stages = "the attack only (counts only if refused: it names a volume host path)"
            needs = " [needs the neighbour]" if p.name in NEEDS_NEIGHBOUR else ""
            agent = " [agent workers only]" if p.matrix_probe and p.matrix_probe.needs else ""
            print(f"  probe {p.name} ({p.row}, {p.language}): {stages}{needs}{agent}")
        print("  job  stopper (python3): ends the neighbour and removes its files")
        for name, why in skipped.items():
            print(f"  not measured remotely: {name}: {why}")
