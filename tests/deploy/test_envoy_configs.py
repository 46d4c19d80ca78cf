"""Every Envoy config in the repo passes `envoy --mode validate` with the real Envoy binary."""

from __future__ import annotations

import re
import subprocess
from collections.abc import Callable
from pathlib import Path

import pytest
import yaml

from tests.deploy.conftest import K8S_OVERLAYS, REPO, Manifest, container, load_yaml, only

ENVOY_CONFIGS = ("envoy.yaml", "deploy/compose/envoy.yaml", "deploy/k8s/base/envoy.yaml")


def validate(envoy: str, path: Path) -> subprocess.CompletedProcess[str]:
    # From the repository root, like `make run`: envoy.yaml names its descriptor set relative
    # to it (the derived configs embed theirs).
    return subprocess.run(
        [envoy, "--mode", "validate", "-c", str(path), "--log-level", "warn"],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )


def envoy_version(envoy: str) -> str:
    out = subprocess.run(
        [envoy, "--version"], capture_output=True, text=True, timeout=30, check=True
    ).stdout
    found = re.search(r"/(\d+\.\d+\.\d+)/", out)
    assert found, out
    return found.group(1)


@pytest.mark.parametrize("relative", ENVOY_CONFIGS)
def test_config_file_validates(envoy: str, relative: str) -> None:
    result = validate(envoy, REPO / relative)
    assert result.returncode == 0, result.stdout + result.stderr


@pytest.mark.parametrize("overlay", K8S_OVERLAYS)
def test_configmap_rendered_by_kustomize_validates(
    envoy: str,
    kustomize: Callable[[str], tuple[Manifest, ...]],
    overlay: str,
    tmp_path: Path,
) -> None:
    manifests = kustomize(overlay)
    configmaps = [
        m
        for m in manifests
        if m["kind"] == "ConfigMap" and m["metadata"]["name"].startswith("envoy-config")
    ]
    assert len(configmaps) == 1
    text = configmaps[0]["data"]["envoy.yaml"]
    assert text == (REPO / "deploy/k8s/base/envoy.yaml").read_text(encoding="utf-8")
    extracted = tmp_path / "envoy.yaml"
    extracted.write_text(text, encoding="utf-8")
    result = validate(envoy, extracted)
    assert result.returncode == 0, result.stdout + result.stderr

    # ... and it is the file the Envoy container actually runs with.
    pod = only(manifests, "Deployment", "authz-gateway")["spec"]["template"]["spec"]
    envoy_container = container(pod, "envoy")
    assert envoy_container["args"][:2] == ["-c", "/etc/envoy/envoy.yaml"]
    mount = next(m for m in envoy_container["volumeMounts"] if m["mountPath"] == "/etc/envoy")
    volume = next(v for v in pod["volumes"] if v["name"] == mount["name"])
    assert volume["configMap"]["name"] == configmaps[0]["metadata"]["name"]


def test_validate_mode_rejects_a_broken_config(envoy: str, tmp_path: Path) -> None:
    """Negative control: validation is real, not a rubber stamp."""
    config = load_yaml(REPO / "envoy.yaml")
    config["static_resources"]["clusters"][0]["connect_timeout"] = "soon"
    broken = tmp_path / "broken.yaml"
    broken.write_text(yaml.safe_dump(config), encoding="utf-8")
    assert validate(envoy, broken).returncode != 0


def test_images_run_the_envoy_version_the_configs_are_validated_with(
    envoy: str, kustomize: Callable[[str], tuple[Manifest, ...]]
) -> None:
    expected = f"envoyproxy/envoy:v{envoy_version(envoy)}"
    compose = load_yaml(REPO / "deploy/compose.yaml")
    assert compose["services"]["envoy"]["image"] == expected
    for overlay in K8S_OVERLAYS:
        pod = only(kustomize(overlay), "Deployment", "authz-gateway")["spec"]["template"]["spec"]
        assert container(pod, "envoy")["image"] == expected
