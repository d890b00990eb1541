"""`orvanta audit --server URL --tag TAG`: the hostile probes as ordinary jobs of a live service.

For each tag it finds the live workers serving it, plants its canaries as jobs (a concurrent
neighbour, earlier jobs' leftovers; conformance/remote_jobs.py), submits every probe as a job
of the tag and reads each verdict, the isolation the job reported and the worker that ran
it. The tags run in parallel, each tag's probes one after another. The report is the local
audit's (one cell `remote/<tag>`), written by conformance/remote_report.py.
"""

from __future__ import annotations

import json
import secrets
import threading
import time
from collections import Counter
from dataclasses import dataclass, field
from typing import Any

from conformance.canaries import MARKER, NEIGHBOUR_NO_ROOM, Canaries
from conformance.harness import parse_verdict
from conformance.matrix import Matrix
from conformance.remote_api import AdminAPI, Submitted
from conformance.remote_jobs import (
    AUDIT_WORKSPACE,
    LEFTOVERS,
    LITTER_REASON,
    LITTERS,
    MARK_VAR,
    NEEDS_NEIGHBOUR,
    PROBE_TIMEOUT,
    SCANS,
    STOPPER,
    UNKNOWN_VOLUME,
    PlannedProbe,
    neighbour_env,
    neighbour_script,
    plan,
    probe_env,
)

WAIT_SLACK = 30.0  # beyond a job's own timeout: the queue may hold it a moment
NEIGHBOUR_SETTLE = 1.5  # after it is claimed, until its listeners are bound
QUEUE_TIMEOUT = 30.0  # a job nobody claims in this long: no live worker takes the tag


@dataclass
class RemoteRun:
    """One probe in one tag: its verdict, the job's reported isolation and its worker."""

    probe: PlannedProbe
    measured: str  # blocked | exposed | error
    raw: dict[str, Any]  # the verdict (or the job's output), masked when reported
    isolation: str = ""
    worker: str = ""
    job: str = ""
    exit_code: int | None = None
    duration: float = 0.0


@dataclass
class TagResult:
    tag: str
    workers: list[dict[str, Any]] = field(default_factory=list)
    runs: list[RemoteRun] = field(default_factory=list)
    not_measured: dict[str, str] = field(default_factory=dict)
    could_not_run: str = ""
    notes: list[str] = field(default_factory=list)

    @property
    def agent(self) -> bool:
        return any(w.get("mode") == "agent" for w in self.workers)

    @property
    def isolation(self) -> str:
        """The isolation most of the tag's jobs reported ("" before any ran)."""
        seen = Counter(r.isolation for r in self.runs if r.isolation and r.isolation != "refused")
        return seen.most_common(1)[0][0] if seen else ""


class TagAudit:
    def __init__(self, api: AdminAPI, matrix: Matrix, tag: str, session: str) -> None:
        self.api = api
        self.matrix = matrix
        self.tag = tag
        self.session = session
        self.result = TagResult(tag)
        self.secret = f"{MARKER}_{secrets.token_hex(12)}"
        self.nb = secrets.token_hex(8)
        self.abstract = f"orvanta-audit-{secrets.token_hex(6)}"
        self.port = 0
        self.neighbour = ""
        self.other_job = ""
        self.stopping = threading.Event()  # set on Ctrl-C: no further probe is submitted

    def run(self, log: Any = print) -> TagResult:
        res = self.result
        res.workers = [w for w in self.api.workers() if self.tag in w.get("tags", ())]
        if not res.workers:
            res.could_not_run = f"no live worker serves tag {self.tag!r} (GET /api/workers)"
            return res
        probes, res.not_measured = plan(self.matrix, res.agent)
        try:
            self._plant()
            for probe in probes:
                if self.stopping.is_set():
                    res.could_not_run = "interrupted"
                    break
                if probe.name in NEEDS_NEIGHBOUR and not self.neighbour:
                    res.not_measured[probe.name] = res.notes[-1]
                    continue
                if probe.name in LEFTOVERS and res.isolation in LITTERS:
                    res.not_measured[probe.name] = LITTER_REASON
                    continue
                gone = self._neighbour_gone(probe)
                if gone:
                    res.not_measured[probe.name] = gone
                    continue
                run = self._run_probe(probe)
                if run is None:
                    continue
                gone = self._neighbour_gone(probe)
                if gone and run.measured != "exposed":  # "blocked" may mean it had gone
                    res.not_measured[probe.name] = gone
                    continue
                res.runs.append(run)
                log(f"remote/{self.tag}: {probe.name}: {run.measured} ({run.isolation})")
                if run.raw.get("never_claimed"):
                    res.could_not_run = f"{probe.name}: no worker of tag {self.tag!r} took it"
                    break
        finally:
            self._stop()
        return res

    # -- canaries --------------------------------------------------------------------------
    def _plant(self) -> None:
        """The neighbour (where a second worker can take the probes) and another tag's job."""
        if self.result.agent:
            other = self._submit(
                "python3",
                "print('another tag')\n",
                {"OTHER_SECRET": self.secret},
                tag=f"orvanta-audit-other-{self.session}",
            )
            self.other_job = other.id or ""
        if len(self.result.workers) < 2:
            self.result.notes.append(
                f"only {len(self.result.workers)} live worker serves tag {self.tag!r}: a "
                "concurrent neighbour job would hold it, so the neighbour's canaries are not "
                "planted"
            )
            return
        for _ in range(3):  # a port taken on the worker's host: the neighbour exits, try another
            self.port = 20000 + secrets.randbelow(40000)
            env = neighbour_env(self.nb, self.secret, self.port, self.abstract)
            job = self._submit("python3", neighbour_script(), env, timeout=600)
            if job.id is None:
                self.result.notes.append(f"the neighbour job was refused: {job.refusal}")
                return
            if self.api.wait(job.id, QUEUE_TIMEOUT, until="running") is None:
                self.api.cancel(job.id)
                self.result.notes.append("the neighbour job was never claimed")
                return
            time.sleep(NEIGHBOUR_SETTLE)
            record = self.api.job(job.id)
            if record["status"] != "done":
                self.neighbour = job.id
                return
            result = record.get("result") or {}
            if result.get("exit_code") == NEIGHBOUR_NO_ROOM:  # not a port: trying again won't help
                out = (result.get("stdout") or "").strip().splitlines()
                self.result.notes.append(
                    f"the neighbour job found no room to plant its canaries, so nothing a "
                    f"probe fails to find of them proves anything: {out[-1] if out else ''}"
                )
                return
        self.result.notes.append("the neighbour job could not bind a loopback port")

    def _neighbour_gone(self, probe: PlannedProbe) -> str:
        """Why a probe that looks for what the neighbour holds cannot be measured now (the
        neighbour job ended), or ""."""
        if probe.name not in NEEDS_NEIGHBOUR or not self.neighbour:
            return ""
        record = self.api.job(self.neighbour)
        if record["status"] != "done":
            return ""
        result = record.get("result") or {}
        out = (result.get("stdout") or "").strip().splitlines()
        return (
            f"the neighbour job {self.neighbour} ended (exit {result.get('exit_code')}) before "
            f"this probe was done, so what it held may be gone: {out[-1] if out else 'no output'}"
        )

    def _stop(self) -> None:
        """The neighbour stops and removes its files (where it shares /tmp with a later job);
        anything of this tag still queued or running is canceled."""
        if self.neighbour:
            stopper = self._submit("python3", STOPPER, {"NB_ID": self.nb})
            if stopper.id:
                self.api.wait(stopper.id, 20)
            done = self.api.wait(self.neighbour, 3)
            if done is not None and done.get("result"):
                out = done["result"]["stdout"].strip().splitlines()
                self.result.notes.append(f"neighbour {self.nb}: {out[-1] if out else 'no output'}")
            if done is None:  # its /tmp is its own: it never saw
                self.api.cancel(self.neighbour)
                if self.api.wait(self.neighbour, 15) is None:
                    self.result.notes.append(
                        f"the neighbour job {self.neighbour} outlived its cancel"
                    )
        if self.other_job:
            self.api.cancel(self.other_job)

    # -- probes ----------------------------------------------------------------------------
    def _env(self, probe: PlannedProbe) -> dict[str, str]:
        env = probe_env(self.nb, self.port, self.abstract, self.matrix.limits)
        env["PROBE_TOKEN"] = secrets.token_hex(8)
        if probe.name in SCANS:
            env["SCAN"] = probe.name.removeprefix("credentials_")
        if probe.name == "agent_api":
            env.update({"PROBE_SERVER_URL": self.api.url, "PROBE_OTHER_JOB": self.other_job})
        return env

    def _run_probe(self, probe: PlannedProbe) -> RemoteRun | None:
        env = self._env(probe)
        workers = []
        if probe.refusal_only:
            attack = {k: v.replace("{volume}", UNKNOWN_VOLUME) for k, v in probe.attack_env}
            run = self._job(probe, {**env, **attack, "PROBE_STAGE": "attack"})
            if run.measured == "blocked" and run.raw.get("refused"):
                return run
            self.result.not_measured[probe.name] = (
                "not refused; its attack names the host path of the job's volume, which the API "
                "does not give"
            )
            return None
        if probe.stages == 2:
            planted = self._job(probe, {**env, "PROBE_STAGE": "plant"})
            if planted.measured == "error" or planted.raw.get("refused"):
                return planted
            workers.append(planted.worker)
            plant_evidence = planted.raw.get("evidence")
            env["PROBE_STAGE"] = "attack"
        run = self._job(probe, env)
        if workers and workers[0] != run.worker and run.measured == "blocked":
            self.result.not_measured[probe.name] = (
                f"the plant ran on {workers[0]}, the attack on {run.worker}: what one left "
                "may not be where the other looked"
            )
            return None
        if workers:
            run.raw = {"plant_worker": workers[0], "plant": plant_evidence, **run.raw}
        return run

    def _job(self, probe: PlannedProbe, env: dict[str, str]) -> RemoteRun:
        """One probe job; a submission the server refuses is the runtime's answer too."""
        submitted = self._submit(probe.language, probe.script, env)
        if submitted.id is None:
            held = any(t in submitted.refusal for t in probe.refused_with)
            refusal = {"refused": True, "at": "submission", "detail": submitted.refusal}
            return RemoteRun(probe, "blocked" if held else "error", refusal, "refused")
        job = self.api.wait(submitted.id, PROBE_TIMEOUT + WAIT_SLACK)
        if job is None or job.get("result") is None:
            last = self.api.job(submitted.id)
            self.api.cancel(submitted.id)
            why: dict[str, Any] = {
                "timeout": f"not done after {PROBE_TIMEOUT + WAIT_SLACK:g}s",
                "status": last["status"],
                "never_claimed": last["status"] == "queued",
            }
            return RemoteRun(probe, "error", why, job=submitted.id)
        result = job["result"]
        verdict: dict[str, Any] | None = parse_verdict(result["stdout"])
        refused = result["status"] == "error" and any(
            t in result["stderr"] for t in probe.refused_with
        )
        if refused:
            verdict = {"refused": True, "at": "worker", "evidence": result["stderr"][-800:]}
        measured = "blocked" if refused else str((verdict or {}).get("outcome", "error"))
        raw = verdict or {k: result[k] for k in ("stdout", "stderr", "log")}
        return RemoteRun(
            probe,
            measured if measured in ("blocked", "exposed") else "error",
            {**raw, "job_log": result["log"][:4]},
            result["isolation"],
            job.get("worker") or "",
            submitted.id,
            result["exit_code"],
            round(float(result["duration"]), 4),
        )

    def _submit(
        self,
        language: str,
        script: str,
        env: dict[str, str],
        timeout: float = PROBE_TIMEOUT,
        tag: str = "",
    ) -> Submitted:
        marked = {**env, MARK_VAR: self.session}
        return self.api.submit(language, script, marked, timeout, tag or self.tag, AUDIT_WORKSPACE)


def evidence(run: RemoteRun) -> str:
    """The run's evidence as the report shows it: JSON, every canary secret masked."""
    return Canaries.mask(json.dumps(run.raw))[:1500]
