"""Persistence depends on neither settings nor sign-in (JWT code)."""

from __future__ import annotations

import subprocess
import sys


def test_the_store_imports_neither_settings_nor_identity() -> None:
    probe = (
        "import sys, authz.store, authz.store.sql, authz.store.postgres, authz.store.sqlite; "
        "print(sorted(m for m in sys.modules if m in ('authz.settings', 'authz.identity')))"
    )
    loaded = subprocess.run(
        [sys.executable, "-c", probe], capture_output=True, text=True, check=True, timeout=60
    )
    assert loaded.stdout.strip() == "[]"
