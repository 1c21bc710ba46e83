"""Tests for the Helm chart in helm/fallback-proxy.

The chart is linted and rendered by Helm's own Go library through
helm-python-sdk (no helm binary, no cluster), and every rendered object is
validated against the Kubernetes JSON schemas shipped by kubernetes-validate,
strictly (unknown fields are errors). ServiceMonitor and HTTPRoute are CRDs
those schemas do not cover: they are checked structurally instead (HTTPRoute
against a schema written here from the Gateway API v1 spec).
"""

from __future__ import annotations

import base64
import copy
import hashlib
import json
import re
import shutil
from collections.abc import Callable, Iterator, Mapping
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import helm_python as helm
import jsonschema
import pytest
import yaml
from kubernetes_validate import utils as kubernetes_validate

from proxy.config import RedisSettings, ServerConfig, load_config, parse_config
from tests import helm_docs

ROOT = Path(__file__).resolve().parents[1]
CHART = ROOT / "helm" / "fallback-proxy"
VALUES = yaml.safe_load((CHART / "values.yaml").read_text(encoding="utf-8"))
# Read as `helm -f` reads it (Helm's YAML rules differ from PyYAML's).
PRODUCTION = helm.values_from_yaml((CHART / "values-production.yaml").read_text(encoding="utf-8"))
KUBE_VERSION = kubernetes_validate.latest_version()  # the newest schemas the package ships
CRDS = {("monitoring.coreos.com/v1", "ServiceMonitor"), ("gateway.networking.k8s.io/v1", "HTTPRoute")}
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
PER_POD_STATE = "no Redis: each pod would enforce quotas and limits on its own"


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


# Every optional part of the chart at once: the in-chart Redis, its NetworkPolicy,
# the HPA, the PDB, the chart's Secret, the ServiceMonitor, the dashboard, an
# Ingress with TLS, an HTTPRoute and topology spread constraints.
EVERYTHING: dict[str, Any] = copy.deepcopy(PRODUCTION) | {
    "existingSecret": "",
    "secrets": {"OPENAI_API_KEY": "sk-test", "PROXY_API_KEY": "pk-test"},
    "redis": {"enabled": True, "url": ""},
    "serviceAccount": {"create": True},
    "ingress": {
        "enabled": True,
        "className": "nginx",
        "hosts": [{"host": "llm.example.com", "paths": [{"path": "/v1", "pathType": "Prefix"}]}],
        "tls": [{"secretName": "llm-tls", "hosts": ["llm.example.com"]}],
    },
    "httpRoute": {
        "enabled": True,
        "parentRefs": [{"name": "public", "namespace": "gateway-system", "sectionName": "https"}],
        "hostnames": ["llm.example.com"],
    },
}

SCENARIOS: dict[str, dict[str, Any]] = {
    "default": {},
    "production": PRODUCTION,
    "in-chart redis, no autoscaling, dashboard": {
        "redis": {"enabled": True},
        "replicaCount": 2,
        "grafanaDashboard": {"enabled": True},
        "metrics": {"serviceMonitor": {"enabled": True}},
        "extraEnv": [{"name": "OLLAMA_URL", "value": "http://ollama.ollama:11434"}],
    },
    "existing secret, one replica": {
        "existingSecret": "my-keys",
        "serviceAccount": {"create": False},
    },
    "everything": EVERYTHING,
    "everything, renamed": EVERYTHING | {"nameOverride": "llm-gateway", "fullnameOverride": "edge-llm"},
}


# --- lint and schema validation -------------------------------------------------------


@pytest.mark.parametrize("values", SCENARIOS.values(), ids=SCENARIOS.keys())
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
            continue  # no schema shipped for CRDs: HTTPRoute below, ServiceMonitor in test_service_monitor
        try:
            kubernetes_validate.validate(obj, KUBE_VERSION, strict=True)
        except kubernetes_validate.ValidationError as exc:
            where = ".".join(str(p) for p in exc.path)
            pytest.fail(f"{obj['kind']}/{obj['metadata']['name']}: {where}: {exc.message}")
        assert obj["metadata"]["labels"]["app.kubernetes.io/instance"] == RELEASE
    for route in rendered.all("HTTPRoute"):
        jsonschema.validate(route, HTTPROUTE_SCHEMA, cls=jsonschema.Draft7Validator)


def test_the_validator_rejects_unknown_fields(default: Rendered) -> None:
    deployment = copy.deepcopy(default.one("Deployment"))
    deployment["spec"]["template"]["spec"]["containers"][0]["readinesProbe"] = {}
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(deployment, KUBE_VERSION, strict=True)


def test_bad_values_fail_the_render(chart: helm.Chart) -> None:
    with pytest.raises(helm.HelmRenderError, match="terminationGracePeriodSeconds"):
        chart.render(values={"terminationGracePeriodSeconds": 20}, name=RELEASE)
    with pytest.raises(helm.HelmRenderError, match="maxReplicas"):
        chart.render(
            values={"autoscaling": {"enabled": True, "minReplicas": 5, "maxReplicas": 3}, "redis": {"enabled": True}},
            name=RELEASE,
        )
    # A bare `on:` in a values file reaches the chart as the key "true".
    bare_on = helm.values_from_yaml("routing:\n  routes:\n    coding:\n      on: {claude: {default: groq-llama}}\n")
    assert "true" in bare_on["routing"]["routes"]["coding"]
    with pytest.raises(helm.HelmRenderError, match=r"routing\.routes\.coding: quote the key"):
        chart.render(values=bare_on, name=RELEASE)


SCHEMA = json.loads((CHART / "values.schema.json").read_text(encoding="utf-8"))


def test_the_values_schema_is_draft_7_and_takes_the_shipped_values(chart: helm.Chart) -> None:
    assert SCHEMA["$schema"] == "http://json-schema.org/draft-07/schema#"
    jsonschema.Draft7Validator.check_schema(SCHEMA)
    assert chart.schema == SCHEMA
    for values in SCENARIOS.values():
        jsonschema.validate(chart.merge_values(values), SCHEMA, cls=jsonschema.Draft7Validator)


MISSPELT: dict[str, dict[str, Any]] = {
    "replicaCont": {"replicaCont": 2},
    "tags": {"image": {"tags": "0.1.0"}},
    "maxReplica": {"autoscaling": {"maxReplica": 3}},
    "urls": {"redis": {"urls": "redis://redis:6379/0"}},
    "periodSecond": {"probes": {"readiness": {"periodSecond": 5}}},
    "limit": {"resources": {"limit": {"memory": "1Gi"}}},
    "host": {"ingress": {"host": "llm.example.com"}},
    "timeout": {"httpRoute": {"timeouts": {"timeout": "1h"}}},
    "servicemonitor": {"metrics": {"servicemonitor": {"enabled": True}}},
}


@pytest.mark.parametrize(("typo", "values"), MISSPELT.items(), ids=MISSPELT.keys())
def test_a_misspelt_key_fails_lint_and_render(chart: helm.Chart, typo: str, values: dict[str, Any]) -> None:
    with pytest.raises(helm.HelmValuesError, match=rf"additional propert(y|ies) '{typo}' not allowed"):
        chart.render(values=values, name=RELEASE)
    report = helm.lint(CHART, values, strict=True)
    assert any(f"'{typo}' not allowed" in error for error in report["errors"]), report["errors"]


@pytest.mark.parametrize(
    ("values", "where"),
    [
        ({"replicaCount": "3"}, "at '/replicaCount': got string, want integer"),
        ({"service": {"type": "Ingress"}}, "at '/service/type': value must be one of"),
        ({"containerPort": 70000}, "at '/containerPort': maximum"),
        ({"redis": {"url": "redis-master:6379"}}, "at '/redis/url': 'redis-master:6379' does not match"),
        ({"httpRoute": {"timeouts": {"request": "10 minutes"}}}, "at '/httpRoute/timeouts/request'"),
        ({"secrets": {"OPENAI-API-KEY": "x"}}, "invalid propertyName 'OPENAI-API-KEY'"),
        ({"extraEnv": [{"value": "no name"}]}, "at '/extraEnv/0': missing property 'name'"),
        ({"nameOverride": "Fallback_Proxy"}, "at '/nameOverride': 'Fallback_Proxy' does not match"),
    ],
)
def test_a_value_of_the_wrong_kind_fails_the_render(chart: helm.Chart, values: dict[str, Any], where: str) -> None:
    with pytest.raises(helm.HelmValuesError, match=re.escape(where)):
        chart.render(values=values, name=RELEASE)


def test_routing_is_left_to_the_proxy(render: Callable[..., Rendered]) -> None:
    """The chart's schema does not second-guess the proxy's config: any mapping passes it."""
    assert SCHEMA["properties"]["routing"].keys() == {"title", "type", "description"}
    rendered = render({"routing": {"limits": {"requests_per_minute": 600}}})
    assert yaml.safe_load(rendered.config_text())["limits"] == {"requests_per_minute": 600}


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


def test_defaults_are_one_pod_and_no_autoscaling(default: Rendered) -> None:
    assert default.one("Deployment")["spec"]["replicas"] == 1
    assert default.all("HorizontalPodAutoscaler") == []
    assert default.all("PodDisruptionBudget") == [], "minAvailable 1 of 1 pod would block every node drain"
    assert default.all("Ingress") == [] and default.all("HTTPRoute") == []
    assert "WARNING" not in default.notes


def test_autoscaling(render: Callable[..., Rendered], production: Rendered) -> None:
    rendered = render({"autoscaling": {"enabled": True}, "redis": {"url": "redis://redis:6379/0"}})
    for scaled, low, high in ((rendered, 2, 10), (production, 3, 12)):
        hpa = scaled.one("HorizontalPodAutoscaler")
        assert hpa["apiVersion"] == "autoscaling/v2"
        assert hpa["spec"]["scaleTargetRef"] == {"apiVersion": "apps/v1", "kind": "Deployment", "name": FULLNAME}
        assert (hpa["spec"]["minReplicas"], hpa["spec"]["maxReplicas"]) == (low, high)
        (metric,) = hpa["spec"]["metrics"]
        assert metric["resource"]["name"] == "cpu"
        assert hpa["spec"]["behavior"] == VALUES["autoscaling"]["behavior"]
        # The HPA owns the count: a fixed replicas would reset it on every upgrade.
        assert "replicas" not in scaled.one("Deployment")["spec"]
        assert scaled.container()["resources"]["requests"]["cpu"]
    streams = {
        "type": "Pods",
        "pods": {
            "metric": {"name": "fallback_proxy_open_streams"},
            "target": {"type": "AverageValue", "averageValue": "800"},
        },
    }
    extra = render(
        {"autoscaling": {"enabled": True, "extraMetrics": [streams]}, "redis": {"url": "redis://redis:6379/0"}}
    )
    assert extra.one("HorizontalPodAutoscaler")["spec"]["metrics"][1] == streams
    fixed = render({"replicaCount": 4, "redis": {"url": "redis://redis:6379/0"}})
    assert fixed.all("HorizontalPodAutoscaler") == []
    assert fixed.one("Deployment")["spec"]["replicas"] == 4


def test_the_values_point_at_the_sizing_notes() -> None:
    """The HPA numbers are a starting point; docs/scaling.md says how to size them."""
    comments = helm_docs.comment_descriptions((CHART / "values.yaml").read_text(encoding="utf-8"))
    assert "Sizing: docs/scaling.md" in comments["autoscaling.enabled"]
    assert "docs/scaling.md" in (CHART / "README.md").read_text(encoding="utf-8")


def test_pod_disruption_budget(default: Rendered, production: Rendered, render: Callable[..., Rendered]) -> None:
    pdb = production.one("PodDisruptionBudget")
    assert pdb["spec"]["minAvailable"] == 2
    assert pdb["spec"]["selector"]["matchLabels"] == production.one("Deployment")["spec"]["selector"]["matchLabels"]
    two = render({"replicaCount": 2, "redis": {"enabled": True}})
    assert two.one("PodDisruptionBudget")["spec"]["minAvailable"] == 1
    assert default.all("PodDisruptionBudget") == [], "one pod: would block every node drain"


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
    (proxy,) = [
        d for d in rendered.all("Deployment") if d["metadata"]["labels"]["app.kubernetes.io/component"] == "proxy"
    ]
    assert proxy["spec"]["template"]["spec"]["containers"][0]["securityContext"]["runAsUser"] == 10001


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
    unrelated = render({"resources": {"requests": {"cpu": "300m"}}, "replicaCount": 4, "allowPerPodState": True})
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
    assert production.env()["REDIS_URL"] == PRODUCTION["redis"]["url"]
    assert "WARNING" not in production.notes
    assert "Shared state (health, quotas, limits): redis.url" in production.notes
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


WITHOUT_REDIS: dict[str, dict[str, Any]] = {
    "replicaCount 2": {"replicaCount": 2},
    "autoscaling": {"autoscaling": {"enabled": True}},
    "autoscaling from one pod": {"autoscaling": {"enabled": True, "minReplicas": 1}},
    "existingSecret not said to hold REDIS_URL": {"replicaCount": 3, "existingSecret": "my-keys"},
    "empty secrets.REDIS_URL": {"replicaCount": 3, "secrets": {"REDIS_URL": ""}},
    "the default routing.redis.url": {"replicaCount": 3, "routing": {"redis": {"url": "${REDIS_URL:-}"}}},
}


@pytest.mark.parametrize("values", WITHOUT_REDIS.values(), ids=WITHOUT_REDIS.keys())
def test_several_pods_without_redis_do_not_render(chart: helm.Chart, values: dict[str, Any]) -> None:
    with pytest.raises(helm.HelmRenderError, match=PER_POD_STATE) as failure:
        chart.render(values=values, name=RELEASE)
    message = str(failure.value)
    assert "daily quota" in message and "allowPerPodState=true" in message
    assert "redis.url" in message and "redis.enabled=true" in message


def test_workers_without_redis_do_not_render(chart: helm.Chart) -> None:
    with pytest.raises(
        helm.HelmRenderError, match=re.escape("routing.server.workers 4 and no Redis: each worker would")
    ):
        chart.render(values={"routing": {"server": {"workers": 4}}}, name=RELEASE)


SHARED_STATE: dict[str, tuple[dict[str, Any], str]] = {
    "redis.url": ({"redis": {"url": "redis://redis:6379/0"}}, "redis.url"),
    "in-chart": ({"redis": {"enabled": True}}, "in-chart Redis"),
    "existingSecret with REDIS_URL": (
        {"existingSecret": "my-keys", "redis": {"urlInSecret": True}},
        "REDIS_URL in the Secret",
    ),
    "the chart's Secret": ({"secrets": {"REDIS_URL": "redis://:pw@redis:6379/0"}}, "secrets.REDIS_URL"),
    "routing.redis.url": ({"routing": {"redis": {"url": "redis://redis:6379/0"}}}, "routing.redis.url"),
}


@pytest.mark.parametrize(("values", "source"), SHARED_STATE.values(), ids=SHARED_STATE.keys())
def test_several_pods_with_redis_render(render: Callable[..., Rendered], values: dict[str, Any], source: str) -> None:
    rendered = render(values | {"autoscaling": {"enabled": True}})
    assert rendered.one("HorizontalPodAutoscaler")
    assert f"Shared state (health, quotas, limits): {source}." in rendered.notes
    assert "WARNING" not in rendered.notes


def test_per_pod_state_on_purpose(render: Callable[..., Rendered]) -> None:
    rendered = render({"replicaCount": 3, "allowPerPodState": True})
    assert rendered.one("Deployment")["spec"]["replicas"] == 3
    assert "WARNING: allowPerPodState is on: up to 3 proxy processes and no Redis" in rendered.notes
    assert "daily quotas are enforced per pod" in rendered.notes


def test_redis_sentinel(render: Callable[..., Rendered]) -> None:
    """A Sentinel URL reaches the proxy as REDIS_URL, in the form its config accepts."""
    url = "redis+sentinel://:s3cret@sentinel-0.redis:26379,sentinel-1.redis:26379/mymaster/2"
    rendered = render({"redis": {"url": url}, "autoscaling": {"enabled": True}})
    assert rendered.env()["REDIS_URL"] == url
    config = parse_config(yaml.safe_load(rendered.config_text()), environ=DUMMY_ENV | {"REDIS_URL": url})
    assert config.redis.url == url


CLUSTER_SEED = "redis://redis-cluster.redis.svc.cluster.local:6379"


def test_redis_cluster_goes_into_the_routing_config(render: Callable[..., Rendered], default: Rendered) -> None:
    rendered = render({"redis": {"cluster": True, "url": CLUSTER_SEED}, "autoscaling": {"enabled": True}})
    config = yaml.safe_load(rendered.config_text())
    assert config["redis"] == {"url": "${REDIS_URL:-}", "cluster": True}
    assert {k: v for k, v in config.items() if k != "redis"} == {
        k: v for k, v in VALUES["routing"].items() if k != "redis"
    }
    assert rendered.env()["REDIS_URL"] == CLUSTER_SEED
    assert "(Redis Cluster)" in rendered.notes
    annotations = rendered.one("Deployment")["spec"]["template"]["metadata"]["annotations"]
    assert (
        annotations["checksum/config"]
        != default.one("Deployment")["spec"]["template"]["metadata"]["annotations"]["checksum/config"]
    )
    assert "cluster" not in yaml.safe_load(default.config_text())["redis"]


def test_redis_cluster_is_valid_for_the_proxy(render: Callable[..., Rendered]) -> None:
    if "cluster" not in RedisSettings.__dataclass_fields__:
        pytest.skip("the proxy's config has no redis.cluster yet (issue 13, item 5)")
    rendered = render({"redis": {"cluster": True, "url": CLUSTER_SEED}})
    config = parse_config(yaml.safe_load(rendered.config_text()), environ=DUMMY_ENV | {"REDIS_URL": CLUSTER_SEED})
    assert config.redis.cluster is True


@pytest.mark.parametrize(
    ("values", "reason"),
    [
        ({"redis": {"cluster": True, "enabled": True}}, "the in-chart Redis .* is a single node"),
        ({"redis": {"cluster": True, "url": "redis+sentinel://s0:26379/mymaster"}}, "Sentinel watches a single master"),
    ],
    ids=["in-chart", "sentinel"],
)
def test_redis_cluster_refuses_what_is_no_cluster(chart: helm.Chart, values: dict[str, Any], reason: str) -> None:
    with pytest.raises(helm.HelmRenderError, match=reason):
        chart.render(values=values, name=RELEASE)


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


# --- Ingress and Gateway API ----------------------------------------------------------------

DNS_LABEL = r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?$"
DNS_SUBDOMAIN = r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?(\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*$"
GATEWAY_DURATION = r"^([0-9]{1,5}(h|m|s|ms)){1,4}$"
HTTP_METHODS = ["GET", "HEAD", "POST", "PUT", "DELETE", "CONNECT", "OPTIONS", "TRACE", "PATCH"]
# HTTPRoute (gateway.networking.k8s.io/v1) as the Gateway API spec defines it, for
# the fields the chart writes; unknown fields are errors, as they are for the rest.
HTTPROUTE_SCHEMA: dict[str, Any] = {
    "type": "object",
    "required": ["apiVersion", "kind", "metadata", "spec"],
    "additionalProperties": False,
    "properties": {
        "apiVersion": {"const": "gateway.networking.k8s.io/v1"},
        "kind": {"const": "HTTPRoute"},
        "metadata": {
            "type": "object",
            "required": ["name"],
            "additionalProperties": False,
            "properties": {
                "name": {"type": "string", "pattern": DNS_SUBDOMAIN, "maxLength": 253},
                "labels": {"type": "object", "additionalProperties": {"type": "string", "maxLength": 63}},
                "annotations": {"type": "object", "additionalProperties": {"type": "string"}},
            },
        },
        "spec": {
            "type": "object",
            "additionalProperties": False,
            "properties": {
                "parentRefs": {
                    "type": "array",
                    "minItems": 1,
                    "maxItems": 32,
                    "items": {
                        "type": "object",
                        "required": ["name"],
                        "additionalProperties": False,
                        "properties": {
                            "group": {"type": "string", "pattern": f"^$|^{DNS_SUBDOMAIN[1:]}"},
                            "kind": {"type": "string", "pattern": r"^[a-zA-Z]([-a-zA-Z0-9]*[a-zA-Z0-9])?$"},
                            "namespace": {"type": "string", "pattern": DNS_LABEL, "maxLength": 63},
                            "name": {"type": "string", "minLength": 1, "maxLength": 253},
                            "sectionName": {"type": "string", "pattern": DNS_SUBDOMAIN, "maxLength": 253},
                            "port": {"type": "integer", "minimum": 1, "maximum": 65535},
                        },
                    },
                },
                "hostnames": {
                    "type": "array",
                    "maxItems": 16,
                    "items": {"type": "string", "pattern": r"^(\*\.)?" + DNS_SUBDOMAIN[1:], "maxLength": 253},
                },
                "rules": {
                    "type": "array",
                    "minItems": 1,
                    "maxItems": 16,
                    "items": {
                        "type": "object",
                        "additionalProperties": False,
                        "properties": {
                            "matches": {
                                "type": "array",
                                "maxItems": 64,
                                "items": {
                                    "type": "object",
                                    "additionalProperties": False,
                                    "properties": {
                                        "path": {
                                            "type": "object",
                                            "additionalProperties": False,
                                            "properties": {
                                                "type": {"enum": ["Exact", "PathPrefix", "RegularExpression"]},
                                                "value": {"type": "string", "pattern": "^/", "maxLength": 1024},
                                            },
                                        },
                                        "headers": {"type": "array", "maxItems": 16},
                                        "queryParams": {"type": "array", "maxItems": 16},
                                        "method": {"enum": HTTP_METHODS},
                                    },
                                },
                            },
                            "backendRefs": {
                                "type": "array",
                                "maxItems": 16,
                                "items": {
                                    "type": "object",
                                    # A Service backend needs its port.
                                    "required": ["name", "port"],
                                    "additionalProperties": False,
                                    "properties": {
                                        "group": {"const": ""},
                                        "kind": {"const": "Service"},
                                        "name": {"type": "string", "minLength": 1, "maxLength": 253},
                                        "namespace": {"type": "string", "pattern": DNS_LABEL},
                                        "port": {"type": "integer", "minimum": 1, "maximum": 65535},
                                        "weight": {"type": "integer", "minimum": 0, "maximum": 1000000},
                                    },
                                },
                            },
                            "timeouts": {
                                "type": "object",
                                "additionalProperties": False,
                                "properties": {
                                    "request": {"type": "string", "pattern": GATEWAY_DURATION},
                                    "backendRequest": {"type": "string", "pattern": GATEWAY_DURATION},
                                },
                            },
                        },
                    },
                },
            },
        },
    },
}


@pytest.fixture(scope="module")
def exposed(render: Callable[..., Rendered]) -> Rendered:
    return render(EVERYTHING)


def test_ingress_streams(exposed: Rendered) -> None:
    ingress = exposed.one("Ingress")
    kubernetes_validate.validate(ingress, KUBE_VERSION, strict=True)
    annotations = ingress["metadata"]["annotations"]
    assert annotations["nginx.ingress.kubernetes.io/proxy-buffering"] == "off"
    assert int(annotations["nginx.ingress.kubernetes.io/proxy-read-timeout"]) >= 300
    assert int(annotations["nginx.ingress.kubernetes.io/proxy-send-timeout"]) >= 300
    # As large as the proxy's own body limit (server.max_body_bytes), or nginx refuses first.
    body_size = annotations["nginx.ingress.kubernetes.io/proxy-body-size"]
    assert body_size.endswith("m") and int(body_size[:-1]) * 1024 * 1024 >= ServerConfig().max_body_bytes
    assert ingress["spec"]["ingressClassName"] == "nginx"
    assert ingress["spec"]["tls"] == [{"secretName": "llm-tls", "hosts": ["llm.example.com"]}]
    (rule,) = ingress["spec"]["rules"]
    assert rule["host"] == "llm.example.com"
    (path,) = rule["http"]["paths"]
    assert path["path"] == "/v1" and path["pathType"] == "Prefix"
    service = exposed.one("Service")
    assert path["backend"]["service"] == {"name": service["metadata"]["name"], "port": {"name": "http"}}
    assert "https://llm.example.com/v1" in exposed.notes


def test_ingress_annotations_can_be_dropped_and_added(render: Callable[..., Rendered]) -> None:
    rendered = render(
        {
            "ingress": {
                "enabled": True,
                "className": "alb",
                "annotations": {
                    "nginx.ingress.kubernetes.io/proxy-body-size": None,
                    "alb.ingress.kubernetes.io/load-balancer-attributes": "idle_timeout.timeout_seconds=600",
                },
            }
        }
    )
    ingress = rendered.one("Ingress")
    annotations = ingress["metadata"]["annotations"]
    assert "nginx.ingress.kubernetes.io/proxy-body-size" not in annotations
    assert annotations["alb.ingress.kubernetes.io/load-balancer-attributes"] == "idle_timeout.timeout_seconds=600"
    assert annotations["nginx.ingress.kubernetes.io/proxy-buffering"] == "off"
    (rule,) = ingress["spec"]["rules"]
    assert "host" not in rule, "the default host is any host"
    kubernetes_validate.validate(ingress, KUBE_VERSION, strict=True)


def test_http_route_streams(exposed: Rendered) -> None:
    route = exposed.one("HTTPRoute")
    jsonschema.validate(route, HTTPROUTE_SCHEMA, cls=jsonschema.Draft7Validator)
    spec = route["spec"]
    assert spec["parentRefs"] == [{"name": "public", "namespace": "gateway-system", "sectionName": "https"}]
    assert spec["hostnames"] == ["llm.example.com"]
    (rule,) = spec["rules"]
    assert rule["timeouts"] == {"request": "0s"}, "a gateway's default request timeout would cut streams"
    assert rule["matches"] == [{"path": {"type": "PathPrefix", "value": "/"}}]
    service = exposed.one("Service")
    ((backend,),) = [rule["backendRefs"]]
    assert backend == {"name": service["metadata"]["name"], "port": service["spec"]["ports"][0]["port"]}
    assert "HTTPRoute" in exposed.notes and "public" in exposed.notes


def test_http_route_timeouts_can_be_left_to_the_gateway(render: Callable[..., Rendered]) -> None:
    rendered = render({"httpRoute": {"enabled": True, "parentRefs": [{"name": "gw"}], "timeouts": None}})
    (rule,) = rendered.one("HTTPRoute")["spec"]["rules"]
    assert "timeouts" not in rule
    jsonschema.validate(rendered.one("HTTPRoute"), HTTPROUTE_SCHEMA, cls=jsonschema.Draft7Validator)


def test_http_route_schema_rejects_what_a_gateway_would(exposed: Rendered) -> None:
    route = exposed.one("HTTPRoute")
    for break_it in (
        lambda r: r["spec"]["rules"][0]["timeouts"].update(request="10 minutes"),
        lambda r: r["spec"]["rules"][0].update(timeout={"request": "1h"}),
        lambda r: r["spec"]["rules"][0]["backendRefs"][0].pop("port"),
        lambda r: r["spec"].update(parentRefs=[]),
        lambda r: r["spec"].update(hostnames=["LLM.example.com"]),
    ):
        broken = copy.deepcopy(route)
        break_it(broken)
        with pytest.raises(jsonschema.ValidationError):
            jsonschema.validate(broken, HTTPROUTE_SCHEMA, cls=jsonschema.Draft7Validator)


def test_http_route_needs_a_gateway(chart: helm.Chart) -> None:
    with pytest.raises(helm.HelmRenderError, match=re.escape("httpRoute.enabled needs httpRoute.parentRefs")):
        chart.render(values={"httpRoute": {"enabled": True}}, name=RELEASE)


# --- names ------------------------------------------------------------------------------------------


def walk_key(node: object, key: str) -> Iterator[Any]:
    """Every value stored under `key`, anywhere in a nested object."""
    if isinstance(node, dict):
        for k, v in node.items():
            if k == key:
                yield v
            yield from walk_key(v, key)
    elif isinstance(node, list):
        for item in node:
            yield from walk_key(item, key)


OVERRIDES = {
    "nameOverride": ({"nameOverride": "llm-gateway"}, "llm-gateway", f"{RELEASE}-llm-gateway"),
    "fullnameOverride": ({"fullnameOverride": "edge-llm"}, "fallback-proxy", "edge-llm"),
    "both": ({"nameOverride": "llm-gateway", "fullnameOverride": "edge-llm"}, "llm-gateway", "edge-llm"),
}


@pytest.mark.parametrize(("override", "name", "fullname"), OVERRIDES.values(), ids=OVERRIDES.keys())
def test_name_overrides_reach_every_object(
    render: Callable[..., Rendered], override: dict[str, Any], name: str, fullname: str
) -> None:
    rendered = render(EVERYTHING | override)
    objects = rendered.objects
    # Names and labels.
    names = {f"{o['kind']}/{o['metadata']['name']}" for o in objects}
    assert all(n.split("/")[1] in {fullname, f"{fullname}-redis", f"{fullname}-dashboard"} for n in names), names
    for obj in objects:
        assert obj["metadata"]["labels"]["app.kubernetes.io/name"] == name, obj["kind"]
    # No trace of the default names, anywhere (NOTES included).
    text = json.dumps(objects) + rendered.notes
    assert FULLNAME not in text
    if name != "fallback-proxy":
        assert '"app.kubernetes.io/name": "fallback-proxy"' not in text
    # Every selector selects the pods it is meant for.
    proxy, redis = rendered.one("Deployment", fullname), rendered.one("Deployment", f"{fullname}-redis")
    proxy_pods = proxy["spec"]["template"]["metadata"]["labels"]
    redis_pods = redis["spec"]["template"]["metadata"]["labels"]
    for deployment in (proxy, redis):
        assert (
            deployment["spec"]["selector"]["matchLabels"].items()
            <= deployment["spec"]["template"]["metadata"]["labels"].items()
        )
    selectors = list(walk_key(objects, "matchLabels"))
    assert len(selectors) == 8  # 2 Deployments, PDB, ServiceMonitor, 2 in the NetworkPolicy, 2 spread constraints
    service = rendered.one("Service", fullname)
    for selector in selectors:
        targets = [proxy_pods, redis_pods, service["metadata"]["labels"]]
        assert any(selector.items() <= t.items() for t in targets), selector
    assert service["spec"]["selector"].items() <= proxy_pods.items()
    assert rendered.one("Service", f"{fullname}-redis")["spec"]["selector"].items() <= redis_pods.items()
    assert (
        rendered.one("PodDisruptionBudget", fullname)["spec"]["selector"]["matchLabels"].items() <= proxy_pods.items()
    )
    monitor = rendered.one("ServiceMonitor", fullname)["spec"]["selector"]["matchLabels"]
    assert monitor.items() <= service["metadata"]["labels"].items()
    policy = rendered.one("NetworkPolicy", f"{fullname}-redis")["spec"]
    assert policy["podSelector"]["matchLabels"].items() <= redis_pods.items()
    assert policy["ingress"][0]["from"][0]["podSelector"]["matchLabels"].items() <= proxy_pods.items()
    pod = proxy["spec"]["template"]["spec"]
    spread = pod["topologySpreadConstraints"]
    assert [c["topologyKey"] for c in spread] == ["topology.kubernetes.io/zone", "kubernetes.io/hostname"]
    assert all(c["labelSelector"]["matchLabels"].items() <= proxy_pods.items() for c in spread)
    # Every reference names an object the chart renders.
    assert rendered.one("HorizontalPodAutoscaler", fullname)["spec"]["scaleTargetRef"]["name"] == fullname
    for backend in walk_key(rendered.one("Ingress", fullname)["spec"], "service"):
        assert backend == {"name": fullname, "port": {"name": service["spec"]["ports"][0]["name"]}}
    for backend in rendered.one("HTTPRoute", fullname)["spec"]["rules"][0]["backendRefs"]:
        assert (backend["name"], backend["port"]) == (fullname, service["spec"]["ports"][0]["port"])
    config_volume = next(v for v in pod["volumes"] if "configMap" in v)
    assert rendered.one("ConfigMap", config_volume["configMap"]["name"])
    (secret_ref,) = rendered.container(fullname)["envFrom"]
    assert rendered.one("Secret", secret_ref["secretRef"]["name"])
    assert rendered.one("ServiceAccount", pod["serviceAccountName"])
    redis_url = {e["name"]: e.get("value") for e in rendered.container(fullname)["env"]}["REDIS_URL"]
    assert urlsplit(redis_url).hostname == rendered.one("Service", f"{fullname}-redis")["metadata"]["name"]
    assert f"port-forward svc/{fullname} " in rendered.notes


def test_topology_spread_keeps_a_selector_you_give(render: Callable[..., Rendered]) -> None:
    mine = {"matchLabels": {"team": "llm"}}
    rendered = render(
        {
            "topologySpreadConstraints": [
                {"maxSkew": 2, "topologyKey": "zone", "whenUnsatisfiable": "DoNotSchedule", "labelSelector": mine}
            ]
        }
    )
    (constraint,) = rendered.one("Deployment")["spec"]["template"]["spec"]["topologySpreadConstraints"]
    assert constraint["labelSelector"] == mine


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


# --- the chart's README -------------------------------------------------------------------------------


def test_the_chart_readme_is_what_the_generator_writes() -> None:
    readme = (CHART / "README.md").read_text(encoding="utf-8")
    assert readme == helm_docs.updated_readme(readme), "stale values table: run python -m tests.helm_docs"
    assert helm_docs.main(["--check"]) == 0


def test_the_chart_readme_documents_every_value() -> None:
    """Every key of values.yaml has a row of its own or is inside a documented one."""
    readme = (CHART / "README.md").read_text(encoding="utf-8")
    documented = {row.key for row in helm_docs.rows()}

    def paths(node: Mapping[str, Any], prefix: str = "") -> Iterator[str]:
        for key, value in node.items():
            yield f"{prefix}{key}"
            if isinstance(value, dict) and key != "routing":
                yield from paths(value, f"{prefix}{key}.")

    for path in paths(VALUES):
        parts = path.split(".")
        covering = {".".join(parts[:n]) for n in range(1, len(parts) + 1)}
        below = any(k.startswith(f"{path}.") for k in documented)
        assert covering & documented or below, f"{path} is not in the chart's README"
    for key in documented:
        assert f"| `{key}` |" in readme
    assert "| `autoscaling.enabled` | boolean | `false` |" in readme
    assert "| `ingress.annotations` | map of string |" in readme


@pytest.fixture
def chart_copy(tmp_path: Path) -> Path:
    copied = tmp_path / "fallback-proxy"
    shutil.copytree(CHART, copied)
    return copied


def test_the_generator_refuses_an_undocumented_value(chart_copy: Path) -> None:
    values = chart_copy / "values.yaml"
    values.write_text(values.read_text(encoding="utf-8") + "\nnewThing: 3\n", encoding="utf-8")
    with pytest.raises(helm_docs.DocsError, match=re.escape("newThing: in values.yaml but not in values.schema.json")):
        helm_docs.rows(chart_copy)
    schema_path = chart_copy / "values.schema.json"
    schema = json.loads(schema_path.read_text(encoding="utf-8"))
    schema["properties"]["newThing"] = {"type": "integer"}
    schema_path.write_text(json.dumps(schema), encoding="utf-8")
    with pytest.raises(helm_docs.DocsError, match="newThing: no `# --` comment"):
        helm_docs.rows(chart_copy)
    values.write_text(
        values.read_text(encoding="utf-8").replace("\nnewThing", "\n# -- A new thing.\nnewThing"), encoding="utf-8"
    )
    assert helm_docs.rows(chart_copy)[-1] == helm_docs.Row("newThing", "integer", "`3`", "A new thing.")
    assert helm_docs.main(["--check", "--chart", str(chart_copy)]) == 1, "the README lacks the new row"
    assert helm_docs.main(["--chart", str(chart_copy)]) == 0
    assert "| `newThing` | integer | `3` | A new thing. |" in (chart_copy / "README.md").read_text(encoding="utf-8")
    assert helm_docs.main(["--check", "--chart", str(chart_copy)]) == 0


def test_descriptions_come_from_comments_then_the_schema() -> None:
    text = "# -- Top.\n# Second line.\ntop: 1\n\n# Not a description.\nplain: 2\nnest:\n  # -- Inner.\n  inner: 3\n"
    assert helm_docs.comment_descriptions(text) == {"top": "Top. Second line.", "nest.inner": "Inner."}
    schema = {
        "type": "object",
        "properties": {"plain": {"type": "integer", "description": "From the schema."}, "top": {"type": "integer"}},
    }
    rows = list(helm_docs.walk({"top": 1, "plain": 2}, schema, schema, {"top": "Top."}))
    assert [(r.key, r.description) for r in rows] == [("top", "Top."), ("plain", "From the schema.")]
