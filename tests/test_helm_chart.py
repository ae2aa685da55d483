"""The Helm chart (deploy/helm/autojudge), rendered offline by Helm's own engine (the helm-python-sdk wheel binds
Helm's Go SDK) and each core manifest validated against the Kubernetes OpenAPI schemas that kubernetes-validate
ships; the CRD manifests (KEDA ScaledObject, ServiceMonitor) are checked field by field. Also checked: the
environment is settings the server accepts, the probes and grace period fit the server's loading and drain, and
bad values fail against values.schema.json, naming the value. No cluster is contacted."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import pytest
import yaml

from live import missing
from server.settings import load_settings

CHART = Path(__file__).resolve().parents[1] / "deploy" / "helm" / "autojudge"
KUBERNETES = "1.33.0"  # schemas of a release the chart's API versions (apps/v1, policy/v1, autoscaling/v2) serve


def helm() -> Any:
    try:
        import helm_python
    except ImportError:
        missing("helm-python-sdk is not installed (the dev extra brings it)")
    return helm_python


def render(values: dict[str, Any] | None = None) -> dict[str, dict[str, Any]]:
    """The manifests by kind, from a release `aj` in namespace `serve`."""
    with helm().Chart.load(str(CHART)) as chart:
        rendered = chart.render(values or {}, name="aj", namespace="serve")
    docs = [d for path, text in rendered.items() if path.endswith(".yaml") for d in yaml.safe_load_all(text) if d]
    kinds = [d["kind"] for d in docs]
    assert len(kinds) == len(set(kinds)), kinds
    return {d["kind"]: d for d in docs}


def container(manifests: dict[str, dict[str, Any]]) -> dict[str, Any]:
    (server,) = manifests["Deployment"]["spec"]["template"]["spec"]["containers"]
    return server


def env(manifests: dict[str, dict[str, Any]]) -> dict[str, str]:
    return {e["name"]: e["value"] for e in container(manifests)["env"] if "value" in e}


VARIANTS = {
    "defaults": {},
    "gpu, keda, service monitor, volumes, api key": {
        "device": "gpu",
        "autoscaling": {"mode": "keda"},
        "metrics": {"serviceMonitor": {"enabled": True}},
        "cache": {"existingClaim": "autojudge-cache"},
        "models": {"existingClaim": "autojudge-models"},
        "server": {"target": "/models/t.gguf", "draft": "/models/d.gguf", "heads": "/models/h", "apiKeySecret": "s"},
    },
    "hpa": {"autoscaling": {"mode": "hpa"}},
}


def test_the_chart_lints_clean():
    report = helm().lint(str(CHART), strict=True, kube_version=f"v{KUBERNETES}")
    assert report["errors"] == [] and all(m["severity"] < 2 for m in report["messages"]), report


@pytest.mark.parametrize("values", VARIANTS.values(), ids=VARIANTS.keys())
def test_every_core_manifest_is_valid_for_kubernetes(values):
    import kubernetes_validate

    for kind, manifest in render(values).items():
        if manifest["apiVersion"].split("/")[0] in ("keda.sh", "monitoring.coreos.com"):
            continue  # CRDs: no schema ships for them; see the next tests
        try:
            kubernetes_validate.validate(manifest, KUBERNETES, strict=True)
        except kubernetes_validate.ValidationError as e:
            pytest.fail(f"{kind}: {e.message} at {list(e.path)}")


@pytest.mark.parametrize("values", VARIANTS.values(), ids=VARIANTS.keys())
def test_the_environment_is_settings_the_server_accepts(values):
    variables = env(render(values))
    settings = load_settings([], variables)  # raises on an unknown value
    assert settings.host == "0.0.0.0" and settings.port == 8000
    assert settings.vllm_metrics and settings.served_model_name == "autojudge"
    assert settings.drain_grace == 5 and settings.shutdown_timeout == 60
    known = {f"AUTOJUDGE_{name.upper()}" for name in type(settings).__dataclass_fields__}
    assert set(variables) <= known, set(variables) - known


def test_probes_and_grace_period_fit_loading_and_drain():
    manifests = render()
    pod, server = manifests["Deployment"]["spec"]["template"]["spec"], container(manifests)
    ready, startup = server["readinessProbe"], server["startupProbe"]
    assert ready["httpGet"]["path"] == "/ready"
    assert startup["httpGet"]["path"] == server["livenessProbe"]["httpGet"]["path"] == "/health"
    assert startup["periodSeconds"] * startup["failureThreshold"] >= 600  # a model load is minutes
    variables = env(manifests)
    grace, drain = float(variables["AUTOJUDGE_DRAIN_GRACE"]), float(variables["AUTOJUDGE_SHUTDOWN_TIMEOUT"])
    assert ready["periodSeconds"] * ready["failureThreshold"] < grace  # unready before the replica refuses work
    assert pod["terminationGracePeriodSeconds"] > grace + drain  # no SIGKILL while requests finish
    strategy = manifests["Deployment"]["spec"]["strategy"]["rollingUpdate"]
    assert strategy["maxUnavailable"] == 0 and manifests["PodDisruptionBudget"]["spec"]["maxUnavailable"] == 1
    annotations = manifests["Deployment"]["spec"]["template"]["metadata"]["annotations"]
    assert annotations["prometheus.io/scrape"] == "true" and annotations["prometheus.io/path"] == "/metrics"
    assert {"HorizontalPodAutoscaler", "ScaledObject", "ServiceMonitor"}.isdisjoint(manifests)


def test_gpu_keda_and_service_monitor():
    manifests = render(VARIANTS["gpu, keda, service monitor, volumes, api key"])
    server = container(manifests)
    assert server["image"].endswith(":cuda") and env(manifests)["AUTOJUDGE_DEVICE"] == "cuda"
    assert server["resources"]["limits"]["nvidia.com/gpu"] == 1
    assert {"name": "models", "mountPath": "/models", "readOnly": True} in server["volumeMounts"]
    keda = manifests["ScaledObject"]["spec"]
    assert keda["scaleTargetRef"]["name"] == manifests["Deployment"]["metadata"]["name"]
    (trigger,) = keda["triggers"]
    assert trigger["type"] == "prometheus" and "autojudge_num_requests_waiting" in trigger["metadata"]["query"]
    assert float(trigger["metadata"]["threshold"]) > 0
    assert "replicas" not in manifests["Deployment"]["spec"]  # the autoscaler owns the count
    endpoint = manifests["ServiceMonitor"]["spec"]["endpoints"][0]
    assert endpoint["port"] == manifests["Service"]["spec"]["ports"][0]["name"] and endpoint["path"] == "/metrics"
    selector = manifests["ServiceMonitor"]["spec"]["selector"]["matchLabels"]
    assert selector.items() <= manifests["Service"]["metadata"]["labels"].items()


def test_hpa_scales_on_waiting_requests_per_pod():
    hpa = render(VARIANTS["hpa"])["HorizontalPodAutoscaler"]["spec"]
    (metric,) = hpa["metrics"]
    assert metric["pods"]["metric"]["name"] == "autojudge_num_requests_waiting"
    assert hpa["minReplicas"] <= hpa["maxReplicas"]


@pytest.mark.parametrize(
    ("values", "where"),
    [
        ({"device": "tpu"}, "/device"),
        ({"autoscaling": {"mode": "vpa"}}, "/autoscaling/mode"),
        ({"replicaCount": "two"}, "/replicaCount"),
        ({"server": {"maxSlots": 0}}, "/server/maxSlots"),
        ({"sever": {"maxSlots": 4}}, "'sever' not allowed"),  # a typo is an error, not a silent default
    ],
)
def test_bad_values_fail_naming_the_value(values, where):
    with pytest.raises(Exception, match=re.escape(where)):
        render(values)
