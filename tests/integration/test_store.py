"""The same behaviour from every store: embedded SQLite, real PostgreSQL and the unit-test fake."""

from __future__ import annotations

import asyncio
from datetime import UTC, datetime, timedelta

import pytest

from authz.keys import generate_key, hash_key, mask_key, mint_key
from authz.models import (
    CLI_ACTOR,
    Actor,
    Enforcement,
    ModelPrice,
    NewKey,
    NewWorkspace,
    StreamingUsage,
    WorkspaceUpdate,
)
from authz.store.base import (
    PRICES_AUDIT,
    Change,
    ChangeKind,
    Conflict,
    KeyLimitReached,
    NotFound,
    Store,
)
from authz.store.common import InvalidInput
from tests.conftest import StoreOpener
from tests.support.feeds import Recorder, wait_for

pytestmark = pytest.mark.integration


def new_key(workspace_id: str, label: str = "app") -> tuple[str, NewKey]:
    return mint_key(workspace_id, label)


async def test_migrate_is_idempotent(store: Store) -> None:
    assert await store.migrate() == []


async def test_workspace_create_show_update(store: Store) -> None:
    created = await store.create_workspace(
        NewWorkspace(name="acme", rpm=5, tpm=1000), actor=CLI_ACTOR
    )
    assert created.id.startswith("ws_")
    assert (created.rpm, created.tpm, created.key_limit) == (5, 1000, 10)
    updated = await store.update_workspace(
        created.id, WorkspaceUpdate(rpm=7, monthly_token_quota=500), actor=CLI_ACTOR
    )
    assert (updated.rpm, updated.tpm, updated.monthly_token_quota) == (7, 1000, 500)
    assert await store.get_workspace(created.id) == updated
    assert [w.id for w in await store.list_workspaces()] == [created.id]


async def test_duplicate_workspace_name_is_a_conflict(store: Store) -> None:
    await store.create_workspace(NewWorkspace(name="acme"), actor=CLI_ACTOR)
    with pytest.raises(Conflict, match="acme"):
        await store.create_workspace(NewWorkspace(name="acme"), actor=CLI_ACTOR)


async def test_bad_values_are_refused(store: Store) -> None:
    with pytest.raises(InvalidInput, match="empty"):
        await store.create_workspace(NewWorkspace(name="  "), actor=CLI_ACTOR)
    with pytest.raises(InvalidInput, match="rpm"):
        await store.create_workspace(NewWorkspace(name="x", rpm=-1), actor=CLI_ACTOR)
    workspace = await store.create_workspace(NewWorkspace(name="x"), actor=CLI_ACTOR)
    _, key = new_key(workspace.id, label="contains " + generate_key())
    with pytest.raises(InvalidInput, match="label"):
        await store.create_key(key, actor=CLI_ACTOR)
    with pytest.raises(NotFound):
        await store.update_workspace("ws_missing", WorkspaceUpdate(rpm=1), actor=CLI_ACTOR)


async def test_key_lookup_revoke_and_hash_only_at_rest(store: Store) -> None:
    workspace = await store.create_workspace(NewWorkspace(name="acme"), actor=CLI_ACTOR)
    secret, key = new_key(workspace.id)
    created = await store.create_key(key, actor=CLI_ACTOR)
    assert created.mask == mask_key(secret)
    found = await store.lookup_key(hash_key(secret))
    assert found is not None
    grant, ws = found
    assert (grant.key_id, grant.workspace_id, ws.id) == (key.id, workspace.id, workspace.id)
    assert await store.lookup_key(hash_key(generate_key())) is None

    revoked = await store.revoke_key(key.id, actor=CLI_ACTOR)
    assert revoked.revoked_at is not None
    assert await store.lookup_key(hash_key(secret)) is None
    # Revoking again is a no-op that still answers with the key.
    assert (await store.revoke_key(key.id, actor=CLI_ACTOR)).revoked_at == revoked.revoked_at
    by_hash = await store.get_key_by_hash(hash_key(secret))
    assert by_hash is not None
    assert not by_hash.active
    with pytest.raises(NotFound):
        await store.revoke_key("key_missing", actor=CLI_ACTOR)


async def test_key_limit_counts_active_keys(store: Store) -> None:
    workspace = await store.create_workspace(
        NewWorkspace(name="acme", key_limit=2), actor=CLI_ACTOR
    )
    first = new_key(workspace.id)[1]
    await store.create_key(first, actor=CLI_ACTOR)
    await store.create_key(new_key(workspace.id)[1], actor=CLI_ACTOR)
    with pytest.raises(KeyLimitReached, match="revoke an unused key before generating"):
        await store.create_key(new_key(workspace.id)[1], actor=CLI_ACTOR)
    await store.revoke_key(first.id, actor=CLI_ACTOR)
    await store.create_key(new_key(workspace.id)[1], actor=CLI_ACTOR)


async def test_concurrent_creates_never_exceed_the_key_limit(store: Store) -> None:
    workspace = await store.create_workspace(
        NewWorkspace(name="acme", key_limit=3), actor=CLI_ACTOR
    )
    results = await asyncio.gather(
        *(store.create_key(new_key(workspace.id)[1], actor=CLI_ACTOR) for _ in range(10)),
        return_exceptions=True,
    )
    assert sum(1 for r in results if not isinstance(r, BaseException)) == 3
    assert all(isinstance(r, KeyLimitReached) for r in results if isinstance(r, BaseException))
    assert len(await store.list_keys(workspace.id)) == 3


async def test_expired_grace_keys_free_their_slot(store: Store) -> None:
    workspace = await store.create_workspace(
        NewWorkspace(name="acme", key_limit=1), actor=CLI_ACTOR
    )
    _, key = new_key(workspace.id)
    past = datetime.now(UTC) - timedelta(seconds=1)
    await store.create_key(
        NewKey(key.id, key.workspace_id, key.label, key.key_hash, key.mask, expires_at=past),
        actor=CLI_ACTOR,
    )
    _, second = new_key(workspace.id)
    # Refused with KeyLimitReached if the expired key still held the only slot.
    created = await store.create_key(second, actor=CLI_ACTOR)
    assert created.id == second.id
    found = await store.lookup_key(second.key_hash)
    assert found is not None
    assert found[0].key_id == second.id


async def test_last_used_is_batched_and_never_goes_back(store: Store) -> None:
    workspace = await store.create_workspace(NewWorkspace(name="acme"), actor=CLI_ACTOR)
    _, key = new_key(workspace.id)
    await store.create_key(key, actor=CLI_ACTOR)
    later = datetime(2030, 1, 2, 3, 4, 5, tzinfo=UTC)
    await store.record_key_use({key.id: later})
    await store.record_key_use({key.id: later - timedelta(hours=1), "key_unknown": later})
    listed = await store.list_keys(workspace.id)
    assert [k.last_used_at for k in listed] == [later]


async def test_audit_log_records_who_did_what(store: Store) -> None:
    workspace = await store.create_workspace(NewWorkspace(name="acme"), actor=CLI_ACTOR)
    _, key = new_key(workspace.id)
    await store.create_key(key, actor=Actor(kind="user", subject="alice", issuer="https://idp"))
    await store.revoke_key(key.id, actor=CLI_ACTOR, reason="leaked")
    entries = await store.list_audit(workspace.id)
    assert [(e.action, e.actor_subject, e.key_id) for e in entries] == [
        ("workspace.create", "cli", None),
        ("key.create", "alice", key.id),
        ("key.revoke", "cli", key.id),
    ]
    assert entries[-1].detail == "leaked"


async def test_change_feed_announces_revocations_and_limit_changes(
    store: Store, open_replica: StoreOpener
) -> None:
    workspace = await store.create_workspace(NewWorkspace(name="acme"), actor=CLI_ACTOR)
    secret, key = new_key(workspace.id)
    await store.create_key(key, actor=CLI_ACTOR)
    recorder = Recorder()
    watcher = asyncio.create_task(store.watch_changes(recorder))
    try:
        # Both stores reset the sink once they watch; changes after that are never missed.
        await wait_for(recorder, lambda: recorder.resets >= 1)
        # A second connection (another replica, or the CLI) makes the changes.
        other = await open_replica()
        try:
            await other.revoke_key(key.id, actor=CLI_ACTOR)
            await other.update_workspace(workspace.id, WorkspaceUpdate(rpm=1), actor=CLI_ACTOR)
        finally:
            await other.close()
        expected = [
            Change(ChangeKind.KEY, hash_key(secret).hex()),
            Change(ChangeKind.WORKSPACE, workspace.id),
        ]
        await wait_for(recorder, lambda: recorder.changes[-2:] == expected)
    finally:
        watcher.cancel()
        await asyncio.gather(watcher, return_exceptions=True)


async def test_every_workspace_change_is_audited_field_by_field(store: Store) -> None:
    workspace = await store.create_workspace(
        NewWorkspace(name="acme", rpm=5, tpm=1000), actor=CLI_ACTOR
    )
    await store.update_workspace(
        workspace.id, WorkspaceUpdate(rpm=100, monthly_token_quota=500), actor=CLI_ACTOR
    )
    await store.update_workspace(
        workspace.id,
        WorkspaceUpdate(clear_quota=True, key_limit=3, monthly_spend_cap_usd=0.002),
        actor=CLI_ACTOR,
    )
    await store.update_workspace(workspace.id, WorkspaceUpdate(name="acme2"), actor=CLI_ACTOR)
    await store.update_workspace(workspace.id, WorkspaceUpdate(rpm=100), actor=CLI_ACTOR)
    updates = [
        e.detail for e in await store.list_audit(workspace.id) if e.action.endswith("update")
    ]
    assert updates == [
        "rpm 5 \u2192 100, monthly_token_quota none \u2192 500",
        "key_limit 10 \u2192 3, monthly_token_quota 500 \u2192 none, "
        "monthly_spend_cap_usd none \u2192 0.002",
        "name acme \u2192 acme2",
        "no change",
    ]


async def test_enforcement_is_stored_looked_up_and_audited(
    store: Store, open_replica: StoreOpener
) -> None:
    default = await store.create_workspace(NewWorkspace(name="plain"), actor=CLI_ACTOR)
    assert default.enforcement is Enforcement.ENFORCE
    created = await store.create_workspace(
        NewWorkspace(name="acme", rpm=5, enforcement=Enforcement.SHADOW), actor=CLI_ACTOR
    )
    assert created.enforcement is Enforcement.SHADOW
    secret, key = new_key(created.id)
    await store.create_key(key, actor=CLI_ACTOR)
    found = await store.lookup_key(hash_key(secret))
    assert found is not None
    assert found[1].enforcement is Enforcement.SHADOW  # what the Check path sees
    other = await open_replica()
    try:
        update = WorkspaceUpdate(enforcement=Enforcement.ENFORCE)
        updated = await other.update_workspace(created.id, update, actor=CLI_ACTOR)
        # An update that names no mode keeps it.
        again = await other.update_workspace(created.id, WorkspaceUpdate(rpm=6), actor=CLI_ACTOR)
    finally:
        await other.close()
    assert updated.enforcement is again.enforcement is Enforcement.ENFORCE
    assert await store.get_workspace(created.id) == again
    details = [e.detail for e in await store.list_audit(created.id) if e.action.endswith("update")]
    assert details == ["enforcement shadow \u2192 enforce", "rpm 5 \u2192 6"]


async def test_price_changes_are_audited_with_old_and_new_prices(store: Store) -> None:
    alice = Actor(kind="user", subject="alice", issuer="https://idp")
    await store.set_price(ModelPrice("gpt", 1.5, 6.0), actor=alice)
    await store.set_price(ModelPrice("gpt", 2.0, 6.0), actor=CLI_ACTOR)
    entries = await store.list_audit(PRICES_AUDIT)
    assert [(e.action, e.actor_subject, e.detail) for e in entries] == [
        (
            "price.set",
            "alice",
            "gpt: input_per_1m_usd none \u2192 1.5, output_per_1m_usd none \u2192 6.0",
        ),
        ("price.set", "cli", "gpt: input_per_1m_usd 1.5 \u2192 2.0"),
    ]


async def test_streaming_usage_policy_is_stored_and_audited(store: Store) -> None:
    created = await store.create_workspace(
        NewWorkspace(name="streams", streaming_usage=StreamingUsage.REQUIRE), actor=CLI_ACTOR
    )
    assert created.streaming_usage is StreamingUsage.REQUIRE
    assert (await store.get_workspace(created.id)) == created
    updated = await store.update_workspace(
        created.id, WorkspaceUpdate(streaming_usage=StreamingUsage.ESTIMATE), actor=CLI_ACTOR
    )
    assert updated.streaming_usage is StreamingUsage.ESTIMATE
    details = [e.detail for e in await store.list_audit(created.id)]
    assert details[-1] == "streaming_usage require \u2192 estimate"
    default = await store.create_workspace(NewWorkspace(name="plain"), actor=CLI_ACTOR)
    assert default.streaming_usage is StreamingUsage.ESTIMATE


async def test_migrate_creates_one_signing_key_that_every_replica_reads(
    open_replica: StoreOpener,
) -> None:
    first = await open_replica()
    second = await open_replica()
    try:
        await first.migrate()
        await second.migrate()  # a second migrate (another replica) adds no second key
        keys = await first.signing_keys()
        assert len(keys) == 1
        assert len(keys[0].secret) == 32
        assert keys[0].retires_at is None
        assert await second.signing_keys() == keys
        assert keys[0].secret.hex() not in repr(keys[0])
    finally:
        await first.close()
        await second.close()


async def test_rotated_signing_key_stays_valid_for_the_overlap_only(store: Store) -> None:
    (old,) = await store.signing_keys()
    new = await store.rotate_signing_key(overlap=timedelta(hours=1))
    keys = await store.signing_keys()
    assert [k.id for k in keys] == [new.id, old.id]
    assert keys[0].retires_at is None
    retires = keys[1].retires_at
    assert retires is not None
    assert timedelta(minutes=59) < retires - datetime.now(UTC) <= timedelta(hours=1)
    # A rotation with no overlap retires every older key at once.
    newest = await store.rotate_signing_key(overlap=timedelta(0))
    assert [k.id for k in await store.signing_keys()] == [newest.id]
