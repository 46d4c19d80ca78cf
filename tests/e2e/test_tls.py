"""TLS with client certificates between Envoy and the sidecar, with certificates made here,
and the health-only port the probes use meanwhile."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import grpc
import pytest
import yaml
from envoy.service.auth.v3 import external_auth_pb2_grpc

from deploy.render import AUTHZ_TLS_SOCKET
from tests.support.certs import Pki, make_pki
from tests.support.checks import bearer, check_request
from tests.support.procs import free_port
from tests.support.stack import (
    Stack,
    authz_cli,
    render_envoy_config,
    start_envoy,
    start_sidecar,
    start_upstream,
    wait_until,
)

pytestmark = pytest.mark.e2e


def with_shipped_tls_block(config_path: Path, pki: Pki) -> None:
    """Uncomment the shipped transport_socket block, pointed at this test's files."""
    socket: dict[str, Any] = yaml.safe_load(AUTHZ_TLS_SOCKET)
    files = {
        "/etc/envoy/tls/client.pem": pki.client_cert,
        "/etc/envoy/tls/client-key.pem": pki.client_key,
        "/etc/envoy/tls/ca.pem": pki.ca,
    }
    text = yaml.safe_dump(socket)
    for shipped, made in files.items():
        assert shipped in text
        text = text.replace(shipped, str(made))
    config = yaml.safe_load(config_path.read_text())
    for cluster in config["static_resources"]["clusters"]:
        if cluster["name"] in {"authz", "authz_access_log"}:  # both reach the sidecar
            cluster.update(yaml.safe_load(text))
    config_path.write_text(yaml.safe_dump(config))


def test_envoy_with_a_client_certificate_checks_a_client_without_one_is_refused(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    pki = make_pki(tmp_path)
    database_url = f"sqlite:///{tmp_path / 'a.db'}"
    authz_cli(database_url, "migrate")
    workspace = authz_cli(database_url, "workspace", "create", "tls")
    key = authz_cli(database_url, "key", "create", "--workspace", workspace["id"], "--label", "t")
    tls_addr = f"127.0.0.1:{free_port()}"
    health_addr = f"127.0.0.1:{free_port()}"
    upstream, upstream_port = start_upstream(tmp_path)
    # The stack's readiness wait asks `grpc_addr` in plaintext: the health-only port.
    sidecar = start_sidecar(
        tmp_path,
        database_url=database_url,
        grpc_addr=health_addr,
        env={
            "AUTHZ_GRPC_ADDR": tls_addr,
            "AUTHZ_HEALTH_ADDR": health_addr,
            "AUTHZ_TLS_CERT": str(pki.server_cert),
            "AUTHZ_TLS_KEY": str(pki.server_key),
            "AUTHZ_TLS_CLIENT_CA": str(pki.ca),
        },
    )
    real_render = render_envoy_config

    def render_with_tls(path: Path, **ports: Any) -> Path:
        rendered = real_render(path, **ports)
        with_shipped_tls_block(rendered, pki)
        return rendered

    monkeypatch.setattr("tests.support.stack.render_envoy_config", render_with_tls)
    envoy, port = start_envoy(
        tmp_path, authz_port=int(tls_addr.rsplit(":", 1)[1]), upstream_port=upstream_port
    )
    try:
        stack = Stack(envoy, upstream, sidecar, database_url, port, upstream_port)
        auth = {"Authorization": f"Bearer {key['secret']}"}
        wait_until(
            lambda: stack.request("/v1/models", headers=auth).status == 200,
            timeout=30,
            what="an allowed request through Envoy over TLS",
        )
        assert (
            stack.request("/v1/models", headers={"Authorization": "Bearer sk-oais_x"}).status == 401
        )

        no_cert = grpc.ssl_channel_credentials(root_certificates=pki.ca.read_bytes())
        for channel in (
            grpc.secure_channel(
                tls_addr, no_cert, options=[("grpc.ssl_target_name_override", "authz")]
            ),
            grpc.insecure_channel(tls_addr),
        ):
            with channel:
                stub = external_auth_pb2_grpc.AuthorizationStub(channel)
                with pytest.raises(grpc.RpcError) as refused:
                    stub.Check(check_request(headers=bearer(key["secret"])), timeout=5)
                assert refused.value.code() == grpc.StatusCode.UNAVAILABLE
    finally:
        envoy.stop()
        sidecar.process.stop()
        upstream.stop()
