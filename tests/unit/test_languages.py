"""Script header parsing for the sandbox annotation (R-ANN-1) and language names."""

from __future__ import annotations

import pytest

from runtime.languages import (
    LANGUAGES,
    UnknownLanguageError,
    guess_language,
    header_lines,
    language,
    wants_sandbox,
)

ANNOTATED = {
    "python-hash-nospace": "#sandbox\nprint('hi')\n",
    "python-hash-space": "# sandbox\nprint('hi')\n",
    "js-slashes": "// sandbox\nconsole.log('hi')\n",
    "after-python-shebang": "#!/usr/bin/env python3\n# sandbox\nprint('hi')\n",
    "after-bash-shebang": "#!/bin/bash\n#sandbox\necho hi\n",
    "after-other-comments": "# job: nightly export\n# owner: data team\n# sandbox\nx = 1\n",
    "after-blank-lines": "\n\n# sandbox\nx = 1\n",
    "trailing-space": "# sandbox   \nx = 1\n",
    "indented": "   # sandbox\nx = 1\n",
    "crlf": "# sandbox\r\nx = 1\r\n",
    "only-the-annotation": "# sandbox",
}

NOT_ANNOTATED = {
    "no-comment": "print('hi')\n",
    "after-code": "import os\n# sandbox\nprint('hi')\n",
    "after-bash-code": "#!/bin/bash\necho hi\n#sandbox\n",
    "sandboxed": "# sandboxed\nx = 1\n",
    "sandboxing": "#sandboxing\nx = 1\n",
    "prefix-word": "# nosandbox\nx = 1\n",
    "inside-a-string": "x = '# sandbox'\n",
    "print-string": 'print("# sandbox")\n',
    "inside-a-docstring": '"""\n# sandbox\n"""\nx = 1\n',
    "words-after": "# sandbox please\nx = 1\n",
    "empty": "",
}


@pytest.mark.req("R-ANN-1")
@pytest.mark.parametrize("script", ANNOTATED.values(), ids=ANNOTATED.keys())
def test_annotation_found(script: str) -> None:
    assert wants_sandbox(script) is True


@pytest.mark.req("R-ANN-1")
@pytest.mark.parametrize("script", NOT_ANNOTATED.values(), ids=NOT_ANNOTATED.keys())
def test_annotation_not_found(script: str) -> None:
    assert wants_sandbox(script) is False


@pytest.mark.req("R-ANN-1")
def test_header_lines_stop_at_the_first_code_line() -> None:
    script = "#!/usr/bin/env python3\n\n# a comment\n// other\nimport os\n# later\n"
    assert header_lines(script) == ["#!/usr/bin/env python3", "# a comment", "// other"]
    assert header_lines("x = 1\n# sandbox\n") == []


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
