"""The real image, built from this work tree and run with podman against the project's fakes.

`docker build .` as a user would run it (tests/podman.py says how podman stands
in for Docker here), then the container: it runs as uid 10001, becomes ready,
reports healthy on the port it was started with, answers and falls back through
the fakes on loopback (`--network host`), leaves a provider without its key
alone, and on `podman stop` lets a stream in flight finish and exits 0. The
image's default command with `--env-file .env.example` is healthy too, and the
runtime stage holds nothing but what runs.
"""

from __future__ import annotations

import json
import os
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest
from openai import OpenAI

from proxy.fakes import FakeOllama, FakeOpenAI
from tests.podman import Podman
from tests.redis_server import free_port

pytestmark = [pytest.mark.container, pytest.mark.slow]

ROOT = Path(__file__).resolve().parents[1]
CLOUD_KEY = "sk-test-container-cloud"
STOP_GRACE = 35  # docker-compose.yml's stop_grace_period; the app drains for 30 s
READY_WITHIN = 60.0  # a bound for a loaded 2-core machine; the measured time is printed


CPU_SECONDS_OF_PID_1 = (
    "import os; f = open('/proc/1/stat').read().rsplit(')', 1)[1].split(); "
    "print((int(f[11]) + int(f[12])) / os.sysconf('SC_CLK_TCK'))"
)


@dataclass
class Running:
    name: str
    port: int
    url: str
    ready_after: float
    cloud: FakeOpenAI
    absent: FakeOpenAI
    local: FakeOllama


def wait_ready(url: str, within: float) -> dict[str, object]:
    deadline = time.monotonic() + within
    while True:
        try:
            answer = httpx.get(f"{url}/readyz", timeout=2)
            if answer.status_code == 200:
                body: dict[str, object] = answer.json()
                return body
        except httpx.TransportError:
            pass
        assert time.monotonic() < deadline, f"{url} not ready within {within:g} s"
        time.sleep(0.05)


def write_config(path: Path, cloud: FakeOpenAI, absent: FakeOpenAI, local: FakeOllama) -> None:
    path.write_text(
        f"""
providers:
  cloud:
    model: openai/gpt-test
    api_base: {cloud.url}/v1
    api_key: ${{CLOUD_API_KEY:-}}
    needs: [api_key]
  absent:                       # its key is not given to the container: disabled
    model: openai/gpt-test
    api_base: {absent.url}/v1
    api_key: ${{ABSENT_API_KEY:-}}
    needs: [api_key]
  local:
    model: ollama_chat/{local.model}
    api_base: {local.url}
    local: true
    warmup: true
routes:
  default: [absent, cloud, local]
  private: {{local_only: true, chain: [local]}}
health: {{probe_interval_seconds: 0.5}}
""",
        encoding="utf-8",
    )
    path.chmod(0o644)


@pytest.fixture(scope="module")
def running(podman: Podman, proxy_image: str, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Running]:
    """The image serving a config of fakes, started as `docker run` would start it, on a port of
    its own (not 8080): the health check must follow it."""
    with (
        FakeOpenAI("cloud", api_key=CLOUD_KEY, reply=" ".join(f"word{i}" for i in range(20)), chunks=20) as cloud,
        FakeOpenAI("absent") as absent,
        FakeOllama("local") as local,
    ):
        config = tmp_path_factory.mktemp("image") / "config.yaml"
        write_config(config, cloud, absent, local)
        port = free_port()
        name = f"fp-test-image-{os.getpid()}"
        started = time.monotonic()
        podman.run(
            "run",
            "--detach",
            f"--name={name}",
            "--network=host",
            f"--stop-timeout={STOP_GRACE}",
            f"--env=CLOUD_API_KEY={CLOUD_KEY}",
            f"--volume={config}:/etc/fallback-proxy/config.yaml:ro",
            proxy_image,
            "serve",
            "--host=127.0.0.1",
            f"--port={port}",
        )
        try:
            url = f"http://127.0.0.1:{port}"
            wait_ready(url, READY_WITHIN)
            yield Running(name, port, url, time.monotonic() - started, cloud, absent, local)
        finally:
            logs = podman.run("logs", name, check=False).stderr
            podman.remove(name)
            assert CLOUD_KEY not in logs, "the provider key showed up in the container's log"


def test_runs_as_uid_10001_under_a_name_of_its_own(podman: Podman, running: Running) -> None:
    ids = podman.run("exec", running.name, "id").stdout.strip()
    assert ids == "uid=10001(fallback-proxy) gid=10001(fallback-proxy) groups=10001(fallback-proxy)"
    # Debian's own user `proxy` (13) is still there, untouched: the names no longer collide.
    passwd = podman.run("exec", running.name, "getent", "passwd", "proxy", "fallback-proxy").stdout.splitlines()
    assert [line.split(":")[:3] for line in passwd] == [["proxy", "x", "13"], ["fallback-proxy", "x", "10001"]]


def test_ready_and_healthy_on_the_port_it_was_started_with(podman: Podman, running: Running) -> None:
    print(f"image ready {running.ready_after:.2f} s after `podman run`")
    assert running.port != 8080
    check = podman.healthy(running.name)
    assert check.returncode == 0, check.stdout + check.stderr
    assert podman.inspect(running.name)["State"]["Health"]["Status"] == "healthy"  # type: ignore[index]
    ready = httpx.get(f"{running.url}/readyz").json()
    assert ready["ready"] is True and ready["health"]["cloud"]["state"] == "healthy"


def test_a_chat_answer_and_a_fallback_through_the_container(running: Running) -> None:
    client = OpenAI(base_url=f"{running.url}/v1", api_key="unused", max_retries=0)
    first = client.chat.completions.with_raw_response.create(
        model="default", messages=[{"role": "user", "content": "hi"}]
    )
    assert first.headers["x-proxy-provider"] == "cloud"
    assert first.parse().choices[0].message.content == running.cloud.reply
    chats = [r for r in running.cloud.requests if r.path == "/v1/chat/completions"]
    assert chats[-1].headers["authorization"] == f"Bearer {CLOUD_KEY}", "the key came in through the environment"

    running.cloud.set_fault("status", status=503, times=1)
    second = client.chat.completions.with_raw_response.create(
        model="default", messages=[{"role": "user", "content": "hi"}]
    )
    assert second.headers["x-proxy-provider"] == "local"
    assert second.headers["x-proxy-fallbacks"] == "absent=policy,cloud=server_error"
    assert second.parse().choices[0].message.content == running.local.reply

    private = client.chat.completions.with_raw_response.create(
        model="private", messages=[{"role": "user", "content": "hi"}]
    )
    assert private.headers["x-proxy-provider"] == "local"


def test_a_provider_without_its_key_is_disabled_and_never_called(podman: Podman, running: Running) -> None:
    deadline = time.monotonic() + 30
    while sum(r.path == "/v1/models" for r in running.cloud.requests) < 2:  # probe rounds have run
        assert time.monotonic() < deadline, "the cloud fake was never probed"
        time.sleep(0.1)
    assert running.absent.request_count == 0, "neither probed nor called"
    ready = httpx.get(f"{running.url}/readyz").json()
    assert ready["health"]["absent"] == {"state": "disabled", "breaker": "closed", "reason": "ABSENT_API_KEY not set"}
    logs = podman.run("logs", running.name).stderr
    assert "providers.absent: disabled: ABSENT_API_KEY not set" in logs


def test_podman_stop_lets_a_stream_finish_and_exits_0(podman: Podman, running: Running) -> None:
    """Last in this module: it stops the container."""
    running.cloud.set_fault("slow", token_delay=0.15)  # 20 chunks: ~3 s of stream
    client = OpenAI(base_url=f"{running.url}/v1", api_key="unused", max_retries=0, timeout=60)
    stream = client.chat.completions.create(model="default", messages=[{"role": "user", "content": "hi"}], stream=True)
    pieces = [chunk.choices[0].delta.content or "" for chunk in [next(iter(stream))] if chunk.choices]
    stopped: dict[str, float] = {}

    def stop() -> None:
        began = time.monotonic()
        podman.run("stop", f"--time={STOP_GRACE}", running.name, timeout=STOP_GRACE + 30)
        stopped["after"] = time.monotonic() - began

    stopper = threading.Thread(target=stop)
    stopper.start()
    for chunk in stream:
        pieces.extend(choice.delta.content or "" for choice in chunk.choices)
    ended = time.monotonic()
    stopper.join(timeout=STOP_GRACE + 60)
    assert "".join(pieces) == running.cloud.reply, "the stream in flight was cut"
    assert stopped["after"] < STOP_GRACE, "podman had to kill it"
    state = podman.inspect(running.name)["State"]
    assert isinstance(state, dict) and state["ExitCode"] == 0 and not state["OOMKilled"]
    assert time.monotonic() - ended < STOP_GRACE
    logs = podman.run("logs", running.name).stderr
    assert "server_shutting_down" not in logs, "the stream finished; none was cut at the grace's end"


# --- the image's own defaults ----------------------------------------------------------------------


def test_the_default_command_with_env_example_is_healthy(podman: Podman, proxy_image: str) -> None:
    """`docker run --env-file .env.example IMAGE`: the baked config, no key, the default command
    (port 8080, inside a network namespace of its own), and the HEALTHCHECK as built."""
    name = f"fp-test-default-{os.getpid()}"
    podman.run(
        "run", "--detach", f"--name={name}", "--network=none", f"--env-file={ROOT / '.env.example'}", proxy_image
    )
    try:
        healthy = podman.wait_healthy(name, within=READY_WITHIN)
        assert healthy.returncode == 0, healthy.stdout + healthy.stderr
        ready = podman.run("exec", name, "fallback-proxy", "healthcheck", "--ready")
        assert ready.stdout.strip() == "healthy: http://127.0.0.1:8080/readyz"
        # Ready in under 2 s: counted in CPU seconds of the server process (PID 1), which a
        # busy machine does not inflate as it does the wall clock.
        cpu = podman.run("exec", name, "python", "-c", CPU_SECONDS_OF_PID_1).stdout.strip()
        print(f"default image ready after {float(cpu):.2f} s of CPU")
        assert float(cpu) < 2.0, f"{cpu} s of CPU to become ready"
        podman.run("stop", "--time=10", name, timeout=60)
        assert podman.inspect(name)["State"]["ExitCode"] == 0  # type: ignore[index]
        logs = podman.run("logs", name).stderr
        assert "disabled: OPENAI_API_KEY not set" in logs and "disabled: OPENROUTER_API_KEY not set" in logs
        levels = {json.loads(line).get("level") for line in logs.splitlines() if line.startswith("{")}
        assert "error" not in levels, logs
    finally:
        podman.remove(name)


def test_the_runtime_stage_holds_only_what_runs(podman: Podman, proxy_image: str) -> None:
    script = r"""
set -u
for tool in gcc cc make git; do command -v "$tool" >/dev/null && echo "tool:$tool"; done
[ -e /opt/venv/bin/pip ] && echo "venv:pip"
ls -d /opt/venv/lib/python3*/site-packages/setuptools 2>/dev/null | sed 's/^/venv:/'
find /opt/venv -type d -name tests -path '*/site-packages/*' | head -3 | sed 's/^/tests:/'
find /opt/venv -path '*/litellm/proxy/_experimental/out' | sed 's/^/ui:/'
for dir in /src /root/.cache /tmp/pip-*; do [ -e "$dir" ] && echo "left:$dir"; done
python -c "import proxy, importlib.util as u; print('pyc:' + str(u.cache_from_source(proxy.__file__)))"
du -sk /opt/venv | sed 's/^/venv-kb:/'
du -sk /opt/venv/lib/python3*/site-packages/* | sort -rn | head -8 | sed 's/^/top:/'
"""
    out = podman.run("run", "--rm", "--network=none", "--entrypoint=sh", proxy_image, "-c", script).stdout
    lines = out.splitlines()
    assert not [line for line in lines if line.split(":")[0] in ("tool", "venv", "tests", "ui", "left")], out
    (pyc,) = [line.removeprefix("pyc:") for line in lines if line.startswith("pyc:")]
    assert podman.run("run", "--rm", "--network=none", "--entrypoint=test", proxy_image, "-f", pyc).returncode == 0
    venv_mb = int(next(line for line in lines if line.startswith("venv-kb:")).split(":")[1].split()[0]) / 1024
    size_mb = int(podman.run("image", "inspect", "--format={{.Size}}", proxy_image).stdout) / 1e6
    top = ", ".join(
        f"{line.split()[-1].rsplit('/', 1)[-1]} {int(line.split(':')[1].split()[0]) // 1024} MB"
        for line in lines
        if line.startswith("top:")
    )
    print(f"image {size_mb:.0f} MB, of which the venv {venv_mb:.0f} MB: {top}")
    assert venv_mb < 330, f"the venv grew to {venv_mb:.0f} MB: {top}"
