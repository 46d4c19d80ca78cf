"""`authz ...` with tracemalloc on; each SIGUSR1 writes what the heap holds (bench --memory).

    AUTHZ_BENCH_SNAPSHOTS=/tmp/dir python -m bench.memprobe serve

On SIGUSR1 it writes `snapshot-N.pickle` (a tracemalloc snapshot, one frame per trace) and
`types-N.json` (live objects the garbage collector tracks, counted and sized by type), each
renamed into place when complete. tracemalloc sees only what Python's allocators hand out: the
C++ heaps of gRPC and of protobuf's upb arenas are not in it, which is why the benchmark also
reports RSS. Nothing here runs in production.
"""

from __future__ import annotations

import gc
import json
import os
import signal
import sys
import tracemalloc
from collections import Counter
from pathlib import Path
from types import FrameType

from authz.cli import main as authz_main

SNAPSHOT_DIR_ENV = "AUTHZ_BENCH_SNAPSHOTS"


def census() -> dict[str, list[int]]:
    """[count, shallow bytes] of every gc-tracked object, by type name."""
    counts: Counter[str] = Counter()
    sizes: Counter[str] = Counter()
    for obj in gc.get_objects():
        name = f"{type(obj).__module__}.{type(obj).__qualname__}"
        counts[name] += 1
        sizes[name] += sys.getsizeof(obj)
    return {name: [counts[name], sizes[name]] for name in counts}


class Dumper:
    """The SIGUSR1 handler: numbered snapshots in `folder`."""

    def __init__(self, folder: Path) -> None:
        self.folder = folder
        self.taken = 0

    def __call__(self, signum: int, frame: FrameType | None) -> None:
        self.taken += 1
        snapshot = tracemalloc.take_snapshot()
        partial = self.folder / f".snapshot-{self.taken}.tmp"
        snapshot.dump(str(partial))
        types = self.folder / f".types-{self.taken}.tmp"
        types.write_text(json.dumps(census()))
        os.replace(types, self.folder / f"types-{self.taken}.json")
        os.replace(partial, self.folder / f"snapshot-{self.taken}.pickle")


def main() -> int:
    tracemalloc.start(1)
    signal.signal(signal.SIGUSR1, Dumper(Path(os.environ[SNAPSHOT_DIR_ENV])))
    return authz_main(sys.argv[1:])


if __name__ == "__main__":
    raise SystemExit(main())
