"""The benchmark's parsers: what wrk and the open-loop generator print becomes the table."""

from __future__ import annotations

import json
import re

import pytest

from bench.loadgen import (
    RESULT_MARK,
    LoadResult,
    parse_openloop,
    parse_wrk,
    percentile,
    wrk_script,
)
from bench.openloop import http_request, response_length

WRK_STDOUT = """Running 8s test @ http://127.0.0.1:40000/v1/chat/completions
  1 threads and 32 connections
  Thread Stats   Avg      Stdev     Max   +/- Stdev
    Latency     5.01ms    2.10ms  40.12ms   90.00%
    Req/Sec     6.40k   300.00     7.00k    70.00%
  51200 requests in 8.00s, 20.00MB read
  Non-2xx or 3xx responses: 3
Requests/sec:   6400.00
Transfer/sec:      2.50MB
BENCH_RESULT {"requests":51200,"duration_us":8000000,"status":3,"connect":0,"read":1,"write":0,\
"timeout":2,"p50_us":4500,"p99_us":12000,"p999_us":31000}
"""


def test_wrk_result_line_becomes_rps_latencies_and_errors() -> None:
    result = parse_wrk(WRK_STDOUT)

    assert result == LoadResult(
        requests=51200,
        seconds=8.0,
        rps=6400.0,
        p50_ms=4.5,
        p99_ms=12.0,
        p999_ms=31.0,
        non_2xx=3,
        socket_errors=3,
    )


def test_wrk_output_without_the_result_line_is_an_error_naming_it() -> None:
    with pytest.raises(ValueError, match="no BENCH_RESULT line"):
        parse_wrk(WRK_STDOUT.split("BENCH_RESULT")[0])


def test_the_lua_done_hook_prints_json_that_parse_wrk_reads() -> None:
    """Fill the hook's format string as Lua's string.format would and parse the line."""
    script = wrk_script("Bearer sk-oais_test")
    template = re.search(r'string\.format\("(.*?)",\n', script, re.S)
    assert template is not None
    line = template.group(1).replace('\\"', '"').replace("\\n", "")
    values = iter(["100", "2000000", "1", "0", "0", "0", "0", "900", "1500", "2500"])
    filled = re.sub(r"%d", lambda _: next(values), line)

    result = parse_wrk(filled)

    assert (result.requests, result.rps, result.non_2xx) == (100, 50.0, 1)
    assert (result.p50_ms, result.p99_ms, result.p999_ms) == (0.9, 1.5, 2.5)
    assert 'wrk.headers["Authorization"] = [[Bearer sk-oais_test]]' in script
    assert "Authorization" not in wrk_script(None)


def test_openloop_line_round_trips() -> None:
    sent = LoadResult(1000, 1.0, 1000.0, 0.5, 2.0, 3.0, 0, 1)

    assert parse_openloop("noise\n" + RESULT_MARK + json.dumps(sent.to_json())) == sent


def test_percentile_is_nearest_rank() -> None:
    samples = [float(n) for n in range(1, 101)]

    assert percentile(samples, 0.50) == 50.0
    assert percentile(samples, 0.99) == 99.0
    assert percentile(samples, 0.999) == 100.0
    assert percentile([], 0.5) == 0.0


def test_response_length_waits_for_the_whole_body() -> None:
    head = b"HTTP/1.1 503 Service Unavailable\r\ncontent-length: 5\r\n\r\n"

    assert response_length(head + b"abc") is None
    assert response_length(head + b"abcde" + b"HTTP/1.1") == (503, len(head) + 5, False)
    closing = b"HTTP/1.1 200 OK\r\nContent-Length: 0\r\nConnection: close\r\n\r\n"
    assert response_length(closing) == (200, len(closing), True)
    assert response_length(b"HTTP/1.1 200 OK\r\n") is None


def test_http_request_has_the_body_length() -> None:
    request = http_request("h:1", "/v1/x", ["Authorization: Bearer k"], '{"a":1}')

    head, body = request.split(b"\r\n\r\n")
    assert head.startswith(b"POST /v1/x HTTP/1.1\r\nHost: h:1\r\nContent-Length: 7\r\n")
    assert b"Authorization: Bearer k" in head
    assert body == b'{"a":1}'
