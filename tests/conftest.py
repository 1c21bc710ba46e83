"""Shared fixtures: the proxy served over a real socket, and its config."""

from __future__ import annotations

import asyncio
import json
import logging
import os
import socket
import threading
import time
from collections.abc import Callable, Iterator
from typing import TYPE_CHECKING, Any

import httpx
import pytest
import uvicorn
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from proxy.app import create_app
from proxy.config import Config, parse_config
from proxy.fakes import FakeOpenAI
from tests.podman import Podman

if TYPE_CHECKING:
    from .redis_cluster import RedisClusterProcesses


class SecretScan:
    """ASGI wrapper noting every response (headers and body) that shows a configured
    secret: what the proxy sends its clients must never contain one."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app
        self.leaks: list[str] = []

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return

        async def scanning_send(message: Message) -> None:
            if message["type"] == "http.response.start":
                text = b"\n".join(b"%s: %s" % (k, v) for k, v in message.get("headers", [])).decode("latin-1")
            elif message["type"] == "http.response.body":
                text = bytes(message.get("body", b"")).decode("utf-8", "replace")
            else:
                text = ""
            for secret in SECRETS:
                if secret in text:
                    self.leaks.append(f"{scope.get('method')} {scope.get('path')} answered {secret!r}: {text[:200]}")
            await send(message)

        await self.app(scope, receive, scanning_send)


class ServedApp:
    """An ASGI app served by uvicorn on 127.0.0.1 in a thread, lifespan included.
    Every response it sends is scanned for the suite's secrets (`leaks`)."""

    def __init__(self, app: ASGIApp) -> None:
        self.scan = SecretScan(app)
        app = self.scan
        # IPPROTO_TCP explicitly, so asyncio sets TCP_NODELAY on accepted connections.
        self.sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM, socket.IPPROTO_TCP)
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self.sock.bind(("127.0.0.1", 0))
        self.port: int = self.sock.getsockname()[1]
        config = uvicorn.Config(
            app,
            log_level="warning",
            log_config=None,
            access_log=False,
            lifespan="on",
            ws="none",
            timeout_graceful_shutdown=2,
        )
        self.server = uvicorn.Server(config)
        self.thread = threading.Thread(target=self._run, daemon=True, name="proxy-under-test")

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def _run(self) -> None:
        with asyncio.Runner() as runner:
            runner.run(self.server.serve(sockets=[self.sock]))

    def start(self) -> None:
        self.thread.start()
        deadline = time.monotonic() + 30
        while not self.server.started:
            if not self.thread.is_alive() or time.monotonic() > deadline:
                raise RuntimeError("the proxy did not start")
            time.sleep(0.005)

    def stop(self) -> None:
        self.server.should_exit = True
        self.thread.join(timeout=10)
        self.sock.close()


def build_config(data: dict[str, Any]) -> Config:
    """Parse a test config; active probes are off unless the test turns them on,
    so that the fakes' request records hold only what the test sent."""
    health = {"probe_interval_seconds": 0, **data.get("health", {})}
    return parse_config({**data, "health": health}, environ={})


@pytest.fixture
def serve_asgi() -> Iterator[Callable[[ASGIApp], ServedApp]]:
    """`serve_asgi(app)` serves any ASGI app on a free port; stopped after the test."""
    started: list[ServedApp] = []

    def _serve(app: ASGIApp) -> ServedApp:
        served = ServedApp(app)
        served.start()
        started.append(served)
        return served

    yield _serve
    for served in started:
        served.stop()
    leaks = [leak for served in started for leak in served.scan.leaks]
    assert not leaks, f"a response showed a configured secret: {leaks[:3]}"


@pytest.fixture
def serve(serve_asgi: Callable[[ASGIApp], ServedApp]) -> Callable[..., ServedApp]:
    """`serve(config_dict_or_Config, **create_app_kwargs)` starts a proxy; stopped after the test."""

    def _serve(config: dict[str, Any] | Config, **kwargs: Any) -> ServedApp:
        cfg = config if isinstance(config, Config) else build_config(config)
        return serve_asgi(create_app(cfg, **kwargs))

    return _serve


def pytest_configure(config: pytest.Config) -> None:
    """The coverage gate ([tool.coverage.report] fail_under) is for the whole suite, as `pytest` runs it:
    a run of chosen files, `-k` or `-m` still reports coverage, but cannot reach the gate and is not failed by it."""
    whole_suite = config.args_source is pytest.Config.ArgsSource.TESTPATHS
    coverage = config.pluginmanager.getplugin("_cov")  # pytest-cov's plugin, when --cov is on
    if coverage is not None and (not whole_suite or config.option.keyword or config.option.markexpr):
        coverage.options.cov_fail_under = None


# Session fixtures too costly to build once per xdist worker, and the one worker that owns each:
# every test using one is put in its group (`--dist loadgroup`), so the podman images, the Redis
# Cluster and the Agents SDK's environment are each made once, and podman tests never race each other.
SESSION_GROUPS = {
    "podman": "podman",
    "proxy_image": "podman",
    "redis_cluster": "redis-cluster",
    "agents_python": "agents-sdk",
}


@pytest.hookimpl(tryfirst=True)  # before xdist's own hook reads the `xdist_group` marks
def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    for item in items:
        fixtures = getattr(item, "fixturenames", ())
        groups = {SESSION_GROUPS[name] for name in fixtures if name in SESSION_GROUPS}
        if item.get_closest_marker("container") is not None:
            groups.add("podman")
        for group in sorted(groups):
            item.add_marker(pytest.mark.xdist_group(group))


@pytest.fixture(autouse=True)
def xdist_group_held(request: pytest.FixtureRequest) -> None:
    """Under `--dist loadgroup`, xdist suffixes a grouped test's node id with `@group`; fail a grouped
    test that lacks it (a pytest that xdist cannot group), for every worker would then build the podman
    images and the Redis Cluster at once, racing each other."""
    grouped = request.node.get_closest_marker("xdist_group") is not None
    if grouped and request.config.getoption("loadgroup", default=False) and "@" not in request.node.nodeid:
        pytest.fail(f"pytest-xdist did not group {request.node.nodeid}: is pytest newer than it supports?")


@pytest.fixture(scope="session")
def redis_cluster() -> Iterator[RedisClusterProcesses]:
    """A Redis Cluster of six `redis-server` processes (three masters, each with a
    replica), shared by the tests that kill none of its nodes."""
    # Imported here: redis-py loads OpenTelemetry when it is installed, and a test
    # checks that a proxy without Redis or traces loads none of it.
    from .redis_cluster import MISSING, RedisClusterProcesses

    if MISSING:
        pytest.skip(MISSING)
    # No test kills a node of this one: a long node timeout, so that a node starved of CPU by the
    # other test workers for a second is not failed over (losing the writes it had not replicated).
    cluster = RedisClusterProcesses(node_timeout_ms=15_000).start()
    try:
        yield cluster
    finally:
        cluster.stop()


@pytest.fixture
def cloud() -> Iterator[FakeOpenAI]:
    """A fake OpenAI-compatible cloud answering "Hello from cloud."."""
    with FakeOpenAI("cloud") as fake:
        yield fake


@pytest.fixture
def backup() -> Iterator[FakeOpenAI]:
    """A second fake OpenAI-compatible provider answering "Hello from backup."."""
    with FakeOpenAI("backup") as fake:
        yield fake


def openai_provider(url: str, **extra: Any) -> dict[str, Any]:
    """Config for a provider served by a FakeOpenAI at `url`."""
    return {"model": "openai/gpt-test", "api_key": "sk-upstream", "api_base": url + "/v1", **extra}


@pytest.fixture
def http() -> Iterator[httpx.Client]:
    with httpx.Client(timeout=30) as client:
        yield client


# Every secret the suite configures: no log line of any test may contain one.
SECRETS = (
    "sk-upstream",
    "sk-ant-test",
    "sk-test",
    "team-key",
    "admin-secret",
    "SECRET-TOKEN",
    "demo-cloud-key",
    "fuzz-key",
    "admin-key",
)


def request_log(caplog: pytest.LogCaptureFixture, at_least: int = 1) -> list[dict[str, Any]]:
    """The proxy's request log lines (parsed), once `at_least` are written: a request's line is
    written as it ends on the proxy's side, which may be a moment after its client read the end."""
    deadline = time.monotonic() + 5
    while len(lines := [r.getMessage() for r in caplog.records if r.name == "fallback_proxy.request"]) < at_least:
        assert time.monotonic() < deadline, f"{len(lines)} request log lines, not {at_least}"
        time.sleep(0.01)
    return [json.loads(line) for line in lines]


@pytest.fixture(autouse=True)
def no_secret_in_logs(caplog: pytest.LogCaptureFixture) -> Iterator[None]:
    """Capture the proxy's log lines (requests, events, errors) of every test and
    fail the test if a configured key shows up in any of them."""
    caplog.set_level(logging.INFO, logger="fallback_proxy")
    yield
    for record in caplog.records:
        line = record.getMessage() + (caplog.text if record.exc_info else "")
        leaked = [secret for secret in SECRETS if secret in line]
        assert not leaked, f"a log line shows {leaked}: {line[:300]}"


# --- containers: podman, the base image and the proxy image, made once per session -----------------


def _container_session(make: Callable[[], Any]) -> Any:
    """Run `make`; where podman cannot run here, skip saying why (fail instead under .ci/run)."""
    from tests.podman import REQUIRE_VARIABLE, PodmanUnavailable

    try:
        return make()
    except PodmanUnavailable as exc:
        if os.environ.get(REQUIRE_VARIABLE):
            pytest.fail(f"podman cannot run, though {REQUIRE_VARIABLE} is set: {exc}")
        pytest.skip(f"podman cannot run here: {exc}")


@pytest.fixture(scope="session")
def podman(tmp_path_factory: pytest.TempPathFactory) -> Podman:
    """tests/podman.py's `Podman`, with the Dockerfile's base image present."""
    from tests.podman import start_session

    workdir = tmp_path_factory.mktemp("podman")
    found: Podman = _container_session(lambda: start_session(workdir))
    return found


@pytest.fixture(scope="session")
def proxy_image(podman: Podman) -> str:
    """The image built from this work tree (`docker build .`), tagged as docker-compose.yml names it."""
    from tests.podman import build_proxy_image

    tag: str = build_proxy_image(podman)
    return tag
