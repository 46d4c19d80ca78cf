"""The production shape: two replicas on one PostgreSQL and one Redis, Envoy in front of one.

Buckets are shared across replicas, and revocations and limit changes reach both within 1 s.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.support.redis_servers import redis_url_for_tests
from tests.support.stack import (
    FEED_LOGS,
    Sidecar,
    Stack,
    authz_cli,
    change_applied_after,
    start_envoy,
    start_sidecar,
    start_upstream,
    wait_until,
)

pytestmark = pytest.mark.e2e


@pytest.fixture
def replicas(tmp_path: Path, pg_dsn: str) -> Iterator[tuple[Stack, Sidecar]]:
    authz_cli(pg_dsn, "migrate")
    with redis_url_for_tests() as redis_url:
        env = {"AUTHZ_REDIS_URL": redis_url, **FEED_LOGS}
        upstream, upstream_port = start_upstream(tmp_path)
        first = start_sidecar(tmp_path, database_url=pg_dsn, name="replica-a", env=env)
        second = start_sidecar(tmp_path, database_url=pg_dsn, name="replica-b", env=env)
        envoy, port = start_envoy(
            tmp_path, authz_port=int(first.grpc_addr.rsplit(":", 1)[1]), upstream_port=upstream_port
        )
        try:
            stack = Stack(envoy, upstream, first, pg_dsn, port, upstream_port)
            wait_until(lambda: stack.request("/v1/models").status == 401, timeout=20, what="up")
            yield stack, second
        finally:
            envoy.stop()
            first.process.stop()
            second.process.stop()
            upstream.stop()


def test_two_replicas_share_buckets_and_see_changes_within_a_second(
    replicas: tuple[Stack, Sidecar],
) -> None:
    stack, other = replicas
    workspace = authz_cli(stack.database_url, "workspace", "create", "acme", "--rpm", "4")
    key = authz_cli(
        stack.database_url, "key", "create", "--workspace", workspace["id"], "--label", "prod"
    )
    auth = {"Authorization": f"Bearer {key['secret']}"}

    # One bucket for the workspace, whichever replica answers.
    assert [stack.request("/v1/models", headers=auth).status for _ in range(2)] == [200, 200]
    assert [other.decide(key["secret"]) for _ in range(2)] == [200, 200]
    denied = stack.request("/v1/models", headers=auth)
    assert denied.status == 429
    assert denied.headers["retry-after"] == "15"
    assert other.decide(key["secret"]) == 429

    # Within a second: from the commit to each replica applying it (its own log line).
    updated = authz_cli(stack.database_url, "workspace", "update", workspace["id"], "--rpm", "600")
    wait_until(
        lambda: stack.request("/v1/models", headers=auth).status == 200, timeout=10, what="a"
    )
    wait_until(lambda: other.decide(key["secret"]) == 200, timeout=10, what="b")
    for replica in (stack.sidecar, other):
        assert change_applied_after(replica, "ws", updated["updated_at"]) < 1.0

    revoked = authz_cli(stack.database_url, "key", "revoke", key["id"])
    wait_until(
        lambda: stack.request("/v1/models", headers=auth).status == 401, timeout=10, what="a"
    )
    wait_until(lambda: other.decide(key["secret"]) == 401, timeout=10, what="b")
    for replica in (stack.sidecar, other):
        assert change_applied_after(replica, "key", revoked["revoked_at"]) < 1.0
