"""The image's default config and .env.example agree, and `docker run --env-file .env.example` starts.

No container engine is needed here: the Dockerfile says what the container
runs (ENTRYPOINT + CMD), with which environment (ENV) and which config (the
file COPY'd to $FALLBACK_PROXY_CONFIG); this runs that very command, with that
config and .env.example read the way `docker run --env-file` reads it.
tests/test_container.py does the same in a real container where podman runs.
"""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import time
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest
import yaml

from tests.redis_server import free_port
from tests.test_deploy_docker import Stage, copies, env_of, parse_dockerfile

ROOT = Path(__file__).resolve().parents[1]
ENV_EXAMPLE = ROOT / ".env.example"
REFERENCE = re.compile(r"\$\{([A-Za-z_][A-Za-z0-9_]*)(?::?-[^}]*)?\}")
CLOUD_KEYS = ("OPENAI_API_KEY", "ANTHROPIC_API_KEY", "GEMINI_API_KEY", "GROQ_API_KEY", "OPENROUTER_API_KEY")


def env_file(path: Path, host: Mapping[str, str]) -> dict[str, str]:
    """Variables as `docker run --env-file` reads them: `KEY=value` literally (no quotes, no
    expansion; `KEY=` is set and empty), a bare `KEY` copied from the host if set there."""
    found: dict[str, str] = {}
    for line in path.read_text(encoding="utf-8").splitlines():
        if not line.strip() or line.lstrip().startswith("#"):
            continue
        key, sep, value = line.partition("=")
        if sep:
            found[key.strip()] = value
        elif key.strip() in host:
            found[key.strip()] = host[key.strip()]
    return found


@dataclass(frozen=True)
class Image:
    """What the Dockerfile's last stage runs: its argv, environment and default config file."""

    argv: list[str]
    env: dict[str, str]
    config_source: Path
    healthcheck: list[str]


def image() -> Image:
    final: Stage = parse_dockerfile((ROOT / "Dockerfile").read_text(encoding="utf-8"))[-1]
    entrypoint, cmd, check = final.last("ENTRYPOINT"), final.last("CMD"), final.last("HEALTHCHECK")
    assert entrypoint is not None and cmd is not None and check is not None
    env = env_of(final)
    target = env["FALLBACK_PROXY_CONFIG"]
    (source,) = [s for flags, sources, dest in copies(final) if "from" not in flags and dest == target for s in sources]
    body = check.body()
    assert body.startswith("CMD [")
    return Image(
        argv=entrypoint.exec_form() + cmd.exec_form(),
        env=env,
        config_source=ROOT / source,
        healthcheck=yaml.safe_load(body.removeprefix("CMD ")),
    )


def references(text: str) -> set[str]:
    """The ${VAR} names of a YAML file's values (comments are not read)."""

    def walk(node: object) -> set[str]:
        if isinstance(node, str):
            return set(REFERENCE.findall(node))
        if isinstance(node, dict):
            return {name for k, v in node.items() for name in walk(k) | walk(v)}
        if isinstance(node, list):
            return {name for item in node for name in walk(item)}
        return set()

    return walk(yaml.safe_load(text))


def test_every_variable_of_the_image_config_is_in_env_example() -> None:
    used = references(image().config_source.read_text(encoding="utf-8"))
    assert {"OPENROUTER_API_KEY", "OPENAI_API_KEY", "PROXY_API_KEY"} <= used
    documented = env_file(ENV_EXAMPLE, {})
    assert used - documented.keys() == set(), f"add to .env.example: {sorted(used - documented.keys())}"
    for key in CLOUD_KEYS:
        assert documented[key] == "", f"{key} must be blank in .env.example"


def test_the_image_config_sends_no_alerts_and_warms_nothing_by_default() -> None:
    """In a container, a placeholder webhook host would get every alert, and localhost is the container."""
    from proxy.config import load_config

    config = load_config(image().config_source, environ=env_file(ENV_EXAMPLE, {}))
    assert config.alerts.webhooks == ()
    assert not [p.name for p in config.providers.values() if p.warmup and p.disabled_reason is None]
    assert config.providers["local-qwen"].disabled_reason == "OLLAMA_URL not set", "not the container's localhost"
    assert {name for name, p in config.providers.items() if p.disabled_reason} >= {
        "openai-4o",
        "claude",
        "gemini-flash",
        "groq-llama",
        "openrouter-llama",
    }


@pytest.fixture
def entrypoint(tmp_path: Path) -> Iterator[tuple[subprocess.Popen[str], int, Image]]:
    """The image's ENTRYPOINT + CMD, run here with its ENV and `--env-file .env.example`.
    Two substitutions only: the config path (the file the image copies there) and the port
    (a free one instead of 8080, which other tests on this machine may hold)."""
    spec = image()
    port = free_port()
    argv = list(spec.argv)
    argv[argv.index("--port") + 1] = str(port)
    bin_dir = Path(sys.executable).parent
    assert argv[0] == "fallback-proxy" and (bin_dir / "fallback-proxy").exists()
    argv[0] = str(bin_dir / "fallback-proxy")
    env = {
        **spec.env,
        "PATH": f"{bin_dir}:{os.environ['PATH']}",
        "HOME": str(tmp_path),
        **env_file(ENV_EXAMPLE, os.environ),
        "FALLBACK_PROXY_CONFIG": str(spec.config_source),
    }
    server = subprocess.Popen(argv, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, cwd=tmp_path)
    try:
        yield server, port, spec
    finally:
        if server.poll() is None:
            server.send_signal(signal.SIGTERM)
        server.wait(timeout=60)
        if server.stdout is not None:
            server.stdout.close()


def test_docker_run_with_env_example_would_start(entrypoint: tuple[subprocess.Popen[str], int, Image]) -> None:
    server, port, spec = entrypoint
    deadline = time.monotonic() + 120
    ready = None
    while ready is None:
        assert server.poll() is None, f"exited {server.returncode}:\n{server.stdout.read() if server.stdout else ''}"
        assert time.monotonic() < deadline, "not ready within 120 s"
        try:
            answer = httpx.get(f"http://127.0.0.1:{port}/readyz", timeout=2)
            ready = answer.json() if answer.status_code == 200 else None
        except httpx.TransportError:
            pass
        time.sleep(0.05)
    assert ready["ready"] is True and ready["store"]["kind"] == "memory"
    for name, variable in (("openai-4o", "OPENAI_API_KEY"), ("openrouter-llama", "OPENROUTER_API_KEY")):
        assert ready["health"][name] == {"state": "disabled", "breaker": "closed", "reason": f"{variable} not set"}

    # The image's HEALTHCHECK command finds this server and checks it on its real port.
    check = subprocess.run(
        [str(Path(sys.executable).parent / spec.healthcheck[0]), *spec.healthcheck[1:], "--pid", str(server.pid)],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert check.returncode == 0, check.stderr
    assert check.stdout.strip() == f"healthy: http://127.0.0.1:{port}/healthz"

    server.send_signal(signal.SIGTERM)
    # 0 in a container, where it is PID 1; here uvicorn re-raises the SIGTERM it handled.
    assert server.wait(timeout=60) in (0, -signal.SIGTERM)
    log = server.stdout.read() if server.stdout else ""
    for variable in CLOUD_KEYS:
        assert f"disabled: {variable} not set" in log
    assert "error" not in {line.split('"level":"')[1].split('"')[0] for line in log.splitlines() if '"level":"' in line}


def readme_block(heading: str) -> list[str]:
    """The commands of the first bash block under `heading` in README.md (comments dropped)."""
    text = (ROOT / "README.md").read_text(encoding="utf-8")
    section = text.split(f"\n{heading}\n", 1)[1]
    block = section.split("```bash\n", 1)[1].split("```", 1)[0]
    return [line.split("  #")[0].strip() for line in block.splitlines() if line.strip()]


def test_readme_docker_commands_are_the_ones_the_tests_run() -> None:
    services = yaml.safe_load((ROOT / "docker-compose.yml").read_text(encoding="utf-8"))["services"]
    build, run, probe = readme_block("### The image alone")
    assert build == f"docker build -t {services['proxy']['image']} ."
    argv = run.split()
    assert argv[:3] == ["docker", "run", "--rm"] and argv[-1] == services["proxy"]["image"]
    assert argv[argv.index("-p") + 1] == services["proxy"]["ports"][0], "published as compose publishes it"
    assert argv[argv.index("--env-file") + 1] == ".env"
    grace = int(argv[argv.index("--stop-timeout") + 1])
    assert grace == int(services["proxy"]["stop_grace_period"].removesuffix("s"))
    from tests.test_container import STOP_GRACE

    assert grace == STOP_GRACE, "tests/test_container.py stops the container with the grace README gives"
    assert probe == "curl http://127.0.0.1:8080/readyz"
    compose = readme_block("## Run with docker compose")
    assert compose[:2] == ["cp .env.example .env", "docker compose up -d --build"]
