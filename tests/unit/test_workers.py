"""AUTHZ_WORKERS settings: refused on the in-process buckets, one metrics port per worker."""

from __future__ import annotations

import pytest

from authz.settings import SettingsError, load_settings
from authz.workers import worker_settings

REDIS = {"AUTHZ_REDIS_URL": "redis://127.0.0.1:6379/0"}


def test_more_than_one_worker_needs_redis() -> None:
    with pytest.raises(SettingsError) as raised:
        load_settings({"AUTHZ_WORKERS": "2"})
    assert "AUTHZ_WORKERS" in str(raised.value)
    assert "AUTHZ_REDIS_URL" in str(raised.value)
    assert load_settings({"AUTHZ_WORKERS": "1"}).workers == 1


@pytest.mark.parametrize("raw", ["0", "-1", "two"])
def test_workers_must_be_a_positive_integer(raw: str) -> None:
    with pytest.raises(SettingsError, match="AUTHZ_WORKERS"):
        load_settings({**REDIS, "AUTHZ_WORKERS": raw})


def test_each_worker_serves_metrics_on_its_own_port() -> None:
    settings = load_settings({**REDIS, "AUTHZ_WORKERS": "3", "AUTHZ_METRICS_ADDR": "0.0.0.0:9464"})
    addrs = [worker_settings(settings, i).metrics_addr for i in range(settings.workers)]
    assert addrs == ["0.0.0.0:9464", "0.0.0.0:9465", "0.0.0.0:9466"]
    assert {worker_settings(settings, i).grpc_addr for i in range(3)} == {settings.grpc_addr}
