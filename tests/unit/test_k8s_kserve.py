"""The Kubernetes and KServe manifests, checked offline: each kustomize overlay renders, every
object validates strictly against Kubernetes 1.29-1.31, the KServe resources against KServe's
CRD schemas (closed, so a misspelt key fails), and every port, path and name agrees with
deploy/contract.py. (The Dockerfile's EXPOSE and the compose file's ports are held to the same
contract by tests/unit/test_deploy_files.py.)"""

import functools
import json
import os
import re
import shutil
import subprocess
import tempfile
from pathlib import Path

import jsonschema
import kubernetes_validate
import pytest
import yaml
from kubernetes_validate.utils import SchemaNotFoundError

from kiln.deploy import contract
from kiln.deploy.server import HOST, ServerSettings

ROOT = Path(__file__).resolve().parents[2]
K8S = ROOT / "deploy" / "k8s"
KSERVE = ROOT / "deploy" / "kserve"
ADAPTER_RULES = K8S / "prometheus-adapter" / "rules.yaml"
KSERVE_SCHEMAS = ROOT.parent / "shared" / "schemas" / "kserve"
KUBECTL = shutil.which("kubectl")

KUBERNETES_VERSIONS = ["1.29", "1.30", "1.31"]
# What `kubectl kustomize` renders: each overlay, and one with the model-volume component.
OVERLAYS = {"cpu": "overlays/cpu", "gpu": "overlays/gpu",
            "cpu+model-volume": ("overlays/cpu", "components/model-volume")}
OBJECTS = {("ConfigMap", "kiln-config"), ("Deployment", "kiln"), ("Service", "kiln"),
           ("Service", "kiln-metrics"), ("PodDisruptionBudget", "kiln"),
           ("HorizontalPodAutoscaler", "kiln")}
# TorchServe's metrics path, which nginx's metrics listener passes through unchanged.
METRICS_PATH = "/metrics"
# KServe's storage initializer downloads storageUri here (DefaultModelLocalMountPath).
KSERVE_MODEL_DIR = "/mnt/models"
# Knative accepts one container port, named http1 or h2c (or unnamed).
KNATIVE_PORT_NAMES = {"http1", "h2c"}

KSERVE_SCHEMA_FILES = {
    ("serving.kserve.io/v1beta1", "InferenceService"):
        "serving.kserve.io_inferenceservices.v1beta1.schema.json",
    ("serving.kserve.io/v1alpha1", "ServingRuntime"):
        "serving.kserve.io_servingruntimes.v1alpha1.schema.json",
}
# Every annotation key of these groups that the KServe files may use, with its allowed values
# (None: any string). Sources: kserve/kserve pkg/constants/constants.go (v0.16 and later:
# DeploymentMode with Standard / Knative, the legacy RawDeployment / Serverless only being
# normalised; AutoscalerClass and AutoscalerAllowedClassList; SetPrometheusAnnotation;
# KserveContainerPrometheusPortKey / KServeContainerPrometheusPathKey, read from the
# ServingRuntime), and Knative Serving's autoscaling annotations
# (knative.dev/serving pkg/apis/autoscaling: ScaleDownDelayAnnotationKey).
CHECKED_PREFIXES = ("serving.kserve.io/", "prometheus.kserve.io/", "autoscaling.knative.dev/")
ALLOWED_ANNOTATIONS = {
    "serving.kserve.io/deploymentMode": {"Standard", "Knative"},
    "serving.kserve.io/autoscalerClass": {"hpa", "external", "keda"},
    "serving.kserve.io/enable-prometheus-scraping": {"true", "false"},
    "prometheus.kserve.io/port": None,
    "prometheus.kserve.io/path": None,
    "autoscaling.knative.dev/scale-down-delay": None,
}


# --- rendering and validating -----------------------------------------------------------


def kustomize(folder) -> tuple[dict, ...]:
    if KUBECTL is None:
        pytest.skip("kubectl is not installed: the kustomize overlays cannot be rendered")
    out = subprocess.run([KUBECTL, "kustomize", str(folder)], capture_output=True, text=True,
                         timeout=60)
    assert out.returncode == 0, out.stderr
    return tuple(doc for doc in yaml.safe_load_all(out.stdout) if doc)


@functools.cache
def render(overlay: str) -> tuple[dict, ...]:
    """The objects `kubectl kustomize` renders for one entry of OVERLAYS."""
    if isinstance(OVERLAYS[overlay], str):
        return kustomize(K8S / OVERLAYS[overlay])
    # An overlay with components: a throw-away kustomization that pulls them in by relative
    # paths (kustomize refuses absolute ones), as an operator's own overlay would.
    with tempfile.TemporaryDirectory() as folder:
        base, *components = (os.path.relpath(K8S / part, folder) for part in OVERLAYS[overlay])
        (Path(folder) / "kustomization.yaml").write_text(yaml.safe_dump(
            {"resources": [base], "components": components}))
        return kustomize(folder)


def one(docs, kind: str, name: str) -> dict:
    found = [d for d in docs if d["kind"] == kind and d["metadata"]["name"] == name]
    assert len(found) == 1, f"{kind}/{name}: {len(found)} found"
    return found[0]


def k8s_validate(doc: dict, version: str) -> str:
    """kubernetes-validate's strict check; a kind it has no schema for is a failure here (its
    command line only warns about one, and exits 0)."""
    try:
        return kubernetes_validate.validate(doc, version, strict=True)
    except SchemaNotFoundError as e:
        pytest.fail(e.message)


def closed(schema: dict) -> dict:
    """`schema` with additionalProperties: false on every object schema that lists properties
    and does not preserve unknown fields, so that a misspelt key is an error."""
    schema = dict(schema)
    if "properties" in schema:
        schema["properties"] = {k: closed(v) for k, v in schema["properties"].items()}
        if not schema.get("x-kubernetes-preserve-unknown-fields"):
            schema.setdefault("additionalProperties", False)
    for key in ("items", "additionalProperties", "not"):
        if isinstance(schema.get(key), dict):
            schema[key] = closed(schema[key])
    for key in ("allOf", "anyOf", "oneOf"):
        if key in schema:
            schema[key] = [closed(s) for s in schema[key]]
    return schema


@functools.cache
def kserve_validator(api_version: str, kind: str) -> jsonschema.Draft7Validator:
    if not KSERVE_SCHEMAS.is_dir():
        pytest.skip(f"no KServe CRD schemas at {KSERVE_SCHEMAS}")
    path = KSERVE_SCHEMAS / KSERVE_SCHEMA_FILES[(api_version, kind)]
    return jsonschema.Draft7Validator(closed(json.loads(path.read_text())))


def kserve_errors(doc: dict) -> list[str]:
    key = (doc["apiVersion"], doc["kind"])
    assert key in KSERVE_SCHEMA_FILES, f"no KServe schema for {key}"
    return [f"{'.'.join(map(str, e.absolute_path))}: {e.message}"
            for e in kserve_validator(*key).iter_errors(doc)]


def kserve_docs() -> dict[str, dict]:
    docs = {}
    for path in sorted(KSERVE.glob("*.yaml")):
        for doc in yaml.safe_load_all(path.read_text()):
            docs[f"{path.name}:{doc['kind']}/{doc['metadata']['name']}"] = doc
    return docs


def runtime() -> dict:
    return yaml.safe_load((KSERVE / "servingruntime.yaml").read_text())


def isvc(variant: str) -> dict:
    return yaml.safe_load((KSERVE / f"inferenceservice-{variant}.yaml").read_text())


# --- Kubernetes: renders and validates ----------------------------------------------------


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_overlay_renders_the_expected_objects(overlay):
    assert {(d["kind"], d["metadata"]["name"]) for d in render(overlay)} == OBJECTS


@pytest.mark.parametrize("version", KUBERNETES_VERSIONS)
@pytest.mark.parametrize("overlay", OVERLAYS)
def test_every_rendered_object_validates_strictly(overlay, version):
    failures = {}
    for doc in render(overlay):
        try:
            assert k8s_validate(doc, version) == version
        except kubernetes_validate.ValidationError as e:
            failures[f"{doc['kind']}/{doc['metadata']['name']}"] = (
                f"{'.'.join(map(str, e.path))}: {e.message}")
    assert failures == {}


def test_strict_validation_fails_on_a_misspelt_key_and_an_unknown_kind():
    deployment = one(render("cpu"), "Deployment", "kiln")
    misspelt = {**deployment, "spec": {**deployment["spec"], "replicaz": 2}}
    with pytest.raises(kubernetes_validate.ValidationError, match="replicaz"):
        k8s_validate(misspelt, "1.31")
    monitor = {"apiVersion": "monitoring.coreos.com/v1", "kind": "ServiceMonitor",
               "metadata": {"name": "kiln"}, "spec": {}}
    with pytest.raises(pytest.fail.Exception, match="ServiceMonitor"):
        k8s_validate(monitor, "1.31")


# --- KServe: CRD schemas and annotations --------------------------------------------------


@pytest.mark.parametrize("name", list(kserve_docs()))
def test_kserve_documents_validate_against_closed_crd_schemas(name):
    assert kserve_errors(kserve_docs()[name]) == []


def test_closed_kserve_schema_rejects_a_misspelt_key():
    doc = isvc("raw")
    doc["spec"]["predictor"]["scaleMetrik"] = "cpu"
    doc["spec"]["predictor"]["model"]["storageURI"] = "pvc://x"
    assert sorted(kserve_errors(doc)) == [
        "spec.predictor.model: Additional properties are not allowed ('storageURI' was "
        "unexpected)",
        "spec.predictor: Additional properties are not allowed ('scaleMetrik' was unexpected)"]


def annotations(doc: dict) -> dict[str, str]:
    found = dict(doc["metadata"].get("annotations", {}))
    found.update(doc["spec"].get("predictor", {}).get("annotations", {}))
    return found


@pytest.mark.parametrize("name", list(kserve_docs()))
def test_kserve_annotation_keys_and_values_are_known(name):
    unknown = {k: v for k, v in annotations(kserve_docs()[name]).items()
               if k.startswith(CHECKED_PREFIXES)
               and (k not in ALLOWED_ANNOTATIONS
                    or ALLOWED_ANNOTATIONS[k] is not None and v not in ALLOWED_ANNOTATIONS[k])}
    assert unknown == {}


def test_raw_inferenceservice_passes_kserves_hpa_rules():
    """What KServe's admission webhook asks (validateAutoScalingCompExtension): cpu or memory
    scaling only in Standard mode with the hpa autoscaler class, a cpu target in 1-100, and
    no canary (a traffic split needs Knative)."""
    doc = isvc("raw")
    meta, predictor = annotations(doc), doc["spec"]["predictor"]
    assert meta["serving.kserve.io/deploymentMode"] == "Standard"
    assert meta["serving.kserve.io/autoscalerClass"] == "hpa"
    assert predictor["scaleMetric"] == "cpu" and 1 <= predictor["scaleTarget"] <= 100
    assert 1 <= predictor["minReplicas"] <= predictor["maxReplicas"]
    assert "canaryTrafficPercent" not in predictor


def test_serverless_inferenceservice_scales_on_concurrency_with_a_canary():
    doc = isvc("serverless")
    meta, predictor = annotations(doc), doc["spec"]["predictor"]
    assert meta["serving.kserve.io/deploymentMode"] == "Knative"
    assert "serving.kserve.io/autoscalerClass" not in meta  # Knative's own KPA
    assert predictor["scaleMetric"] == "concurrency"
    assert 1 <= predictor["scaleTarget"] <= predictor["containerConcurrency"]
    assert 0 < predictor["canaryTrafficPercent"] < 100
    assert 1 <= predictor["minReplicas"] <= predictor["maxReplicas"]


@pytest.mark.parametrize("variant", ["raw", "serverless", "grpc"])
def test_inferenceservices_use_kilns_runtime_on_v2(variant):
    sr, model = runtime(), isvc(variant)["spec"]["predictor"]["model"]
    assert model["runtime"] == sr["metadata"]["name"]
    assert sr["spec"]["protocolVersions"] == ["v2", "grpc-v2"]
    assert model["protocolVersion"] == ("grpc-v2" if variant == "grpc" else "v2")
    assert model["modelFormat"]["name"] in {f["name"] for f in sr["spec"]["supportedModelFormats"]}
    assert model["storageUri"]


def test_runtime_reads_its_store_where_kserve_puts_the_model():
    env = {e["name"]: e["value"] for e in runtime()["spec"]["containers"][0]["env"]}
    assert env[contract.ENV["model_store"]] == KSERVE_MODEL_DIR
    assert env[contract.ENV["keys_file"]] == contract.KEYS_FILE
    assert env[contract.ENV["run_dir"]] == contract.RUN_DIR
    assert set(env) <= set(contract.ENV.values())


# --- the contract: settings, mounts, security ---------------------------------------------


def config(docs) -> dict[str, str]:
    return one(docs, "ConfigMap", "kiln-config")["data"]


def pod(docs) -> dict:
    return one(docs, "Deployment", "kiln")["spec"]["template"]


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_configmap_sets_the_contracts_environment(overlay):
    data = config(render(overlay))
    assert set(data) <= set(contract.ENV.values())
    assert data[contract.ENV["model_store"]] == contract.MODEL_STORE
    assert data[contract.ENV["keys_file"]] == contract.KEYS_FILE
    assert data[contract.ENV["run_dir"]] == contract.RUN_DIR
    assert data[contract.ENV["versions_file"]] == contract.VERSIONS_FILE
    env_from = pod(render(overlay))["spec"]["containers"][0]["envFrom"]
    assert env_from == [{"configMapRef": {"name": "kiln-config"}}]


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_termination_grace_outlasts_the_entrypoints_drain(overlay):
    data = config(render(overlay))
    grace, drain = (int(data[contract.ENV[k]]) for k in ("grace_s", "drain_delay_s"))
    spec = pod(render(overlay))["spec"]
    assert 0 < drain < grace < spec["terminationGracePeriodSeconds"]
    assert "lifecycle" not in spec["containers"][0]  # the drain delay does a preStop's job


def test_kserve_runtime_grace_outlasts_the_drain():
    env = {e["name"]: e["value"] for e in runtime()["spec"]["containers"][0]["env"]}
    grace, drain = (int(env[contract.ENV[k]]) for k in ("grace_s", "drain_delay_s"))
    for variant in ("raw", "serverless", "grpc"):
        assert 0 < drain < grace < isvc(variant)["spec"]["predictor"][
            "terminationGracePeriodSeconds"]


def mounts(pod_spec: dict) -> dict[str, dict]:
    """mountPath -> the volume mounted there."""
    volumes = {v["name"]: v for v in pod_spec["volumes"]}
    return {m["mountPath"]: {**volumes[m["name"]], **m}
            for m in pod_spec["containers"][0]["volumeMounts"]}


def check_mounts(pod_spec: dict, model_store_from_volume: bool, versions: bool = False):
    found = mounts(pod_spec)
    if versions:  # optional, a whole folder: a route change reaches running pods
        mounted = found.pop(str(Path(contract.VERSIONS_FILE).parent))
        assert mounted["configMap"] == {"name": "kiln-versions", "optional": True}
        assert mounted["readOnly"] is True and "subPath" not in mounted
    keys = found.pop(str(Path(contract.KEYS_FILE).parent))
    assert keys["secret"]["secretName"] == "kiln-keys" and keys["readOnly"] is True
    assert "subPath" not in keys  # a subPath would never see a rotated key
    assert "emptyDir" in found.pop(contract.RUN_DIR) and "emptyDir" in found.pop("/tmp")
    if model_store_from_volume:
        store = found.pop(contract.MODEL_STORE)
        assert store["persistentVolumeClaim"]["readOnly"] is True and store["readOnly"] is True
    assert found == {}


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_pod_mounts_the_keys_run_dir_and_tmp(overlay):
    check_mounts(pod(render(overlay))["spec"], overlay.endswith("+model-volume"), versions=True)


def test_kserve_runtime_mounts_the_keys_run_dir_and_tmp():
    spec = runtime()["spec"]
    check_mounts(spec, model_store_from_volume=False)


def check_security(pod_security: dict, container_security: dict):
    both = {**pod_security, **container_security}
    assert both["runAsNonRoot"] is True and both["runAsUser"] == contract.USER_ID
    assert both["seccompProfile"] == {"type": "RuntimeDefault"}
    assert container_security["allowPrivilegeEscalation"] is False
    assert container_security["readOnlyRootFilesystem"] is True
    assert container_security["capabilities"] == {"drop": ["ALL"]}


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_pod_runs_unprivileged_on_a_read_only_root(overlay):
    spec = pod(render(overlay))["spec"]
    check_security(spec["securityContext"], spec["containers"][0]["securityContext"])
    assert spec["automountServiceAccountToken"] is False
    assert spec["enableServiceLinks"] is False


def test_kserve_runtime_runs_unprivileged_on_a_read_only_root():
    container = runtime()["spec"]["containers"][0]
    check_security({}, container["securityContext"])
    for variant in ("raw", "serverless", "grpc"):
        assert isvc(variant)["spec"]["predictor"]["securityContext"]["runAsUser"] == \
            contract.USER_ID


def test_gpu_overlay_asks_for_a_gpu_node_and_the_gpu_image():
    spec = pod(render("gpu"))["spec"]
    container = spec["containers"][0]
    assert container["resources"]["limits"]["nvidia.com/gpu"] == 1
    assert container["image"].endswith(":gpu")
    assert spec["nodeSelector"] == {"nvidia.com/gpu.present": "true"}
    assert {"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"} in \
        spec["tolerations"]
    cpu = pod(render("cpu"))["spec"]
    assert "nvidia.com/gpu" not in cpu["containers"][0]["resources"]["limits"]
    assert cpu["containers"][0]["image"].endswith(":cpu")


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_memory_request_covers_the_java_heap(overlay):
    docs = render(overlay)
    heap = config(docs)[contract.ENV["java_heap"]]
    resources = pod(docs)["spec"]["containers"][0]["resources"]
    assert gib(heap) < gib(resources["requests"]["memory"]) <= gib(resources["limits"]["memory"])


def gib(quantity: str) -> float:
    number, unit = re.fullmatch(r"(\d+(?:\.\d+)?)([a-zA-Z]*)", quantity).groups()
    return float(number) * {"g": 1, "Gi": 1, "m": 1 / 1024, "Mi": 1 / 1024}[unit]


# --- the HPA and prometheus-adapter -------------------------------------------------------


def adapter_rule() -> dict:
    rules = yaml.safe_load(ADAPTER_RULES.read_text())["rules"]
    assert len(rules) == 1
    return rules[0]


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_hpa_scales_the_deployment_on_the_adapters_metric_and_cpu(overlay):
    docs = render(overlay)
    hpa = one(docs, "HorizontalPodAutoscaler", "kiln")["spec"]
    assert hpa["scaleTargetRef"] == {"apiVersion": "apps/v1", "kind": "Deployment",
                                     "name": "kiln"}
    assert "replicas" not in one(docs, "Deployment", "kiln")["spec"]
    pods, resource = hpa["metrics"]
    assert pods["type"] == "Pods"
    assert pods["pods"]["metric"]["name"] == adapter_rule()["name"]["as"]
    assert resource == {"type": "Resource", "resource": {
        "name": "cpu", "target": {"type": "Utilization", "averageUtilization": 70}}}
    assert 1 <= hpa["minReplicas"] <= hpa["maxReplicas"]
    # CPU utilisation is measured against the request: the pod must have one.
    assert pod(docs)["spec"]["containers"][0]["resources"]["requests"]["cpu"]


def test_adapter_rule_maps_the_series_to_namespaced_pods():
    rule = adapter_rule()
    series = re.fullmatch(r"(\w+)\{.*\}", rule["seriesQuery"]).group(1)
    assert re.fullmatch(rule["name"]["matches"], series)
    assert rule["resources"]["overrides"] == {"namespace": {"resource": "namespace"},
                                              "pod": {"resource": "pod"}}
    for placeholder in ("<<.Series>>", "<<.LabelMatchers>>", "<<.GroupBy>>"):
        assert placeholder in rule["metricsQuery"]


# --- one port, path and name per concept --------------------------------------------------


def resolve(port, container: dict) -> int:
    """A probe's or Service's target port, by number or by the container port's name."""
    if isinstance(port, int):
        return port
    named = {p["name"]: p["containerPort"] for p in container["ports"]}
    return named[port]


def check_probes(container: dict):
    for probe, path in (("startupProbe", contract.READY_PATH),
                        ("readinessProbe", contract.READY_PATH),
                        ("livenessProbe", contract.LIVE_PATH)):
        get = container[probe]["httpGet"]
        assert (resolve(get["port"], container), get["path"]) == \
            (contract.PUBLIC_PORTS["http"], path), probe


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_container_ports_are_the_public_ports(overlay):
    container = pod(render(overlay))["spec"]["containers"][0]
    assert {p["name"]: p["containerPort"] for p in container["ports"]} == contract.PUBLIC_PORTS


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_services_expose_each_public_port_by_its_name(overlay):
    docs = render(overlay)
    container = pod(docs)["spec"]["containers"][0]
    seen = {}
    for service in ("kiln", "kiln-metrics"):
        spec = one(docs, "Service", service)["spec"]
        assert spec["selector"].items() <= pod(docs)["metadata"]["labels"].items()
        for port in spec["ports"]:
            seen[port["name"]] = (service, port["port"], resolve(port["targetPort"], container))
    expected = {name: ("kiln-metrics" if name == "metrics" else "kiln", number, number)
                for name, number in contract.PUBLIC_PORTS.items()}
    assert seen == expected
    assert one(docs, "Service", "kiln-metrics")["spec"]["clusterIP"] == "None"


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_probes_ask_the_contracts_paths_on_the_http_port(overlay):
    check_probes(pod(render(overlay))["spec"]["containers"][0])


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_scrape_annotations_name_the_metrics_port(overlay):
    found = pod(render(overlay))["metadata"]["annotations"]
    assert found == {"prometheus.io/scrape": "true",
                     "prometheus.io/port": str(contract.PUBLIC_PORTS["metrics"]),
                     "prometheus.io/path": METRICS_PATH}


def test_kserve_runtime_serves_oip_on_its_only_port():
    sr = runtime()
    (container,) = sr["spec"]["containers"]
    (port,) = container["ports"]  # KServe routes to the first port; Knative allows one
    assert port["containerPort"] == contract.PUBLIC_PORTS["oip"]
    assert port["name"] in KNATIVE_PORT_NAMES
    check_probes({**container, "ports": []})
    assert sr["metadata"]["annotations"] == {
        "prometheus.kserve.io/port": str(contract.PUBLIC_PORTS["metrics"]),
        "prometheus.kserve.io/path": METRICS_PATH}


def test_the_grpc_inferenceservice_routes_to_the_oip_grpc_port_as_h2c():
    (port,) = isvc("grpc")["spec"]["predictor"]["model"]["ports"]
    assert port == {"name": "h2c", "containerPort": contract.PUBLIC_PORTS["oip-grpc"],
                    "protocol": "TCP"}


def test_internal_ports_stay_on_loopback_apart_from_the_public_ones(tmp_path):
    internal = contract.INTERNAL_PORTS
    assert not set(vars(internal).values()) & set(contract.PUBLIC_PORTS.values())
    lines = dict(line.split("=", 1) for line in ServerSettings(
        run_dir=tmp_path, model_store=tmp_path, models=[], ports=internal,
    ).config_properties().splitlines())
    assert lines["inference_address"] == f"http://{HOST}:{internal.inference}"
    assert lines["management_address"] == f"http://{HOST}:{internal.management}"
    assert lines["metrics_address"] == f"http://{HOST}:{internal.metrics}"
    assert (lines["grpc_inference_address"], int(lines["grpc_inference_port"])) == \
        (HOST, internal.grpc_inference)
    assert f"{HOST}:{internal.oip}" in lines["vmargs"]

