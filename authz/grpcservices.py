"""The standard gRPC services: health (with `List`) and server reflection, v1 and v1alpha."""

from __future__ import annotations

from collections.abc import Iterable

import grpc
from grpc_health.v1 import health_pb2
from grpc_health.v1.health import aio as health_aio  # type: ignore[attr-defined]  # old stubs
from grpc_reflection.v1alpha import reflection, reflection_pb2, reflection_pb2_grpc
from grpc_reflection.v1alpha._async import ReflectionServicer

REFLECTION_V1 = "grpc.reflection.v1.ServerReflection"


class HealthServicer(health_aio.HealthServicer):  # type: ignore[misc]
    """grpcio-health-checking's servicer, plus the `List` it leaves UNIMPLEMENTED."""

    async def List(
        self,
        request: health_pb2.HealthListRequest,
        context: grpc.aio.ServicerContext[
            health_pb2.HealthListRequest, health_pb2.HealthListResponse
        ],
    ) -> health_pb2.HealthListResponse:
        # The base class keeps its statuses here and offers no accessor; a unit test pins it.
        statuses = dict(self._server_status)
        return health_pb2.HealthListResponse(
            statuses={
                service: health_pb2.HealthCheckResponse(status=status)
                for service, status in statuses.items()
            }
        )


def add_reflection(server: grpc.aio.Server, service_names: Iterable[str]) -> None:
    """Reflection under both names: grpcurl and current tools ask v1, older ones v1alpha."""
    names = (*service_names, reflection.SERVICE_NAME, REFLECTION_V1)
    servicer = ReflectionServicer(names)
    reflection_pb2_grpc.add_ServerReflectionServicer_to_server(servicer, server)
    # v1 is v1alpha renamed, message for message and field for field, so the same servicer
    # answers it with the same (wire-identical) messages.
    v1 = grpc.method_handlers_generic_handler(
        REFLECTION_V1,
        {
            "ServerReflectionInfo": grpc.stream_stream_rpc_method_handler(
                servicer.ServerReflectionInfo,
                request_deserializer=reflection_pb2.ServerReflectionRequest.FromString,
                response_serializer=reflection_pb2.ServerReflectionResponse.SerializeToString,
            )
        },
    )
    server.add_generic_rpc_handlers((v1,))
