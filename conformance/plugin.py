"""pytest plugin (entry point `pytest11: orvanta`): options, the req marker, cell fixtures.

Tests are generated from matrix.yaml: each test function declares which
arguments it needs (`cell`, `probe`) and which kind of cell it checks;
`pytest_generate_tests` fills them in, filtered by --backend and --platform.

Installed, the plugin loads in every pytest session of its environment, so it
stays inert (no matrix, no Docker) unless the conformance suite is collected or
one of its options is given. When active under xdist it distributes by cell
(`--dist loadgroup`), so each cell is set up once per run.
"""

from __future__ import annotations

import os
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from conformance.audit import AuditCollector
from conformance.harness import CellSession
from conformance.leftovers import CELLS_DIR, reap_dead_runs
from conformance.matrix import BACKENDS, EXPECT_KINDS, Cell, Matrix, Probe, current_env_cell, load
from conformance.platforms import finish, open_platform, prepare, unavailable
from conformance.platforms.session import owned_prefix, start_session
from conformance.report.model import PLATFORM_MISSING
from conformance.resources import suite_file
from runtime.jobdir import remove_tree

MATRIX_KEY = pytest.StashKey[Matrix]()
ACTIVE_KEY = pytest.StashKey[bool]()
SUITE_DIR = Path(__file__).resolve().parent
# every option of ours with its default: any other value asks for the suite
DEFAULTS: dict[str, Any] = {
    "backend": "all",
    "platform": "all",
    "matrix": None,
    "audit_report": None,
    "audit_progress": False,
    "current_env": False,
}


def pytest_addoption(parser: pytest.Parser) -> None:
    group = parser.getgroup("orvanta", "Orvanta isolation conformance")
    group.addoption(
        "--backend",
        default=DEFAULTS["backend"],
        choices=(*BACKENDS, "all"),
        help="isolation backend whose cells to run (default: all)",
    )
    group.addoption(
        "--platform",
        default=DEFAULTS["platform"],
        help="platforms whose cells to run: names from matrix.yaml, comma-separated, or all "
        "(default)",
    )
    group.addoption(
        "--matrix",
        default=DEFAULTS["matrix"],
        type=Path,
        help="the conformance matrix (default: the suite's own matrix.yaml)",
    )
    group.addoption(
        "--audit-report",
        default=None,
        type=Path,
        metavar="DIR",
        help="write audit.json, audit.html, audit.md and junit.xml to DIR",
    )
    group.addoption(
        "--audit-progress",
        action="store_true",
        help="print one line per test: elapsed, outcome, cell, probe, measured vs expected",
    )
    group.addoption(
        "--current-env",
        action="store_true",
        help="add a cell for the isolation configured in this environment",
    )


def active(config: pytest.Config) -> bool:
    """Asked for: an option of ours differs from its default, or the run collects this
    package (a path in or above it, or `--pyargs conformance`)."""
    if ACTIVE_KEY not in config.stash:
        config.stash[ACTIVE_KEY] = _asked(config)
    return config.stash[ACTIVE_KEY]


def _asked(config: pytest.Config) -> bool:
    if any(config.getoption(name) != default for name, default in DEFAULTS.items()):
        return True
    for arg in config.args:
        target = arg.split("::", 1)[0]
        if config.option.pyargs and target.split(".", 1)[0] == SUITE_DIR.name:
            return True
        path = (config.invocation_params.dir / target).resolve()
        if path == SUITE_DIR or SUITE_DIR in path.parents:
            return True
        if path in SUITE_DIR.parents and _collects_suite(path):
            return True
    return False


def _collects_suite(above: Path) -> bool:
    """A run rooted above the suite collects it, unless the way down passes an installed
    environment (a project's own .venv/.../site-packages/conformance is not its tests)."""
    between = SUITE_DIR.relative_to(above).parts[:-1]
    return not any(p in ("site-packages", "dist-packages") or p.startswith(".") for p in between)


@pytest.hookimpl(tryfirst=True)
def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line("markers", "req(*ids): SPEC.md requirement IDs this test covers")
    config.addinivalue_line("markers", "cell_kind(kind): the kind of matrix cell a test checks")
    if not active(config):
        return
    if getattr(config.option, "dist", "no") == "load":  # xdist's -n default: one cell, many set-ups
        config.option.dist = "loadgroup"
    if not hasattr(config, "workerinput"):
        start_session()  # before xdist starts workers, which inherit it
    out = config.getoption("audit_report", None)
    if out is not None and not hasattr(config, "workerinput"):  # the xdist controller writes
        if not config.option.xmlpath:
            config.option.xmlpath = str(out / "junit.xml")
        collector = AuditCollector(out, matrix_of(config), config.getoption("audit_progress"))
        config.pluginmanager.register(collector, "orvanta-audit")


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """Deselect, visibly, what is not a test here rather than skip it.

    A check with no matching cell (e.g. --backend=none has no job_error cell), and a
    cell x probe pair that does not apply (agent_api on a database worker): cell and
    probe are parametrized separately so that each cell stays one session-scoped set-up.
    """
    keep: list[pytest.Item] = []
    drop: list[pytest.Item] = []
    for item in items:
        empty = any(
            str(m.kwargs.get("reason", "")).startswith("got empty parameter set")
            for m in item.iter_markers("skip")
        )
        params = getattr(item, "callspec", None)
        cell = params.params.get("cell") if params else None
        probe = params.params.get("probe") if params else None
        misfit = (
            isinstance(cell, Cell)
            and isinstance(probe, Probe)
            and probe not in matrix_of(config).probes_for(cell)
        )
        (drop if empty or misfit else keep).append(item)
    if drop:
        config.hook.pytest_deselected(items=drop)
        items[:] = keep


def pytest_runtest_setup(item: pytest.Item) -> None:
    """Carry the cited requirement IDs in the report, for coverage under xdist too."""
    ids = [i for m in item.iter_markers("req") for i in m.args]
    item.user_properties.append(("req", sorted(set(ids))))


def matrix_of(config: pytest.Config) -> Matrix:
    if MATRIX_KEY not in config.stash:
        option = config.getoption("matrix")
        path = suite_file("matrix.yaml") if option is None else Path(option)
        if not path.is_absolute():
            path = config.invocation_params.dir / path
        matrix = load(path)
        if config.getoption("current_env"):
            matrix.cells.append(current_env_cell(os.environ, config.getoption("platform"), matrix))
        config.stash[MATRIX_KEY] = matrix
    return config.stash[MATRIX_KEY]


def selected_cells(config: pytest.Config) -> list[Cell]:
    backend = config.getoption("backend")
    platforms = set(config.getoption("platform").split(","))
    matrix = matrix_of(config)
    unknown = platforms - set(matrix.platforms) - {"all"}
    if unknown:
        raise pytest.UsageError(
            f"--platform {','.join(sorted(unknown))}: not in {matrix.path} "
            f"(known: {', '.join(sorted(matrix.platforms))}, or all)"
        )
    return [
        cell
        for cell in matrix.cells
        if backend in ("all", cell.backend) and ("all" in platforms or cell.platform in platforms)
    ]


def pytest_generate_tests(metafunc: pytest.Metafunc) -> None:
    if "cell" not in metafunc.fixturenames or not active(metafunc.config):
        return
    kind_marker = metafunc.definition.get_closest_marker("cell_kind")
    kinds = set(kind_marker.args) if kind_marker else {"table", *EXPECT_KINDS}
    cells = [c for c in selected_cells(metafunc.config) if c.kind in kinds]
    if "startup_log" in kinds:
        cells = [c for c in selected_cells(metafunc.config) if c.startup_log]
    matrix = matrix_of(metafunc.config)
    metafunc.parametrize(
        "cell",
        [pytest.param(c, id=c.id, marks=_marks(c, matrix.platforms)) for c in cells],
        indirect=True,
        scope="session",
    )
    if "probe" in metafunc.fixturenames:
        probes = matrix.probes.values()
        metafunc.parametrize(
            "probe", [pytest.param(p, id=p.name, marks=pytest.mark.req(*p.req)) for p in probes]
        )


def _marks(cell: Cell, platforms: dict[str, Any]) -> list[pytest.MarkDecorator]:
    marks = [pytest.mark.req(*cell.req), pytest.mark.xdist_group(cell.id)]
    reason = unavailable(platforms[cell.platform])
    if reason:
        marks.append(pytest.mark.skip(reason=f"{PLATFORM_MISSING}: {cell.platform}: {reason}"))
    return marks


def _drivers(config: pytest.Config) -> set[str]:
    platforms = matrix_of(config).platforms
    return {platforms[c.platform].driver for c in selected_cells(config)}


def pytest_sessionstart(session: pytest.Session) -> None:
    if active(session.config) and not hasattr(session.config, "workerinput"):
        prepare(_drivers(session.config))  # once, on the xdist controller
        reap_dead_runs()  # after prepare: killed runs' containers and guests are gone


def pytest_sessionfinish(session: pytest.Session) -> None:
    if active(session.config) and not hasattr(session.config, "workerinput"):
        finish(_drivers(session.config))


@pytest.fixture(scope="session")
def matrix(request: pytest.FixtureRequest) -> Matrix:
    return matrix_of(request.config)


@pytest.fixture(scope="session")
def cells_root() -> Iterator[Path]:
    """Where cells keep their state, canaries and job dirs: a directory jobs may pass through
    (0711). Jobs under unshare run as the unprivileged ORVANTA_JOB_UID and reach their job
    dirs and the canaries by path; pytest's own 0700 temporary directories would stop them."""
    root = Path(tempfile.mkdtemp(prefix=owned_prefix(CELLS_DIR)))
    root.chmod(0o711)
    yield root
    remove_tree(root)  # unmounts anything a worker left mounted, then deletes


@pytest.fixture(scope="session")
def cell(request: pytest.FixtureRequest, cells_root: Path) -> Iterator[CellSession]:
    """A started cell: its workers, canaries and queue; torn down when its tests are done."""
    spec: Cell = request.param
    matrix = matrix_of(request.config)
    platform = open_platform(matrix.platforms[spec.platform])
    root = Path(tempfile.mkdtemp(prefix=spec.id.replace("/", "_") + "-", dir=cells_root))
    root.chmod(0o711)
    session = CellSession(matrix, spec, platform, root)
    try:
        session.start()
        yield session
    finally:
        try:
            session.close()
        finally:
            platform.close()


@pytest.fixture
def record(request: pytest.FixtureRequest, cell: CellSession) -> Iterator[list[dict[str, Any]]]:
    """Evidence for the audit report: the cell's start-up, and the probe runs appended here."""
    runs: list[dict[str, Any]] = []
    yield runs
    info = {
        "id": cell.cell.id,
        "startup_log": cell.startup_log().splitlines(),
        "facts": cell.platform.facts(),
    }
    request.node.user_properties.append(("orvanta_cell", info))
    for run in runs:
        request.node.user_properties.append(("orvanta_run", run))
