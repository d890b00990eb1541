"""Pure logic of the job service: volume annotations, agent settings, database URLs, API enums."""

from __future__ import annotations

import typing
from pathlib import Path

import pytest

from runtime.database import DatabaseURLError, SqliteDatabase, connect, redact
from runtime.languages import LANGUAGES, VolumeAnnotationError, VolumeRequest, volume_annotations
from runtime.settings import JOB_ISOLATION_VALUES, Settings, SettingsError
from runtime.store.errors import InvalidNameError, check_name


@pytest.mark.req("R-ANN-4")
@pytest.mark.parametrize(
    ("script", "expected"),
    [
        ("# volume: cache\nprint(1)\n", [VolumeRequest("cache", "cache")]),
        ("#volume: cache data\n", [VolumeRequest("cache", "data")]),
        ("// volume: models m\n", [VolumeRequest("models", "m")]),
        (
            "# sandbox\n# volume: a\n# volume: b x\n",
            [VolumeRequest("a", "a"), VolumeRequest("b", "x")],
        ),
        ("print(1)\n# volume: late\n", []),  # only the header counts
    ],
)
def test_volume_annotations_are_read_from_the_header(
    script: str, expected: list[VolumeRequest]
) -> None:
    assert volume_annotations(script) == expected


@pytest.mark.req("R-ANN-4")
@pytest.mark.parametrize(
    ("header", "names"),
    [
        ("# volume: ../etc", "'../etc'"),
        ("# volume: /etc", "'/etc'"),
        ("# volume: cache ../../root", "'../../root'"),
        ("# volume: a/b", "'a/b'"),
        ("# volume: .hidden", "'.hidden'"),
        ("# volume: a..b", "'a..b'"),
        ("# volume:", "specification ''"),
        ("# volume: a b c", "'a b c'"),
        ("# volume: a x\n# volume: b x", "targets"),
    ],
)
def test_volume_names_that_are_paths_are_refused(header: str, names: str) -> None:
    with pytest.raises(VolumeAnnotationError) as err:
        volume_annotations(header + "\nprint(1)\n")
    assert names in str(err.value) and "a name, not a path" in str(err.value)


@pytest.mark.req("R-AGT-1")
def test_an_agent_is_configured_by_server_url_and_token_only() -> None:
    s = Settings.from_env(
        {
            "MODE": "agent",
            "ORVANTA_SERVER_URL": "http://127.0.0.1:8000",
            "ORVANTA_AGENT_TOKEN": "tok-SECRET",
        }
    )
    assert (s.mode, s.server_url, s.agent_token, s.database_url) == (
        "agent",
        "http://127.0.0.1:8000",
        "tok-SECRET",
        None,
    )
    assert "SECRET" not in repr(s)  # the token is not in the repr (logs, tracebacks)


@pytest.mark.req("R-AGT-1")
@pytest.mark.parametrize(
    ("env", "variable", "says"),
    [
        (
            {"DATABASE_URL": "postgresql://u:SECRET@h/db", "ORVANTA_SERVER_URL": "http://h:1"},
            "DATABASE_URL",
            "must hold no database credentials",
        ),
        ({"ORVANTA_AGENT_TOKEN": "t"}, "ORVANTA_SERVER_URL", "base URL"),
        (
            {"ORVANTA_SERVER_URL": "ftp://h", "ORVANTA_AGENT_TOKEN": "t"},
            "ORVANTA_SERVER_URL",
            "http",
        ),
        ({"ORVANTA_SERVER_URL": "http://h:1"}, "ORVANTA_AGENT_TOKEN", "group's token"),
    ],
)
def test_an_agent_refuses_database_credentials_and_missing_api_settings(
    env: dict[str, str], variable: str, says: str
) -> None:
    with pytest.raises(SettingsError) as err:
        Settings.from_env({"MODE": "agent", **env})
    assert err.value.variable == variable and says in str(err.value)
    assert "SECRET" not in str(err.value)


def test_mode_and_worker_tags() -> None:
    assert Settings.from_env({"WORKER_TAGS": "a, b c"}).worker_tags == ("a", "b", "c")
    assert Settings.from_env({}).worker_tags == ("default",)
    with pytest.raises(SettingsError, match=r"'server'.*worker, agent"):
        Settings.from_env({"MODE": "server"})


@pytest.mark.parametrize(
    "url",
    ["mysql://u:p@h/db", "sqlite://relative.db", "sqlite:///", "http://h", "postgresql:/x"],
)
def test_database_urls_other_than_postgresql_and_sqlite_are_refused(
    url: str, tmp_path: Path
) -> None:
    with pytest.raises(DatabaseURLError, match="accepted: postgresql://"):
        connect(url, tmp_path)


def test_sqlite_urls_and_the_default(tmp_path: Path) -> None:
    default = connect(None, tmp_path)
    named = connect(f"sqlite:///{tmp_path}/other.db", tmp_path)
    assert isinstance(default, SqliteDatabase) and default.display == str(
        tmp_path / "queue.sqlite3"
    )
    assert isinstance(named, SqliteDatabase) and named.display == str(tmp_path / "other.db")
    default.close()
    named.close()


def test_passwords_are_redacted() -> None:
    assert redact("postgresql://orvanta:s3cr:et@127.0.0.1:5432/db") == (
        "postgresql://orvanta:***@127.0.0.1:5432/db"
    )
    assert redact("sqlite:////x/q.db") == "sqlite:////x/q.db"
    assert redact("postgresql://h/db?sslmode=off&password=pw") == (
        "postgresql://h/db?sslmode=off&password=***"
    )
    assert redact("postgresql://u:p@ss@h/db") == "postgresql://u:***@h/db"
    # libpq takes these unencoded; a URL parser would leave them visible or raise
    assert redact("postgresql://u:pa?ss@h/db") == "postgresql://u:***@h/db"
    assert redact("postgresql://u:p[a]s#s@h:5432/db") == "postgresql://u:***@h:5432/db"
    assert redact("postgresql://u@h/db") == "postgresql://u@h/db"


@pytest.mark.req("R-GRP-1")
@pytest.mark.parametrize("name", ["../x", "", "a/b", "-a", "x" * 64, "a..b", "a b"])
def test_tags_groups_and_workspaces_are_plain_names(name: str) -> None:
    with pytest.raises(InvalidNameError):
        check_name("tag", name)


def test_the_api_enums_match_the_runtime() -> None:
    from runtime.api import models

    assert set(typing.get_args(models.Language)) == set(LANGUAGES)
    assert set(typing.get_args(models.Isolation)) == set(JOB_ISOLATION_VALUES)
