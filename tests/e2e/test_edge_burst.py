"""A burst through one Envoy in front of the embedded sidecar (issue 20, item 4).

Envoy's default circuit breakers (1,024 requests) used to trip and fail the Check itself,
a 503 for a valid key far below its limits. The shipped `authz` cluster's breakers sit above
everything the listener admits, so a burst never overflows them. What is left is throughput:
a Check still waiting at the 250 ms ext_authz timeout is a 503, and so is a request the stdlib
demo upstream's small accept backlog refuses (see docs/deploy.md, "Bursts", for the figures).
"""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from tests.e2e.test_envoy_contract import new_key
from tests.support.edge import EdgeEnvoy, burst, raw_request, start_edge_envoy
from tests.support.stack import Stack, start_sidecar, start_upstream, wait_until

pytestmark = pytest.mark.e2e

BURST = 2000
# A request refused because a breaker was full: active requests, or pending ones.
OVERFLOWS = (
    "cluster.authz.upstream_rq_active_overflow",
    "cluster.authz.upstream_rq_pending_overflow",
)


@pytest.fixture(scope="module")
def edge(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Stack, EdgeEnvoy]]:
    log_dir = tmp_path_factory.mktemp("burst")
    database_url = f"sqlite:///{log_dir / 'authz.db'}"
    upstream, upstream_port = start_upstream(log_dir)
    sidecar = start_sidecar(log_dir, database_url=database_url)
    envoy = start_edge_envoy(
        log_dir, authz_ports=[int(sidecar.grpc_addr.rsplit(":", 1)[1])], upstream_port=upstream_port
    )
    try:
        stack = Stack(envoy.process, upstream, sidecar, database_url, envoy.port, upstream_port)
        wait_until(lambda: stack.request("/v1/models").status == 401, timeout=20, what="routes")
        yield stack, envoy
    finally:
        envoy.process.stop()
        sidecar.process.stop()
        upstream.stop()


def test_a_burst_of_2000_never_overflows_the_authz_circuit_breakers(
    edge: tuple[Stack, EdgeEnvoy],
) -> None:
    stack, envoy = edge
    _, key = new_key(stack, rpm=1_000_000, tpm=100_000_000)
    headers = {"Authorization": f"Bearer {key['secret']}"}
    assert raw_request(stack.envoy_port, "/v1/models", headers=headers).status == 200
    before = envoy.stats()

    statuses = burst(stack.envoy_port, "/v1/models", headers, count=BURST)

    after = envoy.stats()
    assert sum(statuses.values()) == BURST
    assert set(statuses) <= {200, 429, 503}, statuses
    assert statuses[200] > 0
    # Not one Check failed because a circuit breaker was full.
    assert {name: after.get(name, 0) - before.get(name, 0) for name in OVERFLOWS} == dict.fromkeys(
        OVERFLOWS, 0
    )


def test_the_breakers_sit_above_what_the_listener_admits(edge: tuple[Stack, EdgeEnvoy]) -> None:
    """Envoy's own view of the shipped thresholds (remaining capacity at rest)."""
    _, envoy = edge
    stats = envoy.stats()
    assert stats["cluster.authz.circuit_breakers.default.remaining_rq"] > 10_000
    assert stats["cluster.authz.circuit_breakers.default.remaining_pending"] > 10_000
