"""Terminal injection: subjects, models and labels from tenants and IdPs print escaped in
`authz audit`, `authz usage` and `authz key list`, on both stores."""

from __future__ import annotations

import asyncio
import contextlib
import io
from datetime import UTC, datetime

import pytest

from authz.cli import main
from authz.keys import mint_key
from authz.models import CLI_ACTOR, Actor, NewWorkspace, UsageRow
from authz.store.base import Store
from authz.usage.periods import period_of

pytestmark = pytest.mark.integration

FORGED = "x\x1b[2K\rINCIDENT: key_admin revoked as leaked\nby mallory"


async def run(database_url: str, *args: str) -> str:
    """The real command line, on a thread: it runs its own event loop."""

    def cli() -> str:
        out, err = io.StringIO(), io.StringIO()
        with contextlib.redirect_stderr(err):
            code = main([*args, "--database-url", database_url], out=out)
        assert code == 0, err.getvalue()
        return out.getvalue()

    return await asyncio.to_thread(cli)


def assert_inert(text: str, lines: int) -> None:
    assert "\x1b" not in text
    assert "\r" not in text
    assert len(text.splitlines()) == lines, text
    assert not any(line.startswith(("INCIDENT", "by mallory")) for line in text.splitlines())


async def test_audit_prints_a_hostile_subject_escaped(database_url: str, url_store: Store) -> None:
    store = url_store
    workspace = await store.create_workspace(NewWorkspace(name="acme"), actor=CLI_ACTOR)
    actor = Actor(kind="user", subject=FORGED, issuer="https://idp\x1b]0;t\x07", address="a\nb")
    _, new = mint_key(workspace.id, "svc")
    await store.create_key(new, actor=actor)
    out = await run(database_url, "audit", "--workspace", workspace.id)
    assert_inert(out, lines=1 + len(await store.list_audit(workspace.id)))
    assert "x\\x1b[2K\\x0dINCIDENT: key_admin revoked as leaked\\x0aby mallory" in out


async def test_usage_and_key_list_print_hostile_models_and_labels_escaped(
    database_url: str, url_store: Store
) -> None:
    store = url_store
    workspace = await store.create_workspace(NewWorkspace(name="acme"), actor=CLI_ACTOR)
    _, new = mint_key(workspace.id, "svc")
    key = await store.create_key(new, actor=CLI_ACTOR)
    hour = datetime.now(UTC).replace(minute=0, second=0, microsecond=0)
    row = UsageRow(hour, workspace.id, key.id, FORGED, 1, 2, 3, 0, 0, 0.0)
    assert await store.apply_usage_batch("batch-inert", [row])
    out = await run(database_url, "usage", "--workspace", workspace.id, "--month", period_of(hour))
    assert_inert(out, lines=3)  # the total, one model, one key
    assert "\\x1b[2K" in out
