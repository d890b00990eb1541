"""Where the suite's data lives: `matrix.yaml` and `fixtures/` (probes, jobs, worker image).

A checkout keeps them at its top level, where a reader expects them; the wheel
carries a copy as package data (`conformance/data/`, put there by setup.py's
build step), so an installed `orvanta audit` finds them from any directory.
"""

from __future__ import annotations

from importlib import resources
from pathlib import Path

CHECKOUT = Path(__file__).resolve().parent.parent
DATA = ("matrix.yaml", "fixtures/probes", "fixtures/jobs", "fixtures/worker-image")


def in_checkout() -> bool:
    """Running from a source checkout (or an editable install of one)."""
    return (CHECKOUT / "pyproject.toml").is_file() and (CHECKOUT / "matrix.yaml").is_file()


def suite_file(name: str) -> Path:
    """The path of `name` (one of DATA, or below one): the checkout's, else the wheel's."""
    if in_checkout():
        return CHECKOUT / name
    return Path(str(resources.files("conformance").joinpath("data", name)))
