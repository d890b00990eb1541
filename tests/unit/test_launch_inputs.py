"""What a launcher reads from an fd: data in a memfd of the worker's, never a file (R-JOB-1)."""

from __future__ import annotations

import fcntl
import os

import pytest

from runtime.backends import Launch, memory_file, records


@pytest.mark.req("R-JOB-1")
def test_a_launchers_input_is_an_anonymous_memory_file_read_from_its_start() -> None:
    data = records(["TOKEN=s3cret\nline two", "EMPTY="]) * 5000  # larger than one write
    fd = memory_file(data)
    try:
        assert os.readlink(f"/proc/self/fd/{fd}").startswith("/memfd:"), "it has a path"
        assert fcntl.fcntl(fd, fcntl.F_GETFD) & fcntl.FD_CLOEXEC, "a job's spawn would inherit it"
        chunks = []
        while chunk := os.read(fd, 1 << 16):
            chunks.append(chunk)
        assert b"".join(chunks) == data
        with pytest.raises(PermissionError):
            os.write(fd, b"x")  # sealed: not even its holder changes it
    finally:
        os.close(fd)


def test_fd_marks_are_replaced_inside_an_argument_too() -> None:
    """nsjail takes its config as a path: /proc/self/fd/{fd0}."""
    launch = Launch(["nsjail", "--config", "/proc/self/fd/{fd0}", "--args", "{fd1}"], {})
    assert launch.argv_for([7, 12]) == ["nsjail", "--config", "/proc/self/fd/7", "--args", "12"]


def test_without_memfd_the_input_is_an_unlinked_file_of_roots_alone(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A seccomp filter may refuse memfd_create: the job still starts, its input unreachable."""

    def refused(name: str, flags: int = 0) -> int:
        raise OSError(38, "Function not implemented")

    monkeypatch.setattr(os, "memfd_create", refused)
    fd = memory_file(b"TOKEN=s3cret\0")
    try:
        assert os.readlink(f"/proc/self/fd/{fd}").endswith(" (deleted)")
        assert os.fstat(fd).st_mode & 0o777 == 0o600
        assert os.read(fd, 100) == b"TOKEN=s3cret\0"
    finally:
        os.close(fd)
