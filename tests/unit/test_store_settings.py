"""The connection-budget settings: pool size, the LISTEN URL and the statement cache."""

from __future__ import annotations

import pytest

from authz.settings import Settings, SettingsError, load_settings

PG = "postgresql://authz:pw@db:5432/authz"


def test_defaults_budget_three_connections_per_process() -> None:
    options = Settings(database_url=PG).store_options()
    assert options["pool_size"] == 2
    assert options["listen_url"] is None
    assert options["statement_cache"] is True


def test_pgbouncer_settings_reach_the_store() -> None:
    settings = load_settings(
        {
            "AUTHZ_DATABASE_URL": "postgresql://authz:pw@pgbouncer:6432/authz",
            "AUTHZ_DATABASE_LISTEN_URL": PG,
            "AUTHZ_DATABASE_STATEMENT_CACHE": "false",
            "AUTHZ_DB_POOL_SIZE": "4",
        }
    )
    options = settings.store_options()
    assert (options["listen_url"], options["statement_cache"], options["pool_size"]) == (
        PG,
        False,
        4,
    )


@pytest.mark.parametrize(
    ("environ", "message"),
    [
        (
            {"AUTHZ_DATABASE_LISTEN_URL": "mysql://secret@h/db"},
            "invalid setting AUTHZ_DATABASE_LISTEN_URL: expected postgresql://USER@HOST:PORT/DB",
        ),
        (
            {"AUTHZ_DATABASE_LISTEN_URL": PG},
            "invalid setting AUTHZ_DATABASE_LISTEN_URL: needs a PostgreSQL AUTHZ_DATABASE_URL",
        ),
        (
            {"AUTHZ_DATABASE_URL": PG, "AUTHZ_DATABASE_STATEMENT_CACHE": "maybe"},
            "invalid setting AUTHZ_DATABASE_STATEMENT_CACHE",
        ),
    ],
)
def test_bad_values_name_the_setting(environ: dict[str, str], message: str) -> None:
    with pytest.raises(SettingsError) as caught:
        load_settings(environ)
    assert str(caught.value).startswith(message)
    assert "pw" not in str(caught.value)


def test_commands_are_not_held_to_the_request_path_timeout() -> None:
    settings = Settings(database_url=PG, db_timeout_ms=150)
    assert settings.store_options()["read_timeout"] == 0.15
    assert settings.store_options(request_path=False)["read_timeout"] == 10.0
