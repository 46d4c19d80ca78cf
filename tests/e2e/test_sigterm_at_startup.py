"""A SIGTERM at any moment of start-up ends the sidecar cleanly (exit 0), as one after it does.

Found as a rare failure of test_workers.py's drain test: a SIGTERM that reached a process
after it turned ready but before its signal handler was installed met the default handler,
which killed it mid-start; the supervisor then reported the worker's death as exit 143.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.support.procs import free_port, free_ports_in_a_row
from tests.support.redis_servers import redis_url_for_tests
from tests.support.stack import authz_cli

pytestmark = pytest.mark.e2e

# Runs the real `authz serve` entry point with one change: start() first sends the process
# its own SIGTERM, the worst moment (listeners about to bind, readiness about to turn on).
SIGTERM_DURING_START = """
import os, signal, sys
from authz import server
from authz.cli.main import main

real_start = server.start

async def start_after_sigterm(app, **options):
    os.kill(os.getpid(), signal.SIGTERM)
    return await real_start(app, **options)

server.start = start_after_sigterm
sys.exit(main(["serve"]))
"""


def _env(**settings: str) -> dict[str, str]:
    return {
        "PATH": os.environ.get("PATH", "/usr/bin"),
        "PYTHONPATH": os.environ.get("PYTHONPATH", ""),
        "AUTHZ_DRAIN_DELAY_S": "0",
        **settings,
    }


def test_sigterm_during_start_drains_and_exits_zero(tmp_path: Path) -> None:
    result = subprocess.run(
        [sys.executable, "-c", SIGTERM_DURING_START],
        env=_env(
            AUTHZ_DATABASE_URL=f"sqlite:///{tmp_path / 'authz.db'}",
            AUTHZ_GRPC_ADDR=f"127.0.0.1:{free_port()}",
            AUTHZ_METRICS_ADDR=f"127.0.0.1:{free_port()}",
        ),
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 0, result.stderr
    assert "stopped" in result.stderr


def test_sigterm_while_workers_start_exits_zero(tmp_path: Path, pg_dsn: str) -> None:
    authz_cli(pg_dsn, "migrate")
    with redis_url_for_tests() as redis:
        process = subprocess.Popen(
            [sys.executable, "-m", "authz", "serve", "--workers", "2"],
            env=_env(
                AUTHZ_DATABASE_URL=pg_dsn,
                AUTHZ_REDIS_URL=redis,
                AUTHZ_GRPC_ADDR=f"127.0.0.1:{free_port()}",
                AUTHZ_METRICS_ADDR=f"127.0.0.1:{free_ports_in_a_row(2)}",
            ),
            stderr=subprocess.PIPE,
            text=True,
        )
        try:
            # As soon as both workers exist, still importing: the supervisor forwards it.
            children = Path(f"/proc/{process.pid}/task/{process.pid}/children")
            deadline = time.monotonic() + 60
            while len(children.read_text().split()) < 2 and time.monotonic() < deadline:
                time.sleep(0.001)
            process.send_signal(signal.SIGTERM)
            _, stderr = process.communicate(timeout=90)
        finally:
            process.kill()
    assert process.returncode == 0, stderr
