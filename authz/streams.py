"""Ending long-lived request streams on shutdown.

Envoy keeps its access-log stream open for as long as it runs, so the gRPC server's grace
period would always run out waiting for it. On shutdown we stop reading instead: the servicer
sees the stream end, writes what it holds and answers, and the grace period only waits for
Checks that are really in flight.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from typing import TypeVar

import grpc
from envoy.service.accesslog.v3 import als_pb2_grpc
from envoy.service.accesslog.v3.als_pb2 import StreamAccessLogsMessage, StreamAccessLogsResponse

T = TypeVar("T")


class StreamStop:
    """Set once on shutdown; every stream read through `until_stopped` then ends."""

    def __init__(self) -> None:
        self._stopping = asyncio.Event()

    def stop(self) -> None:
        self._stopping.set()

    async def until_stopped(self, messages: AsyncIterator[T]) -> AsyncIterator[T]:
        """`messages`, until they end or shutdown starts; a message already read is kept."""
        stopping = asyncio.ensure_future(self._stopping.wait())
        try:
            while True:
                read = asyncio.ensure_future(anext(messages))
                await asyncio.wait({read, stopping}, return_when=asyncio.FIRST_COMPLETED)
                if not read.done():
                    read.cancel()
                    return
                try:
                    message = read.result()
                except StopAsyncIteration:
                    return
                yield message
        finally:
            stopping.cancel()


class StoppableAccessLog(als_pb2_grpc.AccessLogServiceServicer):  # type: ignore[misc]
    """The access-log servicer, reading its stream only until shutdown starts."""

    def __init__(self, servicer: als_pb2_grpc.AccessLogServiceServicer, stop: StreamStop) -> None:
        self._servicer = servicer
        self._stop = stop

    async def StreamAccessLogs(
        self,
        request_iterator: AsyncIterator[StreamAccessLogsMessage],
        context: grpc.aio.ServicerContext[StreamAccessLogsMessage, StreamAccessLogsResponse],
    ) -> StreamAccessLogsResponse:
        response: StreamAccessLogsResponse = await self._servicer.StreamAccessLogs(
            self._stop.until_stopped(request_iterator), context
        )
        return response
