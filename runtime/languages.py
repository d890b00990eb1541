"""The languages a job may be written in, and how the script header is read (R-ANN-1)."""

from __future__ import annotations

import re
from dataclasses import dataclass


@dataclass(frozen=True)
class Language:
    name: str
    filename: str

    def argv(self, script_path: str, python_path: str) -> list[str]:
        """The command that runs the script, as seen from inside the job's view."""
        if self.name == "python3":
            return [python_path, "-u", script_path]
        return ["/bin/bash", script_path]


LANGUAGES = {
    "python3": Language("python3", "main.py"),
    "bash": Language("bash", "main.sh"),
}


class UnknownLanguageError(ValueError):
    def __init__(self, name: str) -> None:
        super().__init__(f"unknown job language {name!r}; accepted: {', '.join(sorted(LANGUAGES))}")


def language(name: str) -> Language:
    try:
        return LANGUAGES[name]
    except KeyError:
        raise UnknownLanguageError(name) from None


def guess_language(filename: str) -> str:
    """python3 for .py, bash for .sh/.bash; anything else must be named with --lang."""
    if filename.endswith(".py"):
        return "python3"
    if filename.endswith((".sh", ".bash")):
        return "bash"
    raise UnknownLanguageError(filename.rsplit(".", 1)[-1] if "." in filename else filename)


_SANDBOX = re.compile(r"^(#|//)\s?sandbox\s*$")
_VOLUME = re.compile(r"^(?:#|//)\s?volume:\s*(?P<spec>.*)$")
# Volumes, workspaces, tags and worker groups share one rule: a plain name, never a path.
PLAIN_NAME_PATTERN = r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,62}$"
_PLAIN_NAME = re.compile(PLAIN_NAME_PATTERN)


def is_plain_name(value: str) -> bool:
    """1-63 letters, digits, '_', '.' or '-', starting with a letter or digit, no '..'."""
    return bool(_PLAIN_NAME.match(value)) and ".." not in value


def header_lines(script: str) -> list[str]:
    """The leading comment block of a script (a shebang line counts as part of it)."""
    lines = []
    for line in script.splitlines():
        stripped = line.strip()
        if not stripped:
            continue
        if stripped.startswith(("#", "//")):
            lines.append(stripped)
            continue
        break
    return lines


def wants_sandbox(script: str) -> bool:
    """`#sandbox`, `# sandbox` (Python, Bash) or `// sandbox` (TS/JS) in the header."""
    return any(_SANDBOX.match(line) for line in header_lines(script))


@dataclass(frozen=True)
class VolumeRequest:
    """`# volume: NAME [TARGET]`: the workspace's volume NAME at ./TARGET in the job dir."""

    name: str
    target: str


class VolumeAnnotationError(ValueError):
    def __init__(self, line: str, what: str, value: str) -> None:
        super().__init__(
            f"volume annotation {line!r}: {what} {value!r} is not valid: use 1-63 letters, "
            f"digits, '_', '.' or '-' (a name, not a path); e.g. '# volume: cache data'"
        )


def volume_annotations(script: str) -> list[VolumeRequest]:
    """The persistent volumes a script's header asks for (R-ANN-4); names only, never paths."""
    volumes: list[VolumeRequest] = []
    for line in header_lines(script):
        match = _VOLUME.match(line)
        if match is None:
            continue
        parts = match["spec"].split()
        if not parts or len(parts) > 2:
            raise VolumeAnnotationError(line, "specification", match["spec"])
        name, target = parts[0], parts[-1]
        for what, value in (("name", name), ("target", target)):
            if not is_plain_name(value):
                raise VolumeAnnotationError(line, what, value)
        volumes.append(VolumeRequest(name, target))
    targets = [v.target for v in volumes]
    if len(set(targets)) != len(targets):
        raise VolumeAnnotationError(", ".join(targets), "targets", "(the same target twice)")
    return volumes
