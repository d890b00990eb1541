"""One cell under test: real `orvanta worker` processes holding canaries, probes sent as jobs.

For a table cell two workers share the cell's queue: the first runs a
long-lived "neighbour" job (the concurrently running job the page says others
must not reach), the second runs the probes one by one, from the moment the
neighbour is seen asleep: it sleeps only once it has planted its canaries.

On a platform of `mode: agent` the workers are agents (R-AGT-1..3): a real
`orvanta server` runs beside them over a throw-away PostgreSQL database whose
password is the canary secret; the agents get only its URL and their group's
token, and another group's job waits in the queue for agent_api to go after.
"""

from __future__ import annotations

import contextlib
import json
import logging
import secrets
import subprocess
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from conformance.canaries import NEIGHBOUR_NO_ROOM, PLANT_NEIGHBOUR, Canaries
from conformance.leftovers import note
from conformance.matrix import Cell, Matrix, Probe
from conformance.platforms import Platform, WorkerProcess
from conformance.platforms.session import owner_of
from conformance.service import Service, scratch_postgres
from runtime.executor import JobResult
from runtime.queue import JobQueue

log = logging.getLogger("orvanta.harness")
READY_LINE = "pulling jobs from"
START_TIMEOUT = 60.0
PROBE_TIMEOUT = 60.0
LIMIT_VARS = {
    "memory_mb": "ORVANTA_JOB_MEMORY_MB",
    "pids": "ORVANTA_JOB_PIDS",
    "cpu_seconds": "ORVANTA_JOB_CPU_SECONDS",
    "file_mb": "ORVANTA_JOB_FILE_SIZE_MB",
    "disk_mb": "ORVANTA_JOB_DISK_MB",
}
# The concurrently running job: it leaves data in its dir and, where its sandbox lets it, in
# /tmp, /dev/shm, a SysV segment and a POSIX queue, for neighbour_files and neighbour_ipc.
NEIGHBOUR = (
    'import os, sys\ntoken = os.environ["NEIGHBOUR_TOKEN"]\n'
    + PLANT_NEIGHBOUR
    # asleep under this name only once every canary is planted: `CellSession._wait_planted`
    + 'asleep = [sys.executable, "-c", "import time; time.sleep(900)"]\n'
    + 'os.execv(sys.executable, [*asleep, f"orvanta-neighbour-{token}"])\n'
)
# Probes that look for what the neighbour job holds here (its files, IPC, process, argv, dir):
# measured only while it runs (`CellSession._neighbour_gone`)
READS_NEIGHBOUR = frozenset(
    {
        "neighbour_files",
        "neighbour_ipc",
        "neighbour_process",
        "ps_listing",
        "proc_uncover",
        "state_jobs",
        "launcher_argv",
    }
)
# Kernel settings a probe may write back (with their current value): restored if one changed.
KERNEL_SETTINGS = (
    "/proc/sys/kernel/domainname",
    "/proc/sys/kernel/hostname",
    "/proc/sys/kernel/core_pattern",
    "/proc/sys/vm/swappiness",
    "/sys/kernel/mm/transparent_hugepage/khugepaged/defrag",
    "/sys/kernel/mm/ksm/run",
    "/sys/module/printk/parameters/time",
    "/sys/kernel/mm/transparent_hugepage/use_zero_page",
)


class HarnessError(RuntimeError):
    """The cell could not be set up; the message carries the worker's log."""


@dataclass
class ProbeRun:
    """What one probe did in one cell: the job record, its verdict, and what survived it."""

    cell: str
    probe: str
    result: JobResult
    verdict: dict[str, Any] | None
    survivors: list[str] = field(default_factory=list)

    @property
    def outcome(self) -> str:
        """The probe's own verdict; a process of the job that outlived it makes any probe's
        outcome exposed (R-JOB-3), whatever the probe said."""
        if self.verdict is None:
            return "error"
        if self.survivors and self.verdict.get("outcome") != "error":
            return "exposed"
        return str(self.verdict.get("outcome", "error"))


def parse_verdict(stdout: str) -> dict[str, Any] | None:
    """The probe's JSON verdict: its last non-empty stdout line."""
    lines = [line for line in stdout.splitlines() if line.strip()]
    if not lines:
        return None
    try:
        verdict = json.loads(lines[-1])
    except json.JSONDecodeError:
        return None
    return verdict if isinstance(verdict, dict) else None


class CellSession:
    def __init__(self, matrix: Matrix, cell: Cell, platform: Platform, root: Path) -> None:
        self.matrix = matrix
        self.cell = cell
        self.platform = platform
        self.root = root
        self.state_dir = root / "state"
        self.canaries = Canaries.plant(root)
        self.workers: list[tuple[WorkerProcess, Path]] = []
        self.queue: JobQueue | None = None
        self.neighbour_id: str | None = None
        self.exit_code: int | None = None  # set when the worker refused to start
        self.agent = matrix.mode(cell) == "agent"
        self.tag = "cell" if self.agent else "default"
        self.service: Service | None = None
        self.other_job = ""  # agent cells: another worker group's job, holding the secret
        self._agent_env: dict[str, str] = {}
        self._database_url: str | None = None
        self._cleanup = contextlib.ExitStack()
        self.neighbour_token = secrets.token_hex(8)
        note(root, "token", self.neighbour_token)  # a killed run's next run removes its plants

    # -- lifecycle -------------------------------------------------------------------------
    def start(self) -> None:
        self.state_dir.mkdir(parents=True, exist_ok=True)
        if self.agent:
            self._start_service()
        self.platform.start(self.root)
        victim = self.platform.probe_env().get("CANARY_CGROUP")
        if victim and Path(victim).is_dir():  # a group on this host (not a guest's)
            note(self.root, "victim", victim)
        self.platform.listen(self.canaries)
        first = self._spawn("worker-a")
        if self.cell.kind == "refuses_start":
            proc, _ = first
            try:
                self.exit_code = proc.wait(timeout=START_TIMEOUT)
            except Exception as exc:
                raise HarnessError(
                    f"worker did not exit within {START_TIMEOUT:g}s: {self.startup_log()}"
                ) from exc
            return
        self._wait_ready(first)
        self.queue = JobQueue(self.platform.queue_database(self._database_url, self.state_dir))
        if self.cell.kind == "table":
            self.neighbour_id = self.queue.submit(
                "python3",
                self._script(NEIGHBOUR),
                {"NEIGHBOUR_TOKEN": self.neighbour_token},
                900,
                tag=self.tag,
            )
            note(self.root, "job", self.neighbour_id)
            self._wait_running(self.neighbour_id)
            self._wait_ready(self._spawn("worker-b"))
            self._wait_planted(self.neighbour_id)

    def close(self) -> None:
        """Everything the cell started goes, whatever fails on the way (logged)."""
        if self.queue is not None and self.neighbour_id is not None:
            try:  # the workers' stop kills it anyway
                self.queue.cancel(self.neighbour_id)
            except Exception:
                log.exception("cell %s: cannot cancel the neighbour job", self.cell.id)
        self.platform.stop_workers()
        for proc, _ in self.workers:
            if proc.poll() is None:
                proc.terminate()
        for proc, _ in self.workers:
            try:
                proc.wait(timeout=15)
            except Exception:
                proc.kill()
                proc.wait()
        if self.queue is not None:
            with contextlib.suppress(Exception):  # a relay that died already said why
                self.queue.close()
        self.platform.cleanup(self.neighbour_token)
        self._cleanup.close()
        self.canaries.close()

    def _start_service(self) -> None:
        """The server agents talk to, its PostgreSQL password the canary secret."""
        url = self._cleanup.enter_context(
            scratch_postgres("orvanta_cell", password=self.canaries.secret)
        )
        self._database_url = url
        # `server: unix` (agents in containers with no network): the socket lies in the cell
        # root, which the container mounts at the same path
        unix = self.platform.spec.server == "unix"
        self.service = Service.start(url, self.root / "srv", unix_socket=unix)
        self._cleanup.callback(self.service.stop)
        token = self.service.create_group("cell", [self.tag])
        self.service.create_group("other", ["other"])
        self.other_job = self.service.submit(
            "print('another group')\n", env={"OTHER_SECRET": self.canaries.secret}, tag="other"
        )
        self._agent_env = {
            "MODE": "agent",
            "ORVANTA_SERVER_URL": self.service.url,
            "ORVANTA_AGENT_TOKEN": token,
        }

    # -- probes ----------------------------------------------------------------------------
    def run_probe(self, probe: Probe) -> ProbeRun:
        """Submit the probe (an earlier planting job first, for two-stage probes), then remove
        whatever it may have left and put back any kernel setting it changed."""
        assert self.queue is not None, "cell not started"
        token = secrets.token_hex(8)
        note(self.root, "token", token)
        env = self.canaries.job_env(token, self.matrix.limits_for(self.cell))
        env.update(self.platform.probe_env())
        nb = self.neighbour_token
        env.update(
            {
                "CANARY_NEIGHBOUR_TMP": f"/tmp/orvanta-neighbour-{nb}",
                "CANARY_NEIGHBOUR_SHM": f"/dev/shm/orvanta-neighbour-{nb}",
                "CANARY_NEIGHBOUR_SYSV_KEY": str(int(nb[:7], 16) | 0x4F000000),
                "CANARY_NEIGHBOUR_MQ": f"/orvanta-neighbour-{nb}",
            }
        )
        if self.service is not None:
            env.update({"PROBE_SERVER_URL": self.service.url, "PROBE_OTHER_JOB": self.other_job})
        volume = self.state_dir / "volumes" / "default" / probe.name
        env["PROBE_VOLUME_HOST"] = str(volume)
        gone = self._neighbour_gone(probe)
        if gone is not None:  # its canaries may be gone too: nothing to measure against
            never_ran = JobResult("not-run", self.cell.backend, "error", None, 0.0, "", "", [])
            return ProbeRun(self.cell.id, probe.name, never_ran, gone, [])
        kernel = _read_all(KERNEL_SETTINGS)
        try:
            if probe.stages == 2:
                planted = self._probe_job(probe, {**env, "PROBE_STAGE": "plant"})
                verdict = parse_verdict(planted.stdout) or _refusal(probe, planted)
                if verdict is None or verdict.get("outcome") == "error" or verdict.get("refused"):
                    return ProbeRun(self.cell.id, probe.name, planted, verdict, [])
                attack = {k: v.replace("{volume}", str(volume)) for k, v in probe.attack_env}
                env = {**env, **attack, "PROBE_STAGE": "attack"}
            result = self._probe_job(probe, env)
            verdict = parse_verdict(result.stdout) or _refusal(probe, result)
            survivors = self.platform.survivors(token)
            gone = self._neighbour_gone(probe)
            exposed = survivors or (verdict or {}).get("outcome") == "exposed"
            if gone is not None and not exposed:
                verdict = gone  # "blocked" may only mean its canaries had gone meanwhile
        finally:
            self.platform.cleanup(token)
            _restore(kernel)
            _restore_volume(volume)
        return ProbeRun(self.cell.id, probe.name, result, verdict, survivors)

    def _neighbour_gone(self, probe: Probe) -> dict[str, Any] | None:
        """For a probe that looks for what the neighbour holds, once the neighbour job is no
        longer running: an error verdict with its output. A neighbour that found no room to
        plant exits (NEIGHBOUR_NO_ROOM) instead of leaving channels that read as closed."""
        if probe.name not in READS_NEIGHBOUR or self.neighbour_id is None or self.queue is None:
            return None
        job = self.queue.get(self.neighbour_id)
        if job is not None and job.status != "done":
            return None
        result = job.result if job is not None else None
        said = (result.stdout + result.stderr).strip()[-600:] if result else ""
        code = result.exit_code if result else None
        why = (
            "no room to plant"
            if code == NEIGHBOUR_NO_ROOM
            else (result.status if result else "gone")
        )
        return {
            "probe": probe.name,
            "outcome": "error",
            "not_measured": f"the neighbour job {self.neighbour_id} ended ({why}, exit {code}) "
            "before this probe was done: what it held may be gone",
            "evidence": said or "no output",
        }

    def _probe_job(self, probe: Probe, env: dict[str, str]) -> JobResult:
        """One job of the probe; a submission the queue refuses is the runtime's answer too."""
        assert self.queue is not None
        try:
            job_id = self.queue.submit(
                probe.language,
                self._script(probe.script.read_text()),
                env,
                PROBE_TIMEOUT,
                tag=self.tag,
            )
        except ValueError as exc:
            return _refused(self.cell.backend, exc)
        note(self.root, "job", job_id)  # a killed run's next run kills what is left of it
        job = self.queue.wait(job_id, PROBE_TIMEOUT + 30)
        assert job.result is not None
        return job.result

    def run_script(self, language: str, script: str) -> JobResult:
        """One job; a submission the queue refuses comes back as that job's error."""
        assert self.queue is not None, "cell not started"
        try:
            job_id = self.queue.submit(language, self._script(script), {}, 30, tag=self.tag)
        except ValueError as exc:
            return _refused(self.cell.backend, exc)
        note(self.root, "job", job_id)
        job = self.queue.wait(job_id, 60)
        assert job.result is not None
        return job.result

    def startup_log(self) -> str:
        """The first worker's log, with the canary secret masked."""
        if not self.workers:
            return ""
        return self.canaries.mask(self.workers[0][1].read_text(errors="replace"))

    def workers_alive(self) -> bool:
        return all(proc.poll() is None for proc, _ in self.workers)

    # -- helpers ---------------------------------------------------------------------------
    def _script(self, text: str) -> str:
        return f"{self.cell.annotate}\n{text}" if self.cell.annotate else text

    def _worker_env(self) -> dict[str, str]:
        env = self.platform.base_env()
        env.update(self.cell.env)
        env["CANARY_FILE"] = str(self.canaries.secret_file)
        limits = self.matrix.limits_for(self.cell)
        env.update({var: str(limits[k]) for k, var in LIMIT_VARS.items() if k in limits})
        # a worker holds its queue's credentials; an agent only the server's URL and its token
        env.update(self._agent_env or self.canaries.worker_env(self.state_dir))
        env["ORVANTA_STATE_DIR"] = str(self.state_dir)
        env["ORVANTA_JOB_TIMEOUT"] = str(int(PROBE_TIMEOUT))
        return env

    def _spawn(self, name: str) -> tuple[WorkerProcess, Path]:
        log_path = self.root / f"{name}.log"
        proc = self.platform.spawn_worker(self._worker_env(), log_path, (self.canaries.fd,))
        if self.platform.spec.driver == "host" and isinstance(proc, subprocess.Popen):
            note(self.root, "worker", owner_of(proc.pid))  # a killed run's survives it
        self.workers.append((proc, log_path))
        return proc, log_path

    def _wait_ready(self, worker: tuple[WorkerProcess, Path]) -> None:
        proc, log_path = worker
        end = time.monotonic() + START_TIMEOUT
        while time.monotonic() < end:
            if READY_LINE in log_path.read_text(errors="replace"):
                return
            if proc.poll() is not None:
                raise HarnessError(
                    f"worker exited with {proc.poll()} at start:\n"
                    f"{self.canaries.mask(log_path.read_text(errors='replace'))}"
                )
            time.sleep(0.02)
        raise HarnessError(f"worker not ready after {START_TIMEOUT:g}s:\n{log_path.read_text()}")

    def _wait_running(self, job_id: str) -> None:
        assert self.queue is not None
        end = time.monotonic() + START_TIMEOUT
        while time.monotonic() < end:
            job = self.queue.get(job_id)
            if job is not None and job.status != "queued":
                return
            time.sleep(0.02)
        raise HarnessError(f"neighbour job {job_id} was never picked up")

    def _wait_planted(self, job_id: str) -> None:
        """Until the neighbour sleeps, which it does once it has planted every canary: a probe
        sent earlier would read a canary not yet planted as a channel that holds. A neighbour
        that ended instead (no room to plant, or refused) leaves its probes unmeasured
        (`_neighbour_gone`)."""
        assert self.queue is not None
        asleep = f"orvanta-neighbour-{self.neighbour_token}"
        end = time.monotonic() + START_TIMEOUT
        while time.monotonic() < end:
            if self.platform.survivors(asleep):
                return
            job = self.queue.get(job_id)
            if job is not None and job.status == "done":
                return
            time.sleep(0.2)  # a look may be a `docker exec` (gVisor) or a UML guest's scan
        raise HarnessError(
            f"neighbour job {job_id} runs but was not seen asleep (a process named {asleep}) "
            f"within {START_TIMEOUT:g}s: its canaries may not be planted, so no probe is sent"
        )


def _read_all(paths: tuple[str, ...]) -> dict[str, bytes]:
    values = {}
    for path in paths:
        with contextlib.suppress(OSError):
            values[path] = Path(path).read_bytes()
    return values


def _restore(before: dict[str, bytes]) -> None:
    """Put back any kernel setting a probe changed (probes only write back current values)."""
    for path, value in _read_all(tuple(before)).items():
        if value != before[path]:
            with contextlib.suppress(OSError):
                Path(path).write_bytes(before[path])


def _restore_volume(volume: Path) -> None:
    """A probe that replaced its volume by a symlink: the link goes, the directory comes back."""
    if not volume.is_symlink():
        return
    volume.unlink()
    for original in volume.parent.glob(f"{volume.name}.orig-*"):
        original.rename(volume)
        break


def _refusal(probe: Probe, result: JobResult) -> dict[str, Any] | None:
    """A job refused before it ran, for the very thing the probe tries (a poisoned volume, a
    refused variable): the runtime held, which is the probe's "blocked"."""
    if result.status != "error" or not any(t in result.stderr for t in probe.refused_with):
        return None
    return {
        "probe": probe.name,
        "outcome": "blocked",
        "refused": True,
        "evidence": result.stderr[-800:],
    }


def _refused(backend: str, exc: ValueError) -> JobResult:
    """The record of a job the queue refused at submission (it never ran)."""
    return JobResult(
        "refused", backend, "error", None, 0.0, "", str(exc), [f"refused at submission: {exc}"]
    )
