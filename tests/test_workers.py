"""`fallback-proxy serve --workers 2`: a real supervisor process, real workers, real signals.

The supervisor binds the port once and spawns two workers sharing it; each
keeps its metric values in files of the supervisor's metrics directory, and
`/metrics` (whichever worker answers it) sums them. SIGHUP reloads the config
in every worker; SIGTERM stops them gracefully and the supervisor exits 0.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import openai
import pytest
import yaml
from prometheus_client.multiprocess import MultiProcessCollector
from prometheus_client.parser import text_string_to_metric_families

from proxy.fakes import FakeOpenAI

from .conftest import openai_provider
from .redis_server import REDIS_SERVER, RedisServer, free_port

REQUESTS = 40
GRACE_SECONDS = 3
START_TIMEOUT = 20.0


class Supervisor:
    """`python -m proxy.cli serve --workers 2`, its stderr (JSON lines) in a file."""

    def __init__(self, config: Path, port: int, log: Path, env: dict[str, str] | None = None) -> None:
        self.port = port
        self.log = log
        with log.open("wb") as stderr:
            self.process = subprocess.Popen(
                [
                    sys.executable,
                    "-m",
                    "proxy.cli",
                    "serve",
                    "--config",
                    str(config),
                    "--workers",
                    "2",
                    "--log-level",
                    "info",
                ],
                stdin=subprocess.DEVNULL,
                stdout=subprocess.DEVNULL,
                stderr=stderr,
                env={**os.environ, **(env or {})},
            )

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def lines(self) -> list[dict[str, object]]:
        found = []
        for line in self.log.read_text(errors="replace").splitlines():
            try:
                found.append(json.loads(line))
            except ValueError:
                continue
        return found

    def count(self, predicate: str) -> int:
        return sum(1 for line in self.lines() if str(line.get("message", line.get("event", ""))).startswith(predicate))

    def wait_for(self, predicate: str, times: int, timeout: float = START_TIMEOUT) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise AssertionError(f"the supervisor exited with {self.process.returncode}:\n{self.log.read_text()}")
            if self.count(predicate) >= times:
                return
            time.sleep(0.05)
        raise AssertionError(f"{predicate!r} not seen {times} times within {timeout}s:\n{self.log.read_text()}")

    def children(self) -> set[int]:
        pids: set[int] = set()
        for task in Path(f"/proc/{self.process.pid}/task").glob("*"):
            try:
                pids.update(int(pid) for pid in (task / "children").read_text().split())
            except OSError:
                continue
        return pids

    def worker_environ(self, pid: int) -> dict[str, str]:
        raw = Path(f"/proc/{pid}/environ").read_bytes().split(b"\0")
        return dict(item.decode(errors="replace").split("=", 1) for item in raw if b"=" in item)

    def kill(self, also: set[int]) -> None:
        """Stop the supervisor and every worker still there (even orphaned ones)."""
        for pid in also | self.children():
            if not gone(pid):
                os.kill(pid, signal.SIGKILL)
        if self.process.poll() is None:
            self.process.kill()
            self.process.wait()


@contextlib.contextmanager
def serving(tmp_path: Path, cloud: FakeOpenAI, **extra: object) -> Iterator[Supervisor]:
    """Two workers in front of `cloud` (a quota of `quota` requests a day; `extra` top-level config keys)."""
    port = free_port()
    config = tmp_path / "proxy.yaml"
    config.write_text(
        yaml.safe_dump(
            {
                "server": {
                    "host": "127.0.0.1",
                    "port": port,
                    "shutdown_grace_seconds": GRACE_SECONDS,
                    "reload_check_seconds": 0,
                },
                "providers": {
                    "cloud": openai_provider(cloud.url, quota={"requests_per_day": extra.pop("quota", 1000)})
                },
                "routes": {"default": ["cloud"]},
                **extra,
            }
        )
    )
    env = {} if "PROMETHEUS_MULTIPROC_DIR" not in os.environ else {"PROMETHEUS_MULTIPROC_DIR": ""}
    running = Supervisor(config, port, tmp_path / "proxy.log", env)
    seen: set[int] = set()
    try:
        running.wait_for("ready: ", 2)
        seen = running.children()
        yield running
    finally:
        running.kill(seen)


@pytest.fixture
def supervisor(tmp_path: Path, cloud: FakeOpenAI) -> Iterator[Supervisor]:
    with serving(tmp_path, cloud) as running:
        yield running


def ask(url: str) -> str:
    """One chat completion on a connection of its own (so the kernel spreads them over the workers)."""
    with httpx.Client(limits=httpx.Limits(max_keepalive_connections=0)) as http:
        client = openai.OpenAI(base_url=url + "/v1", api_key="unused", http_client=http, max_retries=0)
        answer = client.chat.completions.create(model="default", messages=[{"role": "user", "content": "Hi"}])
    return answer.choices[0].message.content or ""


def requests_counted(text: str) -> float:
    for family in text_string_to_metric_families(text):
        if family.name == "fallback_proxy_requests":
            return sum(
                s.value
                for s in family.samples
                if s.name == "fallback_proxy_requests_total" and s.labels["outcome"] == "ok"
            )
    return 0.0


def requests_of_each_worker(metrics_dir: str) -> dict[int, float]:
    """Per worker pid, the requests its own metrics file counts."""
    counted = {}
    for path in Path(metrics_dir).glob("counter_*.db"):
        pid = int(path.stem.removeprefix("counter_"))
        families = MultiProcessCollector.merge([str(path)], accumulate=False)  # type: ignore[no-untyped-call]
        counted[pid] = sum(
            s.value for family in families for s in family.samples if s.name == "fallback_proxy_requests_total"
        )
    return counted


def gone(pid: int) -> bool:
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] == "Z"
    except OSError:
        return True


def metrics_dir_of(supervisor: Supervisor) -> str:
    found = {supervisor.worker_environ(pid).get("PROMETHEUS_MULTIPROC_DIR") for pid in supervisor.children()}
    found.discard(None)
    assert len(found) == 1, found  # every child (workers, resource tracker) has the one directory
    metrics_dir = found.pop()
    assert metrics_dir is not None and Path(metrics_dir).is_dir()
    return metrics_dir


def test_two_workers_answer_count_together_and_stop_on_sigterm(supervisor: Supervisor) -> None:
    workers = supervisor.children()
    metrics_dir = metrics_dir_of(supervisor)

    with ThreadPoolExecutor(8) as pool:
        answers = list(pool.map(ask, [supervisor.url] * REQUESTS))
    assert answers == ["Hello from cloud."] * REQUESTS

    per_worker = requests_of_each_worker(metrics_dir)
    assert len(per_worker) == 2 and all(count > 0 for count in per_worker.values()), per_worker
    assert set(per_worker) <= workers
    assert sum(per_worker.values()) == REQUESTS
    for _ in range(4):  # whichever worker answers /metrics counts every worker's requests
        assert requests_counted(httpx.get(supervisor.url + "/metrics").text) == REQUESTS

    killed = min(per_worker)  # a worker that dies is replaced; what it counted still counts
    assert (Path(metrics_dir) / f"gauge_livemostrecent_{killed}.db").exists()  # its quota_remaining view
    os.kill(killed, signal.SIGKILL)
    supervisor.wait_for("ready: ", 3, timeout=15)
    deadline = time.monotonic() + 5
    while (Path(metrics_dir) / f"gauge_livemostrecent_{killed}.db").exists() and time.monotonic() < deadline:
        time.sleep(0.05)
    assert not (Path(metrics_dir) / f"gauge_livemostrecent_{killed}.db").exists()  # a dead worker's gauges leave
    assert requests_counted(httpx.get(supervisor.url + "/metrics").text) == REQUESTS
    workers = (workers - {killed}) | supervisor.children()

    supervisor.process.send_signal(signal.SIGHUP)  # each worker reloads the config in place
    supervisor.wait_for("config_reloaded", 2, timeout=10)
    assert supervisor.children() <= workers
    assert ask(supervisor.url) == "Hello from cloud."

    stopping = time.monotonic()
    supervisor.process.send_signal(signal.SIGTERM)
    assert supervisor.process.wait(timeout=GRACE_SECONDS + 5) == 0
    assert time.monotonic() - stopping < GRACE_SECONDS + 3
    deadline = time.monotonic() + 3
    while not all(gone(pid) for pid in workers) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert all(gone(pid) for pid in workers), [pid for pid in workers if not gone(pid)]
    assert not Path(metrics_dir).exists()  # the supervisor made it, the supervisor removed it


def test_a_port_in_use_is_an_error_not_a_traceback(tmp_path: Path, cloud: FakeOpenAI) -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        config = tmp_path / "proxy.yaml"
        config.write_text(
            yaml.safe_dump(
                {
                    "server": {"host": "127.0.0.1", "port": port},
                    "providers": {"cloud": openai_provider(cloud.url)},
                    "routes": {"default": ["cloud"]},
                }
            )
        )
        done = subprocess.run(
            [sys.executable, "-m", "proxy.cli", "serve", "--config", str(config), "--workers", "2"],
            stdin=subprocess.DEVNULL,
            capture_output=True,
            text=True,
            timeout=30,
            check=False,
        )
    assert done.returncode == 3, done.stderr
    assert "address already in use" in done.stderr.lower()
    assert "Traceback" not in done.stderr


def test_workers_stop_when_the_supervisor_is_killed(supervisor: Supervisor) -> None:
    workers = supervisor.children()
    assert ask(supervisor.url) == "Hello from cloud."
    supervisor.process.kill()  # SIGKILL: the supervisor cannot tell anyone
    supervisor.process.wait()
    deadline = time.monotonic() + GRACE_SECONDS + 3
    while not all(gone(pid) for pid in workers) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert all(gone(pid) for pid in workers), [pid for pid in workers if not gone(pid)]


@pytest.mark.skipif(REDIS_SERVER is None, reason="redis-server is not installed")
def test_workers_share_one_quota_through_redis(tmp_path: Path, cloud: FakeOpenAI) -> None:
    redis = RedisServer().start()
    try:
        with serving(tmp_path, cloud, quota=10, redis={"url": redis.url}) as running:
            outcomes = []

            def one(_: int) -> str:
                try:
                    return ask(running.url)
                except openai.APIStatusError as exc:
                    return f"{exc.status_code} {exc.code}"

            with ThreadPoolExecutor(8) as pool:
                outcomes = list(pool.map(one, range(20)))
            text = httpx.get(running.url + "/metrics").text
            per_worker = requests_of_each_worker(metrics_dir_of(running))
            assert running.count("2 workers with in-process state") == 0  # no warning: the state is shared
    finally:
        redis.stop()
    assert len(per_worker) == 2 and all(count > 0 for count in per_worker.values()), per_worker  # both asked
    assert sorted(outcomes) == ["503 all_providers_failed"] * 10 + ["Hello from cloud."] * 10
    calls = [r for r in cloud.requests if r.path == "/v1/chat/completions"]
    assert len(calls) == 10  # the quota held across both workers
    families = {f.name: f for f in text_string_to_metric_families(text)}
    exhausted = sum(
        s.value
        for s in families["fallback_proxy_quota_exhausted"].samples
        if s.name == "fallback_proxy_quota_exhausted_total"
    )
    assert exhausted == 10
