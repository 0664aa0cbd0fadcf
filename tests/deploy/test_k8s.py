"""k8s/: every overlay renders, validates offline, and keeps the deployment's invariants.

Rendering uses the real kustomize (tests/deploy/kustomize.py). Built-in kinds are validated
with ``kubernetes-validate --strict`` (its Python API) against the oldest Kubernetes the
manifests support and the newest it knows. The ServiceMonitor is a CRD
(monitoring.coreos.com/v1) that kubernetes-validate has no schema for (it raises
SchemaNotFoundError, which its CLI prints as a mere warning), so it is validated here
against SERVICE_MONITOR_SCHEMA: the subset of the Prometheus Operator's CRD schema for the
fields the manifests use, strict in the same way (no unknown properties).
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import textwrap
from pathlib import Path
from typing import Any

import jsonschema
import kubernetes_validate
import pytest
import yaml

from tests.deploy.dockerfile_model import exec_form, parse_dockerfile
from tests.deploy.kustomize import render

REPO = Path(__file__).resolve().parents[2]
K8S = REPO / "k8s"
OVERLAYS = ("cpu", "gpu")
# Overlay plus optional components (a model-volume approach, keyless mode), rendered from a
# copy of k8s/ with an extra overlay (kustomize refuses absolute paths to resources).
VARIANTS = (
    "cpu",
    "gpu",
    "cpu+fetch-bundle",
    "gpu+fetch-bundle",
    "gpu+baked-bundle",
    "cpu+keyless",
    "gpu+keyless",
    "gpu+fetch-bundle+keyless",
)
# 1.30: the native preStop sleep action is on by default from this release on.
KUBERNETES_VERSIONS = ("1.30.0", kubernetes_validate.latest_version())
SERVE_ARGS = ["serve", "/models/bundle", "--host", "0.0.0.0", "--port", "8000"]
SECRET_NAME = "rmserve-api-keys"

# A Prometheus duration, as the CRD's pattern has it: 30s, 1m30s, 500ms.
_DURATION = {
    "type": "string",
    "pattern": r"^(0|(([0-9]+)y)?(([0-9]+)w)?(([0-9]+)d)?(([0-9]+)h)?"
    r"(([0-9]+)m)?(([0-9]+)s)?(([0-9]+)ms)?)$",
}
_LABELS = {"type": "object", "additionalProperties": {"type": "string"}}
SERVICE_MONITOR_SCHEMA: dict[str, Any] = {
    "type": "object",
    "additionalProperties": False,
    "required": ["apiVersion", "kind", "metadata", "spec"],
    "properties": {
        "apiVersion": {"const": "monitoring.coreos.com/v1"},
        "kind": {"const": "ServiceMonitor"},
        "metadata": {
            "type": "object",
            "additionalProperties": False,
            "required": ["name"],
            "properties": {
                "name": {"type": "string", "pattern": r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?$"},
                "namespace": {"type": "string"},
                "labels": _LABELS,
                "annotations": _LABELS,
            },
        },
        "spec": {
            "type": "object",
            "additionalProperties": False,
            "required": ["selector"],  # required by the CRD
            "properties": {
                "jobLabel": {"type": "string"},
                "selector": {
                    "type": "object",
                    "additionalProperties": False,
                    "properties": {"matchLabels": _LABELS},
                },
                "namespaceSelector": {
                    "type": "object",
                    "additionalProperties": False,
                    "properties": {
                        "any": {"type": "boolean"},
                        "matchNames": {"type": "array", "items": {"type": "string"}},
                    },
                },
                "endpoints": {
                    "type": "array",
                    "minItems": 1,
                    "items": {
                        "type": "object",
                        "additionalProperties": False,
                        "properties": {
                            "port": {"type": "string"},
                            "path": {"type": "string", "pattern": "^/"},
                            "scheme": {"enum": ["http", "https", "HTTP", "HTTPS"]},
                            "interval": _DURATION,
                            "scrapeTimeout": _DURATION,
                            "honorLabels": {"type": "boolean"},
                        },
                    },
                },
            },
        },
    },
}


def _render_variant(variant: str, scratch: Path) -> Path:
    """The directory to build for VARIANT (a copy of k8s/ for component variants)."""
    if "+" not in variant:
        return K8S / "overlays" / variant
    overlay, *components = variant.split("+")
    name = "-".join([overlay, *components])
    tree = scratch / variant / "k8s"
    if not tree.exists():
        shutil.copytree(K8S, tree)
        extra = tree / "overlays" / name
        extra.mkdir()
        listed = "".join(f"  - ../../components/{component}\n" for component in components)
        (extra / "kustomization.yaml").write_text(
            "apiVersion: kustomize.config.k8s.io/v1beta1\nkind: Kustomization\n"
            f"resources:\n  - ../{overlay}\ncomponents:\n{listed}"
        )
    return tree / "overlays" / name


@pytest.fixture(scope="module")
def scratch(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("k8s")


@pytest.fixture(scope="module", params=VARIANTS)
def variant(request: pytest.FixtureRequest) -> str:
    return str(request.param)


@pytest.fixture(scope="module")
def rendered(variant: str, scratch: Path) -> dict[tuple[str, str], dict[str, Any]]:
    """(kind, name) -> object, as the variant renders."""
    objects = render(_render_variant(variant, scratch))
    return {(obj["kind"], obj["metadata"]["name"]): obj for obj in objects}


def _deployment(rendered: dict[tuple[str, str], dict[str, Any]]) -> dict[str, Any]:
    return rendered[("Deployment", "rmserve")]


def _container(rendered: dict[tuple[str, str], dict[str, Any]]) -> dict[str, Any]:
    containers: list[dict[str, Any]] = _deployment(rendered)["spec"]["template"]["spec"][
        "containers"
    ]
    (container,) = [c for c in containers if c["name"] == "rmserve"]
    return container


@pytest.mark.parametrize("version", KUBERNETES_VERSIONS)
def test_every_object_validates_strictly(
    rendered: dict[tuple[str, str], dict[str, Any]], version: str
) -> None:
    kinds = set()
    for obj in rendered.values():
        kinds.add(obj["kind"])
        if obj["apiVersion"].startswith("monitoring.coreos.com/"):
            jsonschema.validate(obj, SERVICE_MONITOR_SCHEMA)
            continue
        try:
            kubernetes_validate.validate(obj, version, strict=True)
        except kubernetes_validate.ValidationError as e:
            path = ".".join(str(part) for part in e.path)
            pytest.fail(f"{obj['kind']}/{obj['metadata']['name']} at {path}: {e.message}")
    expected = {"Deployment", "Service", "ConfigMap", "PodDisruptionBudget", "NetworkPolicy"}
    assert expected | {"HorizontalPodAutoscaler", "ServiceMonitor"} <= kinds
    assert "Secret" not in kinds, "API keys must not be committed as a Secret"


def test_strict_validation_catches_a_misspelt_field() -> None:
    objects = render(K8S / "overlays" / "cpu")
    (deployment,) = [obj for obj in objects if obj["kind"] == "Deployment"]
    container = deployment["spec"]["template"]["spec"]["containers"][0]
    container["readinesProbe"] = container.pop("readinessProbe")
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(deployment, KUBERNETES_VERSIONS[-1], strict=True)
    # The CRD is not known to kubernetes-validate at all, hence the schema above.
    (monitor,) = [obj for obj in objects if obj["kind"] == "ServiceMonitor"]
    with pytest.raises(kubernetes_validate.SchemaNotFoundError):
        kubernetes_validate.validate(monitor, KUBERNETES_VERSIONS[-1], strict=True)
    monitor["spec"]["endpoints"][0]["intervall"] = "15s"
    with pytest.raises(jsonschema.ValidationError):
        jsonschema.validate(monitor, SERVICE_MONITOR_SCHEMA)


def test_container_runs_the_images_serve_command(
    rendered: dict[tuple[str, str], dict[str, Any]],
) -> None:
    container = _container(rendered)
    _args, stages = parse_dockerfile(REPO / "Dockerfile")
    cpu = {stage.name: stage for stage in stages}["cpu"]
    entrypoint, cmd = cpu.last("ENTRYPOINT"), cpu.last("CMD")
    assert entrypoint is not None
    assert cmd is not None
    assert container["command"] + container["args"] == exec_form(entrypoint) + exec_form(cmd)
    assert container["args"] == SERVE_ARGS


def test_container_command_parses_with_the_real_cli(
    rendered: dict[tuple[str, str], dict[str, Any]], rmserve_parser: argparse.ArgumentParser
) -> None:
    container = _container(rendered)
    assert container["command"] == ["rmserve"]
    args = rmserve_parser.parse_args(container["args"])
    assert args.command == "serve"
    assert args.bundle == "/models/bundle"
    assert args.host == "0.0.0.0"
    (port,) = container["ports"]
    assert args.port == port["containerPort"] == 8000


def _settings_env(rendered: dict[tuple[str, str], dict[str, Any]]) -> dict[str, str]:
    data: dict[str, str] = rendered[("ConfigMap", "rmserve-settings")]["data"]
    return data


@pytest.fixture
def clean_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in list(os.environ):
        if name.startswith("RMSERVE_"):
            monkeypatch.delenv(name)


def test_settings_are_accepted_by_the_service(
    variant: str,
    rendered: dict[tuple[str, str], dict[str, Any]],
    clean_environment: None,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    from rmserve.service.settings import ServiceSettings

    env = _settings_env(rendered)
    for name, value in env.items():
        assert name.startswith("RMSERVE_"), name
        field = name.removeprefix("RMSERVE_").lower()
        assert field in ServiceSettings.model_fields, f"{name} is not a setting of rmserve"
        assert field != "api_keys", "API keys belong in the Secret, not the ConfigMap"
        assert isinstance(value, str), f"{name}: ConfigMap values must be strings"
        monkeypatch.setenv(name, value)
    if not _keyless(variant):
        monkeypatch.setenv("RMSERVE_API_KEYS", "k" * 32)  # what the Secret provides
    settings = ServiceSettings()  # raises on a value or a combination the service refuses
    assert bool(settings.api_key_list()) is not _keyless(variant)
    assert str(settings.bundle) == "/models/bundle"
    assert settings.port == 8000
    assert settings.host == "0.0.0.0"


def _keyless(variant: str) -> bool:
    return "keyless" in variant.split("+")


def test_api_keys_come_from_the_secret(
    variant: str, rendered: dict[tuple[str, str], dict[str, Any]]
) -> None:
    env = {item["name"]: item for item in _container(rendered)["env"]}
    if _keyless(variant):
        assert "RMSERVE_API_KEYS" not in env
    else:
        reference = env["RMSERVE_API_KEYS"]["valueFrom"]["secretKeyRef"]
        # Not optional: a missing Secret must keep the pod from starting (fail closed), not
        # start it without authentication; keyless is the keyless component's explicit choice.
        assert reference == {"name": SECRET_NAME, "key": "api-keys"}
    assert "RMSERVE_API_KEYS" not in _settings_env(rendered)
    (source,) = _container(rendered)["envFrom"]
    assert source["configMapRef"]["name"] == "rmserve-settings"
    # Service links would inject RMSERVE_PORT=tcp://... from the Service named rmserve.
    assert _deployment(rendered)["spec"]["template"]["spec"]["enableServiceLinks"] is False


def test_probes(rendered: dict[tuple[str, str], dict[str, Any]]) -> None:
    container = _container(rendered)
    for probe, path in (
        ("startupProbe", "/readyz"),
        ("readinessProbe", "/readyz"),
        ("livenessProbe", "/healthz"),
    ):
        assert container[probe]["httpGet"] == {"path": path, "port": "http"}, probe
    assert container["ports"][0]["name"] == "http"
    startup = container["startupProbe"]
    # Liveness must not kill a replica that is still loading and warming up its model.
    assert startup["periodSeconds"] * startup["failureThreshold"] >= 300


def test_security_context(rendered: dict[tuple[str, str], dict[str, Any]]) -> None:
    pod = _deployment(rendered)["spec"]["template"]["spec"]
    assert pod["securityContext"]["runAsNonRoot"] is True
    assert pod["securityContext"]["runAsUser"] == 10001
    assert pod["securityContext"]["seccompProfile"] == {"type": "RuntimeDefault"}
    assert pod["automountServiceAccountToken"] is False
    for container in pod["containers"] + pod.get("initContainers", []):
        context = container["securityContext"]
        assert context["allowPrivilegeEscalation"] is False, container["name"]
        assert context["readOnlyRootFilesystem"] is True, container["name"]
        assert context["capabilities"] == {"drop": ["ALL"]}, container["name"]
    mounts = {m["mountPath"]: m for m in _container(rendered)["volumeMounts"]}
    volumes = {v["name"]: v for v in pod["volumes"]}
    assert "emptyDir" in volumes[mounts["/tmp"]["name"]], "a writable /tmp on a read-only root"


def test_grace_period_covers_prestop_and_drain(
    rendered: dict[tuple[str, str], dict[str, Any]],
) -> None:
    from rmserve.service.settings import ServiceSettings

    default_drain = ServiceSettings.model_fields["drain_timeout_s"].default
    drain = float(_settings_env(rendered).get("RMSERVE_DRAIN_TIMEOUT_S", default_drain))
    pre_stop = _container(rendered)["lifecycle"]["preStop"]["sleep"]["seconds"]
    grace = _deployment(rendered)["spec"]["template"]["spec"]["terminationGracePeriodSeconds"]
    assert pre_stop > 0
    assert grace > drain + pre_stop, (grace, drain, pre_stop)


def test_selectors_match_the_pods(rendered: dict[tuple[str, str], dict[str, Any]]) -> None:
    deployment = _deployment(rendered)
    pod_labels = deployment["spec"]["template"]["metadata"]["labels"]

    def selects(selector: dict[str, str], labels: dict[str, str]) -> bool:
        return bool(selector) and all(labels.get(k) == v for k, v in selector.items())

    assert selects(deployment["spec"]["selector"]["matchLabels"], pod_labels)
    service = rendered[("Service", "rmserve")]
    assert selects(service["spec"]["selector"], pod_labels)
    assert service["spec"]["ports"][0]["targetPort"] == "http"
    pdb = rendered[("PodDisruptionBudget", "rmserve")]
    assert selects(pdb["spec"]["selector"]["matchLabels"], pod_labels)
    monitor = rendered[("ServiceMonitor", "rmserve")]
    assert selects(monitor["spec"]["selector"]["matchLabels"], service["metadata"]["labels"])
    endpoint = monitor["spec"]["endpoints"][0]
    assert endpoint["port"] == service["spec"]["ports"][0]["name"]
    assert endpoint["path"] == "/metrics"
    # Prometheus refuses a scrape timeout longer than the interval.
    assert int(endpoint["scrapeTimeout"].rstrip("s")) <= int(endpoint["interval"].rstrip("s"))
    hpa = rendered[("HorizontalPodAutoscaler", "rmserve")]
    target = hpa["spec"]["scaleTargetRef"]
    assert (target["apiVersion"], target["kind"], target["name"]) == (
        "apps/v1",
        "Deployment",
        deployment["metadata"]["name"],
    )
    assert 1 <= hpa["spec"]["minReplicas"] <= hpa["spec"]["maxReplicas"]


# NetworkPolicy: who may connect. The server's namespace in these tests; the labels are the
# ones docs/deploy.md tells users to set.
SERVER_NAMESPACE = "rmserve"
CLIENT_LABEL = {"rmserve.io/client": "true"}
CLIENT_NAMESPACE_LABEL = {"rmserve.io/client-namespace": "true"}
MONITORING_NAMESPACE = "monitoring"


def _label_selects(selector: dict[str, Any], labels: dict[str, str]) -> bool:
    """A LabelSelector: every matchLabels pair present; {} selects everything."""
    assert set(selector) <= {"matchLabels"}, f"selector uses {sorted(selector)}; extend the test"
    return all(labels.get(k) == v for k, v in selector.get("matchLabels", {}).items())


def _network_policies(
    rendered: dict[tuple[str, str], dict[str, Any]],
) -> list[dict[str, Any]]:
    return [obj for (kind, _), obj in rendered.items() if kind == "NetworkPolicy"]


def _admits(
    rendered: dict[tuple[str, str], dict[str, Any]],
    *,
    namespace: str,
    pod_labels: dict[str, str],
    port: int,
    protocol: str = "TCP",
    namespace_labels: dict[str, str] | None = None,
) -> bool:
    """Whether the rendered NetworkPolicies admit a connection to an rmserve pod (in
    SERVER_NAMESPACE) from a pod with POD_LABELS in NAMESPACE, as Kubernetes evaluates them:
    a pod selected by no Ingress policy admits everything; otherwise any rule of any selecting
    policy must admit the peer (a peer with both selectors needs both) and the port."""
    target = _deployment(rendered)["spec"]["template"]["metadata"]["labels"]
    named_ports = {p["name"]: p["containerPort"] for p in _container(rendered)["ports"]}
    # The API server labels every namespace with its name.
    ns_labels = {**(namespace_labels or {}), "kubernetes.io/metadata.name": namespace}
    selecting = [
        policy
        for policy in _network_policies(rendered)
        if "Ingress" in policy["spec"].get("policyTypes", ["Ingress"])
        and _label_selects(policy["spec"]["podSelector"], target)
    ]
    if not selecting:
        return True

    def peer_admits(peer: dict[str, Any]) -> bool:
        assert "ipBlock" not in peer, "an ipBlock admits by address, not by label"
        if "namespaceSelector" in peer:
            ns_ok = _label_selects(peer["namespaceSelector"], ns_labels)
        else:
            ns_ok = namespace == SERVER_NAMESPACE
        return ns_ok and _label_selects(peer.get("podSelector", {}), pod_labels)

    def port_admits(entry: dict[str, Any]) -> bool:
        if entry.get("protocol", "TCP") != protocol:
            return False
        if "port" not in entry:
            return True
        first = named_ports[entry["port"]] if isinstance(entry["port"], str) else entry["port"]
        return bool(first <= port <= entry.get("endPort", first))

    return any(
        (not rule.get("from") or any(peer_admits(peer) for peer in rule["from"]))
        and (not rule.get("ports") or any(port_admits(entry) for entry in rule["ports"]))
        for policy in selecting
        for rule in policy["spec"].get("ingress", [])
    )


def test_network_policies_select_only_the_rmserve_pods(
    rendered: dict[tuple[str, str], dict[str, Any]],
) -> None:
    policies = _network_policies(rendered)
    assert {p["metadata"]["name"] for p in policies} == {"rmserve-clients", "rmserve-metrics"}
    pod_labels = _deployment(rendered)["spec"]["template"]["metadata"]["labels"]
    for policy in policies:
        selector = policy["spec"]["podSelector"]
        name = policy["metadata"]["name"]
        assert selector.get("matchLabels"), f"{name}: an empty podSelector isolates every pod"
        assert _label_selects(selector, pod_labels), f"{name} does not select the rmserve pods"
        # Not the trainers: a trainer pod isolated by this policy could not be reached at all.
        assert not _label_selects(selector, {**CLIENT_LABEL, "app.kubernetes.io/name": "x"})
        # Ingress only: egress stays unrestricted (DNS, the fetch-bundle download).
        assert policy["spec"]["policyTypes"] == ["Ingress"], name
        assert "egress" not in policy["spec"], name


def test_network_policies_admit_trainers_and_monitoring_and_nothing_else(
    rendered: dict[tuple[str, str], dict[str, Any]],
) -> None:
    (container_port,) = _container(rendered)["ports"]
    port, protocol = container_port["containerPort"], container_port["protocol"]
    # Every rule names its peers and the serving port: an empty `from` or `ports` admits all.
    peers = []
    for policy in _network_policies(rendered):
        for rule in policy["spec"]["ingress"]:
            assert rule["from"], f"{policy['metadata']['name']}: a rule without peers"
            assert rule["ports"] == [{"protocol": protocol, "port": port}]
            peers.extend(rule["from"])
    assert sorted(peers, key=json.dumps) == sorted(
        [
            {"podSelector": {"matchLabels": CLIENT_LABEL}},
            {
                "namespaceSelector": {"matchLabels": CLIENT_NAMESPACE_LABEL},
                "podSelector": {"matchLabels": CLIENT_LABEL},
            },
            {
                "namespaceSelector": {
                    "matchLabels": {"kubernetes.io/metadata.name": MONITORING_NAMESPACE}
                }
            },
        ],
        key=json.dumps,
    )

    prometheus = {"app.kubernetes.io/name": "prometheus"}
    cases = [
        # (namespace, namespace labels, pod labels, port, protocol, admitted)
        (SERVER_NAMESPACE, {}, CLIENT_LABEL, port, "TCP", True),
        (SERVER_NAMESPACE, {}, {**CLIENT_LABEL, "app": "openrlhf"}, port, "TCP", True),
        (SERVER_NAMESPACE, {}, CLIENT_LABEL, port + 1, "TCP", False),
        (SERVER_NAMESPACE, {}, CLIENT_LABEL, port, "UDP", False),
        (SERVER_NAMESPACE, {}, {}, port, "TCP", False),
        (SERVER_NAMESPACE, {}, {"rmserve.io/client": "false"}, port, "TCP", False),
        (SERVER_NAMESPACE, {}, prometheus, port, "TCP", False),
        ("rl", CLIENT_NAMESPACE_LABEL, CLIENT_LABEL, port, "TCP", True),
        ("rl", CLIENT_NAMESPACE_LABEL, {}, port, "TCP", False),
        ("rl", {}, CLIENT_LABEL, port, "TCP", False),
        ("rl", CLIENT_LABEL, CLIENT_LABEL, port, "TCP", False),
        (MONITORING_NAMESPACE, {}, prometheus, port, "TCP", True),
        (MONITORING_NAMESPACE, {}, {}, port, "TCP", True),
        (MONITORING_NAMESPACE, {}, prometheus, port + 1, "TCP", False),
        ("default", {}, prometheus, port, "TCP", False),
        ("kube-system", {}, {"k8s-app": "kube-dns"}, port, "TCP", False),
    ]
    for namespace, namespace_labels, pod_labels, to_port, proto, admitted in cases:
        got = _admits(
            rendered,
            namespace=namespace,
            namespace_labels=namespace_labels,
            pod_labels=pod_labels,
            port=to_port,
            protocol=proto,
        )
        assert got is admitted, (namespace, namespace_labels, pod_labels, to_port, proto)


def test_network_policy_port_is_the_serving_port(
    rendered: dict[tuple[str, str], dict[str, Any]],
) -> None:
    container = _container(rendered)
    (container_port,) = container["ports"]
    settings_port = int(_settings_env(rendered)["RMSERVE_PORT"])
    args_port = int(container["args"][container["args"].index("--port") + 1])
    service = rendered[("Service", "rmserve")]
    (service_port,) = service["spec"]["ports"]
    assert service_port["targetPort"] == container_port["name"]
    for policy in _network_policies(rendered):
        for rule in policy["spec"]["ingress"]:
            for entry in rule["ports"]:
                assert entry["port"] == container_port["containerPort"]
                assert entry["port"] == settings_port == args_port
                assert entry["protocol"] == container_port["protocol"]


def test_keyless_mode_needs_no_secret(
    variant: str, rendered: dict[tuple[str, str], dict[str, Any]], scratch: Path
) -> None:
    pod = _deployment(rendered)["spec"]["template"]["spec"]
    text = json.dumps(list(rendered.values()))
    if not _keyless(variant):
        assert SECRET_NAME in text
        return
    # Nothing in the render refers to a Secret: the pod starts without one.
    assert SECRET_NAME not in text
    for container in pod["containers"] + pod.get("initContainers", []):
        for item in container.get("env", []):
            assert "secretKeyRef" not in item.get("valueFrom", {}), item["name"]
        for source in container.get("envFrom", []):
            assert "secretRef" not in source, container["name"]
    assert not [v for v in pod["volumes"] if "secret" in v or "projected" in v]
    # The component changes that one reference and nothing else; the NetworkPolicies stay.
    keyed_variant = "+".join(part for part in variant.split("+") if part != "keyless")
    keyed = {
        (obj["kind"], obj["metadata"]["name"]): obj
        for obj in render(_render_variant(keyed_variant, scratch))
    }
    env = _container(keyed)["env"]
    _container(keyed)["env"] = [item for item in env if item["name"] != "RMSERVE_API_KEYS"]
    assert keyed == rendered
    assert _network_policies(rendered)


def test_model_volume(variant: str, rendered: dict[tuple[str, str], dict[str, Any]]) -> None:
    pod = _deployment(rendered)["spec"]["template"]["spec"]
    mounts = [m for m in _container(rendered)["volumeMounts"] if m["mountPath"] == "/models"]
    if "baked-bundle" in variant:
        # The bundle is in the image; a mount at /models would hide it.
        assert mounts == []
        assert "models" not in {v["name"] for v in pod["volumes"]}
        assert ("PersistentVolumeClaim", "rmserve-models") not in rendered
        return
    (mount,) = mounts
    assert mount["readOnly"] is True
    volume = {v["name"]: v for v in pod["volumes"]}[mount["name"]]
    if "fetch-bundle" in variant:
        assert "emptyDir" in volume
        assert "persistentVolumeClaim" not in volume
        assert ("PersistentVolumeClaim", "rmserve-models") not in rendered
        (init,) = pod["initContainers"]
        init_mounts = {m["name"]: m["mountPath"] for m in init["volumeMounts"]}
        assert init_mounts == {mount["name"]: "/models"}
        assert "/models/bundle" in init["args"][0]
        assert "pipefail" in init["args"][0]
    else:
        claim = volume["persistentVolumeClaim"]
        assert claim["readOnly"] is True
        pvc = rendered[("PersistentVolumeClaim", claim["claimName"])]
        assert {"ReadWriteMany", "ReadOnlyMany"} & set(pvc["spec"]["accessModes"])
        assert "initContainers" not in pod


def test_hardware_of_each_overlay(
    variant: str, rendered: dict[tuple[str, str], dict[str, Any]]
) -> None:
    container = _container(rendered)
    resources = container["resources"]
    env = _settings_env(rendered)
    hpa = rendered[("HorizontalPodAutoscaler", "rmserve")]
    (metric,) = hpa["spec"]["metrics"]
    if variant.startswith("gpu"):
        assert str(resources["limits"]["nvidia.com/gpu"]) == "1"
        assert container["image"].endswith("-gpu")
        assert env["RMSERVE_PROVIDER"] == "cuda"
        pod = _deployment(rendered)["spec"]["template"]["spec"]
        assert any(t["key"] == "nvidia.com/gpu" for t in pod["tolerations"])
        assert metric["type"] == "Pods"
        assert metric["pods"]["metric"]["name"] == "rmserve_queue_items"
        assert metric["pods"]["target"]["type"] == "AverageValue"
    else:
        assert "nvidia.com/gpu" not in resources.get("limits", {})
        assert container["image"].endswith("-cpu")
        assert env["RMSERVE_PROVIDER"] == "cpu"
        for kind in ("requests", "limits"):
            assert {"cpu", "memory"} <= set(resources[kind]), kind
        # ONNX Runtime's pools must fit the CPU quota, or every batch is throttled.
        threads = int(env["RMSERVE_MODEL_INSTANCES"]) * int(env["RMSERVE_INTRA_OP_THREADS"])
        assert 0 < threads <= int(resources["limits"]["cpu"])
        assert metric == {
            "type": "Resource",
            "resource": {
                "name": "cpu",
                "target": {"type": "Utilization", "averageUtilization": 70},
            },
        }


def _exported_metric_names() -> set[str]:
    from prometheus_client.parser import text_string_to_metric_families

    from rmserve.service.batcher import BatchStats
    from rmserve.service.metrics import ServiceMetrics

    metrics = ServiceMetrics()
    metrics.observe_request("/v1/score", 200, 0.01)
    metrics.observe_batch(BatchStats(size=2, padded_tokens=20, real_tokens=15, inference_s=0.01))
    metrics.set_queue_items(3)
    metrics.model_info.labels(model="m", precision="fp32", provider="cpu").set(1)
    return {
        sample.name
        for family in text_string_to_metric_families(metrics.render().decode())
        for sample in family.samples
    }


def test_prometheus_adapter_rule_serves_the_hpa_metric() -> None:
    values = yaml.safe_load(
        (K8S / "overlays" / "gpu" / "prometheus-adapter-values.yaml").read_text()
    )
    (rule,) = values["rules"]["custom"]
    hpa = yaml.safe_load((K8S / "overlays" / "gpu" / "hpa-gpu.yaml").read_text())
    (metric,) = hpa["spec"]["metrics"]
    served_as = rule["name"]["as"]
    assert served_as == metric["pods"]["metric"]["name"]
    series = re.match(r"(\w+)\{", rule["seriesQuery"])
    assert series is not None
    assert re.fullmatch(rule["name"]["matches"], series.group(1))
    assert series.group(1) in _exported_metric_names(), "the service must export the series"
    assert rule["resources"]["overrides"]["pod"] == {"resource": "pod"}
    assert rule["resources"]["overrides"]["namespace"] == {"resource": "namespace"}
    for placeholder in ("<<.Series>>", "<<.LabelMatchers>>", "<<.GroupBy>>"):
        assert placeholder in rule["metricsQuery"]


def test_grafana_dashboard_names_only_exported_metrics() -> None:
    dashboard = json.loads((K8S / "grafana-dashboard.json").read_text())
    exported = _exported_metric_names()
    expressions = [t["expr"] for p in dashboard["panels"] for t in p.get("targets", [])]
    templating = [v["definition"] for v in dashboard["templating"]["list"] if "definition" in v]
    assert expressions
    used: set[str] = set()
    for expr in expressions + templating:
        names = set(re.findall(r"\brmserve_\w+", expr))
        assert names, f"panel query names no rmserve metric: {expr}"
        unknown = names - exported
        assert not unknown, f"{sorted(unknown)} in {expr!r} are not exported by the service"
        used |= names
    # The panels the issue asks for: throughput, latency quantiles, queue, batching, errors.
    for required in (
        "rmserve_requests_total",
        "rmserve_request_duration_seconds_bucket",
        "rmserve_queue_items",
        "rmserve_batch_size_bucket",
        "rmserve_padding_ratio_bucket",
        "rmserve_inference_duration_seconds_bucket",
        "rmserve_items_total",
        "rmserve_tokens_total",
        "rmserve_model_info",
    ):
        assert required in used, required
    assert any("status" in e and "rmserve_requests_total" in e for e in expressions)
    quantiles = {q for e in expressions for q in re.findall(r"histogram_quantile\((0\.\d+)", e)}
    assert {"0.5", "0.95", "0.99"} <= quantiles
    ids = [p["id"] for p in dashboard["panels"]]
    assert len(ids) == len(set(ids))


def test_deploy_docs_name_real_files_and_the_real_secret() -> None:
    docs = (REPO / "docs" / "deploy.md").read_text()
    paths = set(re.findall(r"\bk8s/[\w./-]*\w", docs))
    assert paths
    for path in paths:
        assert (REPO / path).exists(), f"docs/deploy.md names {path}, which does not exist"
    assert f"create secret generic {SECRET_NAME}" in docs
    assert "--from-literal=api-keys=" in docs
    for overlay in OVERLAYS:
        assert f"apply -k k8s/overlays/{overlay}" in docs


def test_kubernetes_objects_shown_in_the_docs_validate() -> None:
    docs = (REPO / "docs" / "deploy.md").read_text()
    blocks = [textwrap.dedent(b) for b in re.findall(r"```yaml\n(.*?)```", docs, re.S)]
    objects = [yaml.safe_load(block) for block in blocks]
    objects = [obj for obj in objects if isinstance(obj, dict) and "kind" in obj]
    assert objects, "docs/deploy.md shows a NetworkPolicy"
    for obj in objects:
        kubernetes_validate.validate(obj, KUBERNETES_VERSIONS[-1], strict=True)


def _docs_section(title: str) -> str:
    docs = (REPO / "docs" / "deploy.md").read_text()
    start = docs.index(f"\n## {title}\n")
    end = docs.find("\n## ", start + 1)
    return docs[start : end if end != -1 else None]


def test_docs_explain_keyless_trainers_behind_the_network_policy() -> None:
    section = _docs_section("Running OpenRLHF and verl against the server")
    rendered = {
        (obj["kind"], obj["metadata"]["name"]): obj for obj in render(K8S / "overlays" / "cpu")
    }
    # The labels the docs tell users to set are the ones the policy admits.
    ((key, value),) = CLIENT_LABEL.items()
    ((ns_key, ns_value),) = CLIENT_NAMESPACE_LABEL.items()
    assert f'{key}: "{value}"' in section
    assert f"kubectl label namespace rl {ns_key}={ns_value}" in section
    assert f"--labels={key}={value}" in section
    assert f"`{MONITORING_NAMESPACE}`" in section
    port = _container(rendered)["ports"][0]["containerPort"]
    url = f"http://rmserve.rmserve.svc:{port}"
    assert f"--reward.remote_url {url}/get_reward" in section
    assert "--remote_rm_url" in section
    assert f"RMSERVE_BASE_URL={url} python -m verl.trainer.main_ppo" in section
    assert "components:\n     - ../../components/keyless" in section
    assert (K8S / "components" / "keyless" / "kustomization.yaml").is_file()
    assert "defence in depth" in section.lower()
    assert "probes are not subject to NetworkPolicy" in section


def _documented_metrics_patch() -> dict[str, Any]:
    section = _docs_section("Running OpenRLHF and verl against the server")
    blocks = [textwrap.dedent(b) for b in re.findall(r"```yaml\n(.*?)```", section, re.S)]
    (patch,) = [
        obj
        for obj in map(yaml.safe_load, blocks)
        if isinstance(obj, dict)
        and obj.get("kind") == "NetworkPolicy"
        and obj["metadata"]["name"] == "rmserve-metrics"
    ]
    return patch


def test_documented_metrics_namespace_patch(scratch: Path) -> None:
    """The docs' patch for Prometheus in another namespace replaces the monitoring rule only
    (kustomize replaces the atomic `ingress` list)."""
    patch = _documented_metrics_patch()
    (rule,) = patch["spec"]["ingress"]
    (peer,) = rule["from"]
    namespace = peer["namespaceSelector"]["matchLabels"]["kubernetes.io/metadata.name"]
    assert namespace != MONITORING_NAMESPACE
    tree = scratch / "metrics-patch" / "k8s"
    shutil.copytree(K8S, tree)
    overlay = tree / "overlays" / "cpu-metrics"
    overlay.mkdir()
    (overlay / "networkpolicy-metrics.yaml").write_text(yaml.safe_dump(patch))
    (overlay / "kustomization.yaml").write_text(
        "apiVersion: kustomize.config.k8s.io/v1beta1\nkind: Kustomization\n"
        "resources:\n  - ../cpu\npatches:\n  - path: networkpolicy-metrics.yaml\n"
    )
    patched = {(obj["kind"], obj["metadata"]["name"]): obj for obj in render(overlay)}
    base = {(obj["kind"], obj["metadata"]["name"]): obj for obj in render(K8S / "overlays" / "cpu")}
    key = ("NetworkPolicy", "rmserve-clients")
    assert patched[key] == base[key]
    port = _container(base)["ports"][0]["containerPort"]
    prometheus = {"app.kubernetes.io/name": "prometheus"}
    assert _admits(patched, namespace=namespace, pod_labels=prometheus, port=port)
    assert not _admits(patched, namespace=MONITORING_NAMESPACE, pod_labels=prometheus, port=port)
    assert _admits(patched, namespace=SERVER_NAMESPACE, pod_labels=CLIENT_LABEL, port=port)
