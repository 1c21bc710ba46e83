"""Tests for the Helm chart in helm/fallback-proxy.

The chart is linted and rendered by Helm's own Go library through
helm-python-sdk (no helm binary, no cluster), and every rendered object is
validated against the Kubernetes JSON schemas shipped by kubernetes-validate,
strictly (unknown fields are errors). ServiceMonitor is a CRD those schemas do
not cover: it is checked structurally instead.
"""

from __future__ import annotations

import base64
import copy
import hashlib
import json
from collections.abc import Callable, Iterator, Mapping
from pathlib import Path
from typing import Any

import helm_python as helm
import pytest
import yaml
from kubernetes_validate import utils as kubernetes_validate

from proxy.config import load_config, parse_config

ROOT = Path(__file__).resolve().parents[1]
CHART = ROOT / "helm" / "fallback-proxy"
VALUES = yaml.safe_load((CHART / "values.yaml").read_text(encoding="utf-8"))
# Read as `helm -f` reads it (Helm's YAML rules differ from PyYAML's).
PRODUCTION = helm.values_from_yaml((CHART / "values-production.yaml").read_text(encoding="utf-8"))
KUBE_VERSION = kubernetes_validate.latest_version()  # the newest schemas the package ships
CRDS = {("monitoring.coreos.com/v1", "ServiceMonitor")}
RELEASE, NAMESPACE = "fp", "llm"
FULLNAME = f"{RELEASE}-fallback-proxy"
APP_PORT = 8080
# Every variable the default routing config references, set to a dummy value.
DUMMY_ENV = {
    name: f"dummy-{name.lower()}"
    for name in (
        "OPENAI_API_KEY",
        "ANTHROPIC_API_KEY",
        "GEMINI_API_KEY",
        "GROQ_API_KEY",
        "PROXY_API_KEY",
        "PROXY_ADMIN_KEY",
    )
} | {"REDIS_URL": "redis://redis:6379/0", "OLLAMA_URL": "http://ollama:11434"}

Manifests = list[dict[str, Any]]


class Rendered:
    """One render of the chart: the objects, by kind and name, and NOTES.txt."""

    def __init__(self, files: Mapping[str, str]) -> None:
        self.notes = ""
        self.objects: Manifests = []
        for path, text in files.items():
            if path.endswith("NOTES.txt"):
                self.notes = text
                continue
            self.objects.extend(doc for doc in yaml.safe_load_all(text) if doc)

    def all(self, kind: str) -> Manifests:
        return [o for o in self.objects if o["kind"] == kind]

    def one(self, kind: str, name: str = FULLNAME) -> dict[str, Any]:
        (found,) = [o for o in self.all(kind) if o["metadata"]["name"] == name]
        return found

    def container(self, name: str = FULLNAME) -> dict[str, Any]:
        containers: list[dict[str, Any]] = self.one("Deployment", name)["spec"]["template"]["spec"]["containers"]
        (container,) = containers
        return container

    def env(self) -> dict[str, str]:
        return {e["name"]: e.get("value", "") for e in self.container().get("env", [])}

    def config_text(self) -> str:
        text = self.one("ConfigMap")["data"]["config.yaml"]
        assert isinstance(text, str)
        return text


@pytest.fixture(scope="module")
def chart() -> Iterator[helm.Chart]:
    with helm.Chart.load(CHART) as loaded:
        yield loaded


@pytest.fixture(scope="module")
def render(chart: helm.Chart) -> Callable[..., Rendered]:
    def render(values: dict[str, Any] | None = None) -> Rendered:
        return Rendered(chart.render(values=values or {}, name=RELEASE, namespace=NAMESPACE))

    return render


@pytest.fixture(scope="module")
def default(render: Callable[..., Rendered]) -> Rendered:
    return render()


@pytest.fixture(scope="module")
def production(render: Callable[..., Rendered]) -> Rendered:
    return render(PRODUCTION)


SCENARIOS: dict[str, dict[str, Any]] = {
    "default": {},
    "production": PRODUCTION,
    "in-chart redis, no autoscaling, dashboard": {
        "redis": {"enabled": True},
        "autoscaling": {"enabled": False},
        "grafanaDashboard": {"enabled": True},
        "metrics": {"serviceMonitor": {"enabled": True}},
        "extraEnv": [{"name": "OLLAMA_URL", "value": "http://ollama.ollama:11434"}],
    },
    "existing secret, one replica": {
        "existingSecret": "my-keys",
        "autoscaling": {"enabled": False},
        "replicaCount": 1,
        "serviceAccount": {"create": False},
    },
}


# --- lint and schema validation -------------------------------------------------------


@pytest.mark.parametrize("values", [{}, PRODUCTION], ids=["default", "production"])
def test_lint_is_clean(values: dict[str, Any]) -> None:
    report = helm.lint(CHART, values, strict=True, kube_version=f"v{KUBE_VERSION}")
    assert report["errors"] == []
    assert [m for m in report["messages"] if m["severity"] >= 2] == []  # 2 warning, 3 error


@pytest.mark.parametrize("values", SCENARIOS.values(), ids=SCENARIOS.keys())
def test_every_object_matches_the_kubernetes_schema(render: Callable[..., Rendered], values: dict[str, Any]) -> None:
    rendered = render(values)
    assert rendered.objects
    for obj in rendered.objects:
        if (obj["apiVersion"], obj["kind"]) in CRDS:
            continue  # no schema shipped for CRDs; see test_service_monitor
        try:
            kubernetes_validate.validate(obj, KUBE_VERSION, strict=True)
        except kubernetes_validate.ValidationError as exc:
            where = ".".join(str(p) for p in exc.path)
            pytest.fail(f"{obj['kind']}/{obj['metadata']['name']}: {where}: {exc.message}")
        assert obj["metadata"]["labels"]["app.kubernetes.io/instance"] == RELEASE


def test_the_validator_rejects_unknown_fields(default: Rendered) -> None:
    deployment = copy.deepcopy(default.one("Deployment"))
    deployment["spec"]["template"]["spec"]["containers"][0]["readinesProbe"] = {}
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(deployment, KUBE_VERSION, strict=True)


def test_bad_values_fail_the_render(chart: helm.Chart) -> None:
    with pytest.raises(helm.HelmRenderError, match="terminationGracePeriodSeconds"):
        chart.render(values={"terminationGracePeriodSeconds": 20}, name=RELEASE)
    with pytest.raises(helm.HelmRenderError, match="maxReplicas"):
        chart.render(values={"autoscaling": {"minReplicas": 5, "maxReplicas": 3}}, name=RELEASE)
    # A bare `on:` in a values file reaches the chart as the key "true".
    bare_on = helm.values_from_yaml("routing:\n  routes:\n    coding:\n      on: {claude: {default: groq-llama}}\n")
    assert "true" in bare_on["routing"]["routes"]["coding"]
    with pytest.raises(helm.HelmRenderError, match=r"routing\.routes\.coding: quote the key"):
        chart.render(values=bare_on, name=RELEASE)


# --- the proxy Deployment -----------------------------------------------------------------


@pytest.mark.parametrize("scenario", ["default", "production"])
def test_probes(scenario: str, default: Rendered, production: Rendered) -> None:
    rendered = {"default": default, "production": production}[scenario]
    container = rendered.container()
    assert container["ports"] == [{"name": "http", "containerPort": APP_PORT, "protocol": "TCP"}]
    paths = {
        probe: (container[probe]["httpGet"]["path"], container[probe]["httpGet"]["port"])
        for probe in ("startupProbe", "readinessProbe", "livenessProbe")
    }
    assert paths == {
        "startupProbe": ("/healthz", "http"),
        "readinessProbe": ("/readyz", "http"),
        "livenessProbe": ("/healthz", "http"),
    }
    assert container["args"] == ["serve", "--host", "0.0.0.0", "--port", str(APP_PORT)]
    assert "command" not in container, "the image's ENTRYPOINT is the console script"


def test_cli_accepts_the_args(default: Rendered) -> None:
    from proxy import cli

    args = default.container()["args"]
    if args[0] not in cli.COMMANDS:
        pytest.skip(f"the CLI has no {args[0]!r} subcommand yet")
    parsed = cli.build_parser().parse_args(args)
    assert (parsed.host, parsed.port) == ("0.0.0.0", APP_PORT)


def test_replicas_and_autoscaling(default: Rendered, production: Rendered, render: Callable[..., Rendered]) -> None:
    for rendered in (default, production):
        hpa = rendered.one("HorizontalPodAutoscaler")
        assert hpa["apiVersion"] == "autoscaling/v2"
        assert hpa["spec"]["scaleTargetRef"] == {
            "apiVersion": "apps/v1",
            "kind": "Deployment",
            "name": FULLNAME,
        }
        assert hpa["spec"]["minReplicas"] >= 2
        assert hpa["spec"]["maxReplicas"] >= hpa["spec"]["minReplicas"]
        (metric,) = hpa["spec"]["metrics"]
        assert metric["resource"]["name"] == "cpu"
        # The HPA owns the count: a fixed replicas would reset it on every upgrade.
        assert "replicas" not in rendered.one("Deployment")["spec"]
        assert rendered.container()["resources"]["requests"]["cpu"]
    assert (
        default.one("HorizontalPodAutoscaler")["spec"]["minReplicas"],
        default.one("HorizontalPodAutoscaler")["spec"]["maxReplicas"],
    ) == (2, 10)
    assert production.one("HorizontalPodAutoscaler")["spec"]["minReplicas"] == 3

    fixed = render({"autoscaling": {"enabled": False}})
    assert fixed.all("HorizontalPodAutoscaler") == []
    assert fixed.one("Deployment")["spec"]["replicas"] == VALUES["replicaCount"] >= 2


def test_pod_disruption_budget(default: Rendered, render: Callable[..., Rendered]) -> None:
    pdb = default.one("PodDisruptionBudget")
    assert pdb["spec"]["minAvailable"] == 1
    assert pdb["spec"]["selector"]["matchLabels"] == (default.one("Deployment")["spec"]["selector"]["matchLabels"])
    single = render({"autoscaling": {"enabled": False}, "replicaCount": 1})
    assert single.all("PodDisruptionBudget") == [], "would block every node drain"


@pytest.mark.parametrize("values", SCENARIOS.values(), ids=SCENARIOS.keys())
def test_security_context(render: Callable[..., Rendered], values: dict[str, Any]) -> None:
    rendered = render(values)
    for deployment in rendered.all("Deployment"):
        pod = deployment["spec"]["template"]["spec"]
        assert pod["securityContext"]["runAsNonRoot"] is True
        assert pod["securityContext"]["seccompProfile"] == {"type": "RuntimeDefault"}
        assert pod["automountServiceAccountToken"] is False
        for container in pod["containers"]:
            sc = container["securityContext"]
            assert sc["runAsNonRoot"] is True and sc["runAsUser"] > 0
            assert sc["readOnlyRootFilesystem"] is True
            assert sc["allowPrivilegeEscalation"] is False
            assert sc["capabilities"] == {"drop": ["ALL"]}
            assert sc["seccompProfile"] == {"type": "RuntimeDefault"}
            assert container["resources"]["limits"]["memory"]
    assert rendered.container()["securityContext"]["runAsUser"] == 10001


def test_writable_tmp_and_config_mount(default: Rendered) -> None:
    pod = default.one("Deployment")["spec"]["template"]["spec"]
    volumes = {v["name"]: v for v in pod["volumes"]}
    mounts = {m["mountPath"]: m for m in default.container()["volumeMounts"]}
    assert "emptyDir" in volumes[mounts["/tmp"]["name"]]
    config = mounts["/etc/fallback-proxy/"]
    assert config["readOnly"] is True and "subPath" not in config, "subPath mounts never update"
    assert volumes[config["name"]]["configMap"]["name"] == FULLNAME
    assert default.env()["FALLBACK_PROXY_CONFIG"] == "/etc/fallback-proxy/config.yaml"
    assert "config.yaml" in default.one("ConfigMap")["data"]


def grace_of(rendered: Rendered) -> tuple[int, float]:
    """The pod's termination grace, and the app's drain time in its rendered config."""
    pod = rendered.one("Deployment")["spec"]["template"]["spec"]
    config = parse_config(yaml.safe_load(rendered.config_text()), environ=DUMMY_ENV)
    return pod["terminationGracePeriodSeconds"], config.server.shutdown_grace_seconds


def test_termination_grace_outlasts_the_drain(default: Rendered, render: Callable[..., Rendered]) -> None:
    pre_stop = default.container()["lifecycle"]["preStop"]["exec"]["command"]
    assert pre_stop == ["sleep", str(VALUES["preStopSleepSeconds"])]
    termination, drain = grace_of(default)
    assert drain == VALUES["shutdownGraceSeconds"] == 30, "the chart's default is the app's"
    assert termination > VALUES["preStopSleepSeconds"] + drain
    # The app's own setting, when the routing config has it, wins.
    termination, drain = grace_of(render({"routing": {"server": {"shutdown_grace_seconds": 90}}}))
    assert drain == 90
    assert termination > VALUES["preStopSleepSeconds"] + drain
    explicit = render({"terminationGracePeriodSeconds": 120})
    assert explicit.one("Deployment")["spec"]["template"]["spec"]["terminationGracePeriodSeconds"] == 120


def test_service(default: Rendered) -> None:
    service = default.one("Service")
    assert service["spec"]["type"] == "ClusterIP"
    assert service["spec"]["ports"] == [{"name": "http", "port": 80, "targetPort": "http", "protocol": "TCP"}]
    pod_labels = default.one("Deployment")["spec"]["template"]["metadata"]["labels"]
    assert service["spec"]["selector"].items() <= pod_labels.items()


# --- the routing config ---------------------------------------------------------------------


@pytest.mark.parametrize("scenario", ["default", "production"])
def test_configmap_is_the_routing_values(
    scenario: str, chart: helm.Chart, default: Rendered, production: Rendered, tmp_path: Path
) -> None:
    rendered = {"default": default, "production": production}[scenario]
    text = rendered.config_text()
    # values.yaml as PyYAML reads it; with production overrides, as Helm merges them.
    expected = VALUES["routing"] if scenario == "default" else (chart.merge_values(PRODUCTION)["routing"])
    assert yaml.safe_load(text) == expected
    # Valid for the app, as parsed data and through its own (strict) YAML loader.
    config = parse_config(yaml.safe_load(text), environ=DUMMY_ENV)
    assert {"default", "private"} <= config.routes.keys()
    assert config.routes["private"].local_only
    path = tmp_path / "config.yaml"
    path.write_text(text, encoding="utf-8")
    assert load_config(path, environ=DUMMY_ENV).routes.keys() == config.routes.keys()


def test_routing_uses_env_references_for_every_key() -> None:
    routing = VALUES["routing"]
    for name, provider in routing["providers"].items():
        if "api_key" in provider:
            assert provider["api_key"].startswith("${"), f"{name}: a literal key in values"
    assert routing["redis"]["url"].startswith("${REDIS_URL")
    assert all(key.startswith("${") for key in routing["auth"]["keys"])


def test_no_secret_value_reaches_a_configmap(render: Callable[..., Rendered]) -> None:
    secrets = {key: f"sentinel-{key.lower()}-5f2a" for key in VALUES["secrets"]}
    rendered = render({"secrets": secrets, "grafanaDashboard": {"enabled": True}})
    (secret,) = rendered.all("Secret")
    decoded = {k: base64.b64decode(v).decode() for k, v in secret["data"].items()}
    assert decoded == secrets
    public = json.dumps(rendered.all("ConfigMap") + rendered.all("Deployment")) + rendered.notes
    for value in secrets.values():
        assert value not in public
    envfrom = rendered.container()["envFrom"]
    assert envfrom == [{"secretRef": {"name": secret["metadata"]["name"]}}]


def test_checksum_follows_the_routing_config(default: Rendered, render: Callable[..., Rendered]) -> None:
    def checksum(rendered: Rendered) -> str:
        annotations = rendered.one("Deployment")["spec"]["template"]["metadata"]["annotations"]
        value = annotations["checksum/config"]
        assert isinstance(value, str)
        return value

    text = default.config_text()
    assert checksum(default) == hashlib.sha256(text.removesuffix("\n").encode()).hexdigest()
    changed = render({"routing": {"routes": {"default": ["claude", "local-qwen"]}}})
    assert yaml.safe_load(changed.config_text())["routes"]["default"] == ["claude", "local-qwen"]
    assert checksum(changed) != checksum(default)
    unrelated = render({"resources": {"requests": {"cpu": "300m"}}, "replicaCount": 4})
    assert checksum(unrelated) == checksum(default)


def test_existing_secret(render: Callable[..., Rendered], default: Rendered) -> None:
    rendered = render({"existingSecret": "my-keys"})
    assert rendered.all("Secret") == []
    assert rendered.container()["envFrom"] == [{"secretRef": {"name": "my-keys"}}]
    annotations = rendered.one("Deployment")["spec"]["template"]["metadata"]["annotations"]
    assert "checksum/secret" not in annotations
    assert "my-keys" in rendered.notes
    # The chart's own Secret, by contrast, rolls the pods when keys change.
    assert "checksum/secret" in default.one("Deployment")["spec"]["template"]["metadata"]["annotations"]
    assert default.container()["envFrom"] == [{"secretRef": {"name": FULLNAME}}]


# --- Redis --------------------------------------------------------------------------------


def test_redis_url_from_values(render: Callable[..., Rendered], default: Rendered, production: Rendered) -> None:
    assert "REDIS_URL" not in default.env(), "unset: the Secret's REDIS_URL, if any, applies"
    assert "WARNING" in default.notes and "Redis" in default.notes
    assert production.env()["REDIS_URL"] == PRODUCTION["redis"]["url"]
    assert "WARNING" not in production.notes
    rendered = render({"redis": {"url": "rediss://cache.internal:6380/1"}})
    assert rendered.env()["REDIS_URL"] == "rediss://cache.internal:6380/1"
    assert [d["metadata"]["name"] for d in rendered.all("Deployment")] == [FULLNAME]


def test_in_chart_redis(render: Callable[..., Rendered]) -> None:
    rendered = render({"redis": {"enabled": True}})
    name = f"{FULLNAME}-redis"
    service = rendered.one("Service", name)
    assert service["spec"]["ports"][0]["port"] == 6379
    assert rendered.env()["REDIS_URL"] == f"redis://{name}:6379/0"
    deployment = rendered.one("Deployment", name)
    pod = deployment["spec"]["template"]["spec"]
    redis_labels = deployment["spec"]["template"]["metadata"]["labels"]
    assert pod["securityContext"]["runAsUser"] != 0
    (container,) = pod["containers"]
    assert "--appendonly" in container["args"] and "--save" in container["args"]
    assert all("persistentVolumeClaim" not in v for v in pod["volumes"])
    assert service["spec"]["selector"].items() <= redis_labels.items()
    # The proxy's Service and PDB must not pick up the Redis pod, nor the reverse.
    proxy_selector = rendered.one("Service")["spec"]["selector"]
    assert not proxy_selector.items() <= redis_labels.items()
    proxy_labels = rendered.one("Deployment")["spec"]["template"]["metadata"]["labels"]
    assert not service["spec"]["selector"].items() <= proxy_labels.items()
    policy = rendered.one("NetworkPolicy", name)
    (rule,) = policy["spec"]["ingress"]
    assert rule["from"][0]["podSelector"]["matchLabels"].items() <= proxy_labels.items()


# --- monitoring -------------------------------------------------------------------------------


def test_service_monitor(default: Rendered, production: Rendered) -> None:
    assert default.all("ServiceMonitor") == []
    monitor = production.one("ServiceMonitor")
    assert monitor["apiVersion"] == "monitoring.coreos.com/v1"
    service = production.one("Service")
    assert monitor["spec"]["selector"]["matchLabels"].items() <= service["metadata"]["labels"].items()
    (endpoint,) = monitor["spec"]["endpoints"]
    assert endpoint["path"] == "/metrics"
    assert endpoint["port"] in {p["name"] for p in service["spec"]["ports"]}
    assert monitor["spec"]["namespaceSelector"] == {"matchNames": [NAMESPACE]}
    assert monitor["metadata"]["labels"]["release"] == "kube-prometheus-stack"


def test_grafana_dashboard_configmap(default: Rendered, production: Rendered) -> None:
    source = (ROOT / "config" / "grafana-dashboard.json").read_text(encoding="utf-8")
    assert (CHART / "dashboards" / "fallback-proxy.json").read_text(encoding="utf-8") == source, (
        "helm/fallback-proxy/dashboards/fallback-proxy.json is a copy of config/grafana-dashboard.json"
    )
    assert [c["metadata"]["name"] for c in default.all("ConfigMap")] == [FULLNAME]
    dashboard = production.one("ConfigMap", f"{FULLNAME}-dashboard")
    assert dashboard["metadata"]["labels"]["grafana_dashboard"] == "1"
    assert json.loads(dashboard["data"]["fallback-proxy.json"]) == json.loads(source)


def test_notes_explain_how_to_connect(default: Rendered) -> None:
    assert f"port-forward svc/{FULLNAME} 8080:80" in default.notes
    assert 'base_url="http://127.0.0.1:8080/v1"' in default.notes
    assert f"http://{FULLNAME}.{NAMESPACE}.svc.cluster.local/v1" in default.notes


# --- the chart's files --------------------------------------------------------------------------


def test_chart_metadata(chart: helm.Chart) -> None:
    metadata = chart.metadata
    assert metadata["apiVersion"] == "v2"
    assert metadata["appVersion"] == "0.1.0"
    assert chart.values == VALUES


def test_production_values_are_production_like() -> None:
    assert PRODUCTION["replicaCount"] >= 3
    assert PRODUCTION["autoscaling"]["minReplicas"] >= 3
    assert PRODUCTION["existingSecret"]
    assert PRODUCTION["redis"]["url"].startswith(("redis://", "rediss://"))
    assert PRODUCTION["metrics"]["serviceMonitor"]["enabled"] is True
    assert PRODUCTION["resources"]["limits"]["memory"]
    assert PRODUCTION["image"]["tag"], "pin the image in production"
