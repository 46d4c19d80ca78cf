"""Derive the Docker Compose and Kubernetes Envoy configs from the top-level `envoy.yaml`.

The top-level file is the one source of truth: filters, timeouts, ext_authz settings and health
checks are copied as they are. Only what must differ in a container is changed: the addresses
the listeners (and, for Compose, the admin interface) bind to, and where the `authz` and
`upstream` clusters point. Clusters that move to a host name become STRICT_DNS. A cluster on
loopback that a target does not place is an error, not a silent copy. The JSON transcoder's
descriptor set (a file in the repository, `make protos`) is embedded as `proto_descriptor_bin`,
since the containers do not have the repository.

    python deploy/render.py           # rewrite the generated files
    python deploy/render.py --check   # exit 1 if a generated file is stale

Exit codes: 0 done or up to date, 1 stale (with --check), 2 the source cannot be rendered.
"""

from __future__ import annotations

import argparse
import base64
import copy
import ipaddress
import sys
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

if not __package__:  # run as `python deploy/render.py`: make the `deploy` package importable
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from deploy import render_mesh  # after the path fix above

REPO_ROOT = Path(__file__).resolve().parent.parent
SOURCE = Path("envoy.yaml")
TRANSCODER = "envoy.filters.http.grpc_json_transcoder"


# TLS to the sidecar where there is no mesh (AUTHZ_TLS_CERT, AUTHZ_TLS_KEY, AUTHZ_TLS_CLIENT_CA):
# Envoy presents a client certificate the sidecar's CA signed and verifies the sidecar's, on both
# clusters that reach the sidecar (`authz`, `authz_access_log`). Shipped
# commented out, in envoy.yaml's `authz` cluster and in the header of every derived config
# (YAML comments do not survive rendering); tests/deploy/test_render.py keeps them identical.
AUTHZ_TLS_SOCKET = """\
transport_socket:
  name: envoy.transport_sockets.tls
  typed_config:
    "@type": type.googleapis.com/envoy.extensions.transport_sockets.tls.v3.UpstreamTlsContext
    sni: authz
    common_tls_context:
      alpn_protocols: [h2]
      tls_certificates:
        - certificate_chain: { filename: /etc/envoy/tls/client.pem }
          private_key: { filename: /etc/envoy/tls/client-key.pem }
      validation_context:
        trusted_ca: { filename: /etc/envoy/tls/ca.pem }
        match_typed_subject_alt_names:
          - san_type: DNS
            matcher: { exact: authz }
"""


class RenderError(ValueError):
    """The source config does not have the shape a target needs (one clear line)."""


@dataclass(frozen=True, slots=True)
class Endpoint:
    """Where a cluster's single endpoint lives in a target."""

    host: str
    port: int


@dataclass(frozen=True, slots=True)
class Target:
    """One derived config: where it is written and what differs from the source."""

    name: str
    output: Path
    listener_address: str
    admin_address: str | None = None
    clusters: Mapping[str, Endpoint] = field(default_factory=dict)
    # Clusters that may keep a loopback endpoint because the process is in the same pod.
    loopback_clusters: frozenset[str] = frozenset()


COMPOSE = Target(
    name="Docker Compose (deploy/compose.yaml)",
    output=Path("deploy/compose/envoy.yaml"),
    listener_address="0.0.0.0",  # noqa: S104 - published by Compose, reached from the host
    # Published on the host's loopback only (see compose.yaml), never on a public interface.
    admin_address="0.0.0.0",  # noqa: S104
    clusters={
        "authz": Endpoint("authz", 9191),
        # The access-log stream: the same sidecar, on connections of its own (envoy.yaml).
        "authz_access_log": Endpoint("authz", 9191),
        "upstream": Endpoint("upstream", 8000),
        "console": Endpoint("console", 8090),
    },
)

KUBERNETES = Target(
    name="Kubernetes sidecar (deploy/k8s, ConfigMap envoy-config)",
    output=Path("deploy/k8s/base/envoy.yaml"),
    listener_address="0.0.0.0",  # noqa: S104 - the Service sends traffic to the pod IP
    # The admin interface stays on 127.0.0.1: nothing outside the pod may reach it.
    clusters={"upstream": Endpoint("upstream", 8000), "console": Endpoint("console", 8090)},
    # The sidecar container, same pod (Checks, and the access-log stream on its own cluster).
    loopback_clusters=frozenset({"authz", "authz_access_log"}),
)

TARGETS: tuple[Target, ...] = (COMPOSE, KUBERNETES)


def _is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def _is_ip(host: str) -> bool:
    try:
        ipaddress.ip_address(host)
    except ValueError:
        return False
    return True


def _socket_address(node: Any, where: str) -> dict[str, Any]:
    try:
        found = node["address"]["socket_address"]
    except (KeyError, TypeError):
        raise RenderError(f"{where} has no address.socket_address") from None
    if not isinstance(found, dict):
        raise RenderError(f"{where}: address.socket_address is not a mapping")
    return found


def _only_endpoint(cluster: dict[str, Any], name: str) -> dict[str, Any]:
    try:
        groups = cluster["load_assignment"]["endpoints"]
    except (KeyError, TypeError):
        raise RenderError(f"cluster {name} has no load_assignment.endpoints") from None
    endpoints = [lb for group in groups for lb in group.get("lb_endpoints", [])]
    if len(endpoints) != 1:
        raise RenderError(f"cluster {name} must have exactly one endpoint, has {len(endpoints)}")
    endpoint: dict[str, Any] = endpoints[0]["endpoint"]
    return endpoint


def _bind(config: dict[str, Any], target: Target, changes: list[str]) -> None:
    """Point the admin interface (if the target says so) and every listener at the target's IP."""
    if target.admin_address is not None:
        admin = _socket_address(config.get("admin"), "admin")
        changes.append(f"admin: bound to {target.admin_address} (was {admin['address']})")
        admin["address"] = target.admin_address
    listeners = (config.get("static_resources") or {}).get("listeners") or []
    if not listeners:
        raise RenderError("static_resources.listeners is empty")
    for listener in listeners:
        address = _socket_address(listener, f"listener {listener.get('name')}")
        changes.append(
            f"listener {listener.get('name')}: bound to {target.listener_address}"
            f" (was {address['address']}), port {address['port_value']} kept"
        )
        address["address"] = target.listener_address


def _move(clusters: dict[str, Any], target: Target, changes: list[str]) -> None:
    """Point each cluster the target places at its host and port."""
    for name, moved in target.clusters.items():
        if name not in clusters:
            raise RenderError(f"cluster {name} is not in the source config")
        cluster = clusters[name]
        address = _socket_address(_only_endpoint(cluster, name), f"cluster {name}'s endpoint")
        kind = "STATIC" if _is_ip(moved.host) else "STRICT_DNS"
        changes.append(
            f"cluster {name}: {kind} {moved.host}:{moved.port}"
            f" (was {cluster.get('type', 'STATIC')} {address['address']}:{address['port_value']})"
        )
        cluster["type"] = kind
        address["address"] = moved.host
        address["port_value"] = moved.port


def _refuse_stray_loopback(clusters: dict[str, Any], target: Target) -> None:
    """A cluster added to the source later would otherwise point at the Envoy container."""
    for name, cluster in clusters.items():
        if name in target.clusters or name in target.loopback_clusters:
            continue
        for group in (cluster.get("load_assignment") or {}).get("endpoints", []):
            for lb in group.get("lb_endpoints", []):
                host = _socket_address(lb.get("endpoint"), f"cluster {name}'s endpoint")["address"]
                if _is_loopback(host):
                    raise RenderError(
                        f"cluster {name} points at {host}, which is not where it runs in the "
                        f"{target.name} target; add it to that target in deploy/render.py"
                    )


def _http_filters(config: dict[str, Any]) -> Iterator[dict[str, Any]]:
    for listener in (config.get("static_resources") or {}).get("listeners") or []:
        for chain in listener.get("filter_chains") or []:
            for network_filter in chain.get("filters") or []:
                yield from (network_filter.get("typed_config") or {}).get("http_filters") or []


def _embed_descriptors(config: dict[str, Any], root: Path, changes: list[str]) -> None:
    """Replace the transcoder's descriptor file (repository-relative) by its bytes."""
    for http_filter in _http_filters(config):
        typed = http_filter.get("typed_config") or {}
        path = typed.get("proto_descriptor")
        if http_filter.get("name") != TRANSCODER or path is None:
            continue
        try:
            data = (root / path).read_bytes()
        except OSError as error:
            raise RenderError(
                f"cannot read the transcoder's descriptor {path}: {error.strerror}; "
                "run `make protos`"
            ) from None
        embedded = base64.b64encode(data).decode("ascii")
        http_filter["typed_config"] = {
            (k if k != "proto_descriptor" else "proto_descriptor_bin"): (
                v if k != "proto_descriptor" else embedded
            )
            for k, v in typed.items()
        }
        changes.append(f"{TRANSCODER}: {path} embedded as proto_descriptor_bin")


def render(
    source: Mapping[str, Any], target: Target, *, root: Path = REPO_ROOT
) -> tuple[dict[str, Any], list[str]]:
    """Return the target's config and one line per change made to the source."""
    config: dict[str, Any] = copy.deepcopy(dict(source))
    changes: list[str] = []
    _bind(config, target, changes)
    _embed_descriptors(config, root, changes)
    resources = config.get("static_resources") or {}
    clusters = {c.get("name"): c for c in resources.get("clusters") or []}
    _move(clusters, target, changes)
    _refuse_stray_loopback(clusters, target)
    return config, changes


def render_text(
    source_text: str, target: Target, *, source_name: str = str(SOURCE), root: Path = REPO_ROOT
) -> str:
    """The full text of a generated file: header, then the derived config as YAML."""
    source = yaml.safe_load(source_text)
    if not isinstance(source, dict):
        raise RenderError(f"{source_name} is not a YAML mapping")
    config, changes = render(source, target, root=root)
    header = [
        "# Generated by deploy/render.py — do not edit.",
        f"# Source: {source_name}. Regenerate with `python deploy/render.py`.",
        f"# Target: {target.name}. Differences from the source:",
        *(f"#   - {line}" for line in changes),
        "# Everything else (filters, timeouts, ext_authz settings, health checks) is the source's.",
        "# To require TLS with client certificates to the sidecar (AUTHZ_TLS_*), add this to the",
        "# `authz` and `authz_access_log` clusters, with the files mounted:",
        *(f"#   {line}" for line in AUTHZ_TLS_SOCKET.splitlines()),
    ]
    body = yaml.safe_dump(config, sort_keys=False, default_flow_style=False, width=100)
    return "\n".join(header) + "\n" + body


def rendered(root: Path = REPO_ROOT) -> dict[Path, str]:
    """Every generated file's expected text, keyed by its path under `root`."""
    source_text = (root / SOURCE).read_text(encoding="utf-8")
    files = {root / t.output: render_text(source_text, t, root=root) for t in TARGETS}
    mesh = render_mesh.rendered(
        _http_filters(yaml.safe_load(source_text)), root, source_name=str(SOURCE)
    )
    return files | mesh


def stale(root: Path = REPO_ROOT) -> list[Path]:
    """The generated files that are missing or differ from a fresh render."""
    return [
        path
        for path, text in rendered(root).items()
        if not path.exists() or path.read_text(encoding="utf-8") != text
    ]


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--check", action="store_true", help="fail if a generated file is stale")
    parser.add_argument("--root", type=Path, default=REPO_ROOT, help="repository root")
    args = parser.parse_args(argv)
    root: Path = args.root
    try:
        outdated = stale(root)
        if args.check:
            for path in outdated:
                sys.stderr.write(
                    f"render: {path.relative_to(root)} is stale; run python deploy/render.py\n"
                )
            return 1 if outdated else 0
        for path, text in rendered(root).items():
            if path in outdated:
                path.parent.mkdir(parents=True, exist_ok=True)
                path.write_text(text, encoding="utf-8")
                print(f"wrote {path.relative_to(root)}")
            else:
                print(f"up to date {path.relative_to(root)}")
    except (RenderError, render_mesh.MeshRenderError, OSError, yaml.YAMLError) as error:
        sys.stderr.write(f"render: {error}\n")
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
