"""`orvanta audit`: the conformance suite as a command, writing the audit report.

Registered through the `orvanta.commands` entry point so that the runtime's CLI
offers it without importing the conformance side. It runs the same pytest suite
as `pytest conformance/ --audit-report=DIR`: one model, two entry points.
"""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
EXIT_OK, EXIT_WEAKER, EXIT_COULD_NOT_RUN = 0, 1, 2


def register(sub: Any) -> None:
    audit = sub.add_parser(
        "audit",
        help="run the hostile probes against workers on this host and write the audit report",
        description="Exit 0: every expectation holds. 1: isolation is weaker than configured or "
        "documented. 2: the audit itself could not run.",
    )
    audit.add_argument("--backend", default="all", choices=("none", "unshare", "nsjail", "all"))
    audit.add_argument("--platform", default="all", help="a platform of matrix.yaml, or all")
    audit.add_argument("--out", type=Path, default=Path("reports"), help="report directory")
    audit.add_argument("--matrix", type=Path, default=ROOT / "matrix.yaml")
    audit.add_argument("-n", "--jobs", type=int, default=2, help="parallel pytest workers")
    audit.set_defaults(func=audit_command)


def audit_command(args: argparse.Namespace, _settings: object) -> int:
    import pytest

    if not args.matrix.is_file():
        print(f"orvanta audit: no matrix at {args.matrix}; pass --matrix=PATH")
        return EXIT_COULD_NOT_RUN
    argv = [
        str(ROOT / "conformance"),
        f"--rootdir={ROOT}",
        f"--backend={args.backend}",
        f"--platform={args.platform}",
        f"--matrix={args.matrix}",
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
    code = int(pytest.main(argv))
    if code == pytest.ExitCode.OK:
        return EXIT_OK
    if code == pytest.ExitCode.TESTS_FAILED:
        return EXIT_WEAKER
    print(f"orvanta audit: the audit could not run (pytest exit {code}); see the output above")
    return EXIT_COULD_NOT_RUN
