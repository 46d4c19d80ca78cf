"""The console's browser tests: real Chromium (Debian's), a real OpenID Provider (the npm
`oidc-provider` package), the sidecar, the console and Envoy, all as real processes.

One stack per module: workspaces are created up front and the dev provider's accounts are
bound to them. Under CI=true a missing browser or Node package is a failure, not a skip.
"""

from __future__ import annotations

import json
import os
import shutil
import sys
import urllib.error
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import yaml

from tests.support.idp import issuers_json, jwks_issuer
from tests.support.procs import ManagedProcess, free_port
from tests.support.stack import (
    FEED_LOGS,
    ROOT,
    Sidecar,
    authz_cli,
    envoy_binary,
    render_envoy_config,
    start_sidecar,
    start_upstream,
    wait_until,
)

CHROMIUM = Path("/usr/bin/chromium")
CHROMIUM_ARGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--no-first-run",
]
PROVIDER_SCRIPT = ROOT / "tests" / "support" / "oidc" / "provider.mjs"
CLIENT_ID = "oais-console"
CLIENT_SECRET = "console-test-secret"  # a throwaway client of a throwaway provider
PROVIDER_NAME = "Dev provider"


def _missing(what: str) -> None:
    if os.environ.get("CI") == "true":
        pytest.fail(f"{what} is missing: `make install` installs it")
    pytest.skip(f"{what} is missing: run `make install`")


@dataclass
class ConsoleStack:
    """Everything a browser test reaches through Envoy, and the workspaces it may manage."""

    envoy_port: int
    issuer: str
    database_url: str
    workspaces: dict[str, str]
    processes: list[ManagedProcess]
    sidecar: Sidecar

    @property
    def console(self) -> str:
        return f"http://127.0.0.1:{self.envoy_port}/console/"

    def chat(self, secret: str) -> int:
        """Status of one chat completion through Envoy with this key."""
        request = urllib.request.Request(
            f"http://127.0.0.1:{self.envoy_port}/v1/chat/completions",
            data=json.dumps(
                {"model": "demo-model", "messages": [{"role": "user", "content": "Hi"}]}
            ).encode(),
            headers={"Authorization": f"Bearer {secret}", "Content-Type": "application/json"},
        )
        try:
            with urllib.request.urlopen(request, timeout=10) as answer:
                answer.read()
                return int(answer.status)
        except urllib.error.HTTPError as error:
            return int(error.code)

    def logs(self) -> str:
        return "\n".join(f"== {p.name}\n{p.read_log()}" for p in self.processes)


def _provider(
    log_dir: Path, redirect_uri: str, accounts: dict[str, Any]
) -> tuple[ManagedProcess, str]:
    node = shutil.which("node")
    if node is None:
        _missing("node")
    if not (ROOT / "node_modules" / "oidc-provider").is_dir():
        _missing("the oidc-provider npm package (npm ci)")
    process = ManagedProcess(
        [str(node), str(PROVIDER_SCRIPT)],
        log_dir=log_dir,
        name="oidc-provider",
        env={
            "OIDC_PORT": "0",
            "OIDC_CLIENT": json.dumps(
                {
                    "client_id": CLIENT_ID,
                    "client_secret": CLIENT_SECRET,
                    "redirect_uris": [redirect_uri],
                }
            ),
            "OIDC_ACCOUNTS": json.dumps(accounts),
            "OIDC_AUDIENCE": "oais-keys",
        },
        cwd=ROOT,
    )
    wait_until(
        lambda: "listening " in process.read_log() or not process.is_running(),
        timeout=30,
        what="oidc-provider listening",
    )
    if not process.is_running():
        process.stop()
        raise RuntimeError(f"oidc-provider exited:\n{process.read_log()}")
    line = next(x for x in process.read_log().splitlines() if x.startswith("listening "))
    return process, line.split(" ", 1)[1].strip()


def _envoy_config(log_dir: Path, *, listen: int, authz: int, upstream: int, console: int) -> Path:
    path = render_envoy_config(
        log_dir / "envoy.yaml", listen=listen, admin=free_port(), authz=authz, upstream=upstream
    )
    config = yaml.safe_load(path.read_text())
    for cluster in config["static_resources"]["clusters"]:
        if cluster["name"] == "console":
            endpoint = cluster["load_assignment"]["endpoints"][0]["lb_endpoints"][0]["endpoint"]
            endpoint["address"]["socket_address"]["port_value"] = console
    path.write_text(yaml.safe_dump(config))
    return path


@pytest.fixture(scope="module")
def console_stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ConsoleStack]:
    log_dir = tmp_path_factory.mktemp("console")
    database_url = f"sqlite:///{log_dir / 'authz.db'}"
    authz_cli(database_url, "migrate")
    workspaces = {
        name: authz_cli(database_url, "workspace", "create", name, *extra)["id"]
        for name, extra in {
            "acme": ["--key-limit", "10"],
            "small": ["--key-limit", "2"],
            "limited": ["--rpm", "2"],
        }.items()
    }
    envoy_port, console_port = free_port(), free_port()
    granted = sorted(workspaces.values())
    processes: list[ManagedProcess] = []
    try:
        provider, issuer = _provider(
            log_dir,
            f"http://127.0.0.1:{envoy_port}/console/auth/callback",
            {
                "member": {"workspaces": granted, "permissions": "keys:manage"},
                "viewer": {"workspaces": granted, "permissions": ""},
            },
        )
        processes.append(provider)
        issuers = issuers_json(jwks_issuer(issuer, workspaces=granted))
        upstream, upstream_port = start_upstream(log_dir)
        processes.append(upstream)
        sidecar = start_sidecar(
            log_dir,
            database_url=database_url,
            env={"AUTHZ_JWT_ISSUERS": issuers, "AUTHZ_LEDGER_FLUSH_S": "0.2", **FEED_LOGS},
        )
        processes.append(sidecar.process)
        console = ManagedProcess(
            [sys.executable, "-m", "authz.console"],
            log_dir=log_dir,
            name="console",
            env={
                "AUTHZ_JWT_ISSUERS": issuers,
                "AUTHZ_CONSOLE_ADDR": f"127.0.0.1:{console_port}",
                "AUTHZ_CONSOLE_PUBLIC_URL": f"http://127.0.0.1:{envoy_port}/console/",
                "AUTHZ_CONSOLE_KEY_API": sidecar.grpc_addr,
                "AUTHZ_CONSOLE_COOKIE_SECURE": "false",
                "AUTHZ_CONSOLE_CLIENTS": json.dumps(
                    [
                        {
                            "issuer": issuer,
                            "client_id": CLIENT_ID,
                            "client_secret": CLIENT_SECRET,
                            "name": PROVIDER_NAME,
                            "scope": "openid keys",
                        }
                    ]
                ),
            },
        )
        processes.append(console)
        console.wait_for_port(console_port, timeout=20)
        config = _envoy_config(
            log_dir,
            listen=envoy_port,
            authz=int(sidecar.grpc_addr.rsplit(":", 1)[1]),
            upstream=upstream_port,
            console=console_port,
        )
        envoy = ManagedProcess(
            [envoy_binary(), "-c", str(config), "--use-dynamic-base-id", "--log-level", "warn"],
            log_dir=log_dir,
            name="envoy",
        )
        processes.append(envoy)
        envoy.wait_for_port(envoy_port, timeout=20)
        stack = ConsoleStack(envoy_port, issuer, database_url, workspaces, processes, sidecar)
        # Envoy's health check must see the sidecar before API keys are checked.
        wait_until(lambda: stack.chat("sk-oais_nothing") == 401, timeout=20, what="envoy ready")
        yield stack
    finally:
        for process in reversed(processes):
            process.stop()


@pytest.fixture(scope="module")
def browser() -> Iterator[Any]:
    if not CHROMIUM.exists():
        _missing(str(CHROMIUM))
    try:
        from playwright.sync_api import sync_playwright
    except ImportError:
        _missing("playwright")
    with sync_playwright() as playwright:
        launched = playwright.chromium.launch(executable_path=str(CHROMIUM), args=CHROMIUM_ARGS)
        yield launched
        launched.close()


@pytest.fixture
def page(browser: Any) -> Iterator[Any]:
    context = browser.new_context(viewport={"width": 1200, "height": 800})
    context.grant_permissions(["clipboard-read", "clipboard-write"])
    opened = context.new_page()
    yield opened
    context.close()
