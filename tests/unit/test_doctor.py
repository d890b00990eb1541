"""`orvanta doctor`, the pure parts: capability masks, the report format, the exit code and
the checks that are built from values already read (R-OPS-2, R-PLT-4).

What the doctor reads from this host and runs for real is covered by
tests/integration/test_doctor_host.py; nothing here mocks a subprocess or a file.
"""

from __future__ import annotations

import sys

import pytest

from runtime import doctor
from runtime.doctor import Check, exit_code, render, run_checks
from runtime.settings import Settings

# Docker's default capability set (CapEff/CapBnd of an unprivileged container), in bit order.
DOCKER_DEFAULT_MASK = "00000000a80425fb"
DOCKER_DEFAULT_CAPS = [
    "CHOWN",  # 0
    "DAC_OVERRIDE",  # 1
    "FOWNER",  # 3
    "FSETID",  # 4
    "KILL",  # 5
    "SETGID",  # 6
    "SETUID",  # 7
    "SETPCAP",  # 8
    "NET_BIND_SERVICE",  # 10
    "NET_RAW",  # 13
    "SYS_CHROOT",  # 18
    "MKNOD",  # 27
    "AUDIT_WRITE",  # 29
    "SETFCAP",  # 31
]
ALL_CAPS_MASK = "000001ffffffffff"  # bits 0..40: CHOWN .. CHECKPOINT_RESTORE
# Everything except CAP_SYS_RESOURCE (bit 24), as in a container without it.
ALL_BUT_SYS_RESOURCE = f"{(1 << 41) - 1 - (1 << 24):016x}"


def settings(**env: str) -> Settings:
    return Settings.from_env(env)


# --- capability masks --------------------------------------------------------------------


@pytest.mark.req("R-OPS-2")
def test_docker_default_mask_names_its_fourteen_capabilities() -> None:
    names = doctor.cap_names(DOCKER_DEFAULT_MASK)
    assert names == DOCKER_DEFAULT_CAPS
    assert len(names) == 14
    # the page's minimal set is not in Docker's default one, except SETPCAP
    assert "SYS_ADMIN" not in names
    assert "SYS_RESOURCE" not in names


@pytest.mark.req("R-OPS-2")
def test_mask_without_leading_zeros_means_the_same() -> None:
    assert doctor.cap_names("a80425fb") == DOCKER_DEFAULT_CAPS
    assert doctor.cap_names("A80425FB") == DOCKER_DEFAULT_CAPS


@pytest.mark.req("R-OPS-2")
@pytest.mark.parametrize(
    ("bit", "name"),
    [
        (0, "CHOWN"),
        (8, "SETPCAP"),
        (21, "SYS_ADMIN"),
        (24, "SYS_RESOURCE"),
        (31, "SETFCAP"),
        (37, "AUDIT_READ"),
        (38, "PERFMON"),
        (39, "BPF"),
        (40, "CHECKPOINT_RESTORE"),
    ],
)
def test_single_bits_name_the_linux_capability(bit: int, name: str) -> None:
    """The numbers of linux/capability.h: one bit, one name."""
    assert doctor.cap_names(f"{1 << bit:016x}") == [name]


@pytest.mark.req("R-OPS-2")
def test_full_and_empty_masks() -> None:
    everything = doctor.cap_names(ALL_CAPS_MASK)
    assert len(everything) == 41
    assert everything[0] == "CHOWN"
    assert everything[-1] == "CHECKPOINT_RESTORE"
    assert len(set(everything)) == 41
    assert doctor.cap_names("0000000000000000") == []
    assert doctor.cap_names("") == []  # a missing CapEff line reads as no capabilities


@pytest.mark.req("R-OPS-2")
def test_a_mask_missing_one_bit_misses_exactly_that_name() -> None:
    names = doctor.cap_names(ALL_BUT_SYS_RESOURCE)
    assert len(names) == 40
    assert "SYS_RESOURCE" not in names
    assert {"SYS_ADMIN", "SETPCAP", "SYS_NICE", "SYS_TIME"} <= set(names)


@pytest.mark.req("R-OPS-2")
def test_bits_beyond_the_known_capabilities_are_ignored() -> None:
    assert doctor.cap_names(f"{(1 << 41) | (1 << 63) | (1 << 21):016x}") == ["SYS_ADMIN"]


# --- render --------------------------------------------------------------------------------


@pytest.mark.req("R-OPS-2")
def test_render_tags_aligns_and_summarises() -> None:
    checks = [
        Check("platform", "ok", "Linux 6.1 (x86_64)"),
        Check("user namespace", "info", "in a container"),
        Check("seccomp", "warn", "a filter is active", "docker: --security-opt seccomp=unconfined"),
        Check("unshare", "fail", "flags --user: boom", "first fix\nsecond fix"),
        Check("tini", "ok", "/usr/bin/tini"),
    ]
    assert render(checks).splitlines() == [
        "[ OK ] platform        Linux 6.1 (x86_64)",
        "[INFO] user namespace  in a container",
        "[WARN] seccomp         a filter is active",
        "         → docker: --security-opt seccomp=unconfined",
        "[FAIL] unshare         flags --user: boom",
        "         → first fix",
        "         → second fix",
        "[ OK ] tini            /usr/bin/tini",
        "2 ok, 1 warnings, 1 failures",
    ]


@pytest.mark.req("R-OPS-2")
def test_render_indents_continuation_lines_under_their_fix() -> None:
    solution = "Use this:\n  key: value\n\n   \nOr that"
    out = render([Check("caps", "warn", "missing", solution)]).splitlines()
    assert out == [
        "[WARN] caps  missing",
        "         → Use this:",
        "             key: value",  # a line starting with a space continues the one above
        "         → Or that",  # blank lines are dropped
        "0 ok, 1 warnings, 0 failures",
    ]


@pytest.mark.req("R-OPS-2")
def test_render_shows_no_fixes_for_ok_and_info() -> None:
    checks = [
        Check("a", "ok", "fine", "never shown"),
        Check("b", "info", "note", "never shown either"),
    ]
    out = render(checks)
    assert "never shown" not in out
    assert "→" not in out
    assert out.splitlines()[-1] == "1 ok, 0 warnings, 0 failures"


@pytest.mark.req("R-OPS-2")
def test_render_marks_an_unknown_status_and_handles_no_checks() -> None:
    out = render([Check("x", "bogus", "?")]).splitlines()
    assert out == ["[????] x  ?", "0 ok, 0 warnings, 0 failures"]
    assert render([]) == "0 ok, 0 warnings, 0 failures"


@pytest.mark.req("R-OPS-2")
def test_render_of_the_page_texts_keeps_every_line() -> None:
    """The long fixes (the page's recipes) come out whole, one line each, in order."""
    for text in (doctor.BOTTLEROCKET, doctor.CAP_RECIPE, doctor.PRIVILEGED, doctor.USERNS_FIX):
        out = render([Check("c", "fail", "d", text)]).splitlines()[1:-1]
        assert [line[11:] for line in out] == text.splitlines()
        for line, src in zip(out, text.splitlines(), strict=True):
            assert line.startswith("         → " if not src.startswith(" ") else "           ")


# --- exit code ------------------------------------------------------------------------------


@pytest.mark.req("R-OPS-2")
@pytest.mark.parametrize(
    ("statuses", "code"),
    [
        ([], 0),
        (["ok"], 0),
        (["ok", "info", "warn", "warn"], 0),
        (["fail"], 1),
        (["ok", "warn", "fail", "info"], 1),
        (["fail", "fail"], 1),
    ],
)
def test_exit_code_is_one_only_when_something_failed(statuses: list[str], code: int) -> None:
    assert exit_code([Check(f"c{i}", s, "d") for i, s in enumerate(statuses)]) == code


# --- checks from values already read --------------------------------------------------------


@pytest.mark.req("R-OPS-2")
def test_seccomp_check() -> None:
    assert doctor._seccomp("0", userns_ok=False).status == "ok"
    allowed = doctor._seccomp("2", userns_ok=True)
    assert allowed.status == "info"
    assert "allows user namespaces" in allowed.detail
    blocked = doctor._seccomp("2", userns_ok=False)
    assert blocked.status == "warn"
    assert "unshare --user" in blocked.detail
    assert "docker: --security-opt seccomp=unconfined" in blocked.solution.splitlines()
    assert "seccompProfile: {type: Unconfined}" in blocked.solution
    strict = doctor._seccomp("1", userns_ok=False)
    assert (strict.status, strict.detail) == ("warn", "seccomp mode 1")


@pytest.mark.req("R-OPS-2")
def test_no_new_privs_check() -> None:
    assert doctor._no_new_privs("0").status == "ok"
    on = doctor._no_new_privs("1")
    assert on.status == "warn"
    assert "allowPrivilegeEscalation: true" in on.solution
    assert "no-new-privileges" in on.solution


@pytest.mark.req("R-OPS-2")
def test_proc_masks_check_points_at_privileged_or_dropping_mount_proc() -> None:
    assert doctor._proc_masked([]).status == "ok"
    masks = ["/proc/kcore", "/proc/keys", "/proc/timer_list", "/proc/bus (ro)", "/proc/fs (ro)"]
    masks.append("/proc/irq (ro)")
    check = doctor._proc_masked(masks)
    assert check.status == "warn"
    assert "/proc/kcore, /proc/keys, /proc/timer_list, /proc/bus (ro) and 2 more" in check.detail
    assert "/proc/fs" not in check.detail
    assert "--mount-proc needs privileged" in check.detail
    fixes = check.solution.splitlines()
    assert any("privileged: true" in line for line in fixes)
    assert "UNSHARE_ISOLATION_FLAGS=--user --map-root-user --pid --fork" in check.solution
    assert "DISABLE_NUSER=true" in check.solution
    few = doctor._proc_masked(["/proc/kcore"])
    assert "(/proc/kcore)" in few.detail
    assert "more" not in few.detail


@pytest.mark.req("R-OPS-2")
def test_capabilities_all_present_names_the_minimal_set() -> None:
    status = {"CapEff": ALL_CAPS_MASK, "CapBnd": ALL_CAPS_MASK}
    check = doctor._capabilities(status, settings())
    # "info" instead of "ok" only when the doctor itself runs in a user namespace
    assert check.status in ("ok", "info")
    assert check.detail.startswith("41 of 41 effective")
    assert check.detail.endswith("incl. SYS_ADMIN, SYS_RESOURCE, SETPCAP")
    assert "missing" not in check.detail


@pytest.mark.req("R-OPS-2")
def test_capabilities_of_a_default_docker_container_without_nsjail_warn() -> None:
    status = {"CapEff": DOCKER_DEFAULT_MASK, "CapBnd": DOCKER_DEFAULT_MASK}
    check = doctor._capabilities(status, settings())
    assert check.status == "warn"
    assert check.detail.startswith("14 of 41 effective")
    assert "missing CAP_SYS_ADMIN (" in check.detail
    assert "CAP_SYS_RESOURCE (" in check.detail
    assert "CAP_SETPCAP" not in check.detail  # Docker keeps it
    assert "not in the bounding set either: SYS_ADMIN, SYS_RESOURCE" in check.detail
    assert check.solution == doctor.CAP_RECIPE
    assert "--cap-add SYS_ADMIN --cap-add SYS_RESOURCE --cap-add SETPCAP" in check.solution


@pytest.mark.req("R-OPS-2")
@pytest.mark.parametrize(
    "env",
    [
        {"DISABLE_NSJAIL": "false", "DISABLE_NUSER": "true"},
        {"JOB_ISOLATION": "nsjail_sandboxing", "DISABLE_NUSER": "true"},
    ],
)
def test_capabilities_fail_when_nsjail_without_userns_lacks_sys_admin(env: dict[str, str]) -> None:
    """nsjail with DISABLE_NUSER=true uses the worker's own capabilities: no SYS_ADMIN, no jail."""
    status = {"CapEff": DOCKER_DEFAULT_MASK, "CapBnd": ALL_CAPS_MASK}
    check = doctor._capabilities(status, settings(**env))
    assert check.status == "fail"
    assert "missing CAP_SYS_ADMIN" in check.detail
    assert "bounding set" not in check.detail  # the bounding set still has them
    assert check.solution == doctor.CAP_RECIPE


@pytest.mark.req("R-OPS-2")
def test_capabilities_only_warn_when_nsjail_has_its_own_user_namespace() -> None:
    status = {"CapEff": DOCKER_DEFAULT_MASK, "CapBnd": DOCKER_DEFAULT_MASK}
    check = doctor._capabilities(status, settings(DISABLE_NSJAIL="false"))
    assert check.status == "warn"


@pytest.mark.req("R-OPS-2")
def test_missing_only_sys_resource_is_never_fatal() -> None:
    status = {"CapEff": ALL_BUT_SYS_RESOURCE, "CapBnd": ALL_BUT_SYS_RESOURCE}
    check = doctor._capabilities(status, settings(DISABLE_NSJAIL="false", DISABLE_NUSER="true"))
    assert check.status == "warn"
    assert check.detail.startswith("40 of 41 effective")
    assert "missing CAP_SYS_RESOURCE (worker oom_score_adj, R-NSJ-3)" in check.detail
    assert "not in the bounding set either: SYS_RESOURCE" in check.detail
    assert "SYS_ADMIN" not in check.detail


# --- not Linux (R-PLT-4) -------------------------------------------------------------------


@pytest.mark.req("R-OPS-2", "R-PLT-4")
@pytest.mark.parametrize(("platform", "name"), [("win32", "Windows"), ("darwin", "macOS")])
def test_off_linux_only_the_platform_check_runs_and_fails(
    monkeypatch: pytest.MonkeyPatch, platform: str, name: str
) -> None:
    """The branch reads nothing of the host but sys.platform, so setting that is enough."""
    monkeypatch.setattr(sys, "platform", platform)
    checks = run_checks(settings(ENABLE_UNSHARE_PID="true"))
    monkeypatch.undo()
    assert checks == [
        Check(
            "platform",
            "fail",
            f"{name}: PID isolation is Linux only",
            "Set ENABLE_UNSHARE_PID=false for this worker (R-PID-4, R-PLT-4)",
        )
    ]
    assert exit_code(checks) == 1
    assert render(checks).splitlines() == [
        f"[FAIL] platform  {name}: PID isolation is Linux only",
        "         → Set ENABLE_UNSHARE_PID=false for this worker (R-PID-4, R-PLT-4)",
        "0 ok, 0 warnings, 1 failures",
    ]
