"""Starting a process as another OS user while gRPC calls are in flight (the tests start
PostgreSQL so, often mid-run) must not crash the child: see tests/conftest.py."""

from __future__ import annotations

import asyncio
import subprocess

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_health.v1.health import aio as health_aio  # type: ignore[attr-defined]  # old stubs

from tests.support.procs import child_identity

STARTS = 150


async def test_children_started_as_another_user_survive_concurrent_grpc_calls() -> None:
    uid, gid, groups = child_identity("postgres")
    server = grpc.aio.server()
    health_pb2_grpc.add_HealthServicer_to_server(health_aio.HealthServicer(), server)
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    stop = asyncio.Event()

    async def calls() -> None:
        async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
            stub = health_pb2_grpc.HealthStub(channel)
            while not stop.is_set():
                await stub.Check(health_pb2.HealthCheckRequest())

    def start_children() -> list[int]:
        return [
            subprocess.run(
                ["/bin/true"], user=uid, group=gid, extra_groups=groups, check=False
            ).returncode
            for _ in range(STARTS)
        ]

    load = [asyncio.create_task(calls()) for _ in range(8)]
    try:
        codes = await asyncio.to_thread(start_children)
    finally:
        stop.set()
        await asyncio.gather(*load, return_exceptions=True)
        await server.stop(None)
    assert codes == [0] * STARTS
