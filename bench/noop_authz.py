"""The ceiling for a Python ext_authz server: grpc.aio on uvloop that allows every request.

Setup (b) of `make bench`. It answers the same three services Envoy talks to in the shipped
config (Check, the gRPC health check, and the access-log stream, which it drains), so the
difference to `authz serve` is exactly the project's own work per request.

    python -m bench.noop_authz --addr 127.0.0.1:9292
"""

from __future__ import annotations

import argparse
from collections.abc import AsyncIterator
from typing import Any

import grpc
import uvloop
from envoy.service.accesslog.v3 import als_pb2, als_pb2_grpc
from envoy.service.auth.v3 import external_auth_pb2, external_auth_pb2_grpc
from google.rpc import status_pb2
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_health.v1.health import aio as health_aio  # type: ignore[attr-defined]

_ALLOW = external_auth_pb2.CheckResponse(status=status_pb2.Status(code=0))


class NoopAuthorization(external_auth_pb2_grpc.AuthorizationServicer):  # type: ignore[misc]
    async def Check(
        self, request: external_auth_pb2.CheckRequest, context: grpc.aio.ServicerContext[Any, Any]
    ) -> external_auth_pb2.CheckResponse:
        return _ALLOW


class DrainAccessLogs(als_pb2_grpc.AccessLogServiceServicer):  # type: ignore[misc]
    async def StreamAccessLogs(
        self,
        requests: AsyncIterator[als_pb2.StreamAccessLogsMessage],
        context: grpc.aio.ServicerContext[Any, Any],
    ) -> als_pb2.StreamAccessLogsResponse:
        async for _ in requests:
            pass
        return als_pb2.StreamAccessLogsResponse()


async def serve(addr: str) -> None:
    server = grpc.aio.server()
    external_auth_pb2_grpc.add_AuthorizationServicer_to_server(NoopAuthorization(), server)
    als_pb2_grpc.add_AccessLogServiceServicer_to_server(DrainAccessLogs(), server)
    health = health_aio.HealthServicer()
    health_pb2_grpc.add_HealthServicer_to_server(health, server)
    await health.set("envoy.service.auth.v3.Authorization", health_pb2.HealthCheckResponse.SERVING)
    server.add_insecure_port(addr)
    await server.start()
    await server.wait_for_termination()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--addr", default="127.0.0.1:9292")
    uvloop.run(serve(parser.parse_args().addr))


if __name__ == "__main__":
    main()
