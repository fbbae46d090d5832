"""The Helm chart (deploy/helm/pagedserve) with the real helm (scripts/tools.sh): `helm lint
--strict` and `helm template` for a matrix of values, the output validated against Kubernetes'
schemas (kubernetes-validate --strict, two versions), and checked against the real server and
gateway rather than constants: every rendered engine flag parses with the CLI's own parser, the
gateway's ConfigMap loads with its own loader, the autoscalers' metric exists on a real server."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import httpx
import pytest
import yaml

from pagedserve.cli import build_parser

ROOT = Path(__file__).resolve().parent.parent
CHART = ROOT / "deploy/helm/pagedserve"
K8S_VERSIONS = ("1.33.0", "1.37.0")
TWO_MODELS = [
    {"name": "small", "servedModelName": "SmolLM2-135M-Instruct", "source": {"type": "image",
                                                                             "path": "/opt/models/SmolLM2-135M-Instruct"},
     "replicas": 2, "resources": {"requests": {"cpu": "2", "memory": "6Gi"}, "limits": {"cpu": "2", "memory": "6Gi"}},
     "gpu": {"count": 0, "resource": "nvidia.com/gpu", "product": ""}, "engineArgs": {"max-model-len": 2048},
     "shutdownTimeout": 30, "shmSize": "1Gi", "nodeSelector": {}, "tolerations": [], "affinity": {},
     "podDisruptionBudget": {"maxUnavailable": 1},
     "autoscaling": {"mode": "keda", "minReplicas": 1, "maxReplicas": 3, "targetWaitingRequests": 4,
                     "scaleDownStabilizationSeconds": 300,
                     "keda": {"pollingInterval": 15, "cooldownPeriod": 300, "prometheusAddress": "http://prom:9090"}}},
    {"name": "llama-8b", "servedModelName": "llama-8b", "source": {"type": "pvc", "claimName": "models",
                                                                   "path": "Llama-3.1-8B-Instruct"},
     "replicas": 1, "resources": {"requests": {"cpu": "8", "memory": "32Gi"}, "limits": {"cpu": "8", "memory": "32Gi"}},
     "gpu": {"count": 1, "resource": "nvidia.com/gpu", "product": "NVIDIA-L4"},
     "engineArgs": {"max-model-len": 8192, "gpu-memory-utilization": 0.9, "enable-prefix-caching": True,
                    "kv-cache-dtype": "fp8_e5m2"},
     "shutdownTimeout": 60, "shmSize": "4Gi", "nodeSelector": {}, "affinity": {},
     "tolerations": [{"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"}],
     "podDisruptionBudget": {"maxUnavailable": 1},
     "autoscaling": {"mode": "hpa", "minReplicas": 1, "maxReplicas": 4, "targetWaitingRequests": 2,
                     "scaleDownStabilizationSeconds": 600, "keda": {}}},
]
HUB = dict(TWO_MODELS[1], name="qwen", servedModelName="qwen2.5-7b",
           source={"type": "hub", "repo": "Qwen/Qwen2.5-7B-Instruct", "tokenSecret": {"name": "hf", "key": "token"},
                   "storage": "40Gi"}, autoscaling=dict(TWO_MODELS[1]["autoscaling"], mode="none"))
SCENARIOS = {
    "default": {},
    "two-models-gpu-pvc-hpa-keda-gateway": {"models": TWO_MODELS, "gateway": {
        "enabled": True, "adminKeySecret": "gw-admin", "providerKeysSecret": "provider-keys",
        "ingress": {"enabled": True, "className": "nginx", "host": "llm.example.com", "tlsSecret": "llm-tls"},
        "dataClaimName": "gateway-data",
        "config": {"backends": [{"name": "openai", "url": "https://api.openai.com/v1", "api_key_env": "OPENAI_API_KEY",
                                 "health_check": False}], "batches": {"dir": "/data/batches"}}},
                                            "serviceMonitor": {"enabled": True}, "dashboard": {"enabled": True}},
    "hub-download": {"models": [HUB], "image": {"tag": "cuda"}},
    "kserve-serverless-canary-gateway": {"kserve": {"enabled": True, "canaryTrafficPercent": 10},
                                         "gateway": {"enabled": True},
                                         "models": [dict(m, storageUri=f"pvc://models/{m['name']}") for m in TWO_MODELS]},
    "kserve-raw-keda": {"kserve": {"enabled": True, "deploymentMode": "RawDeployment", "autoscalerClass": "keda"},
                        "models": [dict(TWO_MODELS[0], storageUri="hf://HuggingFaceTB/SmolLM2-135M-Instruct")]},
}


def helm() -> str:
    path = shutil.which("helm")
    assert path, "helm comes from scripts/tools.sh (scripts/test.sh puts it on PATH)"
    return path


def render(tmp_path: Path, values: dict) -> list[dict]:
    f = tmp_path / "values.yaml"
    f.write_text(yaml.safe_dump(values))
    out = subprocess.run([helm(), "template", "rel", str(CHART), "-f", str(f), "--namespace", "llm"],
                         capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    (tmp_path / "rendered.yaml").write_text(out.stdout)
    return [d for d in yaml.safe_load_all(out.stdout) if d]


@pytest.mark.parametrize("scenario", SCENARIOS)
def test_lint_template_and_validate(tmp_path, scenario):
    values = SCENARIOS[scenario]
    f = tmp_path / "lint-values.yaml"
    f.write_text(yaml.safe_dump(values))
    lint = subprocess.run([helm(), "lint", "--strict", str(CHART), "-f", str(f)], capture_output=True, text=True,
                          timeout=60)
    assert lint.returncode == 0, lint.stdout + lint.stderr
    docs = render(tmp_path, values)
    assert docs
    for v in K8S_VERSIONS:
        r = subprocess.run([sys.executable, "-m", "kubernetes_validate", "--strict", "-k", v, "--quiet",
                            str(tmp_path / "rendered.yaml")], capture_output=True, text=True, timeout=120)
        assert r.returncode == 0, f"kubernetes {v}:\n{r.stdout}\n{r.stderr}"


def engine_args(dep: dict) -> list[str]:
    (c,) = [c for c in dep["spec"]["template"]["spec"]["containers"] if c["name"] == "engine"]
    return c["args"]


def test_rendered_engines_match_the_real_cli_and_server_contract(tmp_path):
    docs = render(tmp_path, SCENARIOS["two-models-gpu-pvc-hpa-keda-gateway"])
    deps = {d["metadata"]["name"]: d for d in docs if d["kind"] == "Deployment"}
    assert set(deps) == {"rel-small", "rel-llama-8b", "rel-gateway"}
    parser = build_parser()
    for name in ("rel-small", "rel-llama-8b"):
        spec = deps[name]["spec"]["template"]["spec"]
        (c,) = spec["containers"]
        args = parser.parse_args(c["args"])  # a flag the server lacks fails here
        assert args.command == "serve" and args.host == "0.0.0.0"
        assert c["ports"][0]["containerPort"] == args.port
        for probe in ("startupProbe", "readinessProbe", "livenessProbe"):
            assert c[probe]["httpGet"] == {"path": "/health", "port": "http"}
        assert spec["terminationGracePeriodSeconds"] > args.shutdown_timeout
        assert spec["securityContext"]["runAsNonRoot"] and c["securityContext"]["readOnlyRootFilesystem"]
    gpu = deps["rel-llama-8b"]["spec"]["template"]["spec"]
    assert gpu["containers"][0]["resources"]["limits"]["nvidia.com/gpu"] == 1
    assert gpu["nodeSelector"] == {"nvidia.com/gpu.product": "NVIDIA-L4"}
    assert parser.parse_args(engine_args(deps["rel-llama-8b"])).model_tag == "/models/Llama-3.1-8B-Instruct"
    assert {v["name"] for v in gpu["volumes"]} >= {"models", "shm"}
    # Autoscalers: HPA on the adapter's metric name, KEDA on the server's own metric and label.
    hpa = next(d for d in docs if d["kind"] == "HorizontalPodAutoscaler")
    assert hpa["spec"]["scaleTargetRef"]["name"] == "rel-llama-8b"
    assert hpa["spec"]["metrics"][0]["pods"]["metric"]["name"] == "vllm_num_requests_waiting"
    so = next(d for d in docs if d["kind"] == "ScaledObject")
    assert so["spec"]["scaleTargetRef"]["name"] == "rel-small" and "replicas" not in deps["rel-small"]["spec"]
    q = so["spec"]["triggers"][0]["metadata"]["query"]
    assert q == 'sum(vllm:num_requests_waiting{model_name="SmolLM2-135M-Instruct", namespace="llm"})'
    sm = next(d for d in docs if d["kind"] == "ServiceMonitor")
    assert sm["spec"]["endpoints"][0]["path"] == "/metrics"
    headless = {d["metadata"]["name"] for d in docs if d["kind"] == "Service" and d["spec"].get("clusterIP") == "None"}
    assert headless == {"rel-small-headless", "rel-llama-8b-headless"}


def test_rendered_gateway_config_loads_with_the_gateways_loader(tmp_path):
    from pagedserve.gateway.config import load_config

    docs = render(tmp_path, SCENARIOS["two-models-gpu-pvc-hpa-keda-gateway"])
    cm = next(d for d in docs if d["kind"] == "ConfigMap" and d["metadata"]["name"] == "rel-gateway")
    path = tmp_path / "gateway.yaml"
    path.write_text(cm["data"]["gateway.yaml"])
    cfg = load_config(path, env={"PAGEDSERVE_GATEWAY_ADMIN_KEY": "x", "OPENAI_API_KEY": "y"})
    assert {m.name: m.pool for m in cfg.models} == {"SmolLM2-135M-Instruct": "small", "llama-8b": "llama-8b"}
    assert cfg.pool("small").discovery.dns == "rel-small-headless.llm.svc.cluster.local"
    assert cfg.server.admin_key_env == "PAGEDSERVE_GATEWAY_ADMIN_KEY" and cfg.server.host == "0.0.0.0"
    dep = next(d for d in docs if d["kind"] == "Deployment" and d["metadata"]["name"] == "rel-gateway")
    (c,) = dep["spec"]["template"]["spec"]["containers"]
    assert build_parser().parse_args(c["args"]).config == "/etc/pagedserve/gateway.yaml"
    assert c["envFrom"] == [{"secretRef": {"name": "provider-keys"}}]  # OPENAI_API_KEY for the config's backend
    assert cfg.backends[0].api_key_env == "OPENAI_API_KEY"
    # batches on, their files and state on the claim mounted at /data
    assert cfg.batches.dir == "/data/batches"
    vols = {v["name"]: v for v in dep["spec"]["template"]["spec"]["volumes"]}
    assert vols["data"]["persistentVolumeClaim"] == {"claimName": "gateway-data"}
    assert {"name": "data", "mountPath": "/data"} in c["volumeMounts"]
    ing = next(d for d in docs if d["kind"] == "Ingress")
    assert ing["spec"]["tls"][0] == {"hosts": ["llm.example.com"], "secretName": "llm-tls"}
    assert ing["spec"]["rules"][0]["http"]["paths"][0]["backend"]["service"]["name"] == "rel-gateway"


def test_the_autoscalers_metric_is_on_a_real_server(server):
    """The KEDA query and the adapter rule read vllm:num_requests_waiting with a model_name label:
    the real server exports exactly that."""
    text = httpx.get(f"{server.url}/metrics", timeout=10).text
    assert any(line.startswith('vllm:num_requests_waiting{') and 'model_name="smol"' in line
               for line in text.splitlines())


def test_bad_values_fail_with_a_message(tmp_path):
    f = tmp_path / "bad.yaml"
    f.write_text(yaml.safe_dump({"models": [dict(TWO_MODELS[0], autoscaling=dict(TWO_MODELS[0]["autoscaling"],
                                                                                   mode="vpa"))]}))
    r = subprocess.run([helm(), "template", "rel", str(CHART), "-f", str(f)], capture_output=True, text=True,
                       timeout=60)
    assert r.returncode != 0 and "autoscaling.mode must be none, hpa or keda" in r.stderr


def test_kserve_renders_a_runtime_and_inference_services_the_cli_accepts(tmp_path):
    """KServe instead of Deployments: the runtime's args plus each model's (KServe appends them)
    parse with the server's CLI; canaryTrafficPercent only where Knative can split traffic;
    the gateway points at the predictor Services and its config loads."""
    from pagedserve.gateway.config import load_config

    docs = render(tmp_path, SCENARIOS["kserve-serverless-canary-gateway"])
    kinds = [d["kind"] for d in docs]
    assert "HorizontalPodAutoscaler" not in kinds and "ScaledObject" not in kinds
    assert {d["metadata"]["name"] for d in docs if d["kind"] == "Deployment"} == {"rel-gateway"}
    (rt,) = [d for d in docs if d["kind"] == "ServingRuntime"]
    isvcs = {d["metadata"]["name"]: d for d in docs if d["kind"] == "InferenceService"}
    assert set(isvcs) == {"rel-small", "rel-llama-8b"}
    for isvc in isvcs.values():
        pred = isvc["spec"]["predictor"]
        assert pred["model"]["runtime"] == rt["metadata"]["name"] and pred["canaryTrafficPercent"] == 10
        assert pred["model"]["storageUri"].startswith("pvc://models/")
        args = build_parser().parse_args(rt["spec"]["containers"][0]["args"] + pred["model"]["args"])
        assert args.model_tag == "/mnt/models" and args.port == rt["spec"]["containers"][0]["ports"][0]["containerPort"]
    assert isvcs["rel-llama-8b"]["spec"]["predictor"]["model"]["resources"]["limits"]["nvidia.com/gpu"] == 1
    cm = next(d for d in docs if d["kind"] == "ConfigMap" and d["metadata"]["name"] == "rel-gateway")
    (tmp_path / "gw.yaml").write_text(cm["data"]["gateway.yaml"])
    cfg = load_config(tmp_path / "gw.yaml", env={})
    assert {b.url for b in cfg.backends} == {"http://rel-small-predictor.llm.svc.cluster.local/v1",
                                             "http://rel-llama-8b-predictor.llm.svc.cluster.local/v1"}
    raw = render(tmp_path, SCENARIOS["kserve-raw-keda"])
    (isvc,) = [d for d in raw if d["kind"] == "InferenceService"]
    ann = isvc["metadata"]["annotations"]
    assert ann == {"serving.kserve.io/deploymentMode": "RawDeployment", "serving.kserve.io/autoscalerClass": "keda"}
    assert "canaryTrafficPercent" not in isvc["spec"]["predictor"]


def test_raw_manifests_validate_and_their_args_parse():
    """deploy/manifests: the no-Helm example, strict against Kubernetes' schemas, flags the CLI takes."""
    path = ROOT / "deploy/manifests/pagedserve.yaml"
    for v in K8S_VERSIONS:
        r = subprocess.run([sys.executable, "-m", "kubernetes_validate", "--strict", "-k", v, "--quiet", str(path)],
                           capture_output=True, text=True, timeout=120)
        assert r.returncode == 0, r.stdout + r.stderr
    dep = next(d for d in yaml.safe_load_all(path.read_text()) if d["kind"] == "Deployment")
    (c,) = dep["spec"]["template"]["spec"]["containers"]
    args = build_parser().parse_args(c["args"])
    assert c["ports"][0]["containerPort"] == args.port
    assert dep["spec"]["template"]["spec"]["terminationGracePeriodSeconds"] > args.shutdown_timeout


CRDS = ROOT / "tests/data/crds"


def strict(schema):
    """Refuse unknown fields where the CRD does not keep them (kubectl's strict validation)."""
    if isinstance(schema, dict):
        out = {k: strict(v) for k, v in schema.items()}
        if "properties" in out and not out.get("x-kubernetes-preserve-unknown-fields") and "additionalProperties" not in out:
            out["additionalProperties"] = False
        return out
    if isinstance(schema, list):
        return [strict(v) for v in schema]
    return schema


def test_custom_resources_match_their_crd_schemas(tmp_path):
    """ScaledObject, ServiceMonitor, ServingRuntime and InferenceService from every scenario,
    validated against KEDA's, the Prometheus operator's and KServe's CRD schemas."""
    import json

    import jsonschema

    schemas = {}
    for f in CRDS.glob("*.json"):
        d = json.loads(f.read_text())
        schema = strict(d["schema"])
        cls = jsonschema.validators.validator_for(schema)
        cls.check_schema(schema)  # once each: jsonschema.validate re-checks the schema on every call
        schemas[(f"{d['crd']['group']}/{d['crd']['version']}", d["crd"]["kind"])] = cls(schema)
    checked = set()
    for name, values in SCENARIOS.items():
        for doc in render(tmp_path, values):
            key = (doc["apiVersion"], doc["kind"])
            if key in schemas:
                schemas[key].validate(doc)
                checked.add(doc["kind"])
    assert checked == {"ScaledObject", "ServiceMonitor", "ServingRuntime", "InferenceService"}
    # And a mistake is caught: a field the CRD does not have.
    bad = next(d for d in render(tmp_path, SCENARIOS["two-models-gpu-pvc-hpa-keda-gateway"])
               if d["kind"] == "ScaledObject")
    bad["spec"]["minReplicas"] = 1  # KEDA's field is minReplicaCount
    with pytest.raises(jsonschema.ValidationError):
        schemas[("keda.sh/v1alpha1", "ScaledObject")].validate(bad)
