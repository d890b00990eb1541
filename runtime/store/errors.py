"""What the stores refuse, as types: the server answers each with its own status code."""

from __future__ import annotations

from runtime.languages import is_plain_name


class NotFound(KeyError):
    """No such job, worker group or setting (404).

    A KeyError, as the queue raised before these types, so callers that catch one
    (the CLI) keep working.
    """

    def __str__(self) -> str:
        return str(self.args[0])  # KeyError's own would quote the message


class JobNotFound(NotFound):
    def __init__(self, job_id: str, detail: str = "") -> None:
        super().__init__(f"no job {job_id!r}{detail}")
        self.job_id = job_id


class GroupNotFound(NotFound):
    def __init__(self, name: str) -> None:
        super().__init__(f"no worker group {name!r}")
        self.name = name


class Conflict(ValueError):
    """What the request would create exists already (409).

    A ValueError, so the CLI's refusal path prints it as it prints a bad name.
    """


class GroupExists(Conflict):
    def __init__(self, name: str) -> None:
        super().__init__(f"worker group {name!r} already exists")
        self.name = name


class InvalidNameError(ValueError):
    """A tag, group, workspace or volume name that could be a path or an injection."""

    def __init__(self, what: str, value: str) -> None:
        super().__init__(
            f"{what} {value!r} is not valid: use 1-63 letters, digits, '_', '.' or '-', "
            f"starting with a letter or digit"
        )


def check_name(what: str, value: str) -> str:
    if not is_plain_name(value):
        raise InvalidNameError(what, value)
    return value
