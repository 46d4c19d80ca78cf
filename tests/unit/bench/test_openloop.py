"""The open-loop generator against a tiny local server that fails some answers and hangs up."""

from __future__ import annotations

import asyncio
from typing import Any

from bench.openloop import OpenLoop, http_request


async def _serve(
    reader: asyncio.StreamReader, writer: asyncio.StreamWriter, handlers: set[asyncio.Future[Any]]
) -> None:
    task = asyncio.current_task()
    assert task is not None
    handlers.add(task)
    answered = 0
    try:
        while True:
            head = await reader.readuntil(b"\r\n\r\n")
            length = next(
                int(line.split(b":")[1])
                for line in head.split(b"\r\n")
                if line.lower().startswith(b"content-length")
            )
            await reader.readexactly(length)
            answered += 1
            status = b"503 Service Unavailable" if answered % 5 == 0 else b"200 OK"
            hang_up = answered % 7 == 0  # now and then, saying so, as Envoy does
            extra = b"Connection: close\r\n" if hang_up else b""
            writer.write(b"HTTP/1.1 " + status + b"\r\nContent-Length: 2\r\n" + extra + b"\r\nok")
            await writer.drain()
            if hang_up:
                break
    except asyncio.IncompleteReadError:
        pass
    writer.close()
    await writer.wait_closed()


async def test_every_scheduled_request_is_answered_and_failures_are_counted() -> None:
    handlers: set[asyncio.Future[Any]] = set()
    server = await asyncio.start_server(lambda r, w: _serve(r, w, handlers), "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    generator = OpenLoop(
        request=http_request(f"127.0.0.1:{port}", "/v1/x", [], "{}"), connections=4
    )
    async with server:
        result = await generator.run("127.0.0.1", port, rate=400, seconds=0.5)
        await asyncio.gather(*handlers)  # each sees the generator hang up, and closes

    assert result.requests == 200
    assert result.socket_errors == 0
    # Each connection answers 503 to its 5th, 10th... request; connections are replaced after
    # 7 answers, so at least one 503 per started connection that lived that long.
    assert result.non_2xx >= 4
    assert 0 < result.p50_ms <= result.p99_ms <= result.p999_ms
