"""The console in a real browser, signed in through a real OpenID Provider, through Envoy.

Each test follows a step of the product docs ("Create a key", "Rotate a key", "A leaked key")
and asserts what the member sees on the page and what a client sees through Envoy.
"""

from __future__ import annotations

import os
import re
import time
from pathlib import Path
from typing import Any

import pytest

from tests.browser.conftest import PROVIDER_NAME, ConsoleStack
from tests.support.stack import authz_cli, change_applied_after, wait_until

pytestmark = pytest.mark.e2e

LIMIT_MESSAGE = "Key limit reached: revoke an unused key before generating a replacement."
SCREENSHOTS = os.environ.get("AUTHZ_CONSOLE_SCREENSHOTS")
"""A folder to save the README's screenshots into (docs/img), when set."""


def sign_in(page: Any, stack: ConsoleStack, user: str = "member") -> None:
    page.goto(stack.console)
    page.wait_for_url(re.compile(r"/console/signin"))
    page.get_by_role("link", name=f"Sign in with {PROVIDER_NAME}").click()
    # The development provider's one-click sign-in page, on the provider's origin.
    page.wait_for_url(re.compile(re.escape(stack.issuer)))
    page.get_by_role("button", name=f"Sign in as {user}").click()
    page.wait_for_url(re.compile(re.escape(stack.console)))
    page.locator("#main h1").wait_for()


def open_keys(page: Any, stack: ConsoleStack, workspace: str) -> None:
    page.goto(f"{stack.console}w/{stack.workspaces[workspace]}/keys")
    page.locator("#count").wait_for()


def generate(page: Any, label: str) -> str:
    page.get_by_label("Label").fill(label)
    page.get_by_role("button", name="Generate").click()
    secret = page.locator("#secret-value")
    secret.wait_for()
    return str(secret.text_content())


def row(page: Any, label: str) -> Any:
    return page.locator("#keys tbody tr").filter(has=page.locator("td.label", has_text=label))


def test_sign_in_lands_on_the_keys_page_of_a_granted_workspace(
    page: Any, console_stack: ConsoleStack
) -> None:
    sign_in(page, console_stack)
    first = sorted(console_stack.workspaces.values())[0]
    assert page.url.endswith(f"/console/w/{first}/keys")
    assert page.get_by_role("heading", name="API keys").is_visible()
    select = page.get_by_label("Workspace")
    assert select.input_value() == first
    assert sorted(select.locator("option").all_text_contents()) == sorted(
        console_stack.workspaces.values()
    )
    # Choosing a workspace puts it in the URL and in the page.
    other = next(w for w in console_stack.workspaces.values() if w != first)
    select.select_option(other)
    page.wait_for_url(f"**/console/w/{other}/keys")
    page.get_by_text(f"Workspace {other}").wait_for()


def test_generate_shows_the_secret_once_and_the_traffic_shows_in_observability(
    page: Any, console_stack: ConsoleStack
) -> None:
    sign_in(page, console_stack)
    open_keys(page, console_stack, "acme")
    secret = generate(page, "prod-payments-worker")
    assert secret.startswith("sk-oais_")
    assert page.get_by_text("It will not be shown again").is_visible()
    assert page.get_by_role("button", name="Copy").is_visible()
    page.get_by_role("button", name="Copy").click()
    page.get_by_text("Copied").wait_for()
    assert page.evaluate("navigator.clipboard.readText()") == secret
    mask = row(page, "prod-payments-worker").locator("code").text_content()
    assert mask == f"{secret[:5]}{'*' * 10}{secret[-4:]}"
    assert row(page, "prod-payments-worker").get_by_text("by member").is_visible()
    if SCREENSHOTS:
        page.screenshot(path=str(Path(SCREENSHOTS) / "console-keys.png"))

    page.reload()
    row(page, "prod-payments-worker").wait_for()
    assert page.locator("#secret-value").count() == 0
    assert secret not in page.content()
    assert row(page, "prod-payments-worker").locator("code").text_content() == mask

    # A client uses the key through Envoy; the ledger's hourly row reaches Observability.
    assert console_stack.chat(secret) == 200
    assert console_stack.chat(secret) == 200
    page.get_by_role("link", name="Observability").click()
    page.wait_for_url(re.compile(r"/observability"))

    def counted() -> bool:
        page.reload()
        page.locator("[data-tile=Requests]").wait_for()  # the page has its data
        cell = page.locator("#per-key tr", has_text="prod-payments-worker").locator("td.num")
        return bool(cell.count() > 0 and cell.first.text_content() == "2")

    wait_until(counted, timeout=30, what="two requests on the Observability page", interval=0.3)
    assert page.locator("[data-tile=Requests] .tile-value").text_content() == "2"
    assert page.locator("figure.chart svg rect.s1").count() > 0
    if SCREENSHOTS:
        page.screenshot(path=str(Path(SCREENSHOTS) / "console-observability.png"), full_page=True)
    open_keys(page, console_stack, "acme")
    assert row(page, "prod-payments-worker").locator("td.num").text_content() == "2"


def test_rotate_then_revoke_refuses_the_old_key_through_envoy_within_a_second(
    page: Any, console_stack: ConsoleStack
) -> None:
    sign_in(page, console_stack)
    open_keys(page, console_stack, "acme")
    old = generate(page, "staging-pipeline")
    page.get_by_role("button", name="Done").click()
    old_mask = row(page, "staging-pipeline").locator("code").text_content()

    row(page, "staging-pipeline").get_by_role("button", name="Rotate").click()
    dialog = page.locator("dialog")
    dialog.get_by_role("combobox").select_option(label="24 hours")
    dialog.get_by_role("button", name="Rotate").click()
    new = str(page.locator("#secret-value").text_content())
    today = time.strftime("%Y-%m-%d", time.gmtime())
    replacement = f"staging-pipeline (rotated {today})"
    row(page, replacement).wait_for()
    assert new != old
    assert row(page, "staging-pipeline").first.get_by_text("Active until").is_visible()
    assert console_stack.chat(new) == 200
    assert console_stack.chat(old) == 200  # in its grace period

    old_row = page.locator("#keys tbody tr").filter(has_text=old_mask)
    old_row.get_by_role("button", name="Revoke").click()
    dialog = page.locator("dialog")
    assert f"staging-pipeline ({old_mask})" in str(dialog.text_content())
    dialog.get_by_role("button", name="Revoke").click()
    old_row.get_by_text("Revoked").wait_for()
    wait_until(lambda: console_stack.chat(old) == 401, timeout=10, what="401 for the old key")
    # From the revocation's commit to the sidecar applying it, by the sidecar's own log line
    # (not the test's wall clock, which a busy machine stretches).
    listed = authz_cli(
        console_stack.database_url, "key", "list", "--workspace", console_stack.workspaces["acme"]
    )
    (revoked,) = [k for k in listed if k["mask"] == old_mask]
    assert change_applied_after(console_stack.sidecar, "key", revoked["revoked_at"]) < 1.0
    assert console_stack.chat(new) == 200

    # The audit view says who did what: created, rotated, revoked, by the signed-in member.
    page.get_by_role("link", name="Observability").click()
    audit = page.locator("#audit tbody tr").filter(has=page.locator("code", has_text=old_mask))
    audit.first.wait_for()
    assert [r.locator("td").nth(2).text_content() for r in audit.all()] == [
        "revoked",
        "rotated",
        "created",
    ]
    assert {r.locator("td").nth(1).text_content() for r in audit.all()} == {"member"}


def test_observability_shows_latency_and_denials_per_key(
    page: Any, console_stack: ConsoleStack
) -> None:
    sign_in(page, console_stack)
    open_keys(page, console_stack, "limited")  # 2 requests per minute
    secret = generate(page, "batch-importer")
    assert [console_stack.chat(secret) for _ in range(3)] == [200, 200, 429]
    page.get_by_role("link", name="Observability").click()
    page.wait_for_url(re.compile(r"/observability"))
    key_row = page.locator("#per-key tr", has_text="batch-importer")

    def observed() -> bool:
        # The denial is recorded by Check as it answers; latency comes later, from Envoy's
        # access log of the allowed requests: wait for both.
        page.reload()
        page.locator("[data-tile=Requests]").wait_for()
        denied = key_row.locator("td[data-col=denied]")
        p50 = key_row.locator("td[data-col=p50]")
        return bool(
            denied.count() == 1
            and denied.text_content() == "1"
            and re.fullmatch(r"[\d.]+ ms", str(p50.text_content()))
        )

    wait_until(
        observed, timeout=30, what="the 429 and latency on the Observability page", interval=0.3
    )
    assert page.locator("[data-tile='Denied 429 requests'] .tile-value").text_content() == "1"
    assert page.locator("[data-tile='Denied 429 tokens'] .tile-value").text_content() == "0"
    assert "429 requests: 1" in str(key_row.locator("td[data-col=denied]").get_attribute("title"))
    p50 = str(key_row.locator("td[data-col=p50]").text_content())
    p95 = str(key_row.locator("td[data-col=p95]").text_content())
    assert re.fullmatch(r"[\d.]+ ms", p50), p50
    assert re.fullmatch(r"[\d.]+ ms", p95), p95
    assert float(p50.split()[0]) <= float(p95.split()[0])
    p95_tile = str(page.locator("[data-tile='p95 latency'] .tile-value").text_content())
    assert p95_tile.endswith(" ms")
    # The charts: latency dots (p50 and p95 of this hour) and a denial bar.
    assert page.locator("figure.chart svg circle.s4").count() > 0
    assert page.locator("figure.chart svg rect.s1 title", has_text="429 requests").count() > 0


def test_at_the_key_limit_generate_is_disabled_and_says_what_to_do(
    page: Any, console_stack: ConsoleStack
) -> None:
    sign_in(page, console_stack)
    open_keys(page, console_stack, "small")
    assert page.locator("#count").text_content() == "0 of 2 keys"
    generate(page, "worker-a")
    page.get_by_role("button", name="Done").click()
    generate(page, "worker-b")
    assert page.locator("#count").text_content() == "2 of 2 keys"
    assert page.get_by_role("button", name="Generate").is_disabled()
    assert page.locator("#limit").text_content() == LIMIT_MESSAGE
    # The server enforces it too, whatever the page does.
    csrf = page.evaluate("fetch('/console/api/session').then(r => r.json())")["csrf_token"]
    answer = page.request.post(
        f"{console_stack.console}api/w/{console_stack.workspaces['small']}/keys",
        data={"label": "one-too-many"},
        headers={"X-CSRF-Token": csrf, "Origin": console_stack.console.rsplit("/console/", 1)[0]},
    )
    assert answer.status == 409
    assert "revoke an unused key before generating a replacement" in answer.json()["message"]


def test_a_member_without_permission_sees_403(page: Any, console_stack: ConsoleStack) -> None:
    sign_in(page, console_stack, user="viewer")
    page.get_by_role("heading", name="403: no workspace that can manage API keys").wait_for()
    assert page.get_by_text("without a workspace context that can manage API keys").is_visible()
    # The key API refuses on its own, not only the page.
    answer = page.request.get(
        f"{console_stack.console}api/w/{console_stack.workspaces['acme']}/keys"
    )
    assert answer.status == 403
    page.get_by_role("button", name="Sign out").click()
    page.wait_for_url(re.compile(r"/console/signin"))
    assert page.request.get(f"{console_stack.console}api/session").status == 401


def test_an_unsupported_sign_in_provider_gets_its_page(
    page: Any, console_stack: ConsoleStack
) -> None:
    page.goto(f"{console_stack.console}auth/login?provider=https%3A%2F%2Felsewhere.example")
    page.wait_for_url(re.compile(r"/console/signin\?error=unsupported_provider"))
    assert page.get_by_role("heading", name="Unsupported sign-in provider").is_visible()
    assert page.get_by_role("link", name=f"Sign in with {PROVIDER_NAME}").is_visible()


def test_an_xss_label_renders_inert(page: Any, console_stack: ConsoleStack) -> None:
    answer = page.goto(console_stack.console)
    policy = answer.headers["content-security-policy"]
    assert "script-src 'self'" in policy
    assert "frame-ancestors 'none'" in policy
    page.wait_for_url(re.compile(r"/console/signin"))
    sign_in(page, console_stack)
    open_keys(page, console_stack, "acme")
    label = '<img src=x onerror="window.__pwned=1"><script>window.__pwned=2</script>'
    generate(page, label)
    page.get_by_role("button", name="Done").click()
    page.reload()
    cell = page.locator("#keys td.label", has_text="<img src=x")
    assert cell.text_content() == label
    assert page.locator("#keys img, #keys script").count() == 0
    assert page.evaluate("window.__pwned") is None


def test_sign_out_clears_the_session(page: Any, console_stack: ConsoleStack) -> None:
    sign_in(page, console_stack)
    open_keys(page, console_stack, "acme")
    page.get_by_role("button", name="Sign out").click()
    page.wait_for_url(re.compile(r"/console/signin"))
    page.goto(f"{console_stack.console}w/{console_stack.workspaces['acme']}/keys")
    page.wait_for_url(re.compile(r"/console/signin"))
    # is_visible() does not wait; wait_for() does (visible by default), so a slow render on a
    # busy machine is not read as a missing link.
    page.get_by_role("link", name=f"Sign in with {PROVIDER_NAME}").wait_for()
