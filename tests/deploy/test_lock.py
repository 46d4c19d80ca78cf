"""constraints.txt: one pinned version of every dependency, used by every install.

`make lock` writes it; `make install` and the Dockerfile install with `--constraint` on it, so a
build takes the versions the tests ran with, not whatever was released that morning.
"""

from __future__ import annotations

import re
import tomllib
from importlib import metadata

from packaging.requirements import Requirement
from packaging.utils import canonicalize_name
from packaging.version import Version

from tests.deploy.conftest import REPO

CONSTRAINTS = REPO / "constraints.txt"
PIN = re.compile(r"^([A-Za-z0-9][A-Za-z0-9._-]*)==([^\s;]+)$")


def pins() -> dict[str, Version]:
    found: dict[str, Version] = {}
    for line in CONSTRAINTS.read_text(encoding="utf-8").splitlines():
        if not line or line.startswith("#"):
            continue
        matched = PIN.match(line)
        assert matched, f"not an exact pin: {line!r}"
        name = canonicalize_name(matched[1])
        assert name not in found, f"{name} pinned twice"
        found[name] = Version(matched[2])
    return found


def requirements() -> list[Requirement]:
    project = tomllib.loads((REPO / "pyproject.toml").read_text(encoding="utf-8"))["project"]
    listed = project["dependencies"] + project["optional-dependencies"]["dev"]
    return [Requirement(r) for r in listed]


def test_every_dependency_is_pinned_within_what_pyproject_allows() -> None:
    pinned = pins()
    assert "oais-authz" not in pinned, "the project itself is not a dependency"
    for requirement in requirements():
        if requirement.marker is not None and not requirement.marker.evaluate():
            continue
        name = canonicalize_name(requirement.name)
        assert name in pinned, f"{requirement} is not in constraints.txt: run `make lock`"
        assert requirement.specifier.contains(pinned[name], prereleases=True), (
            f"constraints.txt pins {name}=={pinned[name]}, outside {requirement}: run `make lock`"
        )


def test_this_environment_has_the_pinned_versions() -> None:
    """`make install` installed from constraints.txt: what the tests run on is what is pinned."""
    drift = {}
    for name, version in pins().items():
        installed = Version(metadata.version(name))
        if installed != version:
            drift[name] = f"{installed} installed, {version} pinned"
    assert drift == {}, "run `make install` (or `make lock` and commit)"


def test_makefile_and_dockerfile_install_with_the_constraints() -> None:
    makefile = (REPO / "Makefile").read_text(encoding="utf-8")
    (install,) = [
        line for line in makefile.splitlines() if "-e '.[dev]'" in line and "$(BIN)" in line
    ]
    assert "--constraint constraints.txt" in install
    assert re.search(r"^\$\(STAMP\):.*constraints\.txt", makefile, re.MULTILINE), (
        "a new lock must reinstall"
    )
    assert re.search(r"^lock:", makefile, re.MULTILINE)
    dockerfile = (REPO / "Dockerfile").read_text(encoding="utf-8").replace("\\\n", " ")
    instructions = [line.strip() for line in dockerfile.splitlines()]
    installs = [i for i in instructions if i.startswith("RUN") and "pip install" in i]
    assert installs
    assert all("--constraint constraints.txt" in i for i in installs)
    copies = [i.split()[1:] for i in instructions if i.startswith("COPY")]
    assert any("constraints.txt" in words for words in copies)
