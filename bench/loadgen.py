"""The two load generators `make bench` drives, and parsers for what they print.

Closed loop: wrk (Debian's `wrk`), C connections each sending its next request as soon as the
last answer arrives; it finds the most a setup can push. Its Lua `done` hook prints one JSON
line with the counts and the p50/p99/p99.9 of its microsecond histogram.

Open loop at a fixed rate: bench.openloop, our own (see its docstring for why: Debian has no
wrk2, and autocannon's histogram keeps whole milliseconds). It schedules requests at a fixed
total rate and counts latency from each request's scheduled time.
"""

from __future__ import annotations

import json
import math
import shutil
import subprocess
import sys
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

RESULT_MARK = "BENCH_RESULT "
REQUEST_BODY = (
    '{"model":"gpt-4o-mini","max_tokens":16,'
    '"messages":[{"role":"user","content":"Say hello in one word."}]}'
)
PATH = "/v1/chat/completions"


@dataclass(frozen=True, slots=True)
class LoadResult:
    """One run against one listener: throughput, latency (ms) and everything that was not 2xx."""

    requests: int
    seconds: float
    rps: float
    p50_ms: float
    p99_ms: float
    p999_ms: float
    non_2xx: int
    socket_errors: int

    def to_json(self) -> dict[str, Any]:
        return asdict(self)


def wrk_script(authorization: str | None) -> str:
    """The wrk Lua script: the POST, and a `done` hook printing one JSON result line."""
    header = f'wrk.headers["Authorization"] = [[{authorization}]]\n' if authorization else ""
    return (
        'wrk.method = "POST"\n'
        f"wrk.body = [[{REQUEST_BODY}]]\n"
        'wrk.headers["Content-Type"] = "application/json"\n'
        f"{header}"
        "done = function(summary, latency, requests)\n"
        "  local e = summary.errors\n"
        f'  io.write(string.format("{RESULT_MARK}'
        '{\\"requests\\":%d,\\"duration_us\\":%d,\\"status\\":%d,\\"connect\\":%d,'
        '\\"read\\":%d,\\"write\\":%d,\\"timeout\\":%d,'
        '\\"p50_us\\":%d,\\"p99_us\\":%d,\\"p999_us\\":%d}\\n",\n'
        "    summary.requests, summary.duration, e.status, e.connect, e.read, e.write,"
        " e.timeout,\n"
        "    latency:percentile(50), latency:percentile(99), latency:percentile(99.9)))\n"
        "end\n"
    )


def parse_wrk(output: str) -> LoadResult:
    """The result line the script's `done` hook printed, as a LoadResult."""
    for line in output.splitlines():
        if line.startswith(RESULT_MARK):
            raw = json.loads(line[len(RESULT_MARK) :])
            seconds = raw["duration_us"] / 1e6
            return LoadResult(
                requests=raw["requests"],
                seconds=seconds,
                rps=raw["requests"] / seconds if seconds else 0.0,
                p50_ms=raw["p50_us"] / 1e3,
                p99_ms=raw["p99_us"] / 1e3,
                p999_ms=raw["p999_us"] / 1e3,
                non_2xx=raw["status"],
                socket_errors=raw["connect"] + raw["read"] + raw["write"] + raw["timeout"],
            )
    raise ValueError(f"no {RESULT_MARK.strip()} line in wrk output:\n{output[-2000:]}")


def parse_openloop(output: str) -> LoadResult:
    """The result line bench.openloop printed, as a LoadResult."""
    for line in output.splitlines():
        if line.startswith(RESULT_MARK):
            return LoadResult(**json.loads(line[len(RESULT_MARK) :]))
    raise ValueError(f"no {RESULT_MARK.strip()} line in openloop output:\n{output[-2000:]}")


def percentile(samples: list[float], fraction: float) -> float:
    """The nearest-rank percentile (0 for no samples)."""
    if not samples:
        return 0.0
    ordered = sorted(samples)
    return ordered[min(len(ordered) - 1, max(0, math.ceil(fraction * len(ordered)) - 1))]


def run_wrk(
    url: str,
    *,
    authorization: str | None,
    connections: int,
    seconds: float,
    script_dir: Path,
    threads: int = 1,
) -> LoadResult:
    """Run wrk closed loop against `url` and return its result."""
    script = script_dir / "wrk-post.lua"
    script.write_text(wrk_script(authorization))
    done = subprocess.run(  # noqa: S603 - our own argument list
        [
            shutil.which("wrk") or "wrk", f"-t{threads}", f"-c{connections}", f"-d{seconds:g}s",
            "--timeout", "2s", "-s", str(script), url,
        ],
        capture_output=True, text=True, check=False, timeout=seconds + 60,
    )  # fmt: skip
    if done.returncode != 0:
        raise RuntimeError(f"wrk failed ({done.returncode}): {done.stderr[-2000:]}")
    return parse_wrk(done.stdout)


def run_openloop(
    url: str, *, authorization: str | None, rate: int, connections: int, seconds: float
) -> LoadResult:
    """Run bench.openloop (its own process) at a fixed `rate` against `url`."""
    headers = ["--header", f"Authorization: {authorization}"] if authorization else []
    done = subprocess.run(  # noqa: S603 - our own argument list
        [
            sys.executable, "-m", "bench.openloop", url, "--rate", str(rate),
            "--connections", str(connections), "--seconds", f"{seconds:g}", *headers,
        ],
        capture_output=True, text=True, check=False, timeout=seconds + 60,
        cwd=Path(__file__).resolve().parent.parent,
    )  # fmt: skip
    if done.returncode != 0:
        raise RuntimeError(f"openloop failed ({done.returncode}): {done.stderr[-2000:]}")
    return parse_openloop(done.stdout)
