"""`make run`'s console: a development OpenID Provider and the console, for the demo workspace.

The provider is the `oidc-provider` npm package (tests/support/oidc/provider.mjs), clearly
marked as development-only on its sign-in page: one click signs in a demo member who may
manage keys in the demo workspace. Never use it outside a demo.
"""

from __future__ import annotations

import json
import os
import secrets
import shutil
import sys
from collections.abc import Callable
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
PROVIDER_SCRIPT = ROOT / "tests" / "support" / "oidc" / "provider.mjs"
PORTS = {"console": 8090, "dev sign-in": 9400}
PUBLIC_URL = "http://127.0.0.1:8080/console/"


def start_demo_console(start: Callable[[str, list[str]], None], workspace_id: str) -> str:
    """Start the dev provider and the console; returns a line saying where the console is.

    Sets AUTHZ_JWT_ISSUERS (and the console's settings) in this process's environment, so the
    sidecar started after this trusts the development provider too.
    """
    node = shutil.which("node")
    if node is None or not (ROOT / "node_modules" / "oidc-provider").is_dir():
        return "Console: not started (needs Node.js and `npm ci`; `make install` does both)"
    issuer = f"http://127.0.0.1:{PORTS['dev sign-in']}"
    secret = secrets.token_urlsafe(24)
    client = {"client_id": "oais-console", "client_secret": secret}
    os.environ.update(
        {
            "OIDC_PORT": str(PORTS["dev sign-in"]),
            "OIDC_CLIENT": json.dumps({**client, "redirect_uris": [PUBLIC_URL + "auth/callback"]}),
            "OIDC_ACCOUNTS": json.dumps(
                {"demo-member": {"workspaces": [workspace_id], "permissions": "keys:manage"}}
            ),
            "AUTHZ_JWT_ISSUERS": json.dumps(
                [
                    {
                        "issuer": issuer,
                        "audience": "oais-keys",
                        "workspaces": [workspace_id],
                        "workspace_claim": "workspaces",
                        "permission_claim": "permissions",
                        "manage_permission": "keys:manage",
                        "jwks_url": f"{issuer}/jwks",
                    }
                ]
            ),
            "AUTHZ_CONSOLE_ADDR": f"127.0.0.1:{PORTS['console']}",
            "AUTHZ_CONSOLE_PUBLIC_URL": PUBLIC_URL,
            "AUTHZ_CONSOLE_COOKIE_SECURE": "false",  # plain http on loopback
            "AUTHZ_CONSOLE_CLIENTS": json.dumps(
                [
                    {
                        "issuer": issuer,
                        "name": "the development provider",
                        "scope": "openid keys",
                        **client,
                    }
                ]
            ),
        }
    )
    start("dev sign-in", [node, str(PROVIDER_SCRIPT)])
    start("console", [sys.executable, "-m", "authz.console"])
    return f"Console: {PUBLIC_URL} (development sign-in: one click, as demo-member)"
