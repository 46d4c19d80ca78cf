"""A fixed-rate, open-loop HTTP/1.1 load generator (`make bench`'s latency-at-1k-rps runs).

Why our own: wrk2 is not packaged by Debian, and autocannon (npm) keeps latencies in whole
milliseconds, too coarse for the sub-millisecond differences between setups. This one sends
request i at t0 + i/rate whatever happened before (open loop), over a pool of keep-alive
connections; a request whose turn comes while every connection is busy waits in a queue, and
its latency still counts from its scheduled time, so a stall shows up in the tail instead of
quietly lowering the rate (no coordinated omission). It runs in its own process (uvloop) so
its CPU is not the sidecar's; at 1,000 rps it needs a few per cent of a core.

    python -m bench.openloop URL --rate 1000 --seconds 8 --connections 64 \
        [--header 'Authorization: Bearer ...'] [--body JSON]

It prints one line: `BENCH_RESULT {...}` (see bench.loadgen.LoadResult).
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import contextlib
import json
import time
from typing import cast
from urllib.parse import urlsplit

import uvloop

from bench.loadgen import REQUEST_BODY, RESULT_MARK, LoadResult, percentile

_DRAIN_SECONDS = 5.0


def http_request(host: str, path: str, headers: list[str], body: str) -> bytes:
    """The one request every connection sends, rendered once."""
    data = body.encode()
    lines = [f"POST {path} HTTP/1.1", f"Host: {host}", f"Content-Length: {len(data)}"]
    lines += ["Content-Type: application/json", *headers]
    return ("\r\n".join(lines) + "\r\n\r\n").encode() + data


def response_length(buffer: bytes) -> tuple[int, int, bool] | None:
    """(status, total bytes, server closes) of the first complete response in `buffer`, or
    None while it is partial.

    Only what Envoy sends here: a Content-Length body (no chunked encoding).
    """
    end = buffer.find(b"\r\n\r\n")
    if end < 0:
        return None
    head = buffer[:end].decode("latin-1").split("\r\n")
    status = int(head[0].split(" ", 2)[1])
    length, closes = 0, False
    for line in head[1:]:
        name, _, value = line.partition(":")
        name = name.strip().lower()
        if name == "content-length":
            length = int(value)
        elif name == "connection":
            closes = value.strip().lower() == "close"
    total = end + 4 + length
    return (status, total, closes) if len(buffer) >= total else None


class _Connection(asyncio.Protocol):
    def __init__(self, generator: OpenLoop) -> None:
        self.generator = generator
        self.transport: asyncio.WriteTransport | None = None
        self.buffer = b""
        self.scheduled = 0.0
        self.closing = False

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # uvloop's TCP transport has the methods but not the asyncio base classes.
        self.transport = cast(asyncio.WriteTransport, transport)

    def send(self, scheduled: float) -> None:
        assert self.transport is not None
        self.scheduled = scheduled
        self.transport.write(self.generator.request)

    def data_received(self, data: bytes) -> None:
        self.buffer += data
        parsed = response_length(self.buffer)
        if parsed is not None:
            status, total, self.closing = parsed
            self.buffer = self.buffer[total:]
            self.generator.finished(self, status, time.monotonic() - self.scheduled)

    def connection_lost(self, exc: Exception | None) -> None:
        self.generator.broken(self)


class OpenLoop:
    """Sends at a fixed rate over `connections` keep-alive connections and records latencies."""

    def __init__(self, *, request: bytes, connections: int) -> None:
        self.request = request
        self.connections = connections
        self.idle: collections.deque[_Connection] = collections.deque()
        self.waiting: collections.deque[float] = collections.deque()
        self.latencies: list[float] = []
        self.non_2xx = 0
        self.errors = 0
        self.outstanding = 0
        self.all_sent = False
        self.drained = asyncio.Event()
        self.address = ("127.0.0.1", 0)
        self.reconnecting: set[asyncio.Task[None]] = set()
        self.open: set[_Connection] = set()

    def _check_drained(self) -> None:
        if self.all_sent and self.outstanding <= 0:
            self.drained.set()

    def finished(self, conn: _Connection, status: int, latency: float) -> None:
        self.latencies.append(latency)
        if not 200 <= status < 300:
            self.non_2xx += 1
        self.outstanding -= 1
        self._check_drained()
        if not conn.closing:  # else wait for the close, then replace it
            self._ready(conn)

    def _ready(self, conn: _Connection) -> None:
        if self.waiting:
            conn.send(self.waiting.popleft())
        else:
            self.idle.append(conn)

    def broken(self, conn: _Connection) -> None:
        """A connection closed: count the request it carried, and open another in its place."""
        self.open.discard(conn)
        if conn in self.idle:
            self.idle.remove(conn)
        elif not conn.closing:
            self.errors += 1
            self.outstanding -= 1
            self._check_drained()
        if not self.drained.is_set():
            task = asyncio.get_running_loop().create_task(self._connect())
            self.reconnecting.add(task)
            task.add_done_callback(self.reconnecting.discard)

    async def _connect(self) -> None:
        loop = asyncio.get_running_loop()
        _, conn = await loop.create_connection(lambda: _Connection(self), *self.address)
        self.open.add(conn)
        self._ready(conn)

    def submit(self, scheduled: float) -> None:
        self.outstanding += 1
        if self.idle:
            self.idle.popleft().send(scheduled)
        else:
            self.waiting.append(scheduled)

    async def run(self, host: str, port: int, *, rate: float, seconds: float) -> LoadResult:
        self.address = (host, port)
        for _ in range(self.connections):
            await self._connect()
        total = int(rate * seconds)
        started = time.monotonic()
        for index in range(total):
            scheduled = started + index / rate
            delay = scheduled - time.monotonic()
            if delay > 0:
                await asyncio.sleep(delay)
            self.submit(scheduled)
        self.all_sent = True
        self._check_drained()
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self.drained.wait(), _DRAIN_SECONDS)
        for conn in list(self.open):
            if conn.transport is not None:
                conn.transport.close()
        await asyncio.sleep(0)  # let the transports finish closing
        elapsed = time.monotonic() - started
        done = len(self.latencies)
        return LoadResult(
            requests=done,
            seconds=elapsed,
            rps=done / elapsed,
            p50_ms=percentile(self.latencies, 0.50) * 1e3,
            p99_ms=percentile(self.latencies, 0.99) * 1e3,
            p999_ms=percentile(self.latencies, 0.999) * 1e3,
            non_2xx=self.non_2xx,
            socket_errors=self.errors + self.outstanding,
        )


async def _main(args: argparse.Namespace) -> None:
    parts = urlsplit(args.url)
    assert parts.hostname is not None
    assert parts.port is not None
    request = http_request(parts.netloc, parts.path or "/", args.header, args.body)
    generator = OpenLoop(request=request, connections=args.connections)
    result = await generator.run(parts.hostname, parts.port, rate=args.rate, seconds=args.seconds)
    print(RESULT_MARK + json.dumps(result.to_json()), flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("url")
    parser.add_argument("--rate", type=float, default=1000.0)
    parser.add_argument("--seconds", type=float, default=8.0)
    parser.add_argument("--connections", type=int, default=64)
    parser.add_argument("--header", action="append", default=[])
    parser.add_argument("--body", default=REQUEST_BODY)
    uvloop.run(_main(parser.parse_args()))


if __name__ == "__main__":
    main()
