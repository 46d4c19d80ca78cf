"""The README's five-minute tour, run verbatim against `make run`, as a new user would.

Every fenced block after a `<!-- tour` marker in README.md is read from the README itself (so
the two cannot drift) and run line by line in one bash session from the repository root. The
only edits are the ones a user makes: `ws_...`, `key_...` and `sk-oais_...` become the id or
secret printed last before that line. The test then checks what the user sees.
"""

from __future__ import annotations

import json
import math
import os
import queue
import re
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

from demo.run import PORTS, _port_free
from tests.support.procs import ManagedProcess
from tests.support.stack import ROOT, wait_until

pytestmark = pytest.mark.e2e

README = ROOT / "README.md"
_BLOCK = re.compile(r"<!-- tour.*?-->\n```sh\n(.*?)```", re.S)
# What a user copies from earlier output into a line that names it by placeholder.
_PRINTED = {
    "ws_...": re.compile(r"\bws_[0-9A-Za-z]+"),
    "key_...": re.compile(r"\bkey_[0-9A-Za-z]+"),
    "sk-oais_...": re.compile(r"\bsk-oais_[0-9A-Za-z]{46}\b"),
}
_TIMEOUT_S = 60


def tour_commands(readme: str) -> list[str]:
    """The tour's shell commands, in order; a line ending in `\\` goes on with the next."""
    return [
        command
        for block in _BLOCK.findall(readme)
        for command in re.split(r"(?<!\\)\n", block)
        if command.strip()
    ]


def paste(line: str, seen: str) -> str:
    """`line` with each placeholder replaced by the last matching value printed so far."""
    for placeholder, pattern in _PRINTED.items():
        if placeholder in line:
            found = pattern.findall(seen)
            assert found, f"the tour uses {placeholder} before anything printed one: {line}"
            line = line.replace(placeholder, found[-1])
    return line


class Shell:
    """One interactive-like bash session: state (`. .venv/bin/activate`) carries over."""

    def __init__(self, *, cwd: Path, env: dict[str, str]) -> None:
        self._proc = subprocess.Popen(
            ["bash", "--noprofile", "--norc"],
            cwd=cwd,
            env=env,
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )
        self._lines: queue.Queue[str] = queue.Queue()
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()

    def _read(self) -> None:
        assert self._proc.stdout is not None
        for line in self._proc.stdout:
            self._lines.put(line)

    def run(self, command: str) -> str:
        """Run one command line; return everything it printed (stdout and stderr)."""
        assert self._proc.stdin is not None
        done = f"__tour_done_{uuid.uuid4().hex}__"
        self._proc.stdin.write(f"{command}\necho; echo {done}\n")
        self._proc.stdin.flush()
        out: list[str] = []
        while (line := self._lines.get(timeout=_TIMEOUT_S)) != f"{done}\n":
            out.append(line)
        return "".join(out)[:-1]  # the `echo` that ends a last line without a newline

    def close(self) -> None:
        if self._proc.stdin is not None:
            self._proc.stdin.close()
        try:
            self._proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            self._proc.kill()
            self._proc.wait()
        self._reader.join(timeout=10)
        if self._proc.stdout is not None:
            self._proc.stdout.close()


@pytest.fixture
def make_run(
    tmp_path: Path, make_run_ports: None
) -> Iterator[tuple[ManagedProcess, dict[str, str]]]:
    busy = [f"{name}:{port}" for name, port in PORTS.items() if not _port_free(port)]
    if busy:
        pytest.skip(f"make run needs its fixed ports, busy here: {busy}")
    if not (ROOT / ".venv" / "bin" / "activate").exists():
        pytest.skip("the tour activates .venv: run `make install` first")
    # The user's environment, but a database of the test's own: `make run` and the CLI in the
    # second terminal both read AUTHZ_DATABASE_URL, as they share ./authz.db in the README.
    env = {**os.environ, "AUTHZ_DATABASE_URL": f"sqlite:///{tmp_path / 'authz.db'}"}
    demo = ManagedProcess(
        [sys.executable, "-m", "demo.run", "--envoy-config", str(ROOT / "envoy.yaml")],
        log_dir=tmp_path,
        name="make-run",
        cwd=ROOT,
        env={"AUTHZ_DATABASE_URL": env["AUTHZ_DATABASE_URL"]},
    )
    try:
        wait_until(lambda: "Ctrl-C stops everything" in demo.read_log(), timeout=60, what="demo")
        yield demo, env
    finally:
        demo.stop()


def test_the_readme_tour_works_as_written(
    make_run: tuple[ManagedProcess, dict[str, str]],
) -> None:
    demo, env = make_run
    readme = README.read_text()
    commands = tour_commands(readme)
    seen = demo.read_log()
    shell = Shell(cwd=ROOT, env=env)
    outputs: dict[str, str] = {}
    took: dict[str, float] = {}
    try:
        for command in commands:
            started = time.monotonic()
            output = shell.run(paste(command, seen))
            took[command] = time.monotonic() - started
            outputs[command] = output
            seen += output
    finally:
        shell.close()

    def output_of(prefix: str, comment: str = "") -> str:
        matches = [out for cmd, out in outputs.items() if cmd.startswith(prefix) and comment in cmd]
        assert len(matches) == 1, (prefix, comment, list(outputs))
        return matches[0]

    # The demo key's chat completion answers as the upstream does.
    chat = json.loads(output_of("curl -s http://127.0.0.1:8080/v1/chat/completions"))
    assert chat["object"] == "chat.completion", chat
    assert re.search(r"\bws_", output_of("authz workspace create acme"))
    assert "shown once" in output_of("authz key create --workspace ws_... --label my-app")
    assert output_of("curl -si", "# 200").startswith("HTTP/1.1 200 OK")
    wrong = output_of("curl -si", "# 401")
    assert wrong.startswith("HTTP/1.1 401 Unauthorized")
    # The body the README shows under "A wrong key gets the contract's body".
    shown = re.search(r"contract's body:\n\n```json\n(.*?)\n```", readme, re.S)
    assert shown is not None
    assert json.loads(wrong.split("\n\n", 1)[1]) == json.loads(shown.group(1))
    listed = output_of("authz key list")
    assert "my-app" in listed
    assert not _PRINTED["sk-oais_..."].search(listed), "key list printed a secret"
    assert output_of("authz key revoke").startswith("revoked key_")

    # Six quick requests: five pass, the sixth gets 429 with retry-after: 12. The bucket refills
    # from the first request on, so 12 holds when the six take under a second, as they do on an
    # idle machine; a loaded test machine may take longer, and then the wait is that much less.
    loop = next(command for command in commands if command.startswith("for i in 1 2 3 4 5 6"))
    burst = outputs[loop].splitlines()
    assert burst[:-1] == [*["HTTP/1.1 200 OK"] * 5, "HTTP/1.1 429 Too Many Requests"]
    if took[loop] < 1:
        assert burst[-1] == "retry-after: 12"
    else:
        shortest = max(1, 12 - math.ceil(took[loop] - 1))
        assert burst[-1] in {f"retry-after: {s}" for s in range(shortest, 13)}, burst
