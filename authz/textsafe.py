"""Untrusted text made inert for terminals and log lines.

Names, labels, JWT subjects, model names, file names and key ids come from tenants, identity
providers, upstream responses and leaked material. Printed raw, an ESC starts a terminal control
sequence and a newline forges a table row, an INCIDENT line or a log record. Every such value
goes through `printable()` on its way to a terminal or a text log.
"""

from __future__ import annotations

import logging


def _escape(ch: str) -> str:
    code = ord(ch)
    if code < 0x100:
        return f"\\x{code:02x}"
    if code < 0x10000:
        return f"\\u{code:04x}"
    return f"\\U{code:08x}"


def printable(value: object) -> str:
    """`str(value)` with every character that is not printable (C0/C1 controls, DEL, line and
    paragraph separators, bidi and zero-width format characters) written as a Python-style
    escape: `\\x1b`, `\\n`-as-`\\x0a`, `\\u202e`. Plain text passes unchanged."""
    text = str(value)
    if text.isprintable():
        return text
    return "".join(ch if ch.isprintable() else _escape(ch) for ch in text)


class InertTextFormatter(logging.Formatter):
    """A text log formatter whose message cannot hold a control character: a key id or model
    carrying `%0A` (decoded) or ESC cannot forge a log line. Tracebacks keep their lines."""

    def format(self, record: logging.LogRecord) -> str:
        original = record.msg, record.args
        record.msg, record.args = printable(record.getMessage()), None
        try:
            return super().format(record)
        finally:
            record.msg, record.args = original
