"""deploy/k8s: every overlay renders, validates strictly offline, and keeps its promises."""

from __future__ import annotations

import base64
import copy
import re
from collections.abc import Callable

import kubernetes_validate
import pytest

from tests.deploy.conftest import (
    AUTHZ_SERVICE,
    K8S_OVERLAYS,
    KUSTOMIZATIONS,
    REPO,
    Manifest,
    container,
    env_of,
    load_yaml,
    only,
)

Kustomize = Callable[[str], tuple[Manifest, ...]]

# The oldest Kubernetes the manifests target (native gRPC probes: 1.27 GA; preStop `sleep`:
# beta and on by default since 1.30) and the newest kubernetes-validate ships.
K8S_VERSIONS = ("1.30.0", kubernetes_validate.latest_version())


def pod_spec(manifest: Manifest) -> Manifest:
    spec: Manifest = manifest["spec"]["template"]["spec"]
    return spec


def workloads(manifests: tuple[Manifest, ...]) -> list[Manifest]:
    return [m for m in manifests if m["kind"] in {"Deployment", "Job"}]


@pytest.mark.parametrize("directory", KUSTOMIZATIONS)
def test_kustomize_renders(kustomize: Kustomize, directory: str) -> None:
    assert kustomize(directory)


@pytest.mark.parametrize("version", K8S_VERSIONS)
@pytest.mark.parametrize("directory", KUSTOMIZATIONS)
def test_every_object_validates_strictly(
    kustomize: Kustomize, directory: str, version: str
) -> None:
    for manifest in kustomize(directory):
        kubernetes_validate.validate(manifest, version, strict=True)


def test_production_secret_example_validates() -> None:
    secret = load_yaml(REPO / "deploy/k8s/overlays/production/secret.example.yaml")
    kubernetes_validate.validate(secret, kubernetes_validate.latest_version(), strict=True)
    assert set(secret["stringData"]) == {"database-url", "redis-url"}


def test_strict_validation_rejects_an_unknown_field(kustomize: Kustomize) -> None:
    """Negative control: a misspelt field deep in a pod spec is caught."""
    deployment = copy.deepcopy(only(kustomize(K8S_OVERLAYS[1]), "Deployment", "authz-gateway"))
    container(pod_spec(deployment), "authz")["readinessProbe"]["grpc"]["servcie"] = "x"
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(deployment, kubernetes_validate.latest_version(), strict=True)


@pytest.mark.parametrize("directory", KUSTOMIZATIONS)
def test_pods_are_hardened(kustomize: Kustomize, directory: str) -> None:
    for workload in workloads(kustomize(directory)):
        pod = pod_spec(workload)
        assert pod["securityContext"]["runAsNonRoot"] is True
        assert pod["securityContext"]["seccompProfile"] == {"type": "RuntimeDefault"}
        assert pod["automountServiceAccountToken"] is False
        for c in pod["containers"]:
            where = f"{workload['metadata']['name']}/{c['name']}"
            sc = c["securityContext"]
            assert sc["runAsNonRoot"] is True, where
            assert isinstance(sc["runAsUser"], int), where
            assert sc["runAsUser"] > 0, where
            assert sc["readOnlyRootFilesystem"] is True, where
            assert sc["allowPrivilegeEscalation"] is False, where
            assert sc["capabilities"] == {"drop": ["ALL"]}, where
            assert sc["seccompProfile"] == {"type": "RuntimeDefault"}, where
            assert c["resources"]["requests"]["cpu"], where
            assert c["resources"]["limits"]["memory"], where
            assert re.fullmatch(r"[^:@]+(:[\w.-]+|@sha256:[0-9a-f]{64})", c["image"]), where
            assert not c["image"].endswith(":latest"), where


@pytest.mark.parametrize("directory", KUSTOMIZATIONS)
def test_sidecar_probes_are_native_grpc(kustomize: Kustomize, directory: str) -> None:
    deployments = [m for m in kustomize(directory) if m["kind"] == "Deployment"]
    authz_pods = [
        pod_spec(d)
        for d in deployments
        if any(c["name"] == "authz" for c in pod_spec(d)["containers"])
    ]
    assert authz_pods
    for pod in authz_pods:
        authz = container(pod, "authz")
        env = env_of(authz)
        if any(c["name"] == "envoy" for c in pod["containers"]):
            # Sidecar: only Envoy in the pod reaches Check and the access-log service; the
            # kubelet probes the pod IP, where health alone listens.
            assert env["AUTHZ_GRPC_ADDR"]["value"] == "127.0.0.1:9191"
            assert env["AUTHZ_HEALTH_ADDR"]["value"] == "0.0.0.0:9192"
            assert {p["containerPort"] for p in authz["ports"]} == {9192, 9464}
            probe_port = 9192
        else:
            # The central authorizer is called across the mesh on 9191.
            assert env["AUTHZ_GRPC_ADDR"]["value"] == "0.0.0.0:9191"
            probe_port = 9191
        assert authz["livenessProbe"]["grpc"] == {"port": probe_port, "service": ""}
        assert authz["startupProbe"]["grpc"] == {"port": probe_port, "service": ""}
        assert authz["readinessProbe"]["grpc"] == {"port": probe_port, "service": AUTHZ_SERVICE}
        assert env["AUTHZ_FAILURE_MODE"]["value"] in {"closed", "open"}
        # Drain must end before the kubelet's SIGKILL.
        drain = float(env["AUTHZ_DRAIN_DELAY_S"]["value"])
        grace = float(env["AUTHZ_SHUTDOWN_GRACE_S"]["value"])
        assert drain + grace < pod["terminationGracePeriodSeconds"]
        # The database and Redis give up well inside Envoy's ext_authz timeout (2 s; this bound
        # is the 250 ms it used to be).
        redis_ms = int(env["AUTHZ_REDIS_TIMEOUT_MS"]["value"])
        db_ms = int(env["AUTHZ_DB_TIMEOUT_MS"]["value"])
        assert redis_ms < db_ms < 250
        mounts = {m["mountPath"] for m in authz["volumeMounts"]}
        assert "/tmp" in mounts


@pytest.mark.parametrize("overlay", K8S_OVERLAYS)
def test_sidecar_pod_runs_envoy_and_authz_side_by_side(kustomize: Kustomize, overlay: str) -> None:
    manifests = kustomize(overlay)
    deployment = only(manifests, "Deployment", "authz-gateway")
    pod = pod_spec(deployment)
    assert {c["name"] for c in pod["containers"]} == {"envoy", "authz"}
    envoy = container(pod, "envoy")
    assert envoy["lifecycle"]["preStop"]["sleep"]["seconds"] < pod["terminationGracePeriodSeconds"]
    # Envoy stops serving before the sidecar stops answering it.
    drain = float(env_of(container(pod, "authz"))["AUTHZ_DRAIN_DELAY_S"]["value"])
    assert envoy["lifecycle"]["preStop"]["sleep"]["seconds"] <= drain

    database_url = env_of(container(pod, "authz"))["AUTHZ_DATABASE_URL"]
    assert database_url["valueFrom"]["secretKeyRef"]["key"] == "database-url"

    service = only(manifests, "Service", "authz-gateway")
    assert service["spec"]["selector"].items() <= pod_labels(deployment).items()
    assert 9191 not in {p["port"] for p in service["spec"]["ports"]}, "ext_authz stays in the pod"
    pdb = only(manifests, "PodDisruptionBudget")
    assert pdb["spec"]["selector"]["matchLabels"].items() <= pod_labels(deployment).items()


def pod_labels(workload: Manifest) -> dict[str, str]:
    labels: dict[str, str] = workload["spec"]["template"]["metadata"]["labels"]
    return labels


def test_embedded_overlay_is_one_pod_on_a_volume(kustomize: Kustomize) -> None:
    manifests = kustomize("deploy/k8s/overlays/embedded")
    deployment = only(manifests, "Deployment", "authz-gateway")
    assert deployment["spec"]["replicas"] == 1
    assert deployment["spec"]["strategy"] == {"type": "Recreate"}
    pod = pod_spec(deployment)
    authz = container(pod, "authz")
    assert "AUTHZ_REDIS_URL" not in env_of(authz)
    mount = next(m for m in authz["volumeMounts"] if m["mountPath"] == "/var/lib/authz")
    volume = next(v for v in pod["volumes"] if v["name"] == mount["name"])
    claim = only(manifests, "PersistentVolumeClaim")
    assert volume["persistentVolumeClaim"]["claimName"] == claim["metadata"]["name"]
    secret = only(manifests, "Secret")
    ref = env_of(authz)["AUTHZ_DATABASE_URL"]["valueFrom"]["secretKeyRef"]
    assert ref["name"] == secret["metadata"]["name"]
    url = base64.b64decode(secret["data"]["database-url"]).decode()
    assert url.startswith("sqlite:////var/lib/authz/")
    # The demo upstream is the `upstream` Service the generated Envoy config points at.
    upstream = only(manifests, "Service", "upstream")
    assert upstream["spec"]["ports"][0]["port"] == 8000
    assert not any(m["kind"] == "Job" for m in manifests), "SQLite migrates itself"


def test_production_overlay_is_replicated_on_postgres_and_redis(kustomize: Kustomize) -> None:
    manifests = kustomize("deploy/k8s/overlays/production")
    deployment = only(manifests, "Deployment", "authz-gateway")
    assert deployment["spec"]["replicas"] >= 3
    assert deployment["spec"]["strategy"]["rollingUpdate"]["maxUnavailable"] == 0
    env = env_of(container(pod_spec(deployment), "authz"))
    for name, key in (("AUTHZ_DATABASE_URL", "database-url"), ("AUTHZ_REDIS_URL", "redis-url")):
        ref = env[name]["valueFrom"]["secretKeyRef"]
        assert ref == {"name": "authz-backends", "key": key}, name
    assert not any(m["kind"] == "Secret" for m in manifests), "credentials never live in git"
    assert only(manifests, "PodDisruptionBudget")["spec"]["maxUnavailable"] == 1
    job = only(manifests, "Job", "authz-migrate")
    migrate = container(pod_spec(job), "migrate")
    assert migrate["command"] == ["authz", "migrate"]
    assert env_of(migrate)["AUTHZ_DATABASE_URL"] == env["AUTHZ_DATABASE_URL"]
    assert migrate["image"] == container(pod_spec(deployment), "authz")["image"]
    assert pod_spec(job)["restartPolicy"] == "Never"


@pytest.mark.parametrize("overlay", K8S_OVERLAYS)
def test_the_console_route_has_a_backend(kustomize: Kustomize, overlay: str) -> None:
    manifests = kustomize(overlay)
    envoy = load_yaml(REPO / "deploy/k8s/base/envoy.yaml")
    [cluster] = [c for c in envoy["static_resources"]["clusters"] if c["name"] == "console"]
    address = cluster["load_assignment"]["endpoints"][0]["lb_endpoints"][0]["endpoint"]["address"]
    service = only(manifests, "Service", address["socket_address"]["address"])
    assert address["socket_address"]["port_value"] in {p["port"] for p in service["spec"]["ports"]}
    deployment = only(manifests, "Deployment", "console")
    assert service["spec"]["selector"].items() <= pod_labels(deployment).items()
    assert deployment["spec"]["replicas"] == 1  # sessions live in the console's memory
    console = container(pod_spec(deployment), "console")
    env = env_of(console)
    # The key API through Envoy's Service: the sidecar's gRPC port stays closed to other pods.
    gateway = only(manifests, "Service", "authz-gateway")
    host, port = env["AUTHZ_CONSOLE_KEY_API"]["value"].rsplit(":", 1)
    assert (host, int(port)) == ("authz-gateway", 8080)
    assert int(port) in {p["port"] for p in gateway["spec"]["ports"]}
    assert env["AUTHZ_CONSOLE_ADDR"]["value"].endswith(f":{console['ports'][0]['containerPort']}")
