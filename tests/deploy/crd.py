"""Validate custom resources against the real CRD schemas committed in schemas/crds/.

Each file there is one CRD version's `openAPIV3Schema`, copied from the project's published CRDs
(schemas/README.md says from where). The API server would *prune* an unknown field silently;
here it is an error, so a misspelt field fails the test instead of vanishing in the cluster:
every object schema that lists its properties and does not preserve unknown fields gets
`additionalProperties: false`. CEL rules (`x-kubernetes-validations`) are not evaluated.
"""

from __future__ import annotations

import json
from functools import cache
from typing import Any

import jsonschema

from tests.deploy.conftest import SCHEMAS

CRDS = SCHEMAS / "crds"


def _strict(node: Any) -> Any:
    """OpenAPI v3 (Kubernetes flavour) to JSON Schema draft 4, with unknown fields refused."""
    if isinstance(node, list):
        return [_strict(item) for item in node]
    if not isinstance(node, dict):
        return node
    schema = {key: _strict(value) for key, value in node.items()}
    if schema.pop("x-kubernetes-int-or-string", False):
        schema["type"] = ["integer", "string"]
    if schema.pop("nullable", False) and isinstance(schema.get("type"), str):
        schema["type"] = [schema["type"], "null"]
    pattern = schema.get("pattern")
    if isinstance(pattern, str) and "(?i)" in pattern[1:]:
        # Go's RE2 takes `^(?i)...`; Python wants global flags first.
        schema["pattern"] = "(?i)" + pattern.replace("(?i)", "")
    preserve = schema.get("x-kubernetes-preserve-unknown-fields", False)
    if "properties" in schema and "additionalProperties" not in schema and not preserve:
        schema["additionalProperties"] = False
    return schema


@cache
def crd(file_stem: str) -> tuple[str, str, jsonschema.protocols.Validator]:
    """(apiVersion, kind, validator) of `schemas/crds/<file_stem>.json`."""
    loaded = json.loads((CRDS / f"{file_stem}.json").read_text(encoding="utf-8"))
    schema = _strict(loaded["openAPIV3Schema"])
    # The CRD leaves these to the API server; pin them to this CRD version.
    api_version = f"{loaded['group']}/{loaded['version']}"
    schema["properties"]["apiVersion"] = {"enum": [api_version]}  # draft 4: no const
    schema["properties"]["kind"] = {"enum": [loaded["kind"]]}
    schema["properties"]["metadata"] = {
        "type": "object",
        "required": ["name"],
        "properties": {"name": {"type": "string", "pattern": "^[a-z0-9]([-a-z0-9.]*[a-z0-9])?$"}},
    }
    schema["required"] = sorted({*schema.get("required", []), "apiVersion", "kind", "metadata"})
    jsonschema.Draft4Validator.check_schema(schema)
    return api_version, loaded["kind"], jsonschema.Draft4Validator(schema)


def crd_errors(file_stem: str, instance: Any) -> list[str]:
    """Every schema violation of `instance`, as `path: message` lines (empty when valid)."""
    _, _, validator = crd(file_stem)
    # As kubectl sends it: YAML's integer map keys (portLevelMtls: {9464: ...}) become strings.
    as_json = json.loads(json.dumps(instance))
    return [f"{e.json_path}: {e.message}" for e in validator.iter_errors(as_json)]
