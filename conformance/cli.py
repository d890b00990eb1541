"""`orvanta audit`: the conformance suite as a command, writing the audit report.

Registered through the `orvanta.commands` entry point so that the runtime's CLI
offers it without importing the conformance side. It runs the same pytest suite
as `pytest conformance/ --audit-report=DIR`: one model, two entry points.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
from pathlib import Path
from typing import Any

from conformance.resources import CHECKOUT, in_checkout, suite_file
from runtime.backends import BACKEND_NAMES

SUITE = Path(__file__).resolve().parent
EXIT_OK, EXIT_WEAKER, EXIT_COULD_NOT_RUN = 0, 1, 2
EXTRA = "orvanta-isolation[audit]"


def register(sub: Any) -> None:
    audit = sub.add_parser(
        "audit",
        help="run the hostile probes against workers on this host and write the audit report",
        description="Exit 0: every expectation holds. 1: isolation is weaker than configured or "
        "documented. 2: the audit itself could not run.",
    )
    audit.add_argument("--backend", default="all", choices=(*BACKEND_NAMES, "all"))
    audit.add_argument("--platform", default="all", help="a platform of matrix.yaml, or all")
    audit.add_argument("--out", type=Path, default=Path("reports"), help="report directory")
    audit.add_argument("--matrix", type=Path, default=None, help="default: the suite's own")
    audit.add_argument("-n", "--jobs", type=int, default=2, help="parallel pytest workers")
    remote = audit.add_argument_group(
        "remote audit", "probes as ordinary jobs of a live job service (ORVANTA_ADMIN_TOKEN)"
    )
    remote.add_argument("--server", help="the job service: http://HOST:PORT or unix:///PATH")
    remote.add_argument("--tag", action="append", help="a worker tag to audit (repeatable)")
    remote.add_argument(
        "--expect", action="append", metavar="TAG=BACKEND", help="what TAG should run under"
    )
    remote.add_argument("--dry-run", action="store_true", help="list the jobs; submit nothing")
    audit.set_defaults(func=audit_command)


def audit_command(args: argparse.Namespace, _settings: object) -> int:
    if args.server or args.tag or args.expect or args.dry_run:
        from conformance import remote_cli

        return remote_cli.main(args)
    missing = [m for m in ("pytest", "xdist", "docker") if importlib.util.find_spec(m) is None]
    if missing:
        print(
            f"orvanta audit: needs the audit extra ({', '.join(missing)} missing): "
            f"pip install '{EXTRA}'"
        )
        return EXIT_COULD_NOT_RUN
    import pytest

    matrix = args.matrix or suite_file("matrix.yaml")
    if not matrix.is_file():
        print(f"orvanta audit: no matrix at {matrix}; pass --matrix=PATH")
        return EXIT_COULD_NOT_RUN
    argv = [
        str(SUITE),
        f"--rootdir={CHECKOUT if in_checkout() else SUITE}",
        f"--backend={args.backend}",
        f"--platform={args.platform}",
        f"--matrix={matrix.resolve()}",
        f"--audit-report={args.out}",
        "--current-env",
        "--audit-progress",
        "-q",
        "--tb=line",
        "-p",
        "no:cacheprovider",
    ]
    if args.jobs > 1:
        argv += ["-n", str(args.jobs)]
    report = args.out / "audit.json"
    report.unlink(missing_ok=True)
    code = int(pytest.main(argv))
    if code in (pytest.ExitCode.OK, pytest.ExitCode.TESTS_FAILED) and report.is_file():
        summary = json.loads(report.read_text())["summary"]
        return exit_code(summary)
    print(f"orvanta audit: the audit could not run (pytest exit {code}); see the output above")
    return EXIT_COULD_NOT_RUN


def exit_code(summary: dict[str, Any]) -> int:
    """From the report, not from pytest's code. Weaker isolation anywhere is 1, even when
    some other cell could not run; a cell that could not be set up (or whose platform is
    missing) is 2 only when nothing measured was weaker, and never 1."""
    for entry in summary.get("could_not_run") or []:
        print(f"orvanta audit: could not run {entry['test']}: {entry['why']}")
    if summary.get("weaker", summary["failed"]):
        return EXIT_WEAKER
    return EXIT_COULD_NOT_RUN if summary.get("could_not_run") else EXIT_OK
