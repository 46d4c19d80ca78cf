"""A burst through one Envoy in front of the embedded sidecar (issue 20 item 4, issue 10 item 4).

With healthy backends no amount of load may produce a 503: overload shows as latency, bounded
by Envoy's ext_authz timeout, or as a prompt 429 the client may retry. Envoy's default circuit
breakers (1,024 requests) used to fail the Check itself; gRPC's own backlog protection (1,000
calls waiting for the sidecar) cancelled Checks; a Check still queued at the old 250 ms timeout
was a 503; and the demo upstream's accept backlog of 5, and the `upstream` cluster's default
breakers, refused requests that had passed. Now the sidecar sheds a Check that queued past a
quarter of the 2 s timeout with a pre-rendered 429 (docs/deploy.md, "Bursts", has the figures).
And nothing is lost: Envoy's access-log stream shared the `authz` connection and dropped
hundreds of a burst's entries (usage never billed); now every 200 reaches the ledger.
"""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from tests.e2e.test_envoy_contract import new_key
from tests.support.edge import EdgeEnvoy, burst, raw_request, start_edge_envoy
from tests.support.stack import Stack, authz_cli, start_sidecar, start_upstream, wait_until

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
# Access-log entries Envoy's gRPC logger threw away (its buffer full while the stream to the
# sidecar was above its high watermark), and those it took: usage that would never be billed.
LOGS_DROPPED = "access_logs.grpc_access_log.logs_dropped"
LOGS_WRITTEN = "access_logs.grpc_access_log.logs_written"
# Generous: a sidecar on a loaded 2-core machine works through a burst's entries in seconds.
LEDGER_CEILING_S = 300.0


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


def ledger_requests(stack: Stack, workspace_id: str) -> int:
    """The requests the ledger holds for the workspace (`authz usage`, what billing reads)."""
    report = authz_cli(stack.database_url, "usage", "--workspace", workspace_id)
    return int(report["requests"])


def reconciled(stack: Stack) -> float:
    """Access-log entries the sidecar has accounted for, whatever their result."""
    return sum(
        stack.sidecar.metric("authz_usage_reconciliations_total", result=result)
        for result in ("reported", "estimated", "no_usage", "limiter_unavailable")
    )


def test_every_200_of_a_burst_reaches_the_ledger(edge: tuple[Stack, EdgeEnvoy]) -> None:
    """Nothing lost: each request the burst got through is one access-log entry that Envoy
    delivers and the sidecar files, so usage in a burst is billed like any other."""
    stack, envoy = edge
    workspace_id, key = new_key(stack, rpm=1_000_000, tpm=100_000_000)
    headers = {"Authorization": f"Bearer {key['secret']}"}
    assert raw_request(stack.envoy_port, "/v1/models", headers=headers).status == 200
    # The warm-up is filed first, so the burst starts from a known ledger.
    wait_until(lambda: ledger_requests(stack, workspace_id) == 1, timeout=60, what="warm-up")
    before = envoy.stats()
    reconciled_before = reconciled(stack)

    statuses = burst(stack.envoy_port, "/v1/models", headers, count=BURST)
    passed = statuses[200]
    assert passed > 0, statuses

    # Envoy logs a request when it ends, just after its answer: wait until the sidecar has
    # accounted for as many entries as got through, or Envoy has already thrown some away.
    def settled() -> bool:
        dropped = envoy.stats().get(LOGS_DROPPED, 0) - before.get(LOGS_DROPPED, 0)
        return dropped > 0 or reconciled(stack) - reconciled_before >= passed

    wait_until(settled, timeout=LEDGER_CEILING_S, what="the burst's entries", interval=0.5)
    after = envoy.stats()
    dropped = after.get(LOGS_DROPPED, 0) - before.get(LOGS_DROPPED, 0)
    written = after.get(LOGS_WRITTEN, 0) - before.get(LOGS_WRITTEN, 0)
    assert dropped == 0, f"Envoy dropped {dropped} access-log entries ({written} written)"
    # ... and the ledger files each one once (the flush after its batch).
    wait_until(
        lambda: ledger_requests(stack, workspace_id) >= 1 + passed,
        timeout=LEDGER_CEILING_S,
        what=f"{passed} requests in the ledger",
        interval=0.5,
    )
    assert ledger_requests(stack, workspace_id) == 1 + passed


def test_the_breakers_sit_above_what_the_listener_admits(edge: tuple[Stack, EdgeEnvoy]) -> None:
    """Envoy's own view of the shipped thresholds (remaining capacity at rest)."""
    _, envoy = edge
    stats = envoy.stats()
    assert stats["cluster.authz.circuit_breakers.default.remaining_rq"] > 10_000
    assert stats["cluster.authz.circuit_breakers.default.remaining_pending"] > 10_000
