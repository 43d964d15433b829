"""deploy/k8s: every kustomization renders, and every object passes its schema.

Kubernetes objects are checked by ``kubernetes-validate`` (the API's own OpenAPI schemas,
strict: unknown fields fail); the KServe objects against KServe's CRD schema, vendored in
deploy/k8s/kserve/crd (see its README). Rendering uses tests/kustomize.py; where kubectl is
installed, a test checks that ``kubectl kustomize`` renders the very same objects.
"""

from __future__ import annotations

import copy
import json
import re
import shutil
import subprocess
from pathlib import Path
from typing import Any

import jsonschema
import kubernetes_validate
import pytest
import yaml

from conftest import ROOT
from kustomize import render
from tinyserve.app import ROUTES
from tinyserve.settings import SETTINGS

K8S = ROOT / "deploy" / "k8s"
KUSTOMIZATIONS = sorted(
    p.parent.relative_to(K8S).as_posix() for p in K8S.rglob("kustomization.yaml")
)
KUBERNETES_VERSION = "1.30.0"
CRDS = K8S / "kserve" / "crd"
GET_PATHS = {r.path for r in ROUTES if r.method == "GET"}
ENV_NAMES = {s.env for s in SETTINGS}
Obj = dict[str, Any]


def strict(schema: Any) -> Any:
    """A CRD's structural schema as JSON Schema that rejects unknown fields, as the API server
    does under kubectl's default strict field validation."""
    if isinstance(schema, list):
        return [strict(s) for s in schema]
    if not isinstance(schema, dict):
        return schema
    out = {k: strict(v) for k, v in schema.items()}
    if "properties" in out and not out.get("x-kubernetes-preserve-unknown-fields"):
        out.setdefault("additionalProperties", False)
    return out


def crd_validator(name: str) -> tuple[str, str, Any]:
    crd = json.loads((CRDS / f"{name}.schema.json").read_text())
    schema = strict(crd["openAPIV3Schema"])
    schema["properties"]["metadata"] = {"type": "object"}  # ObjectMeta, as the API server has it
    return f"{crd['group']}/{crd['version']}", crd["kind"], jsonschema.Draft7Validator(schema)


KSERVE = {
    (api, kind): validator
    for api, kind, validator in map(crd_validator, ("servingruntime", "inferenceservice"))
}


def validate(obj: Obj) -> None:
    crd = KSERVE.get((obj["apiVersion"], obj["kind"]))
    if crd is not None:
        crd.validate(obj)
    else:
        kubernetes_validate.validate(obj, KUBERNETES_VERSION, strict=True)


def objects(folder: str) -> dict[tuple[str, str], Obj]:
    return {(o["kind"], o["metadata"]["name"]): o for o in render(K8S / folder)}


def pod_spec(deployment: Obj) -> Obj:
    return deployment["spec"]["template"]["spec"]  # type: ignore[no-any-return]


def test_the_overlays_are_all_found() -> None:
    assert {"base", "overlays/production", "overlays/s3-direct", "overlays/blue-green",
            "kserve", "prometheus-adapter"} <= set(KUSTOMIZATIONS)  # fmt: skip


@pytest.mark.parametrize("folder", KUSTOMIZATIONS)
def test_every_object_passes_its_schema(folder: str) -> None:
    rendered = objects(folder)
    assert rendered
    for obj in rendered.values():
        validate(obj)


def test_the_validators_reject_what_the_api_server_would() -> None:
    deployment = objects("base")[("Deployment", "tinyserve")]
    typo = copy.deepcopy(deployment)
    pod_spec(typo)["containers"][0]["readinesProbe"] = {}
    with pytest.raises(kubernetes_validate.ValidationError):
        validate(typo)
    runtime = objects("kserve")[("ServingRuntime", "tinyserve")]
    for broken in ({"protocolVersion": ["v2"]}, {"containers": "tinyserve"}):
        bad = copy.deepcopy(runtime)
        bad["spec"].update(broken)
        with pytest.raises(jsonschema.ValidationError):
            validate(bad)


@pytest.mark.skipif(shutil.which("kubectl") is None, reason="kubectl is not installed")
@pytest.mark.parametrize("folder", KUSTOMIZATIONS)
def test_kubectl_kustomize_renders_the_same_objects(folder: str) -> None:
    output = subprocess.run(
        ["kubectl", "kustomize", str(K8S / folder)], capture_output=True, text=True, check=True
    ).stdout
    theirs = {(o["kind"], o["metadata"]["name"]): o for o in yaml.safe_load_all(output)}
    assert objects(folder) == theirs


@pytest.mark.parametrize("folder", ["base", "overlays/production", "overlays/s3-direct"])
def test_the_deployment_is_hardened_probed_and_drains(folder: str) -> None:
    rendered = objects(folder)
    (deployment,) = [o for k, o in rendered.items() if k[0] == "Deployment"]
    (config,) = [o for k, o in rendered.items() if k[0] == "ConfigMap"]
    pod = pod_spec(deployment)
    assert pod["securityContext"]["runAsNonRoot"] is True and pod["securityContext"]["runAsUser"]
    assert pod["automountServiceAccountToken"] is False
    for container in [*pod.get("initContainers", ()), *pod["containers"]]:
        context = container["securityContext"]
        assert context["readOnlyRootFilesystem"] is True
        assert context["allowPrivilegeEscalation"] is False
        assert context["capabilities"]["drop"] == ["ALL"]
        assert set(container["resources"]) == {"requests", "limits"}
        assert {"cpu", "memory"} <= set(container["resources"]["limits"])
    (server,) = pod["containers"]
    probes = {k: server[k]["httpGet"]["path"] for k in ("startupProbe", "readinessProbe",
                                                        "livenessProbe")}  # fmt: skip
    assert probes == {"startupProbe": "/health/ready", "readinessProbe": "/health/ready",
                      "livenessProbe": "/health/live"}  # fmt: skip
    assert set(probes.values()) <= GET_PATHS
    # every TINYSERVE_* variable is a real setting; ONNX Runtime threads fit the CPU limit
    names = set(config["data"]) | {e["name"] for e in server.get("env", ())}
    assert {n for n in names if n.startswith("TINYSERVE_")} <= ENV_NAMES
    assert int(config["data"]["TINYSERVE_THREADS"]) <= int(server["resources"]["limits"]["cpu"])
    # SIGTERM comes after preStop; the pod is killed after the grace period: the drain fits
    pre_stop = int(server["lifecycle"]["preStop"]["exec"]["command"][1])
    drain = float(config["data"]["TINYSERVE_DRAIN_TIMEOUT"])
    assert pod["terminationGracePeriodSeconds"] >= pre_stop + drain + 5
    # the args are options `tinyserve serve` has; the mounted volumes exist
    assert server["args"][:2] == ["tinyserve", "serve"]
    volumes = {v["name"] for v in pod["volumes"]}
    for container in [*pod.get("initContainers", ()), *pod["containers"]]:
        assert {m["name"] for m in container["volumeMounts"]} <= volumes
        assert "/tmp" in {m["mountPath"] for m in container["volumeMounts"]}


def test_models_come_from_s3_by_init_step_or_directly() -> None:
    base = pod_spec(objects("base")[("Deployment", "tinyserve")])
    (pull,) = base["initContainers"]
    assert pull["command"] == ["tinyserve", "pull", "$(MODELS_URI)", "/models"]
    (server,) = base["containers"]
    assert {"name": "TINYSERVE_REPO", "value": "/models"} in server["env"]
    assert {"name": "models", "mountPath": "/models", "readOnly": True} in server["volumeMounts"]

    direct = pod_spec(objects("overlays/s3-direct")[("Deployment", "tinyserve")])
    assert "initContainers" not in direct or direct["initContainers"] == []
    env = [e["name"] for e in direct["containers"][0]["env"]]
    # $(MODELS_URI) expands only if MODELS_URI is defined before TINYSERVE_REPO
    assert env.index("MODELS_URI") < env.index("TINYSERVE_REPO")
    assert {"name": "TINYSERVE_CACHE_DIR", "value": "/models"} in direct["containers"][0]["env"]


@pytest.mark.parametrize("folder", KUSTOMIZATIONS)
def test_references_resolve_within_the_render(folder: str) -> None:
    rendered = objects(folder)
    names = set(rendered)
    for (kind, _), obj in rendered.items():
        if kind == "Deployment":
            labels = obj["spec"]["template"]["metadata"]["labels"]
            assert obj["spec"]["selector"]["matchLabels"].items() <= labels.items()
            for container in [*pod_spec(obj).get("initContainers", ()),
                              *pod_spec(obj)["containers"]]:  # fmt: skip
                refs = [s["configMapRef"]["name"] for s in container.get("envFrom", ())
                        if "configMapRef" in s]  # fmt: skip
                refs += [e["valueFrom"]["configMapKeyRef"]["name"]
                         for e in container.get("env", ()) if "valueFrom" in e]  # fmt: skip
                assert {("ConfigMap", r) for r in refs} <= names
        if kind == "HorizontalPodAutoscaler":
            target = obj["spec"]["scaleTargetRef"]
            assert (target["kind"], target["name"]) in names
        if kind in ("Service", "PodDisruptionBudget"):
            selector = obj["spec"]["selector"]
            selector = selector.get("matchLabels", selector)
            pods = [pod_labels for (k, _), o in rendered.items() if k == "Deployment"
                    for pod_labels in [o["spec"]["template"]["metadata"]["labels"]]]  # fmt: skip
            assert any(selector.items() <= p.items() for p in pods), (kind, selector)


def test_blue_green_runs_both_colors_and_the_live_service_picks_one() -> None:
    rendered = objects("overlays/blue-green")
    deployments = {n: o for (k, n), o in rendered.items() if k == "Deployment"}
    assert set(deployments) == {"tinyserve-blue", "tinyserve-green"}
    images = {n: pod_spec(o)["containers"][0]["image"] for n, o in deployments.items()}
    assert images == {"tinyserve-blue": "ghcr.io/example/tinyserve:0.1.0",
                      "tinyserve-green": "ghcr.io/example/tinyserve:0.2.0"}  # fmt: skip
    live = rendered[("Service", "tinyserve")]
    color = live["spec"]["selector"]["color"]
    assert live["metadata"]["annotations"]["tinyserve.dev/live-color"] == color == "blue"
    matched = [n for n, o in deployments.items()
               if live["spec"]["selector"].items()
               <= o["spec"]["template"]["metadata"]["labels"].items()]  # fmt: skip
    assert matched == ["tinyserve-blue"]
    assert {("Service", "tinyserve-green"), ("PodDisruptionBudget", "tinyserve-green")} <= set(
        rendered
    )


def test_the_hpa_scales_on_cpu_and_the_adapters_p99_metric(tmp_path: Path) -> None:
    hpa = objects("overlays/production")[("HorizontalPodAutoscaler", "tinyserve")]
    deployment = objects("overlays/production")[("Deployment", "tinyserve")]
    assert pod_spec(deployment)["containers"][0]["image"] == "ghcr.io/example/tinyserve:0.1.0"
    kinds = {m["type"]: m for m in hpa["spec"]["metrics"]}
    assert kinds["Resource"]["resource"]["name"] == "cpu"
    metric = kinds["Pods"]["pods"]["metric"]["name"]
    adapter = objects("prometheus-adapter")[("ConfigMap", "adapter-config")]
    (rule,) = yaml.safe_load(adapter["data"]["config.yaml"])["rules"]
    assert rule["name"]["as"] == metric
    series = re.match(r"^(\w+)\{", rule["seriesQuery"])
    assert series is not None and re.match(rule["name"]["matches"], series.group(1))
    assert series.group(1).removesuffix("_bucket") in _metric_names()
    # the query is valid PromQL once the adapter has filled in its template
    query = (
        rule["metricsQuery"]
        .replace("<<.Series>>", series.group(1))
        .replace("<<.LabelMatchers>>", 'namespace="tinyserve",pod=~"tinyserve-.*"')
        .replace("<<.GroupBy>>", "pod")
    )
    promtool = shutil.which("promtool")
    if promtool is None:
        pytest.skip("promtool is not installed (make data installs the prometheus package)")
    rules = tmp_path / "rules.yml"
    rules.write_text(yaml.safe_dump({"groups": [{"name": "adapter", "rules": [
        {"record": "adapter:query", "expr": query}]}]}))  # fmt: skip
    check = subprocess.run([promtool, "check", "rules", str(rules)], capture_output=True, text=True)
    assert check.returncode == 0, check.stdout + check.stderr


def test_kserve_runs_tinyserve_as_a_v2_runtime() -> None:
    rendered = objects("kserve")
    runtime = rendered[("ServingRuntime", "tinyserve")]
    (service,) = [o for (k, _), o in rendered.items() if k == "InferenceService"]
    model = service["spec"]["predictor"]["model"]
    assert model["runtime"] == runtime["metadata"]["name"]
    assert model["protocolVersion"] in runtime["spec"]["protocolVersions"] == ["v2"]
    formats = {(f["name"], f["version"]) for f in runtime["spec"]["supportedModelFormats"]}
    assert (model["modelFormat"]["name"], model["modelFormat"]["version"]) in formats
    (container,) = runtime["spec"]["containers"]
    assert container["name"] == "kserve-container"  # the name KServe injects storage into
    args = container["args"]
    assert args[:2] == ["tinyserve", "serve"] and args[args.index("--repo") + 1] == "/mnt/models"
    assert args[args.index("--port") + 1] == str(container["ports"][0]["containerPort"]) == "8080"
    for probe in ("readinessProbe", "livenessProbe"):
        assert container[probe]["httpGet"]["path"] in GET_PATHS
        assert container[probe]["httpGet"]["path"].startswith("/v2/")
    # the InferenceService's name is the model name V2 routes use: a model of the repository
    assert (ROOT / "models" / service["metadata"]["name"]).is_dir()


def _metric_names() -> set[str]:
    from tinyserve.metrics import Metrics

    return {family.name for family in Metrics().registry.collect()}
