"""Everything built from one config, and swapping it for a new one.

A `Runtime` holds what one config makes: the adapters, the health board, the
quota gate, the dispatcher and their background loops (probes, following
other replicas, warm-ups). Process-wide things (the HTTP client, the state
store, metrics) outlive it. A reload builds a new runtime beside the old one,
carries the health views over and swaps it in at once: requests already under
way finish on the runtime they started with.
"""

from __future__ import annotations

import asyncio
import functools
import logging
import time
from collections.abc import Awaitable, Callable, Mapping

from proxy.adapters import Adapter, AttemptLimits, HttpClients, make_adapter
from proxy.background import Background
from proxy.config import Config
from proxy.dispatch import Dispatcher
from proxy.errors import ProviderError
from proxy.health import HealthBoard
from proxy.intake import key_digest
from proxy.limits import ClientLimits, stream_lease_seconds
from proxy.metrics import Metrics
from proxy.observe import OperatorEvents, event
from proxy.quota import QuotaGate
from proxy.state import StateStore

log = logging.getLogger("fallback_proxy")


class Runtime:
    """One config, ready to serve."""

    def __init__(
        self,
        config: Config,
        adapters: Mapping[str, Adapter],
        store: StateStore,
        events: OperatorEvents,
        metrics: Metrics,
        loop_lag: Callable[[], float] | None = None,
    ) -> None:
        self.config = config
        self.adapters = adapters
        self.key_digests = tuple(key_digest(key) for key in config.auth_keys)
        self.admin_digest = key_digest(config.server.admin_key) if config.server.admin_key else None
        self.health = HealthBoard(config.health, config.providers, store, events, loop_lag=loop_lag)
        self.quota = QuotaGate(store, config.quota_timezone, events)
        self.dispatcher = Dispatcher(config, adapters, self.health, self.quota, metrics=metrics)
        self.limits = ClientLimits(
            config.limits,
            store,
            events.store_error,
            lease_seconds=stream_lease_seconds(config),
        )
        self.store = store
        self.loops = Background()

    @classmethod
    def build(
        cls,
        config: Config,
        clients: HttpClients,
        store: StateStore,
        events: OperatorEvents,
        loop_lag: Callable[[], float] | None = None,
    ) -> Runtime:
        """Build the adapters (litellm is imported here when a provider needs it: seconds).
        A provider the config disables gets none: no walk calls it, nothing probes it."""
        adapters = {
            name: make_adapter(provider, clients, events)
            for name, provider in config.providers.items()
            if provider.disabled_reason is None
        }
        return cls(config, adapters, store, events, events.metrics, loop_lag)

    async def start(self, *, warm_up: bool = True) -> None:
        await self.health.refresh()
        if self.store.kind != "memory":
            self.loops.spawn(self.health.follow())
        self.loops.spawn(self.health.probe_forever(self._probes()))
        for name, provider in self.config.providers.items():
            if provider.warmup and warm_up and name in self.adapters:
                self.loops.spawn(_warm_up(name, self.adapters[name]))

    def _probes(self) -> dict[str, Callable[[], Awaitable[None]]]:
        timeout = self.config.health.probe_timeout_seconds
        limits = AttemptLimits(connect=timeout, read=timeout)
        return {
            name: functools.partial(self.adapters[name].probe, limits)
            for name, provider in self.config.providers.items()
            if provider.probe and name in self.adapters
        }

    async def retire(self) -> None:
        """Stop the loops; settle what requests left behind."""
        await self.loops.aclose()
        await self.dispatcher.aclose()
        await self.health.aclose()


async def _warm_up(name: str, adapter: Adapter) -> None:
    """Load a local model at start (in the background: readiness does not wait)."""
    warmup = getattr(adapter, "warmup", None)
    if warmup is None:
        return
    started = time.perf_counter()
    try:
        await warmup()
    except ProviderError as exc:
        event("warmup_failed", logging.WARNING, provider=name, failure=exc.failure.value, detail=exc.message)
        return
    event("warmed_up", provider=name, ms=round((time.perf_counter() - started) * 1000, 1))


def restart_needed(old: Config, new: Config) -> list[str]:
    """Settings a reload cannot change in a running process."""
    changed = []
    if (old.server.host, old.server.port) != (new.server.host, new.server.port):
        changed.append("server.host/port")
    if old.redis != new.redis:
        changed.append("redis")
    if old.alerts != new.alerts:
        changed.append("alerts")
    if old.telemetry != new.telemetry:
        changed.append("telemetry")
    return changed


async def build_in_thread(
    config: Config,
    clients: HttpClients,
    store: StateStore,
    events: OperatorEvents,
    loop_lag: Callable[[], float] | None = None,
) -> Runtime:
    """Build a runtime off the event loop: importing litellm blocks for seconds.
    `loop_lag` lets its health board excuse timeouts the proxy's lateness caused."""
    return await asyncio.to_thread(Runtime.build, config, clients, store, events, loop_lag)
