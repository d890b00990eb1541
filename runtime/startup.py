"""What this host can do, probed once when a worker starts (R-SEL-4, R-PID-2, R-PID-3, R-OPS-1).

Each backend of the registry probes itself (runtime.backends); tini is probed
here. A configured isolation that cannot work refuses the start, with the
page's message for unshare.
"""

from __future__ import annotations

import logging
import shutil
import sys

from runtime.backends import BACKEND_NAMES, backend_class
from runtime.capabilities import HostCapabilities, Probe, run_probe
from runtime.settings import Settings

log = logging.getLogger("orvanta.startup")

PROBE_TIMEOUT = 15.0

UNSHARE_FAILURE = """ENABLE_UNSHARE_PID is set but unshare test failed.
Error: {error}
Flags: {flags}

Solutions:
• Check if user namespaces are enabled: 'sysctl kernel.unprivileged_userns_clone'
• For Docker: Requires 'privileged: true' in docker-compose for --mount-proc flag
• For Kubernetes/Helm: Requires 'privileged: true' in securityContext for --mount-proc flag
• Try different flags via UNSHARE_ISOLATION_FLAGS env var (remove --mount-proc for unprivileged)
• Alternative: Use NSJAIL instead
• Disable: Set ENABLE_UNSHARE_PID=false"""


class StartupError(RuntimeError):
    """The worker must not start: its configured isolation cannot work here."""


def probe_tini(settings: Settings) -> Probe:
    path = shutil.which(settings.tini_path)
    if path is None:
        return Probe(None, f"tini not found at UNSHARE_TINI_PATH={settings.tini_path}")
    ok, output = run_probe([path, "-s", "--", "/bin/true"])
    if not ok:
        return Probe(None, f"{path} -s -- true failed: {output}")
    return Probe(path, f"{path} -s -- true: ok")


def probe_host(settings: Settings) -> HostCapabilities:
    """Probe every backend, whatever the settings ask for (R-SEL-4); refuse to start where
    the configured one cannot work (R-PID-3)."""
    if settings.enable_unshare_pid and sys.platform != "linux":
        raise StartupError(
            f"ENABLE_UNSHARE_PID=true is not supported on {sys.platform}: PID namespace "
            "isolation is Linux only. Set ENABLE_UNSHARE_PID=false for this worker "
            "(or use agent workers without direct database access)."
        )
    caps = HostCapabilities(
        {name: backend_class(name).probe(settings) for name in BACKEND_NAMES},
        probe_tini(settings),
    )
    if settings.enable_unshare_pid and not caps.of("unshare").ok:
        raise StartupError(
            UNSHARE_FAILURE.format(
                error=caps.of("unshare").detail, flags=" ".join(settings.unshare_flags)
            )
        )
    if settings.backend is not None and not caps.of(settings.backend).ok:
        raise StartupError(
            f"ORVANTA_BACKEND={settings.backend} but {settings.backend} does not work here: "
            f"{caps.of(settings.backend).detail}. Install or allow it, or unset ORVANTA_BACKEND "
            "to use the page's hierarchy."
        )
    return caps
