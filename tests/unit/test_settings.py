from __future__ import annotations

import argparse

import pytest

from authz.settings import Settings, SettingsError, add_setting_flags, load_settings, redact_url


def test_defaults_match_the_contract() -> None:
    settings = load_settings({})
    assert settings == Settings()
    assert settings.database_url == "sqlite:///./authz.db"
    assert settings.redis_url is None
    assert settings.grpc_addr == "127.0.0.1:9191"
    assert settings.metrics_addr == "127.0.0.1:9464"
    assert settings.failure_mode == "closed"
    assert settings.keep_authorization is False


def test_flags_win_over_environment() -> None:
    parser = argparse.ArgumentParser()
    add_setting_flags(parser)
    flags = parser.parse_args(["--grpc-addr", "0.0.0.0:7000"])
    settings = load_settings(
        {"AUTHZ_GRPC_ADDR": "127.0.0.1:1", "AUTHZ_FAILURE_MODE": "OPEN"}, flags
    )
    assert settings.grpc_addr == "0.0.0.0:7000"
    assert settings.failure_mode == "open"


@pytest.mark.parametrize(
    ("env", "message"),
    [
        (
            {"AUTHZ_DATABASE_URL": "mysql://x"},
            "invalid setting AUTHZ_DATABASE_URL: expected sqlite",
        ),
        ({"AUTHZ_REDIS_URL": "http://x"}, "invalid setting AUTHZ_REDIS_URL: expected redis://"),
        ({"AUTHZ_GRPC_ADDR": "9191"}, "invalid setting AUTHZ_GRPC_ADDR: expected host:port"),
        ({"AUTHZ_FAILURE_MODE": "maybe"}, "invalid setting AUTHZ_FAILURE_MODE: expected one of"),
        (
            {"AUTHZ_REDIS_TIMEOUT_MS": "0"},
            "invalid setting AUTHZ_REDIS_TIMEOUT_MS: expected a positive",
        ),
        ({"AUTHZ_REDIS_TIMEOUT_MS": "abc"}, "invalid setting AUTHZ_REDIS_TIMEOUT_MS"),
        ({"AUTHZ_CACHE_TTL_S": "nan"}, "invalid setting AUTHZ_CACHE_TTL_S"),
        ({"AUTHZ_REDIS_BREAKER_FAILURES": "0"}, "invalid setting AUTHZ_REDIS_BREAKER_FAILURES"),
        (
            {"AUTHZ_LEDGER_FLUSH_S": "0"},
            "invalid setting AUTHZ_LEDGER_FLUSH_S: expected a positive",
        ),
        ({"AUTHZ_KEEP_AUTHORIZATION": "perhaps"}, "invalid setting AUTHZ_KEEP_AUTHORIZATION"),
        (
            {"AUTHZ_GRPC_ADDR": "127.0.0.1:1", "AUTHZ_METRICS_ADDR": "127.0.0.1:1"},
            "invalid setting AUTHZ_METRICS_ADDR: must differ",
        ),
        ({"AUTHZ_HEALTH_ADDR": "9192"}, "invalid setting AUTHZ_HEALTH_ADDR: expected host:port"),
        (
            {"AUTHZ_GRPC_ADDR": "127.0.0.1:1", "AUTHZ_HEALTH_ADDR": "127.0.0.1:1"},
            "invalid setting AUTHZ_HEALTH_ADDR: must differ",
        ),
        ({"AUTHZ_TLS_CERT": "/nonexistent.pem"}, "invalid setting AUTHZ_TLS_CERT: cannot read"),
        ({"AUTHZ_TLS_CERT": "/dev/null"}, "invalid setting AUTHZ_TLS_KEY: AUTHZ_TLS_CERT and"),
        ({"AUTHZ_TLS_CLIENT_CA": "/dev/null"}, "invalid setting AUTHZ_TLS_CLIENT_CA: needs"),
    ],
)
def test_bad_settings_name_the_setting(env: dict[str, str], message: str) -> None:
    with pytest.raises(SettingsError) as error:
        load_settings(env)
    assert str(error.value).startswith(message)


def test_errors_never_show_a_password() -> None:
    with pytest.raises(SettingsError) as error:
        load_settings({"AUTHZ_REDIS_URL": "http://user:hunter2@host"})
    assert "hunter2" not in str(error.value)
    assert redact_url("postgresql://u:secret@h/db") == "postgresql://u:***@h/db"
