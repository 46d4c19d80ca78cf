"""The Dockerfile, parsed with dockerfile-parse: small, non-root, read-only-ready, right CMD."""

from __future__ import annotations

import importlib.util
import json
import re
import shutil
import subprocess
import sys
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from tests.deploy.conftest import REPO

dockerfile_parse = pytest.importorskip(
    "dockerfile_parse", reason="dockerfile-parse is not installed (a dev dependency)"
)

PINNED_PYTHON = re.compile(r"python:3\.11\.\d+-slim(-[a-z]+)?(@sha256:[0-9a-f]{64})?")


@dataclass(frozen=True)
class Instruction:
    keyword: str
    value: str


@dataclass(frozen=True)
class Stage:
    image: str
    name: str | None
    instructions: tuple[Instruction, ...]

    def all(self, keyword: str) -> list[str]:
        return [i.value for i in self.instructions if i.keyword == keyword]


def parse_stages() -> tuple[list[Stage], Any]:
    parser = dockerfile_parse.DockerfileParser(path=str(REPO / "Dockerfile"))
    images = list(parser.parent_images)  # ARGs in FROM resolved by the parser
    stages: list[Stage] = []
    current: list[Instruction] = []
    header: tuple[str, str | None] | None = None
    for item in parser.structure:
        keyword, value = item["instruction"], item["value"]
        if keyword == "COMMENT":
            continue
        if keyword == "FROM":
            if header is not None:
                stages.append(Stage(header[0], header[1], tuple(current)))
            words = value.split()
            name = words[2] if len(words) == 3 and words[1].upper() == "AS" else None
            header, current = (images[len(stages)], name), []
        elif header is not None:
            current.append(Instruction(keyword, value))
    assert header is not None, "no FROM"
    stages.append(Stage(header[0], header[1], tuple(current)))
    return stages, parser


@pytest.fixture(scope="module")
def stages() -> list[Stage]:
    return parse_stages()[0]


@pytest.fixture(scope="module")
def runtime(stages: list[Stage]) -> Stage:
    return stages[-1]


def env_of(stage: Stage) -> dict[str, str]:
    env: dict[str, str] = {}
    for value in stage.all("ENV"):
        for pair in value.split():
            key, _, val = pair.partition("=")
            env[key] = val
    return env


def test_multi_stage_on_a_pinned_slim_python(stages: list[Stage]) -> None:
    assert len(stages) >= 2
    for stage in stages:
        assert PINNED_PYTHON.fullmatch(stage.image), stage.image
    assert len({s.image for s in stages}) == 1, "the venv must run on the Python it was built on"


def test_runtime_copies_only_the_virtualenv_from_the_builder(
    stages: list[Stage], runtime: Stage
) -> None:
    builder = stages[0].name
    assert runtime.all("COPY") == [f"--from={builder} /opt/authz /opt/authz"]
    assert not runtime.all("ADD")


def test_no_add_and_no_remote_sources(stages: list[Stage]) -> None:
    for stage in stages:
        assert not stage.all("ADD"), "use COPY; ADD fetches URLs and unpacks archives"
        for run in stage.all("RUN"):
            assert not re.search(r"\b(curl|wget)\b", run), run


def test_runs_as_a_numeric_non_root_user(runtime: Stage) -> None:
    users = runtime.all("USER")
    assert users, "the runtime stage must set USER"
    uid, _, gid = users[-1].partition(":")
    assert uid.isdigit(), "numeric, so runAsNonRoot can verify it"
    assert int(uid) > 0
    assert not gid or (gid.isdigit() and int(gid) > 0)


def test_ready_for_a_read_only_root_filesystem(runtime: Stage) -> None:
    env = env_of(runtime)
    assert env["PYTHONDONTWRITEBYTECODE"] == "1"
    volumes = [v for value in runtime.all("VOLUME") for v in json.loads(value)]
    database = env["AUTHZ_DATABASE_URL"]
    assert database.startswith("sqlite:///")
    path = database.removeprefix("sqlite:///")
    assert any(path.startswith(v.rstrip("/") + "/") for v in volumes), (path, volumes)


def test_listens_on_all_interfaces_and_exposes_both_ports(runtime: Stage) -> None:
    env = env_of(runtime)
    assert env["AUTHZ_GRPC_ADDR"] == "0.0.0.0:9191"
    assert env["AUTHZ_METRICS_ADDR"] == "0.0.0.0:9464"
    exposed = {p for value in runtime.all("EXPOSE") for p in value.split()}
    assert exposed == {"9191", "9464"}


def test_default_command_is_authz_serve_in_exec_form(runtime: Stage) -> None:
    assert runtime.all("CMD") == ['["authz", "serve"]']
    assert json.loads(runtime.all("CMD")[0]) == ["authz", "serve"]
    assert not runtime.all("ENTRYPOINT"), "so `docker run IMAGE authz migrate` works"


def test_no_healthcheck_binary(stages: list[Stage]) -> None:
    for stage in stages:
        for check in stage.all("HEALTHCHECK"):
            assert "python" in check, check
        for run in stage.all("RUN"):
            assert "grpc_health_probe" not in run


# --- The build context: what COPY sends, after .dockerignore ---------------------------------


def _ignore_regex(pattern: str) -> re.Pattern[str]:
    out = ""
    i = 0
    while i < len(pattern):
        if pattern.startswith("**/", i):
            out, i = out + "(?:.*/)?", i + 3
        elif pattern.startswith("**", i):
            out, i = out + ".*", i + 2
        elif pattern[i] == "*":
            out, i = out + "[^/]*", i + 1
        elif pattern[i] == "?":
            out, i = out + "[^/]", i + 1
        else:
            out, i = out + re.escape(pattern[i]), i + 1
    return re.compile(out)


def excluded_by_dockerignore(relative: str) -> bool:
    """Docker's rule: the last matching pattern wins; a pattern also matches what is below."""
    rules: list[tuple[bool, re.Pattern[str]]] = []
    for line in (REPO / ".dockerignore").read_text(encoding="utf-8").splitlines():
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        negated = line.startswith("!")
        rules.append((negated, _ignore_regex(line.lstrip("!").strip("/"))))
    parts = relative.split("/")
    candidates = ["/".join(parts[: n + 1]) for n in range(len(parts))]
    excluded = False
    for negated, regex in rules:
        if any(regex.fullmatch(c) for c in candidates):
            excluded = not negated
    return excluded


def context_sources(stages: list[Stage]) -> list[str]:
    sources: list[str] = []
    for stage in stages:
        for value in stage.all("COPY"):
            words = [w for w in value.split() if not w.startswith("--")]
            if "--from=" in value:
                continue
            sources += words[:-1]
    return sources


def test_every_copy_source_exists_and_survives_dockerignore(stages: list[Stage]) -> None:
    sources = context_sources(stages)
    assert sources
    for source in sources:
        path = REPO / source
        assert path.exists(), source
        files = [path] if path.is_file() else [p for p in path.rglob("*") if p.is_file()]
        for file in files:
            relative = file.relative_to(REPO).as_posix()
            if "__pycache__" not in relative and not relative.endswith(".db"):
                assert not excluded_by_dockerignore(relative), relative


@pytest.mark.parametrize(
    "relative",
    [".git/config", ".venv/bin/python", "authz.db", "tests/deploy/test_dockerfile.py",
     "authz/__pycache__/cli.cpython-311.pyc", "deploy/compose.yaml", ".env"],
)  # fmt: skip
def test_dockerignore_keeps_everything_else_out(relative: str) -> None:
    assert excluded_by_dockerignore(relative)


def test_the_build_context_makes_a_complete_wheel(stages: list[Stage], tmp_path: Path) -> None:
    """What the builder stage does (pip wheel on the COPYed files), minus the network."""
    if importlib.util.find_spec("setuptools") is None:
        pytest.skip("setuptools is not installed in this environment: cannot build the wheel")
    context = tmp_path / "context"
    for source in context_sources(stages):
        path = REPO / source
        files = [path] if path.is_file() else [p for p in path.rglob("*") if p.is_file()]
        for file in files:
            relative = file.relative_to(REPO).as_posix()
            if not excluded_by_dockerignore(relative):
                (context / relative).parent.mkdir(parents=True, exist_ok=True)
                shutil.copy(file, context / relative)
    result = subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation",
         "--no-cache-dir", "--quiet", "--wheel-dir", str(tmp_path / "wheels"), str(context)],
        capture_output=True, text=True, timeout=120, check=False,
    )  # fmt: skip
    assert result.returncode == 0, result.stdout + result.stderr
    (wheel,) = (tmp_path / "wheels").glob("oais_authz-*.whl")
    with zipfile.ZipFile(wheel) as archive:
        names = archive.namelist()
        entry_points = next(n for n in names if n.endswith("entry_points.txt"))
        assert "authz = authz.cli:main" in archive.read(entry_points).decode()
    assert "demo/upstream.py" in names
    assert any(re.fullmatch(r"authz/migrations/postgres/\d+_\w+\.sql", n) for n in names)
    assert any(re.fullmatch(r"authz/migrations/sqlite/\d+_\w+\.sql", n) for n in names)
    assert "authz/py.typed" in names
    assert any(re.fullmatch(r"ratelimit/lua/\w+\.lua", n) for n in names)
