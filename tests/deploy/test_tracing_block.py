"""envoy.yaml's commented tracing block is a working config once a user uncomments it."""

from __future__ import annotations

from pathlib import Path

import yaml

from tests.deploy.conftest import REPO
from tests.deploy.test_envoy_configs import validate


def uncomment(lines: list[str], first: str) -> list[str]:
    """`lines` with the commented block starting `# <first>` uncommented, as a user would:
    that line and the deeper-indented commented lines after it lose their `# `."""
    start = next(i for i, line in enumerate(lines) if line.strip() == f"# {first}")
    indent = lines[start][: len(lines[start]) - len(lines[start].lstrip())]
    out = [*lines[:start], indent + first]
    rest = start + 1
    while rest < len(lines) and lines[rest].startswith(indent + "#   "):
        out.append(indent + lines[rest][len(indent) + 2 :])
        rest += 1
    assert rest > start + 1, f"nothing under # {first}"
    return out + lines[rest:]


def test_uncommented_tracing_block_validates(envoy: str, tmp_path: Path) -> None:
    lines = (REPO / "envoy.yaml").read_text(encoding="utf-8").splitlines()
    lines = uncomment(uncomment(lines, "tracing:"), "- name: otel_collector")
    text = "\n".join(lines) + "\n"
    config = yaml.safe_load(text)
    manager = config["static_resources"]["listeners"][0]["filter_chains"][0]["filters"][0]
    provider = manager["typed_config"]["tracing"]["provider"]
    assert provider["name"] == "envoy.tracers.opentelemetry"
    clusters = [c["name"] for c in config["static_resources"]["clusters"]]
    assert "otel_collector" in clusters
    enabled = tmp_path / "envoy.yaml"
    enabled.write_text(text, encoding="utf-8")
    result = validate(envoy, enabled)
    assert result.returncode == 0, result.stdout + result.stderr
