"""Zero-loss SIGTERM with the defaults (issue 11, item 1).

Two replicas behind the shipped envoy.yaml (its health checks, one `authz` endpoint per
replica), steady load, SIGTERM to one replica with every setting at its default: not one
request fails. The default AUTHZ_DRAIN_DELAY_S is derived from the shipped health checks
(docs/deploy.md, "Probes and shutdown"); tests/deploy/test_drain_rule.py holds that rule.
"""

from __future__ import annotations

import signal
import threading
import time
from collections import Counter
from collections.abc import Iterator
from pathlib import Path

import pytest

from authz.settings import Settings
from tests.support.edge import EdgeEnvoy, raw_request, start_edge_envoy
from tests.support.stack import Sidecar, authz_cli, start_sidecar, start_upstream, wait_until

pytestmark = pytest.mark.e2e

# start_sidecar speeds these up for tests; this test runs them at their defaults.
DEFAULTED = ("drain_delay_s", "health_interval_s", "change_poll_ms", "last_used_flush_s")
LOAD_THREADS = 4
# What a replica leaving too early looks like from Envoy: a Check sent to a closed port, or
# cut off by the replica's exit.
DRAIN_FAILURES = (
    "cluster.authz.upstream_cx_connect_fail",
    "cluster.authz.upstream_rq_pending_failure_eject",
    "cluster.authz.upstream_rq_rx_reset",
    "cluster.authz.upstream_cx_destroy_with_active_rq",
    "cluster.authz.upstream_cx_none_healthy",
)


def default_env() -> dict[str, str]:
    defaults = Settings()
    return {f"AUTHZ_{name.upper()}": str(getattr(defaults, name)) for name in DEFAULTED}


def port_of(sidecar: Sidecar) -> int:
    return int(sidecar.grpc_addr.rsplit(":", 1)[1])


@pytest.fixture
def two_replicas(tmp_path: Path, pg_dsn: str) -> Iterator[tuple[EdgeEnvoy, Sidecar, Sidecar, str]]:
    """Two replicas on one PostgreSQL. Rate limits stay in-process (no Redis): the drain is
    about routing, and one backend fewer on a shared test machine is one timeout source fewer."""
    authz_cli(pg_dsn, "migrate")
    env = default_env()
    upstream, upstream_port = start_upstream(tmp_path)
    first = start_sidecar(tmp_path, database_url=pg_dsn, name="replica-a", env=env)
    second = start_sidecar(tmp_path, database_url=pg_dsn, name="replica-b", env=env)
    envoy = start_edge_envoy(
        tmp_path,
        authz_ports=[port_of(first), port_of(second)],
        upstream_port=upstream_port,
        access_log=tmp_path / "access.log",  # read back by envoy_log()
    )
    try:
        wait_until(
            lambda: envoy.stats().get("cluster.authz.membership_healthy") == 2,
            timeout=30,
            what="both replicas healthy in Envoy",
        )
        yield envoy, first, second, pg_dsn
    finally:
        envoy.process.stop()
        first.process.stop()
        second.process.stop()
        upstream.stop()


def test_sigterm_to_one_of_two_replicas_under_load_fails_no_request(
    two_replicas: tuple[EdgeEnvoy, Sidecar, Sidecar, str],
) -> None:
    envoy, leaving, staying, database_url = two_replicas
    workspace = authz_cli(
        database_url, "workspace", "create", "drain", "--rpm", "1000000", "--tpm", "100000000"
    )
    key = authz_cli(database_url, "key", "create", "--workspace", workspace["id"], "--label", "d")
    headers = {"Authorization": f"Bearer {key['secret']}"}

    statuses: Counter[int | str] = Counter()
    failures: list[str] = []
    lock = threading.Lock()
    stop = threading.Event()
    events: dict[str, float] = {}

    def load() -> None:
        while not stop.is_set():
            sent = time.monotonic()
            try:
                status: int | str = raw_request(envoy.port, "/v1/models", headers=headers).status
            except OSError as error:
                status = type(error).__name__
            with lock:
                statuses[status] += 1
                if status != 200:
                    failures.append(f"{status}, sent {since_sigterm(sent)}")

    def since_sigterm(at: float) -> str:
        signalled = events.get("sigterm")
        return "before SIGTERM" if signalled is None else f"SIGTERM {at - signalled:+.3f}s"

    def answered() -> int:
        with lock:
            return sum(statuses.values())

    before = envoy.stats()
    workers = [threading.Thread(target=load) for _ in range(LOAD_THREADS)]
    for worker in workers:
        worker.start()
    try:
        # Both replicas are answering Checks before the signal.
        wait_until(lambda: answered() >= 200, timeout=60, what="steady load")
        events["sigterm"] = time.monotonic()
        leaving.process.send_signal(signal.SIGTERM)
        # Envoy takes the replica out of rotation on its first NOT_SERVING health answer.
        wait_until(lambda: healthy(envoy) == 1, timeout=60, what="the replica out of rotation")
        events["out of rotation"] = time.monotonic()
        assert leaving.process.wait(timeout=120) == 0
        events["exited"] = time.monotonic()
        # The replica is gone; keep the load on until the survivor has carried a good share.
        after_exit = answered()
        wait_until(lambda: answered() >= after_exit + 200, timeout=60, what="load after exit")
    finally:
        stop.set()
        for worker in workers:
            worker.join(timeout=30)

    after = envoy.stats()
    assert staying.process.is_running()
    assert statuses[200] > 400

    def delta(name: str) -> int:
        return after.get(name, 0) - before.get(name, 0)

    assert {name: delta(name) for name in DRAIN_FAILURES} == dict.fromkeys(DRAIN_FAILURES, 0)
    # Not one request failed. If one did, say when (relative to SIGTERM, and the test's own
    # observations of the drain) and what Envoy logged about it.
    timeline = {event: since_sigterm(at) for event, at in events.items()}
    assert set(statuses) == {200}, (statuses, failures, timeline, not_ok(envoy_log(envoy)))


def healthy(envoy: EdgeEnvoy) -> int | None:
    return envoy.stats().get("cluster.authz.membership_healthy")


def envoy_log(envoy: EdgeEnvoy) -> Path:
    return envoy.process.log_path.parent / "access.log"


def not_ok(access_log: Path) -> list[str]:
    """Envoy's access-log lines for requests that did not get a 200."""
    lines = access_log.read_text(encoding="utf-8").splitlines() if access_log.exists() else []
    return [line for line in lines if " 200 " not in line]
