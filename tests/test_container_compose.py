"""docker-compose.yml brought up for real: the proxy image of this work tree, Redis, and Ollama.

podman-compose reads docker-compose.yml (plus an override that makes the
default network internal, so nothing leaves the machine, and publishes no host
port) and creates the containers; the redis and ollama images are stand-ins
(tests/standins/). podman 4.3 cannot wait for a container to be healthy
(podman-compose skips `condition: service_healthy` before podman 4.6, with a
warning) and there is no systemd to run health checks on a timer, so this test
does what Docker Compose does: it starts each service once the conditions of
its `depends_on` hold, running the health checks itself (`podman healthcheck
run`). Then, from inside the network (`podman exec`), it proves the proxy keeps
its state in Redis, answers the private route from the local model, and leaves
the cloud providers that have no key alone.
"""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
import yaml

from tests.podman import STANDIN_LABEL, Podman, build_standins

pytestmark = [pytest.mark.container, pytest.mark.slow]

ROOT = Path(__file__).resolve().parents[1]
COMPOSE = ROOT / "docker-compose.yml"
OVERRIDE = """
services:
  proxy:
    ports: !reset []
  ollama:
    ports: !reset []
networks:
  default:
    internal: true
"""
CONDITION_WITHIN = 120.0  # seconds for one depends_on condition, on a loaded 2-core machine


@dataclass
class Stack:
    project: str
    containers: dict[str, str]  # service -> container name
    started: dict[str, float] = field(default_factory=dict)  # service -> when it was started
    met: dict[str, float] = field(default_factory=dict)  # "service:condition" -> when it held


def services() -> dict[str, Any]:
    found: dict[str, Any] = yaml.safe_load(COMPOSE.read_text(encoding="utf-8"))["services"]
    return found


def start_order(all_services: dict[str, Any]) -> list[str]:
    """The services of the default profile, each after the services it depends on."""
    active = {name: spec for name, spec in all_services.items() if not spec.get("profiles")}
    order: list[str] = []
    while len(order) < len(active):
        ready = [n for n, s in active.items() if n not in order and set(s.get("depends_on") or {}) <= set(order)]
        assert ready, f"a depends_on cycle among {set(active) - set(order)}"
        order.extend(sorted(ready))
    return order


def conditions(spec: dict[str, Any]) -> dict[str, str]:
    deps = spec.get("depends_on") or {}
    if isinstance(deps, list):
        return dict.fromkeys(deps, "service_started")
    return {name: (value or {}).get("condition", "service_started") for name, value in deps.items()}


def hold(podman: Podman, stack: Stack, service: str, condition: str) -> None:
    """Wait until `service` meets `condition`, as Docker Compose waits before starting a dependent."""
    container = stack.containers[service]
    if condition == "service_healthy":
        check = podman.wait_healthy(container, within=CONDITION_WITHIN)
        assert check.returncode == 0, f"{service} never became healthy: {check.stdout}{check.stderr}"
    elif condition == "service_completed_successfully":
        code = podman.run("wait", container, timeout=CONDITION_WITHIN).stdout.strip()
        assert code == "0", f"{service} exited {code}: {podman.run('logs', container).stderr}"
    else:
        assert podman.inspect(container)["State"]["Running"], f"{service} is not running"  # type: ignore[index]
    stack.met.setdefault(f"{service}:{condition}", time.monotonic())


def inside(podman: Podman, stack: Stack, code: str) -> Any:
    """Run Python in the ollama container (it has the proxy's venv): a client on the compose network."""
    done = podman.run("exec", stack.containers["ollama"], "/opt/venv/bin/python", "-c", code, timeout=120)
    return json.loads(done.stdout)


def ask(model: str) -> str:
    return f"""
import json, urllib.request
body = json.dumps({{"model": "{model}", "messages": [{{"role": "user", "content": "hi"}}]}}).encode()
request = urllib.request.Request("http://proxy:8080/v1/chat/completions", body, {{"content-type": "application/json"}})
with urllib.request.urlopen(request, timeout=60) as answer:
    print(json.dumps({{"headers": dict(answer.headers), "body": json.load(answer)}}))
"""


GET = """
import json, urllib.request
with urllib.request.urlopen("http://proxy:8080{path}", timeout=30) as answer:
    print(json.dumps(answer.read().decode()))
"""


@pytest.fixture(scope="module")
def stack(podman: Podman, proxy_image: str, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    if importlib.util.find_spec("podman_compose") is None:
        pytest.skip("podman-compose is not installed (pip install -e '.[test]')")
    images = build_standins(podman, proxy_image)
    for image in images.values():
        labels = podman.inspect(image)["Config"]["Labels"]  # type: ignore[index]
        assert STANDIN_LABEL in labels, f"{image} is not a stand-in: refusing to run it"
    override = tmp_path_factory.mktemp("compose") / "override.yml"
    override.write_text(OVERRIDE, encoding="utf-8")
    project = f"fp-test-compose-{os.getpid()}"
    command = [sys.executable, "-m", "podman_compose", "-p", project, "-f", str(COMPOSE), "-f", str(override)]

    def compose(*args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [*command, *args], cwd=ROOT, env=podman.env, capture_output=True, text=True, timeout=300, check=False
        )

    created = compose("up", "--no-start")
    assert created.returncode == 0, created.stderr[-3000:]
    try:
        listed = podman.run(
            "ps", "--all", f"--filter=label=com.docker.compose.project={project}", "--format=json"
        ).stdout
        containers = {c["Labels"]["com.docker.compose.service"]: c["Names"][0] for c in json.loads(listed)}
        stack = Stack(project, containers)
        all_services = services()
        for service in start_order(all_services):
            for dependency, condition in conditions(all_services[service]).items():
                hold(podman, stack, dependency, condition)
            podman.run("start", containers[service])
            stack.started[service] = time.monotonic()
        yield stack
    finally:
        down = compose("down", "--volumes", "--timeout=10")
        leftover = podman.run(
            "ps", "--all", "--quiet", f"--filter=label=com.docker.compose.project={project}", check=False
        ).stdout.split()
        podman.remove(*leftover)
        podman.run("network", "rm", "--force", f"{project}_default", check=False)
        assert down.returncode == 0, down.stderr[-2000:]


def test_dependencies_held_before_each_service_started(podman: Podman, stack: Stack) -> None:
    all_services = services()
    assert conditions(all_services["proxy"]) == {"redis": "service_healthy", "ollama": "service_healthy"}
    for service, started in stack.started.items():
        for dependency, condition in conditions(all_services[service]).items():
            assert stack.met[f"{dependency}:{condition}"] <= started, f"{service} started before {dependency}"
    hold(podman, stack, "proxy", "service_healthy")  # the proxy's own check: `healthcheck --ready` on 8080


def test_the_one_shot_pull_ran_once_ollama_was_healthy_and_succeeded(podman: Podman, stack: Stack) -> None:
    hold(podman, stack, "ollama-pull", "service_completed_successfully")
    logs = podman.run("logs", stack.containers["ollama-pull"])
    assert logs.stdout.strip().splitlines()[-1] == "success"
    assert podman.inspect(stack.containers["ollama-pull"])["State"]["Status"] == "exited"  # type: ignore[index]


def test_the_private_route_is_answered_by_the_local_model(podman: Podman, stack: Stack) -> None:
    hold(podman, stack, "proxy", "service_healthy")
    private = inside(podman, stack, ask("private"))
    assert private["headers"]["x-proxy-provider"] == "local-qwen" and private["headers"]["x-proxy-route"] == "private"
    assert private["body"]["choices"][0]["message"]["content"] == "Hello from ollama."
    # With no key at all, the default route passes over each cloud provider without a call.
    default = inside(podman, stack, ask("default"))
    assert default["headers"]["x-proxy-provider"] == "local-qwen"
    skipped = "openai-4o=policy,claude=policy,gemini-flash=policy,groq-llama=policy"
    assert default["headers"]["x-proxy-fallbacks"] == skipped
    logs = podman.run("logs", stack.containers["proxy"]).stderr
    assert '"event":"warmed_up"' in logs and '"provider":"local-qwen"' in logs, "warm-up once ollama was healthy"


def test_the_proxy_keeps_its_state_in_redis_and_probes_only_what_has_a_key(podman: Podman, stack: Stack) -> None:
    hold(podman, stack, "proxy", "service_healthy")
    ready = json.loads(inside(podman, stack, GET.format(path="/readyz")))
    assert ready["store"] == {"kind": "redis", "status": "ok"}
    assert ready["health"]["openai-4o"] == {
        "state": "disabled",
        "breaker": "closed",
        "reason": "OPENAI_API_KEY not set",
    }
    deadline = time.monotonic() + 60
    keys: list[str] = []
    while "fp:{local-qwen}:lock:probe:local-qwen" not in keys:  # the probe's lock, one replica per interval
        assert time.monotonic() < deadline, f"no probe lock in Redis; keys: {keys}"
        scan = podman.run("exec", stack.containers["redis"], "redis-cli", "--scan", "--pattern", "fp:*")
        keys = scan.stdout.split()
        time.sleep(0.5)
    assert not [key for key in keys if any(cloud in key for cloud in ("openai-4o", "claude", "gemini", "groq"))]
    metrics: str = inside(podman, stack, GET.format(path="/metrics"))
    probed = {
        line.split('provider="')[1].split('"')[0]
        for line in metrics.splitlines()
        if line.startswith("fallback_proxy_probes_total{")
    }
    assert probed == {"local-qwen"}
