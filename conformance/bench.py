"""`orvanta bench`: what each backend costs per job, against the raw tool, in the same run.

The machine is noisy, so every number is a median over many runs and every
claim is a ratio: the runtime's time for a trivial job divided by the raw tool
launching the same command, measured interleaved (runtime, raw, runtime, ...)
so that both see the same noise.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any

from conformance import bench_queue
from runtime import idmap
from runtime.backends.nsjail import render_config
from runtime.backends.unshare import drop_caps, launch_flags
from runtime.executor import JobRunner
from runtime.idmap import let_jobs_through
from runtime.jobs import JobSpec
from runtime.settings import Settings
from runtime.startup import probe_host

BACKEND_ENV = {
    "none": {},
    "unshare": {"ENABLE_UNSHARE_PID": "true"},
    "nsjail": {"DISABLE_NSJAIL": "false"},
}
SCRIPTS = {"bash": "true\n", "python3": "pass\n"}


def register(sub: Any) -> None:
    bench = sub.add_parser("bench", help="per-job overhead vs the raw tools, and worker throughput")
    bench.add_argument("--runs", type=int, default=40, help="jobs per measurement (default 40)")
    bench.add_argument("--backend", default="all", choices=(*BACKEND_ENV, "all"))
    bench.add_argument("--throughput-jobs", type=int, default=300)
    bench.add_argument("--json", type=Path, default=None, help="also write the results here")
    bench.add_argument("--markdown", action="store_true", help="print the README table")
    bench.add_argument(
        "--repeat",
        type=int,
        default=1,
        help="whole runs, one after another: every figure is then their median, with each "
        "run's headline figures beside it (default 1; issue 17's targets are read on 3)",
    )
    bench_queue.add_arguments(bench)
    bench.set_defaults(func=bench_command)


def bench_command(args: argparse.Namespace, settings: Settings) -> int:
    header = {
        "date": time.strftime("%Y-%m-%d"),
        "machine": f"{platform.node()}: {os.cpu_count()} cores, {platform.release()}",
    }
    postgres = bench_queue.postgres_url(settings.database_url)
    if args.queue and args.repeat != 1:
        raise SystemExit(
            "orvanta bench: --repeat is for the per-job and throughput runs, not --queue"
        )
    if args.queue:
        results = {**header, **bench_queue.run(args, postgres)}
        return _emit(results, args, bench_queue.markdown)
    if args.repeat < 1:
        raise SystemExit(f"orvanta bench: --repeat must be 1 or more, not {args.repeat}")
    backends = list(BACKEND_ENV) if args.backend == "all" else [args.backend]
    runs = []
    for n in range(args.repeat):
        if args.repeat > 1:
            _progress(f"run {n + 1} of {args.repeat}")
        runs.append(one_run(args, backends, postgres))
    results = {**header, **(runs[0] if len(runs) == 1 else combine(runs))}
    results["targets"] = targets(results)
    return _emit(results, args, markdown)


def one_run(args: argparse.Namespace, backends: list[str], postgres: str | None) -> dict[str, Any]:
    """The floor, then per backend the per-job rows and the throughput rows."""
    results: dict[str, Any] = {"runs": args.runs, "per_job": [], "throughput": []}
    results["floor"] = floor(args.runs)
    _progress(
        f"floor    bash     guarantees {results['floor']['guarded_ms']['median']:7.2f} ms  "
        f"raw {results['floor']['raw_ms']['median']:7.2f} ms  ratio {results['floor']['ratio']:.2f}"
    )
    for backend in backends:
        for language in SCRIPTS:
            row = per_job(backend, language, args.runs)
            results["per_job"].append(row)
            _progress(
                f"{backend:8} {language:8} runtime {row['runtime_ms']['median']:7.2f} ms  "
                f"raw {row['raw_ms']['median']:7.2f} ms  ratio {row['ratio']:.2f}  "
                f"overhead {row['overhead_ms']:+.2f} ms"
            )
        for row in throughput(backend, args.throughput_jobs, postgres):
            results["throughput"].append(row)
            _progress(
                f"{backend:8} throughput {row['worker_jobs_per_s']:6.1f} jobs/s "
                f"({row['database']}, {row['workers']} worker(s)), raw ceiling "
                f"{row['raw_jobs_per_s']:6.1f}/s ({row['share']:.0%})"
            )
    return results


# Issue 17's targets, for bash jobs on every backend: the worker's overhead over the raw
# tool, and its jobs/s through the queue (SQLite, one worker) as a share of the raw tool's
OVERHEAD_TARGET_MS = 0.5
SHARE_TARGET = 0.8
HEADLINE = ("overhead_ms", "ratio", "share", "worker_jobs_per_s", "raw_jobs_per_s")


def combine(runs: list[dict[str, Any]]) -> dict[str, Any]:
    """Several runs as one: every number the median of the runs' (a row with the row in the
    same place of every run: each run measures the same backends and queues in the same
    order), each headline figure's values kept as `NAME_runs`."""
    first = runs[0]
    return {
        "runs": first["runs"],
        "repeat": len(runs),
        "floor": _median_row([run["floor"] for run in runs]),
        "per_job": [
            _median_row([run["per_job"][i] for run in runs]) for i in range(len(first["per_job"]))
        ],
        "throughput": [
            _median_row([run["throughput"][i] for run in runs])
            for i in range(len(first["throughput"]))
        ],
    }


def _median_row(rows: list[dict[str, Any]]) -> dict[str, Any]:
    merged: dict[str, Any] = {}
    for key, value in rows[0].items():
        if isinstance(value, dict):
            merged[key] = _median_row([row[key] for row in rows])
        elif isinstance(value, (int, float)) and not isinstance(value, bool):
            values = [row[key] for row in rows]
            merged[key] = round(statistics.median(values), 3)
            if key in HEADLINE:
                merged[f"{key}_runs"] = values
        else:
            merged[key] = value
    return merged


def targets(results: dict[str, Any]) -> list[dict[str, Any]]:
    """Per backend, issue 17's two targets against the bash rows: met or not, and by what."""
    rows = []
    for job in results["per_job"]:
        if job["language"] != "bash":
            continue
        backend = job["backend"]
        share = next(
            (
                t["share"]
                for t in results["throughput"]
                if t["backend"] == backend and t["database"] == "sqlite" and t["workers"] == 1
            ),
            None,
        )
        rows.append(
            {
                "backend": backend,
                "overhead_ms": job["overhead_ms"],
                "overhead_met": job["overhead_ms"] <= OVERHEAD_TARGET_MS,
                "share": share,
                "share_met": share is not None and share >= SHARE_TARGET,
            }
        )
    return rows


def _emit(
    results: dict[str, Any], args: argparse.Namespace, table: Callable[[dict[str, Any]], str]
) -> int:
    if args.json:
        args.json.write_text(json.dumps(results, indent=2) + "\n")
    print(table(results) if args.markdown else json.dumps(results, indent=2))
    return 0


def bench_env(backend: str, tmp: str) -> dict[str, str]:
    """A worker of `backend` whose state (0700) and job dirs both live in the temporary dir."""
    return {
        **BACKEND_ENV[backend],
        "ORVANTA_STATE_DIR": f"{tmp}/state",
        "ORVANTA_JOBS_DIR": f"{tmp}/jobs",
    }


def per_job(backend: str, language: str, runs: int) -> dict[str, Any]:
    """Interleaved runs of one trivial job through the runtime and through the raw tool."""
    with tempfile.TemporaryDirectory(prefix="orvanta-bench-") as tmp:
        let_jobs_through(Path(tmp))  # jobs run as ORVANTA_JOB_UID and walk to their dirs
        settings = Settings.from_env(bench_env(backend, tmp))
        runner = JobRunner(settings, probe_host(settings), tmpfs_root=True)  # as a worker's
        raw = raw_command(backend, language, settings, Path(tmp))
        spec = SCRIPTS[language]

        def through_runtime() -> None:
            result = runner.run(JobSpec(uuid.uuid4().hex[:16], language, spec))
            assert result.status == "success" and result.isolation == backend, result

        def through_raw() -> None:
            subprocess.run(
                raw,
                stdin=subprocess.DEVNULL,
                stdout=subprocess.DEVNULL,
                stderr=subprocess.DEVNULL,
                check=True,
            )

        # The teardown waits for the worker's next pause (runtime.tidier): here it is run,
        # untimed, between the runtime's sample and the raw tool's, which it would slow.
        runtime_s, raw_s = _interleaved(through_runtime, through_raw, runs, runner.wait_teardowns)
        runner.close()
    runtime_ms, raw_ms = _stats(runtime_s), _stats(raw_s)
    return {
        "backend": backend,
        "language": language,
        "raw_command": " ".join(raw),
        "runtime_ms": runtime_ms,
        "raw_ms": raw_ms,
        "ratio": round(runtime_ms["median"] / raw_ms["median"], 3),
        "overhead_ms": round(runtime_ms["median"] - raw_ms["median"], 3),
    }


def floor(runs: int) -> dict[str, Any]:
    """What the per-job guarantees cost with no runtime around them: the lower bound.

    A bare `bash -c true`, against the same with only what every job gets: its own
    directory (a tmpfs of ORVANTA_JOB_DISK_MB where the worker may mount) and script, a
    tracking cgroup the spawn is born in (where cgroups are writable), piped output, and
    the removal of both. Interleaved, like per_job.
    """
    from runtime.cgroups import JobCgroup
    from runtime.jobdir import JobDir

    argv = ["/bin/bash", "-c", "true"]

    def bare() -> None:
        subprocess.run(argv, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, check=True)

    mount = os.geteuid() == 0
    with tempfile.TemporaryDirectory(prefix="orvanta-bench-") as tmp:

        def guarded() -> None:
            owner = (os.geteuid(), os.getegid())
            place = JobDir.create(Path(tmp), uuid.uuid4().hex[:16], owner, 256, mount)
            (place.job_dir / "main.sh").write_text("true\n")
            cgroup = JobCgroup.create(place.root.name)
            entered = cgroup.entered() if cgroup is not None else contextlib.nullcontext()
            with entered:
                proc = subprocess.Popen(
                    ["/bin/bash", str(place.job_dir / "main.sh")],
                    stdin=subprocess.DEVNULL,
                    stdout=subprocess.PIPE,
                    stderr=subprocess.PIPE,
                    cwd=place.job_dir,
                    start_new_session=True,
                )
            proc.communicate()
            place.remove()
            if cgroup is not None:
                cgroup.remove()

        guarded_s, bare_s = _interleaved(guarded, bare, runs)
    raw_ms, guarded_ms = _stats(bare_s), _stats(guarded_s)
    return {
        "raw_ms": raw_ms,
        "guarded_ms": guarded_ms,
        "ratio": round(guarded_ms["median"] / raw_ms["median"], 3),
        "overhead_ms": round(guarded_ms["median"] - raw_ms["median"], 3),
    }


def raw_command(backend: str, language: str, settings: Settings, tmp: Path) -> list[str]:
    """The raw tool launching the same trivial command, as an operator would by hand, with the
    same isolation the runtime gives: the hardened unshare flags (the job's root mapped to
    ORVANTA_JOB_UID, which needs the id-map helpers on PATH) with the job's capabilities
    dropped, and nsjail's config."""
    script = tmp / ("raw.sh" if language == "bash" else "raw.py")
    script.write_text(SCRIPTS[language])
    command = (
        ["/bin/bash", str(script)]
        if language == "bash"
        else [settings.python_path, "-u", str(script)]
    )
    caps = probe_host(settings)
    unshare, nsjail = caps.of("unshare").path, caps.of("nsjail").path
    if backend == "unshare":
        assert unshare and caps.tini.path
        helpers = f"PATH={idmap.launcher_env(settings)['PATH']}"
        flags = launch_flags(settings, unshare)
        return [
            "/usr/bin/env",
            helpers,
            unshare,
            *flags,
            "--",
            *drop_caps(flags),
            caps.tini.path,
            "-s",
            "--",
            *command,
        ]
    if backend == "nsjail":
        assert nsjail
        job_dir = tmp / "rawjob"
        job_dir.mkdir(exist_ok=True)
        (job_dir / script.name).write_text(SCRIPTS[language])
        os.chown(job_dir, *idmap.job_owner(settings))
        config = tmp / f"raw-{language}.cfg"
        config.write_text(render_config(language, settings, job_dir, timeout=30))
        inner = (
            ["/bin/bash", f"/job/{script.name}"]
            if language == "bash"
            else [settings.python_path, "-u", f"/job/{script.name}"]
        )
        return [nsjail, "-Mo", "--config", str(config), "--", *inner]
    return command


def throughput(backend: str, jobs: int, postgres: str | None = None) -> list[dict[str, Any]]:
    """Trivial Bash jobs/s through the queue, against the raw tool's rate: one worker on
    SQLite, and one and two workers on PostgreSQL when DATABASE_URL names one."""
    raw_rate = raw_jobs_per_s(backend, jobs)
    setups = [("sqlite", 1)] + ([("postgresql", 1), ("postgresql", 2)] if postgres else [])
    rows = []
    for database, workers in setups:
        with bench_queue.scratch_url(database, postgres) as url:
            rate = worker_jobs_per_s(backend, jobs, url, workers)
        rows.append(
            {
                "backend": backend,
                "database": database,
                "workers": workers,
                "jobs": jobs,
                "worker_jobs_per_s": round(rate, 1),
                "raw_jobs_per_s": round(raw_rate, 1),
                "share": round(rate / raw_rate, 3),
            }
        )
    return rows


def worker_jobs_per_s(backend: str, jobs: int, database_url: str | None, workers: int) -> float:
    """`workers` `orvanta worker` processes on one queue (SQLite in the first one's state dir
    without a URL), sent the jobs once all of them pull jobs: the rate between the first
    job's end and the last one's, as the queue recorded them. Neither the workers' start
    nor an idle worker's poll interval (up to 0.2 s before it sees the first job) is part
    of a rate of jobs run one after another."""
    # not at import: `orvanta` loads this module for every command, and an agent loads no
    # database driver (R-AGT-1)
    from runtime.queue import JobQueue
    from runtime.store.schema import FINISHED

    with tempfile.TemporaryDirectory(prefix="orvanta-bench-") as tmp:
        let_jobs_through(Path(tmp))
        queue = JobQueue.open(database_url, Path(tmp) / "state-0")
        procs, logs = [], []
        try:
            for n in range(workers):
                env = {**os.environ, **bench_env(backend, tmp)}
                env.update(ORVANTA_STATE_DIR=f"{tmp}/state-{n}", ORVANTA_JOBS_DIR=f"{tmp}/jobs-{n}")
                env.pop("DATABASE_URL", None)  # the bench's own is not this queue
                if database_url:
                    env["DATABASE_URL"] = database_url
                log = Path(tmp) / f"worker-{n}.log"  # a file: a full pipe would stall it
                with open(log, "wb") as out:
                    procs.append(
                        subprocess.Popen(
                            [sys.executable, "-m", "runtime.cli", "worker", "--name", f"b{n}"],
                            env=env,
                            stdin=subprocess.DEVNULL,
                            stdout=subprocess.DEVNULL,
                            stderr=out,
                        )
                    )
                logs.append(log)
            while not all("pulling jobs" in log.read_text(errors="replace") for log in logs):
                for proc, log in zip(procs, logs, strict=True):
                    if proc.poll() is not None:
                        raise RuntimeError(f"bench worker exited at start: {log.read_text()}")
                time.sleep(0.005)  # start-up is not part of the rate
            started = time.monotonic()
            # one commit, and a slow poll: the bench's own queue work would take a core's
            # share from the workers it measures (the raw loop has none beside it)
            with queue.db.transaction():
                ids = [queue.submit("bash", SCRIPTS["bash"]) for _ in range(jobs)]
            queue.wait(ids[-1], 300, poll=0.1)
            while queue.counts().get("done", 0) < jobs and time.monotonic() - started < 300:
                time.sleep(0.1)  # with two workers the last submitted is not the last done
            first, last, done = queue.db.query(
                f"SELECT MIN(finished), MAX(finished), COUNT(*) FROM {FINISHED}"
            )[0]
        finally:
            for proc in procs:
                proc.terminate()
            for proc in procs:
                proc.wait(30)
            queue.close()
    if done < 2 or last <= first:
        raise RuntimeError(f"bench: {done} of {jobs} jobs done; no rate to report")
    return float((done - 1) / (last - first))


def raw_jobs_per_s(backend: str, jobs: int) -> float:
    """The raw tool launching the same job `jobs` times, one after another."""
    with tempfile.TemporaryDirectory(prefix="orvanta-bench-") as tmp:
        let_jobs_through(Path(tmp))
        settings = Settings.from_env(bench_env(backend, tmp))
        raw = raw_command(backend, "bash", settings, Path(tmp))
        started = time.monotonic()
        for _ in range(jobs):
            subprocess.run(
                raw,
                stdin=subprocess.DEVNULL,
                stdout=subprocess.DEVNULL,
                stderr=subprocess.DEVNULL,
                check=True,
            )
        return jobs / (time.monotonic() - started)


def markdown(results: dict[str, Any]) -> str:
    repeat = results.get("repeat", 1)
    lines = [
        f"Measured {results['date']} on {results['machine']}; medians over {results['runs']} "
        "interleaved runs"
        + (
            f"; every figure is the median of {repeat} whole bench runs (each run's in brackets)."
            if repeat > 1
            else "."
        ),
        "",
        "| backend | job | runtime median (p95) | raw tool median (p95) | ratio | overhead |",
        "|---|---|---|---|---|---|",
    ]
    for r in results["per_job"]:
        lines.append(
            f"| {r['backend']} | {r['language']} | {r['runtime_ms']['median']:.2f} ms "
            f"({r['runtime_ms']['p95']:.2f}) | {r['raw_ms']['median']:.2f} ms "
            f"({r['raw_ms']['p95']:.2f}) | {r['ratio']:.2f}x | {r['overhead_ms']:+.2f} ms"
            f"{_each(r, 'overhead_ms', '{:+.2f}')} |"
        )
    if "floor" in results:
        f = results["floor"]
        lines.append(
            f"| (floor: guarantees only) | bash | {f['guarded_ms']['median']:.2f} ms "
            f"({f['guarded_ms']['p95']:.2f}) | {f['raw_ms']['median']:.2f} ms "
            f"({f['raw_ms']['p95']:.2f}) | {f['ratio']:.2f}x | {f['overhead_ms']:+.2f} ms |"
        )
    lines += [
        "",
        "| backend | queue | workers | worker jobs/s | raw tool jobs/s | share |",
        "|---|---|---|---|---|---|",
    ]
    for t in results["throughput"]:
        lines.append(
            f"| {t['backend']} | {t['database']} | {t['workers']} | {t['worker_jobs_per_s']} | "
            f"{t['raw_jobs_per_s']} | {t['share']:.0%}{_each(t, 'share', '{:.0%}')} |"
        )
    if results.get("targets"):
        lines += [
            "",
            f"| backend | overhead (target at most +{OVERHEAD_TARGET_MS} ms) | jobs/s share, "
            f"SQLite, 1 worker (target at least {SHARE_TARGET:.0%}) |",
            "|---|---|---|",
        ]
        for t in results["targets"]:
            share = "not measured" if t["share"] is None else f"{t['share']:.0%}"
            lines.append(
                f"| {t['backend']} | {t['overhead_ms']:+.2f} ms "
                f"{'met' if t['overhead_met'] else 'not met'} | "
                f"{share} {'met' if t['share_met'] else 'not met'} |"
            )
    return "\n".join(lines)


def _each(row: dict[str, Any], key: str, form: str) -> str:
    """Each run's value of a headline figure, where there were several runs."""
    values = row.get(f"{key}_runs")
    return f" ({', '.join(form.format(v) for v in values)})" if values else ""


def _interleaved(
    first: Callable[[], None],
    second: Callable[[], None],
    runs: int,
    between: Callable[[], None] = lambda: None,
) -> tuple[list[float], list[float]]:
    """Seconds per call of each, alternating so that machine noise hits both alike;
    `between` runs untimed after each call of `first`, so that what it left behind
    (the runtime's teardown) does not slow the timing of `second`."""
    for _ in range(3):  # warm caches and the page cache for both
        first()
        between()
        second()
    first_s, second_s = [], []
    for _ in range(runs):
        first_s.append(_timed(first))
        between()
        second_s.append(_timed(second))
    return first_s, second_s


def _timed(fn: Callable[[], None]) -> float:
    started = time.perf_counter()
    fn()
    return time.perf_counter() - started


def _stats(samples: list[float]) -> dict[str, float]:
    ms = sorted(s * 1000 for s in samples)
    return {
        "median": round(statistics.median(ms), 3),
        "p95": round(ms[min(len(ms) - 1, int(len(ms) * 0.95))], 3),
        "min": round(ms[0], 3),
    }


def _progress(message: str) -> None:
    print(f"[bench] {message}", file=sys.stderr, flush=True)
