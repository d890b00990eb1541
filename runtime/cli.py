"""`orvanta`: the worker, one-shot runs, the queue, and host diagnostics.

`orvanta run` is one job on a one-shot worker: same start-up checks, same
selection from the environment as `orvanta worker`, not a side door.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
import uuid
from collections.abc import Sequence
from importlib.metadata import PackageNotFoundError, entry_points, version
from pathlib import Path
from typing import TYPE_CHECKING, NoReturn

from runtime.jobs import JobResult, JobSpec
from runtime.languages import LANGUAGES, UnknownLanguageError, guess_language
from runtime.settings import Settings, SettingsError
from runtime.startup import StartupError

if TYPE_CHECKING:
    from runtime.agent import AgentClient
    from runtime.queue import JobQueue

log = logging.getLogger("orvanta")

EXIT_STARTUP = 2  # the worker refused to start (configuration or host cannot isolate)
EXIT_INPUT = 2  # `run` / `submit` refused the job (runtime.submission), as argparse does


def main(argv: Sequence[str] | None = None) -> int:
    parser = _parser()
    args = parser.parse_args(argv)
    logging.basicConfig(
        level=logging.DEBUG if args.verbose else logging.INFO,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        stream=sys.stderr,
    )
    try:
        settings = Settings.from_env()
        code: int = args.func(args, settings)
        return code
    except SettingsError as exc:
        log.error("refusing to start: %s", exc)
        return EXIT_STARTUP
    except StartupError as exc:
        log.error("%s", exc)
        return EXIT_STARTUP
    except UnknownLanguageError as exc:
        parser.error(str(exc))
        return EXIT_STARTUP  # pragma: no cover - parser.error exits


def _version() -> str:
    try:
        return version("orvanta-isolation")
    except PackageNotFoundError:  # run from a checkout that was never installed
        return "unknown (not installed)"


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="orvanta", description=__doc__)
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    parser.add_argument("--version", action="version", version=f"%(prog)s {_version()}")
    sub = parser.add_subparsers(dest="command", required=True)

    worker = sub.add_parser("worker", help="run a long-lived worker pulling jobs from the queue")
    worker.add_argument("--max-jobs", type=int, default=None, help="exit after this many jobs")
    worker.add_argument("--name", default=None, help="worker name recorded on its jobs")
    worker.set_defaults(func=cmd_worker)

    for name, func, help_ in (
        ("run", cmd_run, "run one script on a one-shot worker and print its output"),
        ("submit", cmd_submit, "queue one script for the workers of ORVANTA_STATE_DIR"),
    ):
        p = sub.add_parser(name, help=help_)
        p.add_argument("file", type=Path, help="the script (- for standard input)")
        p.add_argument("--lang", choices=sorted(LANGUAGES), help="default: from the file suffix")
        p.add_argument(
            "--env",
            action="append",
            default=[],
            metavar="KEY=VALUE",
            help="a variable of the job's own (repeatable)",
        )
        p.add_argument("--timeout", type=float, default=None, help="seconds (default: worker's)")
        p.add_argument("--json", action="store_true", help="print the result record as JSON")
        p.add_argument("--workspace", default="default", help="whose volumes the job may mount")
        if name == "submit":
            p.add_argument("--tag", default="default", help="route to workers serving this tag")
            p.add_argument("--wait", action="store_true", help="wait for the result")
            p.add_argument("--wait-timeout", type=float, default=600.0)
        p.set_defaults(func=func)

    cancel = sub.add_parser("cancel", help="stop a queued or running job")
    cancel.add_argument("job_id")
    cancel.set_defaults(func=cmd_cancel)

    setting = sub.add_parser(
        "settings", help="show or change the job_isolation instance setting (live, R-SEL-7)"
    )
    setting.add_argument("key", choices=("job_isolation",))
    setting.add_argument("value", nargs="?", help="nsjail_sandboxing, none, or --unset")
    setting.add_argument("--unset", action="store_true")
    setting.set_defaults(func=cmd_settings)

    server = sub.add_parser(
        "server", help="serve the HTTP API (jobs, worker groups, settings, agent workers)"
    )
    server.add_argument("--host", default="127.0.0.1", help="address to listen on")
    server.add_argument("--port", type=int, default=8000)
    server.add_argument("--uds", default=None, help="listen on this unix socket instead")
    server.set_defaults(func=cmd_server)

    groups = sub.add_parser("groups", help="list worker groups or create one (prints its token)")
    groups.add_argument("action", choices=("list", "create", "rotate", "delete"))
    groups.add_argument("name", nargs="?", help="the group (create, rotate, delete)")
    groups.add_argument("--tags", default="", help="comma-separated tags the group serves")
    groups.set_defaults(func=cmd_groups)

    doctor = sub.add_parser("doctor", help="check this host for what isolation needs")
    doctor.set_defaults(func=cmd_doctor)

    # Commands of other packages (the conformance suite's `audit`), without importing them here.
    for entry in entry_points(group="orvanta.commands"):
        entry.load()(sub)
    return parser


def _refuse(message: str) -> NoReturn:
    """An input error of `run` or `submit`: one line on stderr, exit 2, no traceback."""
    sys.stderr.write(f"orvanta: {message}\n")
    raise SystemExit(EXIT_INPUT)


def _job(args: argparse.Namespace) -> tuple[str, str, dict[str, str]]:
    """The job the command line names, checked as the queue checks it (runtime.submission)."""
    from runtime.submission import SubmissionError, validate_job

    if str(args.file) == "-":
        lang = args.lang
        if lang is None:
            raise UnknownLanguageError("- (standard input): give --lang")
        try:
            script = sys.stdin.read()
        except UnicodeDecodeError as exc:
            _refuse(f"cannot read the script from standard input: not UTF-8 text ({exc.reason})")
    else:
        try:
            script = args.file.read_text(encoding="utf-8")
        except OSError as exc:
            _refuse(f"cannot read script {args.file}: {exc.strerror}")
        except UnicodeDecodeError as exc:
            _refuse(f"cannot read script {args.file}: not UTF-8 text ({exc.reason})")
        lang = args.lang or guess_language(args.file.name)
    env = {}
    for item in args.env:
        key, sep, value = item.partition("=")
        if not sep or not key:
            _refuse(f"--env {item[:64]!r} is not KEY=VALUE")
        env[key] = value
    try:
        validate_job(lang, script, env)
    except SubmissionError as exc:
        _refuse(str(exc))
    return lang, script, env


def _queue(settings: Settings) -> JobQueue:
    """The queue DATABASE_URL names (SQLite in ORVANTA_STATE_DIR without one)."""
    from runtime.database import DatabaseURLError
    from runtime.queue import JobQueue

    try:
        return JobQueue.open(settings.database_url, settings.state_dir)
    except (DatabaseURLError, ConnectionError) as exc:
        raise StartupError(str(exc)) from None


def cmd_worker(args: argparse.Namespace, settings: Settings) -> int:
    from runtime.worker import JobSource, Worker, start

    runner = start(settings)
    source: JobSource
    tags = settings.worker_tags
    if settings.mode == "agent":
        source, tags = _agent(settings)
    else:
        source = _queue(settings)
    worker = Worker(runner, source, args.name)
    worker.tags = tags
    worker.install_signal_handlers()
    worker.serve(args.max_jobs)
    return 1 if worker.failed else 0


def _agent(settings: Settings) -> tuple[AgentClient, tuple[str, ...]]:
    """The agent's API client, after the server accepted its token (fail fast otherwise)."""
    from runtime.agent import AgentAPIError, AgentClient

    assert settings.server_url and settings.agent_token  # Settings checked MODE=agent
    client = AgentClient(settings.server_url, settings.agent_token)
    try:
        who = client.whoami()
    except AgentAPIError as exc:
        raise StartupError(
            f"agent: the server at {settings.server_url} refused ORVANTA_AGENT_TOKEN ({exc}); "
            f"issue a token with: orvanta groups create NAME --tags TAGS"
        ) from None
    except OSError as exc:
        raise StartupError(
            f"agent: cannot reach ORVANTA_SERVER_URL={settings.server_url} ({exc}); "
            f"start it with: orvanta server"
        ) from None
    log.info("agent: worker group %s serving tags %s", who["name"], ",".join(who["tags"]))
    return client, tuple(who["tags"])


def cmd_server(args: argparse.Namespace, settings: Settings) -> int:
    import os

    from runtime.server import serve

    token = os.environ.get("ORVANTA_ADMIN_TOKEN", "")
    if len(token) < 16:
        raise SettingsError(
            "ORVANTA_ADMIN_TOKEN",
            "***" if token else "",
            "a secret of at least 16 characters",
            "The server needs it to authenticate admins; generate one with: openssl rand -hex 24",
        )
    serve(_queue(settings), token, args.host, args.port, args.uds)
    return 0


def cmd_groups(args: argparse.Namespace, settings: Settings) -> int:
    queue = _queue(settings)
    if args.action == "list":
        for group in queue.groups():
            print(f"{group.name}\t{','.join(group.tags)}")
        return 0
    if not args.name:
        raise SystemExit(f"orvanta: groups {args.action} needs a group name")
    try:
        if args.action == "create":
            tags = tuple(t for t in args.tags.replace(",", " ").split())
            if not tags:
                raise SystemExit("orvanta: groups create needs --tags (the tags it serves)")
            print(queue.create_group(args.name, tags))
        elif args.action == "rotate":
            print(queue.rotate_group_token(args.name))
        else:
            queue.delete_group(args.name)
    except (KeyError, ValueError) as exc:
        raise SystemExit(f"orvanta: {exc.args[0] if isinstance(exc, KeyError) else exc}") from None
    return 0


def cmd_run(args: argparse.Namespace, settings: Settings) -> int:
    from runtime.worker import start

    lang, script, env = _job(args)
    runner = start(settings, serving=False)
    spec = JobSpec(uuid.uuid4().hex[:16], lang, script, env, args.timeout, args.workspace)
    result = runner.run(spec)
    runner.settle()
    return _report(result, args.json)


def cmd_submit(args: argparse.Namespace, settings: Settings) -> int:
    lang, script, env = _job(args)
    queue = _queue(settings)
    try:
        job_id = queue.submit(lang, script, env, args.timeout, args.tag, args.workspace)
    except ValueError as exc:  # a bad tag or workspace; the job itself was checked by _job
        _refuse(str(exc))
    waiting = queue.waiting_reason(args.tag)
    if waiting:
        log.warning("job %s: %s", job_id, waiting)
    if not args.wait:
        print(job_id)
        return 0
    job = queue.wait(job_id, args.wait_timeout)
    assert job.result is not None
    return _report(job.result, args.json)


def cmd_cancel(args: argparse.Namespace, settings: Settings) -> int:
    try:
        outcome = _queue(settings).cancel(args.job_id)
    except KeyError as exc:
        raise SystemExit(f"orvanta: {exc.args[0]}") from None
    print(f"{args.job_id}: {outcome}")
    return 0


def cmd_settings(args: argparse.Namespace, settings: Settings) -> int:
    from runtime.settings import JOB_ISOLATION_VALUES

    queue = _queue(settings)
    if args.unset:
        queue.set_setting(args.key, None)
    elif args.value is not None:
        if args.value not in JOB_ISOLATION_VALUES:
            raise SettingsError(args.key, args.value, ", ".join(JOB_ISOLATION_VALUES))
        queue.set_setting(args.key, args.value)
    print(f"{args.key}={queue.setting(args.key) or '(unset)'}")
    return 0


def cmd_doctor(args: argparse.Namespace, settings: Settings) -> int:
    from runtime.doctor import exit_code, render, run_checks

    checks = run_checks(settings)
    print(render(checks))
    return exit_code(checks)


def _report(result: JobResult, as_json: bool) -> int:
    """Print the job's output (or its record) and exit with the job's exit code."""
    if as_json:
        print(json.dumps(result.to_dict(), indent=2))
    else:
        for line in result.log:
            log.info("job %s: %s", result.job_id, line)
        sys.stdout.write(result.stdout)
        sys.stderr.write(result.stderr)
    if result.exit_code is None:
        return 1
    return result.exit_code


if __name__ == "__main__":
    sys.exit(main())
