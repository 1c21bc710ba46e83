"""Static checks of the docker compose stack: docker-compose.yml, .env.example,
config/compose.yaml (the routing config it mounts), config/prometheus.yml and
the Grafana dashboard. No Docker engine runs here; the files are read and
checked against each other and against the app's config validator.
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import pytest
import yaml

from proxy.config import load_config
from tests.test_deploy_docker import env_of, parse_dockerfile, served_port

ROOT = Path(__file__).resolve().parents[1]
COMPOSE = ROOT / "docker-compose.yml"
ENV_EXAMPLE = ROOT / ".env.example"
DASHBOARD = ROOT / "config" / "grafana-dashboard.json"
APP_PORT = 8080

REFERENCE = re.compile(r"\$\{([A-Za-z_][A-Za-z0-9_]*)(?::?-[^}]*)?\}")
# The metric names of the app's observable contract (see ARCHITECTURE.md).
CONTRACT_METRICS = {
    "fallback_proxy_requests_total": "counter",
    "fallback_proxy_attempts_total": "counter",
    "fallback_proxy_fallbacks_total": "counter",
    "fallback_proxy_tokens_total": "counter",
    "fallback_proxy_recoveries_total": "counter",
    "fallback_proxy_quota_fail_closed_total": "counter",
    "fallback_proxy_request_duration_seconds": "histogram",
    "fallback_proxy_time_to_first_token_seconds": "histogram",
    "fallback_proxy_provider_health": "gauge",
    "fallback_proxy_breaker_open": "gauge",
    "fallback_proxy_quota_remaining": "gauge",
}
SECRET_KEYS = (
    "OPENAI_API_KEY",
    "ANTHROPIC_API_KEY",
    "GEMINI_API_KEY",
    "GROQ_API_KEY",
    "PROXY_API_KEY",
    "PROXY_ADMIN_KEY",
)


@pytest.fixture(scope="module")
def compose() -> dict[str, Any]:
    data = yaml.safe_load(COMPOSE.read_text(encoding="utf-8"))
    assert isinstance(data, dict)
    return data


@pytest.fixture(scope="module")
def services(compose: dict[str, Any]) -> dict[str, Any]:
    found = compose["services"]
    assert isinstance(found, dict)
    return found


def env_example() -> dict[str, str]:
    """The variables .env.example sets, with their example values."""
    found: dict[str, str] = {}
    for line in ENV_EXAMPLE.read_text(encoding="utf-8").splitlines():
        line = line.strip()
        if line and not line.startswith("#"):
            key, sep, value = line.partition("=")
            assert sep and re.fullmatch(r"[A-Z_][A-Z0-9_]*", key), f"bad .env line: {line!r}"
            found[key] = value
    return found


def environment(service: Mapping[str, Any]) -> dict[str, str]:
    """A service's `environment`, in either the mapping or the list form."""
    env = service.get("environment") or {}
    if isinstance(env, list):
        env = dict(item.partition("=")[::2] for item in env)
    return {str(k): "" if v is None else str(v) for k, v in env.items()}


def depends_on(service: Mapping[str, Any]) -> dict[str, str]:
    """A service's dependencies and their conditions (the short form means started)."""
    deps = service.get("depends_on") or {}
    if isinstance(deps, list):
        return {name: "service_started" for name in deps}
    return {name: (spec or {}).get("condition", "service_started") for name, spec in deps.items()}


def published(service: Mapping[str, Any]) -> list[tuple[str, int, int]]:
    """(host ip, host port, container port) for each short-syntax port."""
    found = []
    for spec in service.get("ports", []):
        parts = str(spec).split("/")[0].split(":")
        ip = parts[0] if len(parts) == 3 else ""
        found.append((ip, int(parts[-2]), int(parts[-1])))
    return found


def mounts(service: Mapping[str, Any]) -> dict[str, tuple[str, str]]:
    """Container path -> (host path, mode) for each short-syntax volume."""
    found = {}
    for spec in service.get("volumes", []):
        source, target, *mode = str(spec).split(":")
        found[target] = (source, mode[0] if mode else "rw")
    return found


def mounted_config(services: dict[str, Any]) -> Path:
    target = env_of(parse_dockerfile((ROOT / "Dockerfile").read_text(encoding="utf-8"))[-1])["FALLBACK_PROXY_CONFIG"]
    source, mode = mounts(services["proxy"])[target]
    assert mode == "ro"
    return (ROOT / source).resolve()


def references(node: object) -> set[str]:
    """Every ${VAR} / ${VAR:-default} name in the strings of parsed YAML (keys too)."""
    if isinstance(node, str):
        return set(REFERENCE.findall(node))
    if isinstance(node, Mapping):
        return {name for k, v in node.items() for name in references(k) | references(v)}
    if isinstance(node, list):
        return {name for item in node for name in references(item)}
    return set()


# --- services and how they connect ---------------------------------------------------


def test_services_exist(services: dict[str, Any]) -> None:
    assert {"proxy", "redis", "ollama", "ollama-pull"} <= services.keys()
    assert services["proxy"]["build"] in (".", {"context": "."})


def test_every_dependency_is_a_service(services: dict[str, Any]) -> None:
    for name, service in services.items():
        for dep, condition in depends_on(service).items():
            assert dep in services, f"{name} depends on unknown service {dep}"
            assert condition in ("service_started", "service_healthy", "service_completed_successfully")
            if condition == "service_healthy":
                assert "healthcheck" in services[dep], f"{dep} has no healthcheck"
            profiles = set(services[dep].get("profiles", []))
            assert profiles <= set(service.get("profiles", [])), (
                f"{name} depends on {dep}, which only runs with profiles {profiles}"
            )


def test_proxy_waits_for_a_healthy_redis_and_uses_it(services: dict[str, Any]) -> None:
    proxy, redis = services["proxy"], services["redis"]
    assert depends_on(proxy)["redis"] == "service_healthy"
    assert "ollama" in depends_on(proxy)
    assert redis["image"].startswith("redis:7")
    assert "redis-cli" in redis["healthcheck"]["test"] and "ping" in redis["healthcheck"]["test"]
    url = urlsplit(environment(proxy)["REDIS_URL"])
    assert (url.scheme, url.hostname, url.port) == ("redis", "redis", 6379)


def test_published_ports_agree_with_the_app(services: dict[str, Any]) -> None:
    proxy = services["proxy"]
    assert [(port, target) for _, port, target in published(proxy)] == [(APP_PORT, APP_PORT)]
    stages = parse_dockerfile((ROOT / "Dockerfile").read_text(encoding="utf-8"))
    expose = [int(p) for e in stages[-1].all("EXPOSE") for p in e.value.split()]
    assert expose == [APP_PORT]
    assert proxy["command"][0] == "serve"
    assert served_port(proxy["command"]) == APP_PORT
    from proxy import cli

    kind, *argv = proxy["healthcheck"]["test"]
    assert kind == "CMD" and argv[0] == "fallback-proxy"
    args = cli.build_parser().parse_args(argv[1:])
    # Readiness, on the port `serve` was started with (read from the server, not written here).
    assert args.command == "healthcheck" and args.ready and args.url is None


def test_stop_waits_for_the_drain(services: dict[str, Any]) -> None:
    config = load_config(mounted_config(services), environ=dummy_environment(services))
    stop_grace = int(services["proxy"]["stop_grace_period"].removesuffix("s"))
    assert stop_grace > config.server.shutdown_grace_seconds


def test_env_file_is_dot_env(services: dict[str, Any]) -> None:
    env_file = services["proxy"]["env_file"]
    paths = [e if isinstance(e, str) else e["path"] for e in env_file]
    assert paths == [".env"]
    gitignore = (ROOT / ".gitignore").read_text(encoding="utf-8").split()
    assert ".env" in gitignore, ".env holds keys: never commit it"


# --- the routing config it mounts --------------------------------------------------------


def dummy_environment(services: dict[str, Any]) -> dict[str, str]:
    """What the proxy container sees: .env.example's variables set, then compose's."""
    env = {name: f"dummy-{name.lower()}" for name in env_example()}
    env.update({k: v for k, v in env_example().items() if v})
    env.update(environment(services["proxy"]))
    return env


def test_mounted_config_exists_and_is_valid(services: dict[str, Any]) -> None:
    path = mounted_config(services)
    assert path.is_file() and path.is_relative_to(ROOT)
    config = load_config(path, environ=dummy_environment(services))
    assert config.redis_url == "redis://redis:6379/0"
    assert {"default", "private"} <= config.routes.keys()
    local = [p for p in config.providers.values() if p.local]
    assert local and all(p.warmup for p in local)
    assert config.routes["private"].local_only
    # The default route ends on the local model, so answers flow with no cloud key.
    route = config.routes["default"]
    node = route.first
    while "default" in route.edges.get(node, {}):
        node = route.edges[node]["default"]
    assert config.providers[node].local


def test_mounted_config_starts_without_any_cloud_key(services: dict[str, Any]) -> None:
    config = load_config(mounted_config(services), environ=environment(services["proxy"]))
    assert all(p.api_key is None for p in config.providers.values())
    # Without its key a cloud provider is disabled (never probed nor called), not tried keyless.
    cloud = {name: p.disabled_reason for name, p in config.providers.items() if not p.local}
    assert cloud and all(reason and reason.endswith("_API_KEY not set") for reason in cloud.values()), cloud
    assert all(p.disabled_reason is None for p in config.providers.values() if p.local)


def test_every_variable_the_config_uses_is_provided_or_documented(services: dict[str, Any]) -> None:
    used = references(yaml.safe_load(mounted_config(services).read_text(encoding="utf-8")))
    assert {"OPENAI_API_KEY", "REDIS_URL"} <= used
    provided = environment(services["proxy"]).keys() | env_example().keys()
    assert used - provided == set()


def test_env_example_documents_every_compose_variable_and_keeps_keys_blank(
    compose: dict[str, Any],
) -> None:
    documented = env_example()
    assert references(compose) <= documented.keys()
    for key in SECRET_KEYS:
        assert key in documented and documented[key] == "", f"{key} must be blank in .env.example"
    text = ENV_EXAMPLE.read_text(encoding="utf-8")
    for key in documented:  # each variable has a comment right above it
        above = text.split(f"\n{key}=")[0].rstrip().splitlines()[-1]
        assert above.startswith("#"), f"{key} is not explained in .env.example"


def test_pull_service_pulls_the_tag_the_config_names(services: dict[str, Any]) -> None:
    config = load_config(mounted_config(services), environ=dummy_environment(services))
    ollama_models = {
        p.upstream_model: p.api_base
        for p in config.providers.values()
        if p.litellm_provider in ("ollama", "ollama_chat")
    }
    assert len(ollama_models) == 1
    ((tag, api_base),) = ollama_models.items()
    assert re.fullmatch(r"[\w.\-/]+:[\w.\-]+", tag) and not tag.endswith(":latest")
    pull = services["ollama-pull"]
    argv = [*pull.get("entrypoint", []), *pull.get("command", [])]
    assert argv == ["ollama", "pull", tag]
    assert pull["restart"] == "no"
    assert pull["image"] == services["ollama"]["image"]
    assert depends_on(pull) == {"ollama": "service_healthy"}
    # The pull and the proxy talk to the same Ollama server.
    host = urlsplit(environment(pull)["OLLAMA_HOST"])
    base = urlsplit(api_base or "")
    assert (host.hostname, host.port) == (base.hostname, base.port) == ("ollama", 11434)
    assert any(target == 11434 for _, _, target in published(services["ollama"]))
    assert any(target == "/root/.ollama" for target in mounts(services["ollama"]))


def test_images_are_pinned(services: dict[str, Any]) -> None:
    for name, service in services.items():
        if "image" in service and "build" not in service:
            image = service["image"]
            assert ":" in image and not image.endswith(":latest"), f"{name}: pin {image}"


# --- monitoring ------------------------------------------------------------------------


def test_prometheus_scrapes_the_proxy(services: dict[str, Any]) -> None:
    prometheus = services["prometheus"]
    assert prometheus["profiles"] == ["monitoring"]
    source, _ = mounts(prometheus)["/etc/prometheus/prometheus.yml"]
    config = yaml.safe_load((ROOT / source).read_text(encoding="utf-8"))
    (job,) = config["scrape_configs"]
    assert job.get("metrics_path", "/metrics") == "/metrics"
    targets = [t for group in job["static_configs"] for t in group["targets"]]
    host, _, port = targets[0].partition(":")
    assert targets == [targets[0]] and host in services and host == "proxy"
    assert int(port) == APP_PORT


def test_grafana_provisions_the_dashboard(compose: dict[str, Any], services: dict[str, Any]) -> None:
    grafana = services["grafana"]
    assert grafana["profiles"] == ["monitoring"]
    volumes = mounts(grafana)
    sources = {source for source, _ in volumes.values()}
    assert "./config/grafana-dashboard.json" in sources
    provisioned = {c["source"]: c["target"] for c in grafana["configs"]}
    datasource = yaml.safe_load(compose["configs"]["grafana-datasource"]["content"])
    (ds,) = datasource["datasources"]
    assert urlsplit(ds["url"]).hostname == "prometheus"
    assert ds["type"] == "prometheus"
    providers = yaml.safe_load(compose["configs"]["grafana-dashboards"]["content"])
    folder = providers["providers"][0]["options"]["path"]
    dashboard_target = next(t for t, (s, _) in volumes.items() if s.endswith("grafana-dashboard.json"))
    assert dashboard_target.startswith(folder + "/")
    assert all(target.startswith("/etc/grafana/provisioning/") for target in provisioned.values())


# --- the Grafana dashboard ---------------------------------------------------------------


def panels(dashboard: dict[str, Any]) -> Iterator[dict[str, Any]]:
    for panel in dashboard["panels"]:
        yield panel
        yield from panel.get("panels", [])


def test_dashboard_uses_only_contract_metrics() -> None:
    dashboard = json.loads(DASHBOARD.read_text(encoding="utf-8"))
    used: set[str] = set()
    for panel in panels(dashboard):
        for target in panel.get("targets", []):
            for name in re.findall(r"\bfallback_proxy_[a-z_]+", target["expr"]):
                base = re.sub(r"_(bucket|sum|count)$", "", name)
                assert base in CONTRACT_METRICS, f"{panel['title']}: unknown metric {name}"
                kind = CONTRACT_METRICS[base]
                if kind == "histogram":
                    assert name.endswith("_bucket") and "histogram_quantile" in target["expr"]
                if kind == "counter":
                    assert re.search(rf"(rate|increase)\({name}\b", target["expr"]), (
                        f"{panel['title']}: counters are read through rate() or increase()"
                    )
                used.add(base)
    assert used == set(CONTRACT_METRICS), f"not on the dashboard: {set(CONTRACT_METRICS) - used}"


def test_dashboard_panels() -> None:
    dashboard = json.loads(DASHBOARD.read_text(encoding="utf-8"))
    assert dashboard["uid"] == "fallback-proxy"
    variables = {v["name"]: v for v in dashboard["templating"]["list"]}
    assert variables["datasource"]["type"] == "datasource"
    titles = set()
    ids = []
    for panel in panels(dashboard):
        ids.append(panel["id"])
        titles.add(panel["title"])
        if panel["type"] != "row":
            assert panel["datasource"]["uid"] == "${datasource}"
            assert panel["targets"], panel["title"]
            for target in panel["targets"]:
                assert target["expr"].count("(") == target["expr"].count(")")
    assert len(ids) == len(set(ids)), "panel ids must be unique"
    for wanted in (
        "Answers by provider",
        "Fallbacks by reason",
        "Health state",
        "Quota remaining today",
        "Time to first token p50 / p95 by provider",
        "Request rate by route and outcome",
        "Request latency p50 / p95 by route",
    ):
        assert wanted in titles
