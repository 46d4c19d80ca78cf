"""JSON log lines: which process wrote each one, so AUTHZ_WORKERS' shared stream can be split."""

from __future__ import annotations

import json
import logging
import os

import pytest

from authz.logs import JsonFormatter, worker_index, worker_process_name


def record(process_name: str) -> logging.LogRecord:
    made = logging.LogRecord("authz", logging.INFO, __file__, 1, "serving %s", ("x",), None)
    made.processName = process_name
    return made


def test_a_single_process_line_names_its_pid_and_no_worker() -> None:
    entry = json.loads(JsonFormatter().format(record("MainProcess")))
    assert entry["pid"] == os.getpid()
    assert entry["message"] == "serving x"
    assert "worker" not in entry


def test_a_worker_line_names_its_index() -> None:
    entry = json.loads(JsonFormatter().format(record(worker_process_name(3))))
    assert (entry["pid"], entry["worker"]) == (os.getpid(), 3)


@pytest.mark.parametrize("name", [None, "MainProcess", "authz-worker-", "authz-worker-x"])
def test_other_process_names_are_no_worker(name: str | None) -> None:
    assert worker_index(name) is None
