"""The languages a job may be written in, and how the script header is read (R-ANN-1, R-ANN-4).

The header is the leading block of comment lines (`#` or `//`, in every
language) and blank lines; the first other line ends it. A UTF-8 byte-order
mark at the very start of the script is ignored, and spaces, tabs and
invisible format characters (zero-width space, soft hyphen) around a line do
not count. A line ends at LF, as bash reads it (a CR before the LF is
dropped); a comment line holding a lone CR is also read as the lines Python
sees in it (Python takes a lone CR for a line end), so neither reading hides
an annotation.

Annotations are read leniently, and they fail closed: a line that looks like
an annotation but is not one stops the job instead of running it with less
isolation than its author asked for (issue: `\\ufeff# sandbox`, `#  sandbox`
and `# Sandbox` after a shebang all ran unisolated, silently).

Per header line: BODY is the text after the `#` or `//` marker, NFKC-normalised
and stripped; KEY is BODY before its first `:` (all of BODY without one),
case-folded, runs of spaces and tabs counting as one; WORD is the leading run
of letters of KEY.

Accepted (any case, any spacing around the word and the colon):
- `# sandbox`, `#sandbox`, `// sandbox`: KEY is `sandbox` and there is no `:`.
- `# volume: NAME [TARGET]`, `// volume: ...`: KEY is `volume`; NAME and TARGET
  keep their case and must be plain names (`is_plain_name`).

A near miss, refused with `AnnotationError` (naming the line, its number and
the accepted forms), is any other header line where
1. WORD starts with `sandbox` or `volume` (`# sandboxed`, `# sandbox: yes`,
   `# Sandbox please`, `# volumes: x`, `# volume cache` without the colon), or
2. WORD, or KEY with spaces, tabs, `-` and `_` removed, is within edit distance
   (insert, delete, substitute, swap two neighbours) 2 of `sandbox` or 1 of
   `volume` (`# sandbx`, `# sand box`, `# SAND-BOX`, `## sandbox`, `# volme: x`).
   `volume` gets 1, not 2: at 2 everyday first words such as "column" and
   "plume" would fail, and a missed volume is a missing mount, never a job
   that runs with less isolation than it asked for.

Only WORD (or a KEY short enough to be a misspelt annotation) counts: prose
later in the line (`# this script sandboxes nothing`), shebangs and
`# -*- coding: utf-8 -*-` never fail. An ordinary comment whose first word is
`sandbox…` or `volume…` does: reword it, or move it below the first line of code.
Annotations after the header (below the first line of code) are not read.
"""

from __future__ import annotations

import functools
import re
import unicodedata
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


# Volumes, workspaces, tags and worker groups share one rule: a plain name, never a path.
PLAIN_NAME_PATTERN = r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,62}$"
_PLAIN_NAME = re.compile(PLAIN_NAME_PATTERN)

BOM = "\ufeff"
ACCEPTED_FORMS = ("# sandbox", "#sandbox", "// sandbox", "# volume: NAME [TARGET]")
# annotation word -> the largest edit distance that still counts as a near miss (docstring)
NEAR_MISS_DISTANCE = {"sandbox": 2, "volume": 1}
_SHOWN_CHARS = 80  # a header line is quoted up to this length in an error, never in full
_LETTERS = re.compile(r"[^\W\d_]+")
_SQUEEZE = re.compile(r"[\s_-]+")


def is_plain_name(value: str) -> bool:
    """1-63 letters, digits, '_', '.' or '-', starting with a letter or digit, no '..'."""
    return bool(_PLAIN_NAME.match(value)) and ".." not in value


@dataclass(frozen=True)
class VolumeRequest:
    """`# volume: NAME [TARGET]`: the workspace's volume NAME at ./TARGET in the job dir."""

    name: str
    target: str


@dataclass(frozen=True)
class Header:
    """What a script's header asks for: nsjail (`# sandbox`) and persistent volumes."""

    sandbox: bool = False
    volumes: tuple[VolumeRequest, ...] = ()


def _shown(line: str) -> str:
    if len(line) <= _SHOWN_CHARS:
        return repr(line)
    return f"{line[:_SHOWN_CHARS]!r}... ({len(line)} characters)"


class AnnotationError(ValueError):
    """A header line that is, or looks like, an annotation the runtime cannot obey.

    The job must not run: running it could mean running it with less isolation
    than its author asked for.
    """

    def __init__(self, message: str, lineno: int | None = None, line: str | None = None) -> None:
        self.lineno = lineno
        self.line = line
        super().__init__(message)

    @classmethod
    def near_miss(cls, lineno: int, line: str) -> AnnotationError:
        forms = ", ".join(repr(f) for f in ACCEPTED_FORMS)
        return cls(
            f"script line {lineno}: {_shown(line)} looks like a header annotation but is not "
            f"one, so the job is refused rather than run without the isolation it may ask "
            f"for; accepted annotations: {forms} (any case and spacing). If it is an ordinary "
            f"comment, reword it so that its first word is not 'sandbox' or 'volume'",
            lineno,
            line,
        )


class VolumeAnnotationError(AnnotationError):
    def __init__(self, line: str, what: str, value: str, lineno: int | None = None) -> None:
        where = f"script line {lineno}: " if lineno is not None else ""
        super().__init__(
            f"{where}volume annotation {_shown(line)}: {what} {_shown(value)} is not valid: use "
            f"1-63 letters, digits, '_', '.' or '-' (a name, not a path); "
            f"e.g. '# volume: cache data'",
            lineno,
            line,
        )


def _strip(text: str) -> str:
    """Whitespace and invisible format characters (Unicode category Cf) off both ends."""
    start, end = 0, len(text)
    while start < end and (text[start].isspace() or unicodedata.category(text[start]) == "Cf"):
        start += 1
    while end > start and (text[end - 1].isspace() or unicodedata.category(text[end - 1]) == "Cf"):
        end -= 1
    return text[start:end]


def _header(script: str) -> list[tuple[int, str]]:
    """(line number, stripped line) of each comment line of the header, numbered from 1."""
    if script.startswith(BOM):
        script = script[len(BOM) :]
    lines = []
    for number, line in enumerate(script.split("\n"), 1):
        stripped = _strip(line)
        if not stripped:
            continue
        if not stripped.startswith(("#", "//")):
            break
        # A lone CR ends a line for Python (universal newlines) but not for bash: read both
        # ways, so that neither reading hides an annotation from the other.
        for piece in stripped.split("\r"):
            piece = _strip(piece)
            if piece.startswith(("#", "//")):
                lines.append((number, piece))
    return lines


def header_lines(script: str) -> list[str]:
    """The leading comment block of a script (a shebang line counts as part of it)."""
    return [line for _, line in _header(script)]


def _distance(a: str, b: str, most: int) -> int:
    """Edit distance (optimal string alignment), or most + 1 once it is surely larger."""
    if abs(len(a) - len(b)) > most:
        return most + 1
    previous2: list[int] = []
    previous = list(range(len(b) + 1))
    for i, ca in enumerate(a, 1):
        current = [i]
        for j, cb in enumerate(b, 1):
            cost = 0 if ca == cb else 1
            value = min(previous[j] + 1, current[j - 1] + 1, previous[j - 1] + cost)
            if i > 1 and j > 1 and ca == b[j - 2] and a[i - 2] == cb:
                value = min(value, previous2[j - 2] + 1)
            current.append(value)
        previous2, previous = previous, current
    return min(previous[-1], most + 1)


def _near_miss(key: str) -> bool:
    word_match = _LETTERS.match(key)
    word = word_match.group() if word_match else ""
    compact = _SQUEEZE.sub("", key)
    for annotation, most in NEAR_MISS_DISTANCE.items():
        if word.startswith(annotation):
            return True
        if any(_distance(text, annotation, most) <= most for text in (word, compact) if text):
            return True
    return False


@functools.lru_cache(maxsize=4)  # scripts of up to 1 Mi characters (MAX_SCRIPT_CHARS)
def parse_header(script: str) -> Header:
    """The annotations of a script's header; AnnotationError on anything it cannot obey.
    Kept for the last scripts seen (a Header cannot change): a worker often runs the same
    script again, and asks twice of a job it prepares ahead."""
    sandbox = False
    volumes: list[VolumeRequest] = []
    for number, line in _header(script):
        body = line[2:] if line.startswith("//") else line[1:]
        body = _strip(unicodedata.normalize("NFKC", body))
        key, colon, value = body.partition(":")
        key = " ".join(key.split()).casefold()
        if key == "sandbox" and not colon:
            sandbox = True
        elif key == "volume" and colon:
            volumes.append(_volume(number, line, value))
        elif _near_miss(key):
            raise AnnotationError.near_miss(number, line)
    targets = [v.target for v in volumes]
    if len(set(targets)) != len(targets):
        raise VolumeAnnotationError(", ".join(targets), "targets", "(the same target twice)")
    return Header(sandbox, tuple(volumes))


def _volume(number: int, line: str, spec: str) -> VolumeRequest:
    parts = spec.split()
    if not parts or len(parts) > 2:
        raise VolumeAnnotationError(line, "specification", spec.strip(), number)
    name, target = parts[0], parts[-1]
    for what, value in (("name", name), ("target", target)):
        if not is_plain_name(value):
            raise VolumeAnnotationError(line, what, value, number)
    return VolumeRequest(name, target)


def wants_sandbox(script: str) -> bool:
    """`# sandbox` in the header (R-ANN-1); raises AnnotationError on a near miss (fail closed)."""
    return parse_header(script).sandbox


def volume_annotations(script: str) -> list[VolumeRequest]:
    """The persistent volumes a script's header asks for (R-ANN-4); names only, never paths."""
    return list(parse_header(script).volumes)
