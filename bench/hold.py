"""The benchmark's listeners, started and left running for a profiler.

`make bench` says how much CPU a request costs; this says where. It starts what
`bench.envoy_bench` would for the given setups (the same Envoy config, stores and sidecar
settings), warms each listener with wrk, prints one JSON line (each listener's URL, the bearer
header to send, the sidecar PIDs, Envoy's PID) and waits for Ctrl-C or SIGTERM. Drive a
listener with wrk while `py-spy record --pid PID --threads --native` or /proc/PID/task/*/stat
watch the sidecar, and compare with the no-op server (b) under the same load.

    python -m bench.hold --setups b,c,d
"""

from __future__ import annotations

import argparse
import json
import signal
import tempfile
from collections.abc import Sequence
from pathlib import Path
from types import FrameType

from bench.envoy_bench import bench_backends, setup_names, start_bench_envoy
from bench.loadgen import PATH, run_wrk
from bench.setups import SETUPS, Running, Setup, start_setup
from tests.support.procs import ManagedProcess

_WARMUP_SECONDS = 2.0


def hold(setups: Sequence[Setup], log_dir: Path) -> None:
    """Start, warm up, print the JSON line, then wait for a signal and stop everything."""
    stopping: list[int] = []

    def _stop(signum: int, _frame: FrameType | None) -> None:
        stopping.append(signum)

    with bench_backends(setups) as (database_url, redis_url):
        running: dict[str, Running] = {}
        envoy: ManagedProcess | None = None
        try:
            seeded: dict[str, str] = {}
            for setup in setups:
                running[setup.name] = start_setup(
                    setup, log_dir, postgres_url=database_url, redis_url=redis_url, seeded=seeded
                )
            envoy, ports = start_bench_envoy(log_dir, running)
            listeners = {}
            for name, one in running.items():
                url = f"http://127.0.0.1:{ports[name]}{PATH}"
                run_wrk(
                    url,
                    authorization=one.authorization,
                    connections=32,
                    seconds=_WARMUP_SECONDS,
                    script_dir=log_dir,
                )
                listeners[name] = {"url": url, "authorization": one.authorization, "pids": one.pids}
            signal.signal(signal.SIGINT, _stop)
            signal.signal(signal.SIGTERM, _stop)
            print(json.dumps({"listeners": listeners, "envoy_pid": envoy.pid}), flush=True)
            while not stopping:
                signal.pause()
        finally:
            if envoy is not None:
                envoy.stop()
            for one in running.values():
                one.stop()


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--setups", type=setup_names, default=SETUPS, help="e.g. b,c,d")
    args = parser.parse_args(argv)
    with tempfile.TemporaryDirectory(prefix="authz-hold-") as folder:
        hold(args.setups, Path(folder))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
