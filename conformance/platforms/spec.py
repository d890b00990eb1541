"""A platform of matrix.yaml as typed data: what every platform has, plus its driver's options.

Read when the matrix is loaded, so that a typo in an option stops the run before any
worker or container starts, with the platform, the key or value, and what would be valid.
"""

from __future__ import annotations

import difflib
import typing
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass
from typing import TYPE_CHECKING, Any, Generic, TypeVar

if TYPE_CHECKING:
    from _typeshed import DataclassInstance

MODES = ("worker", "agent")
SERVERS = ("tcp", "unix")
OptionsT = TypeVar("OptionsT", bound="DataclassInstance")
T = TypeVar("T")


class SpecError(ValueError):
    """What is wrong at `where` (platforms.NAME.KEY) and what to write instead."""

    def __init__(self, where: str, problem: str) -> None:
        super().__init__(f"{where}: {problem}")
        self.where = where
        self.problem = problem


@dataclass(frozen=True)
class PlatformSpec(Generic[OptionsT]):
    name: str
    driver: str  # the driver class's key in conformance.platforms.DRIVERS
    options: OptionsT  # the driver's own frozen dataclass, its `Options`
    description: str = ""
    mode: str = "worker"  # worker: jobs from the database; agent: through the server's API only
    server: str = "tcp"  # agents: the server on loopback TCP, or unix (a socket in the cell root)

    def __post_init__(self) -> None:
        if self.mode not in MODES:
            raise SpecError("mode", f"{self.mode!r}: use one of {list(MODES)}")
        if self.server not in SERVERS:
            raise SpecError("server", f"{self.server!r}: use one of {list(SERVERS)}")
        if self.server != "tcp" and self.mode != "agent":
            raise SpecError("server", "only agents reach a server: add mode: agent, or drop it")

    def facts(self) -> dict[str, Any]:
        """The platform as defined, for the report beside what was measured."""
        options = asdict(self.options)
        return {"platform": self.name, "driver": self.driver, "mode": self.mode, "options": options}


COMMON = ("description", "mode", "server")  # the keys of every platform, whatever its driver


def read(cls: Callable[..., T], raw: Mapping[str, Any], where: str, **fixed: Any) -> T:
    """`cls(**fixed, **raw)` with each raw value checked against its field's type.

    The dataclass's __post_init__ checks values and raises SpecError naming only the key;
    `where` (platforms.NAME) goes in front of it.
    """
    hints = typing.get_type_hints(cls)
    values = {key: _typed(hints[key], value, f"{where}.{key}") for key, value in raw.items()}
    try:
        return cls(**fixed, **values)
    except SpecError as exc:
        raise SpecError(f"{where}.{exc.where}", exc.problem) from None


def unknown_keys(raw: Mapping[str, Any], known: Sequence[str], where: str, kind: str) -> None:
    """A key no field has: say which, the nearest known key, and all of them."""
    for key in raw:
        if key not in known:
            near = difflib.get_close_matches(str(key), known, n=1)
            hint = f"did you mean {near[0]!r}? " if near else ""
            known_keys = ", ".join(known)
            raise SpecError(
                f"{where}.{key}", f"not a key of {kind} platforms; {hint}use {known_keys}"
            )


DESCRIBE = {bool: "true or false", int: "a whole number", str: "a string (quote it)"}


def _typed(hint: Any, value: Any, where: str) -> Any:
    if hint is bool and isinstance(value, bool):
        return value
    if hint is int and isinstance(value, int) and not isinstance(value, bool):
        return value
    if hint is str and isinstance(value, str):
        return value
    strings = isinstance(value, list) and all(isinstance(v, str) for v in value)
    if typing.get_origin(hint) is tuple and strings:
        return tuple(value)
    raise SpecError(where, f"{value!r} is not {DESCRIBE.get(hint, 'a list of names, like [A, B]')}")
