"""Benchmark the access-log path: CPU per entry Envoy streams back to the sidecar.

The sidecar is built by `authz.app.build` (embedded SQLite store, in-process buckets), its
Check signs N reservations (with AUTHZ_BENCH_REDIS_URL set, the limiter and the replay check
use that Redis), and the resulting entries, shaped as Envoy's `http_grpc` logger
sends them, go through the production access-log servicer in batches the size Envoy's 16 KiB
buffer holds, at the pace Envoy sends them under load. The figure is CPU time
(`time.process_time`, every thread: the store's writes included) per entry, so other load on
the machine does not move it much. Not a test.
"""

from __future__ import annotations

import asyncio
import os
import tempfile
import time
from collections.abc import AsyncIterator
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from envoy.data.accesslog.v3.accesslog_pb2 import HTTPAccessLogEntry
from envoy.service.accesslog.v3.als_pb2 import StreamAccessLogsMessage

from authz.app import App, build
from authz.keys import mint_key
from authz.models import CLI_ACTOR, ModelPrice, NewWorkspace
from authz.settings import Settings
from tests.support.accesslogs import from_check
from tests.support.checks import bearer, check_request

ENTRIES = int(os.environ.get("BENCH_N", "20000"))
WORKSPACES = 10
PER_MESSAGE = 20
"""Entries per StreamAccessLogsMessage: about what Envoy's 16 KiB buffer holds."""
RATE = float(os.environ.get("BENCH_RATE", "4000"))
"""Entries per second, as Envoy streams them under load: messages arrive at this pace (0 sends
them back to back). The CPU figure leaves the waits out."""
ROUNDS = 3
MODEL = "gpt-4o-mini"
BODY = (
    b'{"model": "gpt-4o-mini", "max_tokens": 64, "messages": [{"role": "user", "content": "hi"}]}'
)


class _Context:
    """A call without a deadline: never shed."""

    async def abort(self, code: Any, details: str) -> None:
        raise RuntimeError(f"{code}: {details}")

    def time_remaining(self) -> float | None:
        return None


def _entry(response: Any, n: int) -> HTTPAccessLogEntry:
    """What Envoy logs for an allowed chat completion, with the upstream's usage."""
    usage = {"model": f"{MODEL}-2024-07-18", "prompt_tokens": 9 + n % 7, "completion_tokens": 20}
    entry = from_check(response, usage, started=datetime.now(UTC))
    common = entry.common_properties
    common.downstream_remote_address.socket_address.address = "10.0.0.7"
    common.downstream_remote_address.socket_address.port_value = 40000 + n % 1000
    common.upstream_cluster = "upstream"
    common.time_to_first_upstream_tx_byte.FromNanoseconds(1_200_000)
    common.time_to_last_upstream_rx_byte.FromNanoseconds(180_000_000 + n * 1000)
    common.time_to_last_downstream_tx_byte.FromNanoseconds(181_000_000 + n * 1000)
    entry.request.request_method = 3  # POST
    entry.request.path = "/v1/chat/completions"
    entry.request.authority = "api.example.com"
    entry.request.request_id = f"req-{n:08d}"
    entry.request.request_body_bytes = len(BODY)
    entry.response.response_body_bytes = 600
    return entry


async def _signed_entries(app: App, count: int) -> list[HTTPAccessLogEntry]:
    await app.store.set_price(ModelPrice(MODEL, 0.15, 0.6), actor=CLI_ACTOR)
    await app.accountant.load_prices()
    requests = []
    for w in range(WORKSPACES):
        workspace = await app.store.create_workspace(
            NewWorkspace(name=f"bench{w}", rpm=10**9, tpm=10**9), actor=CLI_ACTOR
        )
        secret, new = mint_key(workspace.id, "bench")
        await app.store.create_key(new, actor=CLI_ACTOR)
        requests.append(check_request(headers=bearer(secret), body=BODY))
    context: Any = _Context()
    entries = []
    for n in range(count):
        response = await app.authorization.Check(requests[n % WORKSPACES], context)
        entries.append(_entry(response, n))
    return entries


async def _stream(
    messages: list[StreamAccessLogsMessage],
) -> AsyncIterator[StreamAccessLogsMessage]:
    loop = asyncio.get_running_loop()
    started = loop.time()
    for n, message in enumerate(messages):
        if RATE:
            await asyncio.sleep(max(0.0, started + n * PER_MESSAGE / RATE - loop.time()))
        yield message


def _messages(entries: list[HTTPAccessLogEntry]) -> list[StreamAccessLogsMessage]:
    messages = []
    for start in range(0, len(entries), PER_MESSAGE):
        message = StreamAccessLogsMessage()
        message.identifier.log_name = "oais_usage"
        message.http_logs.log_entry.extend(entries[start : start + PER_MESSAGE])
        # As gRPC hands it over: parsed from the wire, not the objects built above.
        messages.append(StreamAccessLogsMessage.FromString(message.SerializeToString()))
    return messages


async def main() -> None:
    folder = Path(tempfile.mkdtemp())
    redis_url = os.environ.get("AUTHZ_BENCH_REDIS_URL") or None
    settings = Settings(
        database_url=f"sqlite:///{folder / 'bench.db'}",
        redis_url=redis_url,
        grpc_addr="127.0.0.1:0",
        cache_size=1000,
        cache_ttl_s=600,
        last_used_flush_s=60,
    )
    app = await build(settings)
    entries = await _signed_entries(app, ENTRIES * ROUNDS)
    context: Any = _Context()
    results = []
    for round_ in range(ROUNDS):
        # Fresh reservations each round: a reported one is refused as a replay the second time.
        messages = _messages(entries[round_ * ENTRIES : (round_ + 1) * ENTRIES])
        started = time.process_time()
        await app.access_log.StreamAccessLogs(_stream(messages), context)
        results.append((time.process_time() - started) / ENTRIES * 1e6)
    refused = sum(
        s.value
        for m in app.metrics.entries_refused.collect()
        for s in m.samples
        if s.name.endswith("_total")
    )
    pace = f"{RATE:.0f}/s" if RATE else "back to back"
    backend = "Redis" if redis_url else "embedded"
    label = f"access-log entry, {PER_MESSAGE}/message, {pace} ({backend})"
    print(
        f"{label:<44} CPU {min(results):7.1f} µs/entry  (rounds: "
        + ", ".join(f"{r:.1f}" for r in results)
        + f")  n={ENTRIES}  refused={refused:.0f}"
    )
    await app.store.close()


if __name__ == "__main__":
    asyncio.run(main())
