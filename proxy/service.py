"""The running proxy: what outlives a config reload (metrics, the HTTP clients,
the store, the tracer) and the current `Runtime`, swapped atomically on reload;
and the process-wide pieces it opens (the pooled upstream session, the store,
traces, alerts)."""

from __future__ import annotations

import asyncio
import gc
import hashlib
import logging
import os
import signal
import socket
import threading
from typing import TYPE_CHECKING, Any

import aiohttp
import httpx
from prometheus_client import CollectorRegistry

from proxy.adapters import HttpClients
from proxy.adapters.http import PooledConnector
from proxy.alerts import Alerter, Webhook
from proxy.background import Background
from proxy.config import Config, ConfigError, RedisSettings, TelemetrySettings, load_config
from proxy.metrics import AlertCounters, Metrics
from proxy.observe import Observer, OperatorEvents, event
from proxy.overload import InFlight, LoopLag, ceiling_within, open_files_limit
from proxy.runtime import Runtime, build_in_thread, restart_needed
from proxy.state import MemoryStore, RedisStore, StateStore

if TYPE_CHECKING:
    from proxy.telemetry import Tracing

log = logging.getLogger("fallback_proxy")

GC_YOUNG_THRESHOLD = 10_000
"""Net new container objects that start a young-generation collection (CPython's
default: 700). A request in flight holds ~60 (coroutines, tasks, handles, the
record) and frees them by reference counting: it leaves no cycle. At 32 requests in
flight the population swings by more than 700 all the time, so the default ran a
collection every ~20 requests (5 % of a short request's CPU), each walking every
young object in flight and finding nothing to free. Above the swing, steady load
runs none; garbage cycles (an exception's traceback) are still collected once
10,000 objects' worth have piled up (a few MB at most)."""


def default_transport() -> httpx.AsyncBaseTransport:
    """httpx's API over aiohttp's connection pool, for what still needs httpx
    (alert webhooks, litellm's `acompletion` fallback): several times cheaper
    per request than httpx's own transport on our machines."""
    from httpx_aiohttp import AiohttpTransport

    transport: httpx.AsyncBaseTransport = AiohttpTransport(
        # 0: no limit in the pool (see `open_session`).
        limits=httpx.Limits(max_connections=0, max_keepalive_connections=200, keepalive_expiry=30)
    )
    return transport


def open_session() -> aiohttp.ClientSession:
    """The pooled aiohttp session the adapters call providers with (the hot
    path: a call costs a fraction of the same call through httpx). No cookie
    jar: providers' cookies must not leak from one client's request into
    another's. Timeouts are set per attempt by the adapters. The pool has no
    limit of its own: a wait in it would look like the provider's connect
    timeout. A provider's `max_connections` is counted by its adapter, and the
    process's total by `server.max_in_flight`."""
    connector = PooledConnector(limit=0, limit_per_host=0, keepalive_timeout=30, ttl_dns_cache=60)
    return aiohttp.ClientSession(
        connector=connector,
        cookie_jar=aiohttp.DummyCookieJar(),
        timeout=aiohttp.ClientTimeout(total=None),
        skip_auto_headers=("User-Agent",),
        auto_decompress=True,
    )


def open_store(settings: RedisSettings) -> StateStore:
    """Redis (one server, a Sentinel's master, or a Redis Cluster) when a URL is
    configured (shared by replicas), else in-process."""
    if settings.url is None:
        return MemoryStore()
    return RedisStore.from_url(
        settings.url,
        prefix=settings.prefix,
        timeout=settings.timeout,
        breaker_seconds=settings.breaker_seconds,
        max_connections=settings.max_connections,
        pool_wait=settings.pool_wait,
        breaker_timeouts=settings.breaker_timeouts,
        health_ttl_seconds=settings.health_ttl,
        cluster=settings.cluster,
    )


def start_tracing(settings: TelemetrySettings) -> Tracing | None:
    """The OpenTelemetry tracer when traces are on; OpenTelemetry is imported
    only then (off, nothing of it is loaded)."""
    if not settings.enabled:
        return None
    from proxy.telemetry import Tracing

    return Tracing(settings)


class Service:
    """The running proxy: what outlives a config reload (metrics, the HTTP clients,
    the store) and the current `Runtime`, swapped atomically by `reload`. The app
    keeps it as `app.state.service`; what replicas share lives in the store (`proxy.state`)."""

    def __init__(self, config: Config, registry: CollectorRegistry, store: StateStore | None) -> None:
        self.initial_config = config
        self.metrics = Metrics(registry)
        self.observer = Observer(self.metrics)
        self.events = OperatorEvents(self.metrics)
        self.store = store
        self.clients: HttpClients | None = None
        self.alerts: Alerter | None = None
        self.tracing: Tracing | None = None  # built at start: its export thread belongs to the serving process
        self.runtime: Runtime | None = None
        self.config_hash = ""
        self.rejected_hash = ""  # the file content last rejected: the watch does not try it again
        self.loops = Background()
        self._reload_lock = asyncio.Lock()
        self.ready = False
        self.lag = LoopLag(self.metrics.loop_lag)
        # One process: the gauge reads the count when scraped, nothing per request. Several
        # workers: each adds its own to the shared files as it goes.
        counted = self.metrics.in_flight if self.metrics.multiprocess else None
        self.in_flight = InFlight(_ceiling(config), counted, self.metrics.shed)
        if counted is None:
            self.metrics.in_flight.set_function(lambda: self.in_flight.count)

    @property
    def config(self) -> Config:
        return self.runtime.config if self.runtime is not None else self.initial_config

    async def start(self, transport: httpx.AsyncBaseTransport | None) -> None:
        config = self.initial_config
        store = self.store = self.store or open_store(config.redis)
        client = httpx.AsyncClient(transport=transport or default_transport(), follow_redirects=False)
        self.clients = HttpClients(session=open_session(), client=client)
        self.tracing = start_tracing(config.telemetry)
        self.alerts = _alerter(config, client, self.metrics)
        if self.alerts is not None:
            await self.alerts.start()
            self.events.alerts = self.observer.alerts = self.alerts
        self.lag.start()
        self.runtime = await build_in_thread(config, self.clients, store, self.events, self.lag.recent)
        await self.runtime.start()
        self.config_hash = _file_hash(config.source)
        if config.source and config.server.reload_check_seconds > 0:
            self.loops.spawn(self._watch(config.source, config.server.reload_check_seconds))
        # What start-up built lives as long as the process: keep the collector
        # from walking it again and again (litellm alone leaves ~300k objects).
        gc.collect()
        gc.freeze()
        gc.set_threshold(GC_YOUNG_THRESHOLD, *gc.get_threshold()[1:])
        self.ready = True

    async def reload(self, trigger: str) -> dict[str, Any]:
        """Load the config file again; swap it in if valid, else keep serving the
        old one. Returns what happened (for logs and `POST /admin/reload`)."""
        async with self._reload_lock:
            return await self._reload(trigger)

    async def _reload(self, trigger: str) -> dict[str, Any]:
        old = self.runtime
        source = self.config.source
        assert old is not None and self.clients is not None and self.store is not None
        if source is None:
            return {"reloaded": False, "problems": ["this config was not loaded from a file"]}
        digest = await asyncio.to_thread(_file_hash, source)
        try:
            config = await asyncio.to_thread(load_config, source)
        except ConfigError as exc:
            self.rejected_hash = digest
            self.metrics.reloads.labels("rejected").inc()
            event("config_reload_failed", logging.ERROR, source=source, trigger=trigger, problems=list(exc.problems))
            if self.alerts is not None:
                self.alerts.notify("config_reload_failed", source=source, problems="; ".join(exc.problems))
            return {"reloaded": False, "source": source, "problems": list(exc.problems)}
        new = await build_in_thread(config, self.clients, self.store, self.events, self.lag.recent)
        new.health.adopt(old.health.snapshot())
        await new.start(warm_up=True)
        self.runtime, self.config_hash, self.rejected_hash = new, digest, ""  # an edit since: seen next check
        self.in_flight.configure(_ceiling(config))
        self.loops.spawn(old.retire())
        self.metrics.reloads.labels("ok").inc()
        restart = restart_needed(old.config, config)
        event(
            "config_reloaded",
            logging.WARNING,
            source=source,
            trigger=trigger,
            routes=len(config.routes),
            providers=len(config.providers),
            restart_needed=restart,
        )
        return {
            "reloaded": True,
            "source": source,
            "routes": sorted(config.routes),
            "providers": sorted(config.providers),
            "restart_needed": restart,
        }

    async def _watch(self, source: str, every: float) -> None:
        """Reload when the file's content changes (a ConfigMap update swaps a
        symlink, so the content is compared, not the inode). Each check is one
        `stat` on the loop (microseconds); the file is read and hashed, in a
        thread, only when what `stat` sees has changed: a thread per check would
        make the loop wait for the GIL to come back every few seconds. A content
        that was rejected is not tried again until it changes: one log line, one
        alert and one `rejected` count per bad edit, not one per check."""
        seen: tuple[int, int, int, int] | None = None  # the first check always reads the file
        while True:
            await asyncio.sleep(every)
            signature = _file_signature(source)
            if signature == seen:
                continue
            seen = signature
            digest = await asyncio.to_thread(_file_hash, source)
            if digest and digest not in (self.config_hash, self.rejected_hash):
                await self.reload("file changed")

    def on_sighup(self) -> None:
        self.loops.spawn(self.reload("SIGHUP"))

    async def stop(self) -> None:
        self.ready = False
        self.lag.stop()
        await self.loops.aclose()
        if self.runtime is not None:
            await self.runtime.retire()
        if self.alerts is not None:
            await self.alerts.aclose()
        if self.clients is not None:
            await self.clients.session.close()
            await self.clients.client.aclose()
        if self.store is not None:
            await self.store.aclose()
        if self.tracing is not None:  # last: the spans of what stopped above are exported too
            await self.tracing.aclose()


def _file_signature(path: str) -> tuple[int, int, int, int] | None:
    """What `stat` says of the file a path leads to (through symlinks), or None."""
    try:
        info = os.stat(path)
    except OSError:
        return None
    return info.st_dev, info.st_ino, info.st_mtime_ns, info.st_size


def _file_hash(path: str | None) -> str:
    """The digest of a config file's content; "" when there is none to judge: no
    file, or an empty one (a file being written: truncated, not yet filled in, as
    a plain `echo >` or an editor's save leaves it for a moment)."""
    if path is None:
        return ""
    try:
        with open(path, "rb") as file:
            content = file.read()
    except OSError:
        return ""
    return hashlib.sha256(content).hexdigest() if content else ""


def _alerter(config: Config, client: httpx.AsyncClient, metrics: Metrics) -> Alerter | None:
    settings = config.alerts
    if not settings.webhooks:
        return None
    hooks = [
        Webhook(url=h.url, format=h.format, events=h.events, chat_id=h.chat_id, timeout=h.timeout)
        for h in settings.webhooks
    ]
    return Alerter(
        hooks,
        client,
        dedupe_seconds=settings.dedupe_seconds,
        metrics=AlertCounters(metrics),
        instance=socket.gethostname(),
    )


def listen_for_sighup(service: Service) -> bool:
    """SIGHUP reloads the config (only possible in the main thread)."""
    if threading.current_thread() is not threading.main_thread() or not hasattr(signal, "SIGHUP"):
        return False
    asyncio.get_running_loop().add_signal_handler(signal.SIGHUP, service.on_sighup)
    return True


def _ceiling(config: Config) -> int:
    """`server.max_in_flight`, within what this process's open-files limit carries (said when lowered)."""
    configured = config.server.max_in_flight
    open_files = open_files_limit()
    ceiling = ceiling_within(configured, open_files)
    if ceiling != configured:
        event(
            "max_in_flight_lowered",
            logging.WARNING,
            configured=configured or None,
            open_files_limit=open_files,
            max_in_flight=ceiling,
            fix="raise the open-files limit (ulimit -n, systemd LimitNOFILE=) or lower server.max_in_flight",
        )
    return ceiling
