"""`make run` as a new user meets it: paste the printed curl, get 200; Ctrl-C stops everything."""

from __future__ import annotations

import re
import shlex
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from demo.run import PORTS, _demo_key, _port_free
from tests.support.procs import ManagedProcess
from tests.support.stack import ROOT, wait_until

pytestmark = pytest.mark.e2e

_WARNING = re.compile(r"warn", re.IGNORECASE)
# This machine's pip configuration names package indexes that are not there; a clone elsewhere
# does not see these, and they are not the project's.
_LOCAL_PIP_CONFIG = re.compile(r"^WARNING: Location '.*' is ignored: it is neither a file")


def unexplained_warnings(output: str) -> list[str]:
    """Lines of `output` that warn about something the README's list of expected ones omits."""
    readme = (ROOT / "README.md").read_text()
    listed = re.search(r"<!-- make-run warnings.*?-->\n(.*?)\n\n", readme, re.S)
    assert listed is not None, "README.md lost its list of make run's expected warnings"
    expected = re.findall(r"^- `([^`]+)`", listed.group(1), re.M)
    assert expected
    return [
        line
        for line in output.splitlines()
        if _WARNING.search(line) and not any(text in line for text in expected)
    ]


@pytest.mark.usefixtures("make_run_ports")
def test_make_run_prints_a_curl_that_works_and_stops_cleanly(tmp_path: Path) -> None:
    busy = [f"{name}:{port}" for name, port in PORTS.items() if not _port_free(port)]
    if busy:
        pytest.skip(f"make run needs its fixed ports, busy here: {busy}")
    demo = ManagedProcess(
        [sys.executable, "-m", "demo.run", "--envoy-config", str(ROOT / "envoy.yaml")],
        log_dir=tmp_path,
        name="make-run",
        # As `make run` does: from the repository root (envoy.yaml names files relative to
        # it), but on a database of the test's own.
        cwd=ROOT,
        env={"AUTHZ_DATABASE_URL": f"sqlite:///{tmp_path / 'authz.db'}"},
    )
    try:
        wait_until(lambda: "Ctrl-C stops everything" in demo.read_log(), timeout=60, what="demo")
        printed = demo.read_log()
        command = re.search(r"  (curl .*?)\n\n", printed, re.S)
        assert command is not None, printed
        argv = shlex.split(command.group(1).replace("\\\n", " "))
        answer = subprocess.run(
            [*argv, "-o", "/dev/null", "-w", "%{http_code}"],
            capture_output=True,
            text=True,
            timeout=30,
            check=False,
        )
        assert answer.stdout == "200"
        wrong = subprocess.run(
            [
                "curl",
                "-s",
                "http://127.0.0.1:8080/v1/models",
                "-H",
                "Authorization: Bearer sk-oais_x",
            ],
            capture_output=True,
            text=True,
            timeout=30,
            check=False,
        )
        assert '"code": "invalid_api_key"' in wrong.stdout
        secret = re.search(r"sk-oais_[0-9A-Za-z]{46}", printed)
        assert secret is not None
        assert printed.count(secret.group()) == 2  # shown once, and once in the curl line

        demo.send_signal(signal.SIGINT)
        assert demo.wait(timeout=30) == 0
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline and not all(_port_free(p) for p in PORTS.values()):
            time.sleep(0.1)
        assert all(_port_free(p) for p in PORTS.values()), "a process outlived make run"
        assert unexplained_warnings(demo.read_log()) == []
    finally:
        demo.stop()


def test_make_run_says_what_it_replaced(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A second run revokes the first demo key and says so; the first says it set demo prices."""
    monkeypatch.setenv("AUTHZ_DATABASE_URL", f"sqlite:///{tmp_path / 'authz.db'}")
    first = _demo_key()
    assert first.changes == (
        "demo prices set: model * at $0.50 input / $1.50 output per 1M tokens "
        "(`authz price set` replaces them)",
    )
    second = _demo_key()
    assert second.workspace_id == first.workspace_id
    assert len(second.changes) == 1
    revoked = re.fullmatch(
        r"previous demo key revoked: (key_\w+) \(([\w-]+)\*+(\w+)\) now gets 401",
        second.changes[0],
    )
    assert revoked is not None, second.changes
    assert first.secret.startswith(revoked.group(2))  # shown by its mask,
    assert first.secret.endswith(revoked.group(3))
    assert first.secret not in second.changes[0]  # never in full


@pytest.mark.timeout(600)  # a new virtualenv and a current pip, on a busy machine
def test_the_first_make_run_installs_without_warnings(tmp_path: Path) -> None:
    """`make run` first installs this checkout editable (the Makefile's command, in a new venv)."""
    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True, timeout=120)
    pip = [str(venv / "bin" / "pip"), "install", "--quiet", "--disable-pip-version-check"]
    # As the Makefile does: a current pip first (it shows the build backend's warnings).
    subprocess.run([*pip, "--upgrade", "pip"], capture_output=True, check=True, timeout=300)
    done = subprocess.run(
        # Dependencies are wheels; only this checkout is built.
        [*pip, "--constraint", str(ROOT / "constraints.txt"), "--no-deps", "-e", str(ROOT)],
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )
    assert done.returncode == 0, done.stderr
    printed = [
        line
        for line in (done.stdout + done.stderr).splitlines()
        if not _LOCAL_PIP_CONFIG.match(line)
    ]
    assert [line for line in printed if _WARNING.search(line)] == [], "\n".join(printed)
