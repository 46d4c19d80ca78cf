"""A burst through one Envoy in front of the embedded sidecar (issue 20 item 4, issue 10 item 4).

With healthy backends no amount of load may produce a 503: overload shows as latency, bounded
by Envoy's ext_authz timeout, or as a prompt 429 the client may retry. Envoy's default circuit
breakers (1,024 requests) used to fail the Check itself; gRPC's own backlog protection (1,000
calls waiting for the sidecar) cancelled Checks; a Check still queued at the old 250 ms timeout
was a 503; and the demo upstream's accept backlog of 5, and the `upstream` cluster's default
breakers, refused requests that had passed. Now the sidecar sheds a Check that queued past a
quarter of the 2 s timeout with a pre-rendered 429 (docs/deploy.md, "Bursts", has the figures).
"""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from tests.e2e.test_envoy_contract import new_key
from tests.support.edge import EdgeEnvoy, burst, raw_request, start_edge_envoy
from tests.support.stack import Stack, start_sidecar, start_upstream, wait_until

pytestmark = pytest.mark.e2e

BURST = 2000
# A request refused because a breaker was full: active requests, or pending ones, to the
# sidecar or to the upstream.
OVERFLOWS = (
    "cluster.authz.upstream_rq_active_overflow",
    "cluster.authz.upstream_rq_pending_overflow",
    "cluster.upstream.upstream_rq_pending_overflow",
)
# A Check that failed (an error or a timeout), as Envoy counts it.
FAILURES = ("http.public.ext_authz.error", "cluster.authz.upstream_rq_timeout")


def shed_checks(stack: Stack) -> float:
    """The sidecar's count of Checks shed under overload."""
    return stack.sidecar.metric("authz_checks_total", decision="shed", code="server_overloaded")


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


def test_a_burst_of_2000_gets_only_200s_and_429s_never_a_503(
    edge: tuple[Stack, EdgeEnvoy],
) -> None:
    stack, envoy = edge
    _, key = new_key(stack, rpm=1_000_000, tpm=100_000_000)
    headers = {"Authorization": f"Bearer {key['secret']}"}
    assert raw_request(stack.envoy_port, "/v1/models", headers=headers).status == 200
    before = envoy.stats()
    shed_before = shed_checks(stack)

    statuses = burst(stack.envoy_port, "/v1/models", headers, count=BURST)

    after = envoy.stats()
    assert sum(statuses.values()) == BURST
    assert set(statuses) <= {200, 429}, statuses
    assert statuses[200] > 0
    # Not one Check failed, timed out, or overflowed a circuit breaker.
    counters = (*OVERFLOWS, *FAILURES)
    assert {name: after.get(name, 0) - before.get(name, 0) for name in counters} == dict.fromkeys(
        counters, 0
    )
    # Every 429 is the sidecar's deliberate shed (the key is far below its limits).
    assert shed_checks(stack) - shed_before == statuses[429]


def test_the_breakers_sit_above_what_the_listener_admits(edge: tuple[Stack, EdgeEnvoy]) -> None:
    """Envoy's own view of the shipped thresholds (remaining capacity at rest)."""
    _, envoy = edge
    stats = envoy.stats()
    assert stats["cluster.authz.circuit_breakers.default.remaining_rq"] > 10_000
    assert stats["cluster.authz.circuit_breakers.default.remaining_pending"] > 10_000
