"""Script header parsing for the sandbox annotation (R-ANN-1) and language names."""

from __future__ import annotations

import pytest

from runtime.languages import (
    LANGUAGES,
    AnnotationError,
    Header,
    UnknownLanguageError,
    VolumeRequest,
    guess_language,
    header_lines,
    language,
    parse_header,
    volume_annotations,
    wants_sandbox,
)

ANNOTATED = {
    "python-hash-nospace": "#sandbox\nprint('hi')\n",
    "python-hash-space": "# sandbox\nprint('hi')\n",
    "js-slashes": "// sandbox\nconsole.log('hi')\n",
    "js-slashes-nospace": "//sandbox\nconsole.log('hi')\n",
    "js-slashes-two-spaces": "//  sandbox\nconsole.log('hi')\n",
    "after-python-shebang": "#!/usr/bin/env python3\n# sandbox\nprint('hi')\n",
    "after-bash-shebang": "#!/bin/bash\n#sandbox\necho hi\n",
    "after-other-comments": "# job: nightly export\n# owner: data team\n# sandbox\nx = 1\n",
    "after-blank-lines": "\n\n# sandbox\nx = 1\n",
    "trailing-space": "# sandbox   \nx = 1\n",
    "indented": "   # sandbox\nx = 1\n",
    "crlf": "# sandbox\r\nx = 1\r\n",
    "only-the-annotation": "# sandbox",
    # the near misses that ran unisolated: now read as the annotation they meant
    "byte-order-mark": "\ufeff# sandbox\nprint('hi')\n",
    "byte-order-mark-then-shebang": "\ufeff#!/usr/bin/env python3\n# sandbox\nx = 1\n",
    "two-spaces": "#  sandbox\nx = 1\n",
    "tab": "#\tsandbox\nx = 1\n",
    "capitalised-after-shebang": "#!/usr/bin/env python3\n# Sandbox\nx = 1\n",
    "upper-case": "# SANDBOX\nx = 1\n",
    "upper-case-no-space": "#SANDBOX\nx = 1\n",
    "slashes-upper-case": "// SandBox\nx = 1\n",
    "crlf-after-shebang": "#!/bin/bash\r\n# Sandbox \r\necho hi\r\n",
    "blank-crlf-lines-first": "\r\n\r\n#  sandbox\r\nx = 1\r\n",
    "old-mac-line-ends": "# job\r# sandbox\rx = 1\r",  # python reads a lone CR as a line end
    "after-a-zero-width-space": "\u200b# sandbox\nx = 1\n",
    "full-width-letters": "# \uff53\uff41\uff4e\uff44\uff42\uff4f\uff58\nx = 1\n",
    "with-volume": "# volume: cache\n# sandbox\nx = 1\n",
}

NOT_ANNOTATED = {
    "no-comment": "print('hi')\n",
    "after-code": "import os\n# sandbox\nprint('hi')\n",
    "after-bash-code": "#!/bin/bash\necho hi\n#sandbox\n",
    "inside-a-string": "x = '# sandbox'\n",
    "print-string": 'print("# sandbox")\n',
    "inside-a-docstring": '"""\n# sandbox\n"""\nx = 1\n',
    "empty": "",
    "only-a-shebang": "#!/usr/bin/env python3\nx = 1\n",
    "byte-order-mark-only": "\ufeffx = 1\n",
}

# Ordinary header comments: neither an annotation nor a near miss.
ORDINARY = {
    "prose-with-the-word-later": "# this script sandboxes nothing\nx = 1\n",
    "todo": "# TODO: sandbox this later\nx = 1\n",
    "coding-cookie": "# -*- coding: utf-8 -*-\nx = 1\n",
    "shebang-and-coding": "#!/usr/bin/env python3\n# -*- coding: utf-8 -*-\nx = 1\n",
    "vim-modeline": "# vim: set ft=python ts=4:\nx = 1\n",
    "column-is-not-volume": "# column names: a, b\nx = 1\n",
    "plume": "# plume of smoke\nx = 1\n",
    "values": "# values: 1, 2\nx = 1\n",
    "shellcheck": "#!/bin/bash\n# shellcheck disable=SC2034\necho\n",
    "rule": "#" + "-" * 70 + "\nx = 1\n",
    "empty-comment": "#\n#\nx = 1\n",
    "slashes-prose": "// the sandbox is elsewhere\nx\n",
    "type-ignore": "# type: ignore\nx = 1\n",
}

# Look like an annotation but are none: refused, never run with less isolation than meant.
NEAR_MISSES = {
    "sandbox-colon-yes": "# sandbox: yes",
    "sandbox-colon": "# sandbox:",
    "sandbx": "# sandbx",
    "sanbdox": "# sanbdox",
    "sand-box": "# sand box",
    "sand-hyphen-box": "# SAND-BOX",
    "sandboxed": "# sandboxed",
    "sandboxing": "#sandboxing",
    "nosandbox": "# nosandbox",
    "words-after": "# sandbox please",
    "prose-starting-with-the-word": "# Sandbox tests follow",
    "double-hash": "## sandbox",
    "triple-slash": "/// sandbox",
    "slashes-sandboxed": "// sandboxed",
    "volumes": "# volumes: x",
    "volume-without-colon": "# volume cache",
    "volme": "# volme: x",
    "volumne": "# Volumne: cache",
    "zero-width-inside": "# sand\u200bbox",
}


@pytest.mark.req("R-ANN-1")
@pytest.mark.parametrize("script", ANNOTATED.values(), ids=ANNOTATED.keys())
def test_annotation_found(script: str) -> None:
    assert wants_sandbox(script) is True
    assert parse_header(script).sandbox is True


@pytest.mark.req("R-ANN-1")
@pytest.mark.parametrize(
    "script",
    [*NOT_ANNOTATED.values(), *ORDINARY.values()],
    ids=[*NOT_ANNOTATED.keys(), *ORDINARY.keys()],
)
def test_annotation_not_found(script: str) -> None:
    assert wants_sandbox(script) is False
    assert parse_header(script) == Header(sandbox=False, volumes=())


@pytest.mark.req("R-ANN-1", "R-ANN-2")
@pytest.mark.parametrize("line", NEAR_MISSES.values(), ids=NEAR_MISSES.keys())
def test_a_near_miss_fails_closed_with_the_line_and_the_accepted_forms(line: str) -> None:
    script = f"#!/usr/bin/env python3\n\n{line}\nprint('hi')\n"
    with pytest.raises(AnnotationError) as info:
        wants_sandbox(script)  # raises: never a quiet False (issue: a near miss ran unisolated)
    message = str(info.value)
    assert message.startswith(f"script line 3: {line!r} looks like a header annotation")
    for form in ("'# sandbox'", "'#sandbox'", "'// sandbox'", "'# volume: NAME [TARGET]'"):
        assert form in message
    assert (info.value.lineno, info.value.line) == (3, line)
    assert isinstance(info.value, ValueError)  # the executor turns ValueError into a job error
    with pytest.raises(AnnotationError):
        volume_annotations(script)


@pytest.mark.req("R-ANN-1")
def test_a_near_miss_after_a_real_annotation_still_fails() -> None:
    with pytest.raises(AnnotationError, match="line 2"):
        parse_header("# sandbox\n# sandbx\nx = 1\n")


@pytest.mark.req("R-ANN-1")
def test_a_long_near_miss_is_quoted_only_in_part() -> None:
    line = "# sandbox " + "x" * 10_000
    with pytest.raises(AnnotationError) as info:
        parse_header(line)
    assert len(str(info.value)) < 600 and "(10010 characters)" in str(info.value)


@pytest.mark.req("R-ANN-4")
@pytest.mark.parametrize(
    ("header", "expected"),
    [
        ("# Volume:  cache", VolumeRequest("cache", "cache")),
        ("#VOLUME: cache data", VolumeRequest("cache", "data")),
        ("// volume : Models m", VolumeRequest("Models", "m")),  # names keep their case
        ("\ufeff#  volume:cache\r", VolumeRequest("cache", "cache")),
        ("#!/bin/bash\n# volume:\tcache\tdata  ", VolumeRequest("cache", "data")),
    ],
)
def test_volume_annotations_are_read_as_leniently(header: str, expected: VolumeRequest) -> None:
    assert volume_annotations(f"{header}\nx = 1\n") == [expected]


@pytest.mark.req("R-ANN-1", "R-ANN-4")
def test_parse_header_reads_both_annotations_once() -> None:
    script = "#!/bin/bash\n# Volume: cache data\n#  SANDBOX\n// volume: models\necho\n# sandbx\n"
    assert parse_header(script) == Header(
        sandbox=True, volumes=(VolumeRequest("cache", "data"), VolumeRequest("models", "models"))
    )


@pytest.mark.req("R-ANN-1")
def test_header_lines_stop_at_the_first_code_line() -> None:
    script = "#!/usr/bin/env python3\n\n# a comment\n// other\nimport os\n# later\n"
    assert header_lines(script) == ["#!/usr/bin/env python3", "# a comment", "// other"]
    assert header_lines("x = 1\n# sandbox\n") == []
    assert header_lines("\ufeff# a\r\n# b\r# c\n") == ["# a", "# b", "# c"]


@pytest.mark.req("R-ANN-1")
@pytest.mark.parametrize(
    ("filename", "expected"),
    [
        ("job.py", "python3"),
        ("/tmp/dir.sh/job.py", "python3"),
        ("job.sh", "bash"),
        ("job.bash", "bash"),
    ],
)
def test_guess_language(filename: str, expected: str) -> None:
    assert guess_language(filename) == expected


@pytest.mark.req("R-ANN-1")
@pytest.mark.parametrize(("filename", "named"), [("job.ts", "'ts'"), ("Makefile", "'Makefile'")])
def test_guess_language_refuses_unknown_suffixes(filename: str, named: str) -> None:
    with pytest.raises(UnknownLanguageError) as info:
        guess_language(filename)
    assert named in str(info.value)
    assert "accepted: bash, python3" in str(info.value)


@pytest.mark.req("R-NSJ-1")
def test_unknown_language_error_names_the_language_and_the_accepted_ones() -> None:
    with pytest.raises(UnknownLanguageError) as info:
        language("ruby")
    assert str(info.value) == "unknown job language 'ruby'; accepted: bash, python3"


@pytest.mark.req("R-NSJ-1", "R-PID-1")
def test_language_argv() -> None:
    assert set(LANGUAGES) == {"python3", "bash"}
    python = language("python3")
    assert python.filename == "main.py"
    assert python.argv("/job/main.py", "/usr/bin/python3") == [
        "/usr/bin/python3",
        "-u",
        "/job/main.py",
    ]
    bash = language("bash")
    assert bash.filename == "main.sh"
    assert bash.argv("/job/main.sh", "/usr/bin/python3") == ["/bin/bash", "/job/main.sh"]
