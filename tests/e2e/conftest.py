"""End-to-end fixtures: a full stack of real processes per test module."""

from __future__ import annotations

import fcntl
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from demo.run import PORTS, _port_free
from tests.support.stack import (
    FEED_LOGS,
    Stack,
    start_envoy,
    start_sidecar,
    start_upstream,
    wait_until,
)


def build_stack(
    log_dir: Path,
    database_url: str,
    env: dict[str, str] | None = None,
    *,
    pack_as_bytes: bool | None = None,
) -> Iterator[Stack]:
    upstream, upstream_port = start_upstream(log_dir)
    try:
        sidecar = start_sidecar(log_dir, database_url=database_url, env=env)
        try:
            envoy, envoy_port = start_envoy(
                log_dir,
                authz_port=int(sidecar.grpc_addr.rsplit(":", 1)[1]),
                upstream_port=upstream_port,
                pack_as_bytes=pack_as_bytes,
            )
            try:
                stack = Stack(envoy, upstream, sidecar, database_url, envoy_port, upstream_port)
                # Envoy's health check must see the sidecar before traffic is meaningful.
                wait_until(
                    lambda: stack.request("/v1/models").status == 401,
                    timeout=20,
                    what="envoy routes",
                )
                yield stack
            finally:
                envoy.stop()
        finally:
            sidecar.process.stop()
    finally:
        upstream.stop()


@pytest.fixture(scope="module")
def embedded_stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    log_dir = tmp_path_factory.mktemp("stack")
    yield from build_stack(log_dir, f"sqlite:///{log_dir / 'authz.db'}", FEED_LOGS)


@pytest.fixture
def make_run_ports() -> Iterator[None]:
    """`make run` listens on fixed ports (the README's curl names 8080): a test of it waits here
    while another suite on this machine (two checkouts tested side by side) runs one, rather
    than finding the ports busy and skipping."""
    lock = Path(tempfile.gettempdir()) / "oais-authz-make-run.lock"
    with lock.open("a") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            # The other suite's last `make run` may still be exiting (its children a moment
            # after it): give its ports time to close; a port held by anything else still
            # makes the test skip, as before.
            deadline = time.monotonic() + 30
            while time.monotonic() < deadline and not all(map(_port_free, PORTS.values())):
                time.sleep(0.05)
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)
