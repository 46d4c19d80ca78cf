"""Raw HTTP against a real Envoy, for the edge tests: paths sent exactly as written, clients
that misbehave on purpose, and bursts of simultaneous requests.

urllib and friends normalize paths and follow redirects; an edge test must see what Envoy
itself answers to the bytes a hostile client sends.
"""

from __future__ import annotations

import asyncio
import http.client
from collections import Counter
from collections.abc import Mapping
from dataclasses import dataclass


@dataclass(frozen=True)
class RawAnswer:
    status: int
    headers: dict[str, str]
    body: bytes


def raw_request(
    port: int,
    path: str,
    *,
    method: str = "GET",
    headers: Mapping[str, str] | None = None,
    body: bytes | None = None,
    timeout: float = 10.0,
) -> RawAnswer:
    """One HTTP/1.1 request with `path` byte for byte; redirects are returned, not followed."""
    connection = http.client.HTTPConnection("127.0.0.1", port, timeout=timeout)
    try:
        connection.putrequest(method, path, skip_accept_encoding=True)
        for name, value in (headers or {}).items():
            connection.putheader(name, value)
        if body is not None:
            connection.putheader("content-length", str(len(body)))
        connection.endheaders(body)
        response = connection.getresponse()
        return RawAnswer(
            response.status, {k.lower(): v for k, v in response.getheaders()}, response.read()
        )
    finally:
        connection.close()


async def _one_request(port: int, request: bytes, timeout: float) -> int | str:
    """The status of one HTTP/1.1 request on its own connection, or the error's name."""
    try:
        reader, writer = await asyncio.wait_for(asyncio.open_connection("127.0.0.1", port), timeout)
    except (OSError, TimeoutError) as error:
        return type(error).__name__
    try:
        writer.write(request)
        status_line = await asyncio.wait_for(reader.readline(), timeout)
        parts = status_line.split()
        return int(parts[1]) if len(parts) >= 2 else "no status line"
    except (OSError, TimeoutError, ValueError) as error:
        return type(error).__name__
    finally:
        writer.close()


def burst(
    port: int, path: str, headers: Mapping[str, str], *, count: int, timeout: float = 60.0
) -> Counter[int | str]:
    """`count` requests sent at once, each on its own connection; how many got each status."""
    lines = [f"GET {path} HTTP/1.1", "Host: edge.test", "Connection: close"]
    lines += [f"{name}: {value}" for name, value in headers.items()]
    request = ("\r\n".join(lines) + "\r\n\r\n").encode()

    async def run() -> Counter[int | str]:
        answers = await asyncio.gather(
            *(_one_request(port, request, timeout) for _ in range(count))
        )
        return Counter(answers)

    return asyncio.run(run())


@dataclass(frozen=True)
class SlowClientEnd:
    """How a slow client's connection ended: after how long, how many header bytes it had sent,
    and what (if anything) Envoy answered before closing."""

    seconds: float
    bytes_sent: int
    answer: bytes


async def slow_header_client(port: int, *, ceiling: float) -> SlowClientEnd:
    """Send a request's headers one byte a second until Envoy closes the connection.

    Returns when the connection ends (Envoy's doing); raises TimeoutError if it is still open
    after `ceiling` seconds, which is the failure the test looks for.
    """
    loop = asyncio.get_running_loop()
    started = loop.time()
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    header = b"GET /v1/models HTTP/1.1\r\nHost: edge.test\r\nx-trickle: " + b"a" * 100_000
    closed = asyncio.ensure_future(reader.read(65536))
    sent = 0
    try:
        while loop.time() - started < ceiling:
            try:
                writer.write(header[sent : sent + 1])
                await writer.drain()
            except OSError:
                break
            sent += 1
            # The pace is the behaviour under test (one byte a second), not a wait for an event.
            done, _ = await asyncio.wait({closed}, timeout=1.0)
            if done:
                break
        else:
            raise TimeoutError(f"connection still open after {ceiling:.0f}s")
        answer = await asyncio.wait_for(closed, timeout=ceiling)
        return SlowClientEnd(loop.time() - started, sent, answer)
    finally:
        closed.cancel()
        writer.close()
