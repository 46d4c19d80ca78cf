"""Generated code and the transcoder's descriptor set stay in sync with proto/ (`make protos`)."""

from __future__ import annotations

import importlib
from pathlib import Path

import pytest
import yaml
from google.protobuf import descriptor_pb2

from authz.api import codegen
from authz.api.gen import keys_pb2

ROOT = Path(__file__).resolve().parents[2]
SERVICE = "tokenfactory.keys.v1.KeyService"


def test_generated_files_are_fresh(tmp_path: Path) -> None:
    written = codegen.generate(tmp_path)
    names = sorted(p.name for p in written)
    committed = sorted(p.name for p in codegen.GEN_DIR.iterdir() if p.is_file())
    assert committed == names, "authz/api/gen holds files codegen does not write"
    stale = [n for n in names if (tmp_path / n).read_bytes() != (codegen.GEN_DIR / n).read_bytes()]
    assert stale == [], f"stale generated files {stale}: run `make protos`"


def test_a_changed_proto_is_detected(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Negative control: regenerating from an edited proto gives different files."""
    edited = tmp_path / "proto"
    source = ROOT / "proto" / codegen.PROTO_FILE
    (edited / codegen.PROTO_FILE).parent.mkdir(parents=True)
    (edited / codegen.PROTO_FILE).write_text(
        source.read_text().replace("bool active = 9;", "bool active = 9;\n  string note = 10;")
    )
    for extra in codegen.EXTRA_PROTO_FILES:
        (edited / extra).parent.mkdir(parents=True)
        (edited / extra).write_text((ROOT / "proto" / extra).read_text())
    monkeypatch.setattr(codegen, "PROTO_ROOT", edited)
    out = tmp_path / "gen"
    codegen.generate(out)
    assert (out / "keys_pb2.py").read_bytes() != (codegen.GEN_DIR / "keys_pb2.py").read_bytes()
    assert (out / "keys.pb").read_bytes() != (codegen.GEN_DIR / "keys.pb").read_bytes()


def test_descriptor_set_has_the_service_its_http_rules_and_imports() -> None:
    files = descriptor_pb2.FileDescriptorSet.FromString((codegen.GEN_DIR / "keys.pb").read_bytes())
    by_name = {f.name: f for f in files.file}
    assert {
        "google/api/http.proto",
        "google/api/annotations.proto",
        "google/protobuf/descriptor.proto",
        "google/protobuf/duration.proto",
        "google/protobuf/timestamp.proto",
        codegen.PROTO_FILE,
    } <= by_name.keys()
    (service,) = by_name[codegen.PROTO_FILE].service
    http = importlib.import_module("google.api.annotations_pb2").http  # untyped module
    rules = {
        m.name: m.options.Extensions[http] for m in service.method
    }  # the transcoder maps JSON paths by these
    assert rules["CreateKey"].post == "/keys/v1/workspaces/{workspace_id}/keys"
    assert rules["ListKeys"].get == "/keys/v1/workspaces/{workspace_id}/keys"
    assert rules["RotateKey"].post == "/keys/v1/workspaces/{workspace_id}/keys/{key_id}:rotate"
    assert set(rules) == {
        m.name for m in keys_pb2.DESCRIPTOR.services_by_name["KeyService"].methods
    }


def test_envoy_transcodes_this_service_from_this_descriptor() -> None:
    config = yaml.safe_load((ROOT / "envoy.yaml").read_text())
    hcm = config["static_resources"]["listeners"][0]["filter_chains"][0]["filters"][0]
    (transcoder,) = [
        f["typed_config"]
        for f in hcm["typed_config"]["http_filters"]
        if f["name"] == "envoy.filters.http.grpc_json_transcoder"
    ]
    assert (ROOT / transcoder["proto_descriptor"]) == codegen.GEN_DIR / codegen.DESCRIPTOR_NAME
    assert transcoder["services"] == [SERVICE]
    routes = hcm["typed_config"]["route_config"]["virtual_hosts"][0]["routes"]
    key_route = next(r for r in routes if r["match"].get("prefix") == f"/{SERVICE}/")
    assert key_route["route"]["cluster"] == "authz"
    ext_authz = key_route["typed_per_filter_config"]["envoy.filters.http.ext_authz"]
    assert ext_authz["disabled"] is True
