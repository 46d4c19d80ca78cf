"""Raw HTTP against a real Envoy, for the edge tests: paths sent exactly as written, clients
that misbehave on purpose, and bursts of simultaneous requests.

urllib and friends normalize paths and follow redirects; an edge test must see what Envoy
itself answers to the bytes a hostile client sends.
"""

from __future__ import annotations

import asyncio
import http.client
import urllib.request
from collections import Counter
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import yaml

from tests.support.procs import ManagedProcess, free_port
from tests.support.stack import envoy_binary, render_envoy_config

# The clusters whose endpoint is the sidecar (envoy.yaml).
SIDECAR_CLUSTERS = ("authz", "authz_access_log")


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


@dataclass
class EdgeEnvoy:
    """The shipped envoy.yaml running with its admin port known, for its own counters."""

    process: ManagedProcess
    port: int
    admin_port: int

    def stats(self) -> dict[str, int]:
        """Envoy's counters and gauges (name -> value)."""
        url = f"http://127.0.0.1:{self.admin_port}/stats"
        with urllib.request.urlopen(url, timeout=5) as answer:
            text = answer.read().decode()
        found: dict[str, int] = {}
        for line in text.splitlines():
            name, _, value = line.partition(": ")
            if value.strip().lstrip("-").isdigit():
                found[name] = int(value)
        return found


def start_edge_envoy(
    log_dir: Path,
    *,
    authz_ports: Sequence[int],
    upstream_port: int,
    name: str = "envoy",
    access_log: Path | None = None,
) -> EdgeEnvoy:
    """The shipped envoy.yaml (ports rewritten) with one sidecar endpoint per port given, so
    several replicas sit behind it with the shipped health checks and circuit breakers. With
    `access_log`, Envoy also writes one line per request there: status, response flags and
    details (why Envoy answered as it did), for a test to explain a failure."""
    listen, admin = free_port(), free_port()
    path = render_envoy_config(
        log_dir / f"{name}.yaml",
        listen=listen,
        admin=admin,
        authz=authz_ports[0],
        upstream=upstream_port,
    )
    config = yaml.safe_load(path.read_text(encoding="utf-8"))
    # Checks and the access-log stream reach the same replicas, each on its own cluster.
    for cluster in config["static_resources"]["clusters"]:
        if cluster["name"] not in SIDECAR_CLUSTERS:
            continue
        (group,) = cluster["load_assignment"]["endpoints"]
        (template,) = group["lb_endpoints"]
        group["lb_endpoints"] = [
            {"endpoint": {"address": {"socket_address": {
                **template["endpoint"]["address"]["socket_address"], "port_value": port,
            }}}}
            for port in authz_ports
        ]  # fmt: skip
    if access_log is not None:
        (listener,) = config["static_resources"]["listeners"]
        manager = listener["filter_chains"][0]["filters"][0]["typed_config"]
        manager["access_log"].append(_file_access_log(access_log))
    path.write_text(yaml.safe_dump(config), encoding="utf-8")
    process = ManagedProcess(
        [envoy_binary(), "-c", str(path), "--use-dynamic-base-id", "--log-level", "warn"],
        log_dir=log_dir,
        name=name,
    )
    process.wait_for_port(listen, timeout=20)
    return EdgeEnvoy(process, listen, admin)


def _file_access_log(path: Path) -> dict[str, object]:
    line = "%START_TIME% %RESPONSE_CODE% %RESPONSE_FLAGS% %RESPONSE_CODE_DETAILS% %DURATION%ms\n"
    return {
        "name": "envoy.access_loggers.file",
        "typed_config": {
            "@type": "type.googleapis.com/envoy.extensions.access_loggers.file.v3.FileAccessLog",
            "path": str(path),
            "log_format": {"text_format_source": {"inline_string": line}},
        },
    }
