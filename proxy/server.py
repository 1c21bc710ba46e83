"""Running the app under uvicorn, for `serve`, `demo` and drills.

One process (`build_server`), or `serve_workers`: uvicorn's supervisor binds
the socket once and spawns N worker processes that share it; each worker loads
the config file and runs the whole app (its own lifespan: warm-up, probes,
reload watch). Metrics are summed across workers through prometheus_client's
multi-process files; health, quotas and limits are shared only through Redis.
"""

from __future__ import annotations

import contextlib
import ctypes
import glob
import importlib.util
import logging
import math
import os
import shutil
import signal
import sys
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass
from socket import socket
from typing import Any, Final

import httpx
import uvicorn
from prometheus_client.multiprocess import mark_process_dead
from starlette.applications import Starlette
from uvicorn.config import STARTUP_FAILURE
from uvicorn.supervisors.multiprocess import Multiprocess

from proxy.app import create_app
from proxy.config import Config, ConfigError, load_config
from proxy.http_protocol import HttpToolsOpenAIErrors

log = logging.getLogger("fallback_proxy")

METRICS_DIR_VARIABLE: Final = "PROMETHEUS_MULTIPROC_DIR"  # prometheus_client's own name for it
# uvloop, with a listener that accepts connections in batches (proxy/accept.py); asyncio's own
# listener already does.
EVENT_LOOP: Final = "proxy.accept:new_event_loop" if importlib.util.find_spec("uvloop") else "asyncio"


def raise_open_files_limit() -> tuple[int, int]:
    """Let this process open as many files as the system allows it (the soft
    limit up to the hard one): each stream holds two sockets, and a default soft
    limit of 1,024 caps a worker near 500 streams. Returns (soft, hard) as set."""
    try:
        import resource
    except ImportError:  # not on this platform
        return (-1, -1)
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard != resource.RLIM_INFINITY and soft < hard:
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
        except (OSError, ValueError):
            return (soft, hard)
        soft = hard
    return (soft, hard)


def build_server(
    config: Config,
    *,
    host: str | None = None,
    port: int | None = None,
    transport: httpx.AsyncBaseTransport | None = None,
) -> uvicorn.Server:
    """A uvicorn server for `config` (host and port default to the config's)."""
    app = create_app(config, transport=transport)
    return uvicorn.Server(_uvicorn_config(app, config, host=host, port=port))


def _uvicorn_config(app: Any, config: Config, *, host: str | None, port: int | None, **extra: Any) -> uvicorn.Config:
    return uvicorn.Config(
        app,
        host=host or config.server.host,
        port=config.server.port if port is None else port,
        loop=EVENT_LOOP,
        http=HttpToolsOpenAIErrors,  # malformed HTTP gets an OpenAI error body, not plain text
        ws="none",
        lifespan="on",
        log_config=None,
        access_log=False,
        server_header=False,
        timeout_graceful_shutdown=math.ceil(config.server.shutdown_grace_seconds),
        # Longer than clients' own keep-alive (httpx and the OpenAI SDK: 5 s), so a
        # client never sends on a connection the server is closing.
        timeout_keep_alive=75,
        # The proxy never reads the client's address or scheme: no X-Forwarded-* rewriting per request.
        proxy_headers=False,
        **extra,
    )


def bound_port(server: uvicorn.Server) -> int:
    """The port a started server listens on (useful with port 0)."""
    for listener in server.servers:
        for sock in listener.sockets:
            port: int = sock.getsockname()[1]
            return port
    raise RuntimeError("the server is not listening")


# --- several worker processes ------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class WorkerApp:
    """Builds the app inside a worker process (pickled to it; uvicorn calls it there)."""

    config_path: str
    log_level: str
    supervisor: int  # its pid
    log_format: str = "json"

    def __call__(self) -> Starlette:
        from proxy.observe import configure_logging

        _stop_with(self.supervisor)
        configure_logging(self.log_level, self.log_format)
        try:
            config = load_config(self.config_path)
        except ConfigError as exc:  # the file changed since the supervisor checked it
            for problem in exc.problems:
                print(f"error: {problem}", file=sys.stderr)
            raise SystemExit(STARTUP_FAILURE) from exc
        return create_app(config)


_PR_SET_PDEATHSIG: Final = 1


def _stop_with(supervisor: int) -> None:
    """On Linux, have the kernel send this worker SIGTERM (a graceful stop) when the
    supervisor dies, even by SIGKILL, instead of leaving it serving on its own."""
    if not sys.platform.startswith("linux"):
        return
    ctypes.CDLL(None, use_errno=True).prctl(_PR_SET_PDEATHSIG, signal.SIGTERM)
    if os.getppid() != supervisor:  # it died before the line above
        raise SystemExit(STARTUP_FAILURE)


class Supervisor(Multiprocess):
    """uvicorn's worker supervisor (restarts a worker that dies; SIGTERM/SIGINT stop
    every worker gracefully; SIGTTIN/SIGTTOU add or remove one), with three changes:
    SIGHUP makes every ready worker reload the config in place, as a single process
    does, instead of replacing the workers; the live gauges of a worker that is gone
    leave the shared metrics; and it tells whether it stopped because it was asked to."""

    def __init__(self, config: uvicorn.Config, sockets: list[socket], metrics_dir: str) -> None:
        super().__init__(config, sockets)
        self.metrics_dir = metrics_dir
        self.asked_to_stop = False
        self._pids: set[int] = set()

    def handle_int(self) -> None:
        self.asked_to_stop = True
        super().handle_int()

    def handle_term(self) -> None:
        self.asked_to_stop = True
        super().handle_term()

    def handle_hup(self) -> None:
        log.info("SIGHUP: every worker reloads the config")
        for process in self.processes:
            # a worker still starting has no SIGHUP handler yet (it would die); it reads the file anyway
            if process.pid is not None and process.is_ready(timeout=1):
                os.kill(process.pid, signal.SIGHUP)

    def keep_subprocess_alive(self) -> None:
        super().keep_subprocess_alive()
        self._forget_gone_workers()

    def handle_ttou(self) -> None:
        super().handle_ttou()
        self._forget_gone_workers()

    def join_all(self) -> None:
        super().join_all()
        for pid in self._pids | self._live_pids():
            self._mark_dead(pid)
        self._pids = set()

    def _live_pids(self) -> set[int]:
        return {process.pid for process in self.processes if process.pid is not None}

    def _forget_gone_workers(self) -> None:
        live = self._live_pids()
        for pid in self._pids - live:
            self._mark_dead(pid)
        self._pids = live

    def _mark_dead(self, pid: int) -> None:
        mark_process_dead(pid, self.metrics_dir)  # type: ignore[no-untyped-call]


def serve_workers(
    config: Config,
    *,
    workers: int,
    log_level: str,
    host: str | None = None,
    port: int | None = None,
    log_format: str = "json",
) -> bool:
    """Serve `config` (loaded from its file) with `workers` processes until SIGTERM or
    SIGINT; False when a worker could not start (the supervisor then stops them all)."""
    if config.source is None:
        raise ValueError("workers load the config from its file: this config has none")
    if config.redis.url is None:
        log.warning(
            "%d workers with in-process state: each keeps its own health, quotas and limits; "
            "set redis.url to share them",
            workers,
        )
    with _metrics_dir() as metrics_dir:
        uv_config = _uvicorn_config(
            WorkerApp(config.source, log_level, os.getpid(), log_format),
            config,
            host=host,
            port=port,
            workers=workers,
            factory=True,
        )
        supervisor = Supervisor(uv_config, [uv_config.bind_socket()], metrics_dir)
        supervisor.run()
        return supervisor.asked_to_stop


@contextlib.contextmanager
def _metrics_dir() -> Iterator[str]:
    """The directory the workers share metric values through: the operator's
    `PROMETHEUS_MULTIPROC_DIR` (emptied of a previous run's files), else a
    temporary one made for this run and removed after it."""
    given = os.environ.get(METRICS_DIR_VARIABLE)
    if given:
        os.makedirs(given, exist_ok=True)
        for stale in glob.glob(os.path.join(given, "*.db")):
            os.remove(stale)
        yield given
        return
    made = tempfile.mkdtemp(prefix="fallback-proxy-metrics-")
    os.environ[METRICS_DIR_VARIABLE] = made  # inherited by the workers, read by prometheus_client there
    try:
        yield made
    finally:
        del os.environ[METRICS_DIR_VARIABLE]
        shutil.rmtree(made, ignore_errors=True)
