"""One escape for terminals and text logs: control characters in values never reach either raw."""

from __future__ import annotations

import io
import logging
from collections.abc import Iterator

import pytest

from authz.logs import configure_logging
from authz.textsafe import InertTextFormatter, printable


@pytest.mark.parametrize(
    ("raw", "shown"),
    [
        ("payments-api", "payments-api"),
        ("café 漢字", "café 漢字"),
        ("a\x1b[31mb", "a\\x1b[31mb"),
        ("line\nforged", "line\\x0aforged"),
        ("cr\rtab\tdel\x7f", "cr\\x0dtab\\x09del\\x7f"),
        ("csi\x9b", "csi\\x9b"),
        ("bidi\u202eevil", "bidi\\u202eevil"),
        ("sep\u2028x", "sep\\u2028x"),
    ],
)
def test_printable(raw: str, shown: str) -> None:
    assert printable(raw) == shown


@pytest.fixture
def root_handlers() -> Iterator[None]:
    root = logging.getLogger()
    saved, level = root.handlers[:], root.level
    yield
    root.handlers[:] = saved
    root.setLevel(level)


def test_text_logs_cannot_be_forged_by_a_value(root_handlers: None) -> None:
    configure_logging("info", "text")
    (handler,) = logging.getLogger().handlers
    assert isinstance(handler.formatter, InertTextFormatter)
    stream = io.StringIO()
    handler.setStream(stream)  # type: ignore[attr-defined]
    key_id = "key_x\n2026-11-29 10:00:00,000 WARNING authz.check: all keys revoked"
    logging.getLogger("authz.keyservice").info("key api: revoked %s", key_id)
    try:
        raise ValueError("boom")
    except ValueError:
        logging.getLogger("authz.x").exception("failed on %s", "m\x1bodel")
    lines = stream.getvalue().splitlines()
    assert lines[0].endswith(
        "key api: revoked key_x\\x0a2026-11-29 10:00:00,000 WARNING authz.check: all keys revoked"
    )
    assert lines[1].endswith("failed on m\\x1bodel")
    assert lines[2] == "Traceback (most recent call last):"  # tracebacks keep their lines
    assert not any(line.startswith("2026-11-29 10:00:00") for line in lines)
