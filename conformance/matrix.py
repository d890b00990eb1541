"""matrix.yaml as typed data: the documented table, the probes, the platforms and the cells.

Every mistake in the file is reported with its place and what would be valid,
because the matrix is what a platform team edits to describe their own worker.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from conformance.platforms import parse_platform
from conformance.platforms.spec import MODES, PlatformSpec, SpecError
from conformance.resources import suite_file
from runtime.backends import BACKEND_NAMES

BACKENDS = BACKEND_NAMES  # the registry: a backend with its module has a column

OUTCOMES = ("blocked", "exposed")
PROBES_DIR = suite_file("fixtures/probes")
JOBS_DIR = suite_file("fixtures/jobs")
EXPECT_KINDS = ("refuses_start", "job_error", "job_exit")


class MatrixError(ValueError):
    def __init__(self, path: Path, where: str, problem: str) -> None:
        super().__init__(f"{path}: {where}: {problem}")


@dataclass(frozen=True)
class Row:
    """One property of the comparison table: its documented value per backend."""

    name: str
    req: str
    values: dict[str, str]


@dataclass(frozen=True)
class Override:
    outcome: str
    kind: str  # documented | finding
    reason: str


@dataclass(frozen=True)
class Probe:
    name: str
    row: str  # the table property it attacks
    req: tuple[str, ...]
    script: Path
    needs: str = ""  # a platform mode (agent) the probe only makes sense on; "" for every cell
    stages: int = 1  # 2: an earlier job plants (PROBE_STAGE=plant), a later one attacks
    attack_env: tuple[tuple[str, str], ...] = ()  # job variables of the attack; {volume} filled
    expect: tuple[tuple[str, Override], ...] = ()  # per backend, where it differs from its row
    refused_with: tuple[str, ...] = ()  # a job refused with one of these texts held it off

    @property
    def language(self) -> str:
        return "bash" if self.script.suffix == ".sh" else "python3"


@dataclass(frozen=True)
class Cell:
    id: str
    platform: str
    backend: str
    env: dict[str, str]
    kind: str  # table | refuses_start | job_error | job_exit
    message: str  # what refuses_start / job_error / job_exit must contain
    req: tuple[str, ...]
    annotate: str = ""  # a header line put before every script, e.g. "# sandbox" (R-ANN-1)
    overrides: dict[str, Override] = field(default_factory=dict)
    startup_log: tuple[str, ...] = ()
    job: str = ""  # job_exit: the script of fixtures/jobs/ to run
    finding: str = ""  # where the whole cell contradicts the page: what was measured
    # probes this cell cannot measure, each with the measured reason (they are not run)
    not_measured: dict[str, str] = field(default_factory=dict)


@dataclass(frozen=True)
class Matrix:
    path: Path
    table: dict[str, Row]
    protected: tuple[str, ...]
    probes: dict[str, Probe]
    platforms: dict[str, PlatformSpec[Any]]
    limits: dict[str, int]
    cells: list[Cell]
    # what each platform changes for every cell on it (merged into each cell's overrides)
    platform_overrides: dict[str, dict[str, Override]] = field(default_factory=dict)
    # limits a platform sets apart from `limits` (a slow guest's CPU time), by platform
    platform_limits: dict[str, dict[str, int]] = field(default_factory=dict)

    def limits_for(self, cell: Cell) -> dict[str, int]:
        """The limits this cell's workers run with (and its probes are told)."""
        return {**self.limits, **self.platform_limits.get(cell.platform, {})}

    def mode(self, cell: Cell) -> str:
        """How the cell's workers reach jobs: worker (the database) or agent (the API only)."""
        return self.platforms[cell.platform].mode

    def probes_for(self, cell: Cell) -> list[Probe]:
        """The probes that apply to this cell (agent_api only where workers are agents), less
        those the cell records it cannot measure (with why, in the report)."""
        return [
            p
            for p in self.probes.values()
            if (not p.needs or p.needs == self.mode(cell)) and p.name not in cell.not_measured
        ]

    def documented(self, cell: Cell, probe: Probe) -> str:
        """The outcome the page's table promises for this probe in this cell."""
        value = self.table[probe.row].values[cell.backend]
        if value == "optional":  # nsjail network: isolated unless the cell shares it
            value = "no" if cell.env.get("ORVANTA_NSJAIL_NETWORK") == "shared" else "yes"
        return "blocked" if value in self.protected else "exposed"

    def expected(self, cell: Cell, probe: Probe) -> tuple[str, Override | None]:
        override = cell.overrides.get(probe.name) or dict(probe.expect).get(cell.backend)
        if override is not None:
            return override.outcome, override
        return self.documented(cell, probe), None


def load(path: Path) -> Matrix:
    try:
        raw = yaml.safe_load(path.read_text())
    except OSError as exc:
        raise MatrixError(
            path, "file", f"cannot read it ({exc.strerror}); pass --matrix=PATH"
        ) from None
    except yaml.YAMLError as exc:
        raise MatrixError(path, "file", f"not valid YAML: {exc}") from None
    if not isinstance(raw, dict):
        raise MatrixError(path, "file", "expected a mapping with table, probes, platforms, cells")
    table = {name: _row(path, name, spec) for name, spec in _section(path, raw, "table").items()}
    probes = {n: _probe(path, n, s, table) for n, s in _section(path, raw, "probes").items()}
    platforms, overrides, platform_limits = _platforms(path, _section(path, raw, "platforms"))
    limits = _limits(path, "limits", raw.get("limits", {}))
    cells = [_cell(path, i, spec, overrides, probes) for i, spec in enumerate(raw.get("cells", []))]
    ids = [c.id for c in cells]
    dupes = sorted({i for i in ids if ids.count(i) > 1})
    if dupes:
        raise MatrixError(path, "cells", f"duplicate ids {dupes}; every cell id must be unique")
    return Matrix(
        path=path,
        table=table,
        protected=tuple(raw.get("protected", ())),
        probes=probes,
        platforms=platforms,
        limits=limits,
        cells=cells,
        platform_overrides={
            name: {
                probe: _override(path, f"platforms.{name}.overrides.{probe}", o)
                for probe, o in entries.items()
            }
            for name, entries in overrides.items()
        },
        platform_limits={
            name: _limits(path, f"platforms.{name}.limits", entries, limits)
            for name, entries in platform_limits.items()
        },
    )


def _limits(
    path: Path, where: str, raw: Any, known: dict[str, int] | None = None
) -> dict[str, int]:
    """Positive whole numbers by name; a platform's only for names `limits` has."""
    if not isinstance(raw, dict):
        raise MatrixError(path, where, "must be a mapping like {cpu_seconds: 3}")
    limits = {}
    for key, value in raw.items():
        if known is not None and key not in known:
            raise MatrixError(path, f"{where}.{key}", f"not one of the limits {sorted(known)}")
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise MatrixError(path, f"{where}.{key}", f"{value!r}: write a whole number >= 1")
        limits[str(key)] = value
    return limits


def _section(path: Path, raw: dict[str, Any], name: str) -> dict[str, Any]:
    section = raw.get(name)
    if not isinstance(section, dict) or not section:
        raise MatrixError(path, name, "missing or empty; it must be a mapping")
    return section


def _platforms(
    path: Path, section: dict[str, Any]
) -> tuple[dict[str, PlatformSpec[Any]], dict[str, dict[str, Any]], dict[str, Any]]:
    """Each platform as its typed spec, and apart from it the probe outcomes it overrides
    (which every cell of the platform merges into its own) and the limits it sets."""
    specs, overrides, limits = {}, {}, {}
    for name, entry in section.items():
        entry = entry or {}
        if not isinstance(entry, dict):
            raise MatrixError(path, f"platforms.{name}", "must be a mapping of options, or empty")
        options = {k: v for k, v in entry.items() if k not in ("overrides", "limits")}
        try:
            specs[name] = parse_platform(str(name), options)
        except SpecError as exc:
            raise MatrixError(path, exc.where, exc.problem) from None
        overrides[name] = entry.get("overrides") or {}
        if "limits" in entry:
            limits[name] = entry["limits"]
    return specs, overrides, limits


def _row(path: Path, name: str, spec: dict[str, Any]) -> Row:
    missing = [b for b in BACKENDS if b not in spec]
    if missing:
        raise MatrixError(path, f"table.{name}", f"no value for backend(s) {missing}")
    return Row(name, str(spec.get("req", "")), {b: _text(spec[b]) for b in BACKENDS})


def _text(value: Any) -> str:
    """YAML 1.1 reads unquoted yes/no as booleans; the table means the words."""
    if isinstance(value, bool):
        return "yes" if value else "no"
    return str(value)


def _probe(path: Path, name: str, spec: dict[str, Any], table: dict[str, Row]) -> Probe:
    if spec.get("property") not in table:
        raise MatrixError(
            path,
            f"probes.{name}.property",
            f"{spec.get('property')!r} is not one of {sorted(table)}",
        )
    scripts = [p for p in (PROBES_DIR / f"{name}.py", PROBES_DIR / f"{name}.sh") if p.is_file()]
    if not scripts:
        raise MatrixError(
            path, f"probes.{name}", f"no script {name}.py or {name}.sh in {PROBES_DIR}"
        )
    needs = str(spec.get("needs", ""))
    if needs not in ("", *MODES):
        raise MatrixError(path, f"probes.{name}.needs", f"{needs!r} is not one of {list(MODES)}")
    stages = int(spec.get("stages", 1))
    if stages not in (1, 2):
        raise MatrixError(path, f"probes.{name}.stages", "1, or 2 (plant, then attack)")
    expect = tuple(
        (backend, _override(path, f"probes.{name}.expect.{backend}", o))
        for backend, o in (spec.get("expect") or {}).items()
    )
    unknown = [b for b, _ in expect if b not in BACKENDS]
    if unknown:
        raise MatrixError(path, f"probes.{name}.expect", f"{unknown} not in {list(BACKENDS)}")
    attack_env = tuple((str(k), str(v)) for k, v in (spec.get("attack_env") or {}).items())
    return Probe(
        name,
        spec["property"],
        tuple(spec.get("req", ())),
        scripts[0],
        needs,
        stages,
        attack_env,
        expect,
        _texts(spec.get("refused_with")),
    )


def _annotation(value: Any) -> str:
    """`annotate: true` is the page's `# sandbox`; a string is the header line itself (the
    lenient and near-miss forms of the sandbox annotation)."""
    if value is True:
        return "# sandbox"
    return str(value) if value else ""


def _texts(value: Any) -> tuple[str, ...]:
    """One text or a list of them."""
    if value is None:
        return ()
    return (str(value),) if isinstance(value, str) else tuple(str(v) for v in value)


def _override(path: Path, where: str, o: Any) -> Override:
    if (
        not isinstance(o, dict)
        or o.get("outcome") not in OUTCOMES
        or o.get("kind")
        not in (
            "documented",
            "finding",
        )
    ):
        raise MatrixError(
            path, where, "needs outcome: blocked|exposed and kind: documented|finding"
        )
    return Override(o["outcome"], o["kind"], str(o.get("reason", "")))


def _cell(
    path: Path,
    index: int,
    spec: dict[str, Any],
    platform_overrides: dict[str, dict[str, Any]],
    probes: dict[str, Probe],
) -> Cell:
    where = f"cells[{index}] ({spec.get('id', 'no id')})"
    if not spec.get("id"):
        raise MatrixError(path, where, "every cell needs an id like host/unshare/default-flags")
    if spec.get("platform") not in platform_overrides:
        raise MatrixError(
            path, where, f"platform {spec.get('platform')!r} not in {sorted(platform_overrides)}"
        )
    if spec.get("backend") not in BACKENDS:
        raise MatrixError(path, where, f"backend {spec.get('backend')!r} not in {list(BACKENDS)}")
    expect = spec.get("expect", "table")
    if expect == "table":
        kind, message = "table", ""
    elif isinstance(expect, dict) and len(expect) == 1 and next(iter(expect)) in EXPECT_KINDS:
        kind, message = next(iter(expect.items()))
        if kind == "job_exit" and not (JOBS_DIR / f"{spec.get('job')}.py").is_file():
            raise MatrixError(path, where, f"job_exit needs job: NAME of a script in {JOBS_DIR}")
    else:
        raise MatrixError(
            path,
            where,
            f"expect {expect!r}: use table, {{refuses_start: TEXT}}, {{job_error: TEXT}} or "
            "{job_exit: TEXT} with job: NAME",
        )
    overrides = {}
    for name, o in {
        **platform_overrides[spec["platform"]],
        **(spec.get("overrides") or {}),
    }.items():
        if name not in probes:
            raise MatrixError(path, f"{where}.overrides", f"unknown probe {name!r}")
        overrides[name] = _override(path, f"{where}.overrides.{name}", o)
    return Cell(
        id=str(spec["id"]),
        platform=spec["platform"],
        backend=spec["backend"],
        env={str(k): str(v) for k, v in (spec.get("env") or {}).items()},
        kind=kind,
        message=str(message),
        req=tuple(spec.get("req", ())),
        annotate=_annotation(spec.get("annotate", False)),
        overrides=overrides,
        startup_log=tuple(spec.get("startup_log", ())),
        job=str(spec.get("job", "")),
        finding=str(spec.get("finding", "")),
        not_measured=_not_measured(path, where, spec.get("not_measured") or {}, probes),
    )


def _not_measured(
    path: Path, where: str, entries: Any, probes: Mapping[str, Probe]
) -> dict[str, str]:
    if not isinstance(entries, dict):
        raise MatrixError(path, f"{where}.not_measured", "must map probe names to reasons")
    unknown = sorted(set(entries) - set(probes))
    if unknown:
        raise MatrixError(path, f"{where}.not_measured", f"unknown probe(s) {unknown}")
    return {str(k): str(v) for k, v in entries.items()}


ISOLATION_VARS = (
    "ENABLE_UNSHARE_PID",
    "UNSHARE_ISOLATION_FLAGS",
    "UNSHARE_TINI_PATH",
    "DISABLE_NSJAIL",
    "DISABLE_NUSER",
    "NSJAIL_PATH",
    "JOB_ISOLATION",
    "ORVANTA_NSJAIL_NETWORK",
    "ORVANTA_BACKEND",
)


def current_env_cell(environ: Mapping[str, str], platform: str, matrix: Matrix) -> Cell:
    """The worker as this environment configures it, held to the table of what it asks for.

    Asked-for, not what the host grants: if DISABLE_NSJAIL=false falls back because nsjail
    is missing, the cell fails, because isolation is weaker than configured.
    """
    env = {k: environ[k] for k in ISOLATION_VARS if k in environ}
    wants_nsjail = (
        env.get("DISABLE_NSJAIL", "").lower() in ("false", "0", "no")
        or env.get("JOB_ISOLATION") == "nsjail_sandboxing"
    )
    if wants_nsjail:
        backend = "nsjail"
    elif env.get("ORVANTA_BACKEND") in BACKENDS:
        backend = env["ORVANTA_BACKEND"]
    elif env.get("ENABLE_UNSHARE_PID", "").lower() in ("true", "1", "yes"):
        backend = "unshare"
    else:
        backend = "none"
    here = "host" if platform == "all" or "," in platform else platform
    return Cell(
        id=f"{here}/current-env/{backend}",
        platform=here,
        backend=backend,
        env=env,
        kind="table",
        message="",
        req=("R-SEL-1", "R-SEL-2", "R-SEL-3"),
        overrides=dict(matrix.platform_overrides.get(here, {})),  # what the platform changes
    )
