"""The API's request and response bodies: the OpenAPI spec is generated from these.

Input rules sit in the types, so a bad request is a 422 that names the field
before any route runs; runtime.submission still checks a job whole.
"""

from typing import Annotated, Literal

from fastapi import Path
from pydantic import AfterValidator, BaseModel, Field, StringConstraints

from runtime.languages import PLAIN_NAME_PATTERN, is_plain_name
from runtime.submission import (
    ENV_NAME_PATTERN,
    MAX_ENV_VALUE_CHARS,
    MAX_ENV_VARS,
    MAX_SCRIPT_CHARS,
    storable_problem,
)

MAX_TIMEOUT_SECONDS = 86400.0
MAX_OUTPUT_CHARS = 256 << 20  # per stream, a bound for validation; the real cap is output_limit
MAX_LEASE_SECONDS = 86400.0


def _storable(text: str) -> str:
    """Text both databases can store: no NUL, valid UTF-8 (no lone surrogates)."""
    problem = storable_problem(text)
    if problem:
        raise ValueError(f"must be storable: it {problem}")
    return text


Text = Annotated[str, AfterValidator(_storable)]


def _plain(name: str) -> str:
    if not is_plain_name(name):
        raise ValueError("must not contain '..' (a name, not a path)")
    return name


# the patterns document the rules in the OpenAPI spec; runtime.submission checks the job whole
Name = Annotated[str, StringConstraints(pattern=PLAIN_NAME_PATTERN), AfterValidator(_plain)]
EnvName = Annotated[str, StringConstraints(pattern=ENV_NAME_PATTERN)]
EnvValue = Annotated[Text, StringConstraints(max_length=MAX_ENV_VALUE_CHARS)]
Language = Literal["bash", "python3"]  # = runtime.languages.LANGUAGES (a unit test checks)
Isolation = Literal["none", "nsjail_sandboxing"]  # = JOB_ISOLATION_VALUES (checked too)
JobId = Annotated[str, Path(pattern=r"^[A-Za-z0-9_-]{1,64}$")]
PathName = Annotated[str, Path(pattern=PLAIN_NAME_PATTERN)]


class JobRequest(BaseModel):
    language: Language = Field(description="the job's language")
    script: Annotated[Text, StringConstraints(min_length=1, max_length=MAX_SCRIPT_CHARS)]
    env: dict[EnvName, EnvValue] = Field(default_factory=dict, max_length=MAX_ENV_VARS)
    timeout: float | None = Field(default=None, gt=0, le=MAX_TIMEOUT_SECONDS)
    tag: Name = "default"
    workspace: Name = "default"


class JobCreated(BaseModel):
    id: str
    tag: str
    workspace: str
    waiting: str | None = Field(description="why no worker will take it yet, if none will")


class ResultModel(BaseModel):
    isolation: Annotated[Text, StringConstraints(max_length=64)]
    status: Literal["success", "failure", "timeout", "error", "canceled"]
    exit_code: int | None = Field(ge=-255, le=255)
    duration: float = Field(ge=0, le=10 * MAX_TIMEOUT_SECONDS)
    stdout: Annotated[Text, StringConstraints(max_length=MAX_OUTPUT_CHARS)]
    stderr: Annotated[Text, StringConstraints(max_length=MAX_OUTPUT_CHARS)]
    log: list[Annotated[Text, StringConstraints(max_length=64 << 10)]] = Field(max_length=1000)


class ResultOut(BaseModel):
    """A stored result as it is: no input limits on the way out (a stored job always reads)."""

    isolation: str
    status: str
    exit_code: int | None
    duration: float
    stdout: str
    stderr: str
    log: list[str]


class JobOut(BaseModel):
    id: str
    status: str
    tag: str
    workspace: str
    attempts: int
    worker: str | None
    worker_group: str | None
    created: float
    finished: float | None
    waiting: str | None
    result: ResultOut | None


class SettingValue(BaseModel):
    value: Isolation | None = Field(description="nsjail_sandboxing, none, or null to unset")


class SettingOut(BaseModel):
    value: str | None


class GroupRequest(BaseModel):
    name: Name
    tags: list[Name] = Field(min_length=1, max_length=64)


class GroupOut(BaseModel):
    name: str
    tags: list[str]


class GroupCreated(GroupOut):
    token: str = Field(description="the group's agent token; shown only now")


class AgentClaim(BaseModel):
    worker: Name
    lease: float = Field(default=30.0, gt=0, le=MAX_LEASE_SECONDS)


class AgentJob(BaseModel):
    id: str
    language: str
    script: str
    env: dict[str, str]
    timeout: float | None
    workspace: str
    job_isolation: str | None = None  # the instance setting, read with the claim (R-SEL-7)


class AgentClaimed(BaseModel):
    job: AgentJob | None


class AgentHeartbeat(BaseModel):
    worker: Name
    lease: float = Field(default=30.0, gt=0, le=MAX_LEASE_SECONDS)


class AgentResult(BaseModel):
    worker: Name
    result: ResultModel


class AgentWorker(BaseModel):
    worker: Name
