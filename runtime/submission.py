"""What a job may carry into the queue: one set of rules for the API, the CLI and the queue.

`validate_job` runs wherever a job enters: `JobQueue.submit` (so every path
into the queue refuses), `POST /api/jobs` (a 422 with the message) and
`orvanta run` / `orvanta submit` (exit 2, `orvanta: <message>`). It checks

- the language (`runtime.languages.LANGUAGES`);
- the script: 1 to MAX_SCRIPT_CHARS characters of text both databases can store
  (no NUL, no lone surrogate), and its header annotations
  (`runtime.languages.parse_header`: a near miss of `# sandbox` is refused here,
  before it is queued, instead of failing on a worker later);
- the job's own variables: at most MAX_ENV_VARS names matching ENV_NAME_PATTERN,
  values of at most MAX_ENV_VALUE_CHARS storable characters, and none of the
  names below.

Refused names: variables that change how programs load or run code. A job's
variables once reached the environment of the root launchers (nsjail,
unshare, tini) that start the job, so `LD_PRELOAD=/job/x.so` ran the job's
code as root outside its jail. The launchers no longer get them
(runtime.backends); refusing them at submission is the second line of
defence, for any program that might still start with them. The list is
glibc's own: the variables it removes for setuid programs because they steer
privileged code (sysdeps/generic/unsecvars.h, UNSECURE_ENVVARS), every `LD_`
name (the dynamic loader reads all of them, and glibc adds more per release
and per architecture) and every `MALLOC_` name (allocator tunables and their
aliases: MALLOC_CHECK_, MALLOC_ARENA_MAX, ...), plus PCPROFILE_OUTPUT (where
libpcprofile writes) and a TZ that names a file by absolute path or with
`..` (glibc ignores such a TZ in setuid programs too). TMPDIR is on glibc's
list and refused with it: privileged helpers create their temporary files
where it points, and a job that wants it exports it in its own script, where
it affects only the job. Names are compared ignoring case: a lower-case
`ld_preload` does nothing to glibc, but no job needs it either.

Interpreter variables (PYTHONPATH, BASH_ENV, NODE_OPTIONS, ...) are allowed:
they take effect only in the job's own interpreter, inside its isolation,
where the job's code runs anyway. Exported bash functions (`BASH_FUNC_x%%`)
never match ENV_NAME_PATTERN.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from types import MappingProxyType

from runtime.languages import AnnotationError, UnknownLanguageError, language, parse_header

MAX_SCRIPT_CHARS = 1 << 20
MAX_ENV_VARS = 128
MAX_ENV_NAME_CHARS = 128
MAX_ENV_VALUE_CHARS = 32 << 10
ENV_NAME_PATTERN = rf"^[A-Za-z_][A-Za-z0-9_]{{0,{MAX_ENV_NAME_CHARS - 1}}}$"
_ENV_NAME = re.compile(ENV_NAME_PATTERN)
_SHOWN_CHARS = 64  # a bad name is quoted up to this length; a value is never quoted

_LOADER = "it changes how the dynamic loader loads code into every program started with it"
_RESOLVER = "it changes how glibc resolves host names (it reads files it names)"
# glibc's UNSECURE_ENVVARS (sysdeps/generic/unsecvars.h), with why each one steers a program
REFUSED_NAMES: Mapping[str, str] = MappingProxyType(
    {
        "GCONV_PATH": "glibc loads character-set conversion modules (code) from it",
        "GETCONF_DIR": "getconf runs helper programs from it",
        "GLIBC_TUNABLES": "glibc reads it as every program starts (tunables of the loader "
        "and the allocator; CVE-2023-4911)",
        "HOSTALIASES": _RESOLVER,
        "LD_AUDIT": _LOADER,
        "LD_DEBUG": _LOADER,
        "LD_DEBUG_OUTPUT": _LOADER,
        "LD_DYNAMIC_WEAK": _LOADER,
        "LD_HWCAP_MASK": _LOADER,
        "LD_LIBRARY_PATH": _LOADER,
        "LD_ORIGIN_PATH": _LOADER,
        "LD_PRELOAD": _LOADER,
        "LD_PROFILE": _LOADER,
        "LD_SHOW_AUXV": _LOADER,
        "LD_USE_LOAD_BIAS": _LOADER,
        "LOCALDOMAIN": _RESOLVER,
        "LOCPATH": "glibc loads locale data from it",
        "MALLOC_TRACE": "glibc's allocator writes a trace to the file it names",
        "NIS_PATH": _RESOLVER,
        "NLSPATH": "glibc loads message catalogs from it",
        "RESOLV_HOST_CONF": _RESOLVER,
        "RES_OPTIONS": _RESOLVER,
        "TMPDIR": "privileged programs create their temporary files where it points",
        "TZDIR": "glibc reads time-zone files from it",
        "PCPROFILE_OUTPUT": "glibc's libpcprofile writes to the file it names",
    }
)
REFUSED_PREFIXES: Mapping[str, str] = MappingProxyType(
    {
        "LD_": _LOADER,
        "MALLOC_": "glibc's allocator reads it (a tunable or its alias)",
    }
)


class SubmissionError(ValueError):
    """A job the queue refuses; the message says what was wrong and what to do instead."""


def _shown(text: str) -> str:
    if len(text) <= _SHOWN_CHARS:
        return repr(text)
    return f"{text[:_SHOWN_CHARS]!r}... ({len(text)} characters)"


def storable_problem(text: str) -> str | None:
    """Why neither database could store `text` (NUL, lone surrogate), or None when both can."""
    if "\x00" in text:
        return "contains a NUL character, which no database (and no environment) can hold"
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return "is not valid Unicode (it holds a lone surrogate)"
    return None


def refused_reason(name: str) -> str | None:
    """Why a job variable of this name is refused (see the module docstring), or None."""
    upper = name.upper()
    if upper in REFUSED_NAMES:
        return f"{REFUSED_NAMES[upper]} (runtime.submission.REFUSED_NAMES)"
    for prefix, why in REFUSED_PREFIXES.items():
        if upper.startswith(prefix):
            return f"{why} (runtime.submission.REFUSED_PREFIXES: {prefix}*)"
    return None


def _tz_file(value: str) -> bool:
    """A TZ naming a file by absolute path or with '..': what glibc ignores in setuid programs."""
    path = value[1:] if value.startswith(":") else value
    return path.startswith("/") or ".." in path


def check_env(env: Mapping[str, str]) -> None:
    """A job's own variables: names, values and how many (see the module docstring)."""
    if len(env) > MAX_ENV_VARS:
        raise SubmissionError(
            f"{len(env)} job variables, over the limit of {MAX_ENV_VARS}; "
            f"pass bulk data in the script or a volume instead"
        )
    for name, value in env.items():
        if not isinstance(name, str) or not isinstance(value, str):
            raise SubmissionError(f"job variable {_shown(str(name))}: names and values are text")
        if not _ENV_NAME.fullmatch(name):
            problem = storable_problem(name)
            raise SubmissionError(
                f"job variable name {_shown(name)} is not valid"
                + (f" (it {problem})" if problem else "")
                + f": use letters, digits and '_', not starting with a digit, "
                f"at most {MAX_ENV_NAME_CHARS} characters"
            )
        why = refused_reason(name)
        if why is None and name.upper() == "TZ" and _tz_file(value):
            why = (
                "a TZ that names a file (an absolute path or '..') makes every program read "
                "that file; use a zone name such as 'Europe/Berlin'"
            )
        if why is not None:
            raise SubmissionError(
                f"job variable {name!r} is refused: {why}; set it inside your script instead, "
                f"where it affects only your job"
            )
        if len(value) > MAX_ENV_VALUE_CHARS:
            raise SubmissionError(
                f"job variable {name!r}: its value has {len(value)} characters, over the limit "
                f"of {MAX_ENV_VALUE_CHARS}; pass bulk data in the script or a volume instead"
            )
        problem = storable_problem(value)
        if problem:
            raise SubmissionError(f"job variable {name!r}: its value {problem}")


def check_script(script: str) -> None:
    """Text both databases store, of a sane size, whose header the runtime can obey."""
    if not isinstance(script, str):
        raise SubmissionError("the script must be text")
    if not script:
        raise SubmissionError("the script is empty")
    if len(script) > MAX_SCRIPT_CHARS:
        raise SubmissionError(
            f"the script has {len(script)} characters, over the limit of {MAX_SCRIPT_CHARS}; "
            f"keep data out of it (a volume holds files across jobs)"
        )
    problem = storable_problem(script)
    if problem:
        raise SubmissionError(f"the script {problem}")
    try:
        parse_header(script)
    except AnnotationError as exc:
        raise SubmissionError(str(exc)) from exc


def validate_job(language_name: str, script: str, env: Mapping[str, str]) -> None:
    """Refuse a job no worker should run (SubmissionError); see the module docstring."""
    try:
        language(language_name)
    except UnknownLanguageError as exc:
        raise SubmissionError(str(exc)) from None
    check_script(script)
    check_env(env)
