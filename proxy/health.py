"""Provider health: a pure state machine per provider, and the board that
keeps every replica's view of it in step through the state store.

States: HEALTHY, SLOW (answers, but its time to first token averages above
`slow_ttft_seconds`: demoted to the end of the walk), DEGRADED (recent
failures, still tried), OFFLINE (its breaker is open: skipped without a
network call). The breaker opens after `failure_threshold` consecutive
failures, at once on an auth error, and for a 429's Retry-After; after
`cooldown_seconds` (or as soon as an active probe succeeds) one request is let
through as a trial, and its success closes the breaker again: a recovery.

The proxy's own limits never count: `proxy_saturated` (no free connection
slot) is not a provider's failure, and a timeout that expires while this
process's event loop lags by `loop_lag_seconds` or more is excused (`excused`).

The functions at the top decide; `HealthBoard` applies their verdicts,
publishes changes to the other replicas and runs the free active probes.
"""

from __future__ import annotations

import asyncio
import enum
import logging
import math
import time
import uuid
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass, replace
from typing import Protocol

from proxy.background import Background
from proxy.config import HealthSettings, ProviderConfig
from proxy.errors import FailureClass, ProviderError
from proxy.state import StateStore, StoreUnavailable

log = logging.getLogger("fallback_proxy.health")

TTFT_SMOOTHING = 0.3


class Health(enum.StrEnum):
    HEALTHY = "healthy"
    SLOW = "slow"
    DEGRADED = "degraded"
    OFFLINE = "offline"

    @property
    def level(self) -> int:
        """The gauge value: 0 healthy, 1 slow, 2 degraded, 3 offline."""
        return _LEVELS[self]


_LEVELS = {Health.HEALTHY: 0, Health.SLOW: 1, Health.DEGRADED: 2, Health.OFFLINE: 3}


class Breaker(enum.StrEnum):
    CLOSED = "closed"
    OPEN = "open"
    HALF_OPEN = "half_open"


class Decision(enum.Enum):
    CALL = "call"
    TRIAL = "trial"  # the breaker's cooldown is over: this request tests the provider
    SKIP = "skip"


# Failures that say something about the provider rather than about the request.
COUNTED = frozenset(
    {
        FailureClass.TIMEOUT,
        FailureClass.CONNECTION_ERROR,
        FailureClass.SERVER_ERROR,
        FailureClass.AUTH_ERROR,
        FailureClass.MISCONFIGURED,
        FailureClass.RATE_LIMITED,
    }
)


@dataclass(frozen=True, slots=True)
class ProviderHealth:
    """One provider's health, as a value. `updated` is wall-clock time, so
    replicas can tell which record is newer."""

    state: Health = Health.HEALTHY
    breaker: Breaker = Breaker.CLOSED
    failures: int = 0  # consecutive counted failures
    retry_at: float = 0.0  # when an open breaker may let a trial through
    ttft: float | None = None  # smoothed time to first token, seconds
    reason: str = ""
    updated: float = 0.0
    disabled: bool = False  # switched off by an operator (a drill): skipped until enabled

    def to_record(self) -> dict[str, str]:
        return {
            "state": self.state.value,
            "breaker": self.breaker.value,
            "failures": str(self.failures),
            "retry_at": repr(self.retry_at),
            "ttft": "" if self.ttft is None else repr(self.ttft),
            "reason": self.reason,
            "updated": repr(self.updated),
            "disabled": "1" if self.disabled else "",
        }

    @classmethod
    def from_record(cls, record: Mapping[str, str]) -> ProviderHealth:
        """Parse a stored record; raises ValueError/KeyError on a malformed one."""
        ttft = record.get("ttft", "")
        return cls(
            state=Health(record["state"]),
            breaker=Breaker(record["breaker"]),
            failures=int(record.get("failures", "0")),
            retry_at=float(record.get("retry_at", "0")),
            ttft=float(ttft) if ttft else None,
            reason=record.get("reason", ""),
            updated=float(record["updated"]),
            disabled=bool(record.get("disabled")),
        )


def decide(health: ProviderHealth, now: float) -> Decision:
    """May a request call this provider now?"""
    if health.disabled:
        return Decision.SKIP
    if health.breaker is Breaker.CLOSED:
        return Decision.CALL
    if now >= health.retry_at:
        return Decision.TRIAL  # cooldown over, or a trial in flight took too long
    return Decision.SKIP


def begin_trial(health: ProviderHealth, settings: HealthSettings, now: float) -> ProviderHealth:
    """One request goes through; others keep skipping until it ends."""
    return replace(health, breaker=Breaker.HALF_OPEN, retry_at=now + settings.cooldown_seconds, updated=now)


def after_success(
    health: ProviderHealth, settings: HealthSettings, now: float, ttft: float | None = None
) -> ProviderHealth:
    if health.disabled:
        return health  # a request that was in flight when an operator switched it off
    smoothed = health.ttft
    if ttft is not None:
        smoothed = ttft if smoothed is None else smoothed + TTFT_SMOOTHING * (ttft - smoothed)
    slow = smoothed is not None and smoothed > settings.slow_ttft_seconds
    state = Health.SLOW if slow else Health.HEALTHY
    reason = f"time to first token {smoothed:.1f}s" if slow and smoothed is not None else ""
    if health.breaker is Breaker.CLOSED and health.failures == 0 and health.state is state:
        # Nothing to tell the other replicas.
        if smoothed == health.ttft:
            return health
        # `dataclasses.replace`, without its introspection: this runs on every answer.
        return ProviderHealth(
            health.state,
            health.breaker,
            health.failures,
            health.retry_at,
            smoothed,
            health.reason,
            health.updated,
            health.disabled,
        )
    return ProviderHealth(state=state, ttft=smoothed, reason=reason, updated=now)


def excused(failure: FailureClass, loop_lag: float, settings: HealthSettings) -> bool:
    """A timeout that expired while the event loop was this late may be the
    proxy's lateness (the answer waiting, unread, in a socket buffer): it is not
    counted against the provider. The walk still falls back for the client."""
    return failure is FailureClass.TIMEOUT and loop_lag >= settings.loop_lag_seconds


def after_failure(
    health: ProviderHealth,
    settings: HealthSettings,
    now: float,
    failure: FailureClass,
    retry_after: float | None = None,
) -> ProviderHealth:
    if failure not in COUNTED or health.disabled:
        return health
    failures = health.failures + 1
    if failure is FailureClass.AUTH_ERROR:
        return _opened(
            health, now + settings.cooldown_seconds, failures, now, "auth_error: the provider rejected our key"
        )
    if failure is FailureClass.MISCONFIGURED:
        reason = "misconfigured: the provider's own configuration is wrong (see the log)"
        return _opened(health, now + settings.cooldown_seconds, failures, now, reason)
    if failure is FailureClass.RATE_LIMITED and retry_after:
        return _opened(health, now + retry_after, failures, now, f"rate_limited: retry after {retry_after:g}s")
    if health.breaker is Breaker.HALF_OPEN or failures >= settings.failure_threshold:
        reason = f"{failure.value}: {failures} consecutive failures"
        return _opened(health, now + settings.cooldown_seconds, failures, now, reason)
    return replace(health, state=Health.DEGRADED, failures=failures, reason=failure.value, updated=now)


def _opened(health: ProviderHealth, retry_at: float, failures: int, now: float, reason: str) -> ProviderHealth:
    return replace(
        health,
        state=Health.OFFLINE,
        breaker=Breaker.OPEN,
        failures=failures,
        retry_at=retry_at,
        reason=reason,
        updated=now,
    )


# A probe answered with one of these says "this endpoint does not exist here",
# not "this provider is down": probing it stops; real traffic still tells.
PROBE_UNSUPPORTED_STATUSES = frozenset({404, 405, 501})
# Failures of a probe that say the provider itself is unwell.
PROBE_COUNTED = frozenset(
    {FailureClass.TIMEOUT, FailureClass.CONNECTION_ERROR, FailureClass.SERVER_ERROR, FailureClass.AUTH_ERROR}
)


class ProbeVerdict(enum.Enum):
    COUNTS = "counts"  # against the provider's health
    IGNORED = "ignored"  # a refusal that says nothing of its health (a 400, a 429), or one real traffic outranks
    UNSUPPORTED = "unsupported"  # the probe endpoint does not exist there: stop probing


def probe_verdict(error: ProviderError, answered_recently: bool) -> ProbeVerdict:
    """What a failed probe means for a provider's health. A provider that has
    just answered a real request is healthy whatever its probe says."""
    if error.status_code in PROBE_UNSUPPORTED_STATUSES:
        return ProbeVerdict.UNSUPPORTED
    if error.failure not in PROBE_COUNTED or answered_recently:
        return ProbeVerdict.IGNORED
    return ProbeVerdict.COUNTS


def after_probe_success(health: ProviderHealth, now: float) -> ProviderHealth:
    """A free probe answered: an open breaker may let its trial through now."""
    if not health.disabled and health.breaker is Breaker.OPEN and health.retry_at > now:
        return replace(health, retry_at=now, updated=now)
    return health


class HealthEvents(Protocol):
    """What the board tells operators about; `observe` implements it."""

    def state(self, provider: str, health: ProviderHealth) -> None: ...
    def breaker_opened(self, provider: str, health: ProviderHealth) -> None: ...
    def recovered(self, provider: str, health: ProviderHealth) -> None: ...
    def switched(self, provider: str, health: ProviderHealth) -> None: ...
    def store_error(self, operation: str, error: StoreUnavailable) -> None: ...
    def probe(self, provider: str, outcome: str) -> None: ...
    def excused(self, provider: str, failure: str, lag: float) -> None: ...


class HealthBoard:
    """This replica's view of every provider's health, kept in step with the
    others through the store. Reads never touch the network; changes are
    published in the background; a failing store leaves each replica on its
    own view."""

    def __init__(
        self,
        settings: HealthSettings,
        providers: Mapping[str, ProviderConfig],
        store: StateStore,
        events: HealthEvents,
        *,
        clock: Callable[[], float] = time.time,
        loop_lag: Callable[[], float] | None = None,
    ) -> None:
        """`loop_lag` says how late this process's event loop has lately run
        (`overload.LoopLag.recent`); without it no failure is excused."""
        self.settings = settings
        self.loop_lag = loop_lag
        self.store = store
        self.events = events
        self.clock = clock
        self.replica = uuid.uuid4().hex[:8]
        self._health = {name: ProviderHealth() for name in providers}
        self._answered: dict[str, float] = {}  # when each provider last answered a real request (clock time)
        self.unprobed: dict[str, str] = {}  # providers whose probe endpoint does not exist: why
        self.background = Background()

    def view(self, provider: str) -> ProviderHealth:
        return self._health[provider]

    def snapshot(self) -> dict[str, ProviderHealth]:
        return dict(self._health)

    def decide(self, provider: str) -> Decision:
        now = self.clock()
        health = self._health[provider]
        decision = decide(health, now)
        if decision is Decision.TRIAL:
            self._set(provider, begin_trial(health, self.settings, now))
        return decision

    def disable(self, provider: str, reason: str) -> None:
        """Switch a provider off on purpose (drills): every replica skips it."""
        now = self.clock()
        self._set(
            provider,
            ProviderHealth(
                state=Health.OFFLINE, breaker=Breaker.OPEN, retry_at=math.inf, reason=reason, updated=now, disabled=True
            ),
        )

    def enable(self, provider: str) -> None:
        """Switch a provider back on, healthy until its next failure."""
        self._set(provider, ProviderHealth(updated=self.clock()))

    def adopt(self, snapshot: Mapping[str, ProviderHealth]) -> None:
        """Carry another board's views over (a reloaded config keeps what it knew)."""
        for provider, health in snapshot.items():
            if provider in self._health:
                self._health[provider] = health

    def success(self, provider: str, ttft: float | None = None) -> None:
        now = self.clock()
        self._answered[provider] = now
        self._set(provider, after_success(self._health[provider], self.settings, now, ttft))

    def failure(self, provider: str, failure: FailureClass, retry_after: float | None = None) -> float | None:
        """Count a failed call against `provider`; or, for a timeout that expired
        while this process's loop lagged, excuse it: returns that lag then (None
        when the failure was counted)."""
        if self.loop_lag is not None and failure is FailureClass.TIMEOUT:
            lag = self.loop_lag()
            if excused(failure, lag, self.settings):
                self.events.excused(provider, failure.value, lag)
                return lag
        health = self._health[provider]
        self._set(provider, after_failure(health, self.settings, self.clock(), failure, retry_after))
        return None

    def _set(self, provider: str, new: ProviderHealth, *, publish: bool = True) -> None:
        old = self._health[provider]
        if new is old:
            return
        self._health[provider] = new
        if (old.state, old.breaker, old.failures, old.disabled) == (new.state, new.breaker, new.failures, new.disabled):
            return
        self._announce(provider, old, new)
        if publish:
            self.background.spawn(self._publish(provider, new))

    def _announce(self, provider: str, old: ProviderHealth, new: ProviderHealth) -> None:
        self.events.state(provider, new)
        if new.disabled != old.disabled:  # an operator's switch: not a failure, not a recovery
            self.events.switched(provider, new)
        elif new.breaker is Breaker.OPEN and old.breaker is not Breaker.OPEN:
            self.events.breaker_opened(provider, new)
        elif new.breaker is Breaker.CLOSED and old.breaker is not Breaker.CLOSED:
            self.events.recovered(provider, new)

    async def _publish(self, provider: str, health: ProviderHealth) -> None:
        record = {**health.to_record(), "replica": self.replica}
        try:
            await self.store.put_health(provider, record)
        except StoreUnavailable as exc:
            self.events.store_error("put_health", exc)

    def merge(self, provider: str, record: Mapping[str, str]) -> None:
        """Adopt another replica's record when it is newer than ours."""
        if provider not in self._health or record.get("replica") == self.replica:
            return
        try:
            remote = ProviderHealth.from_record(record)
        except (KeyError, ValueError):
            log.warning("ignoring a malformed health record for %s", provider)
            return
        if remote.updated >= self._health[provider].updated:
            self._set(provider, remote, publish=False)

    async def refresh(self) -> None:
        """Read every provider's record from the store (at start and periodically)."""
        try:
            records = await self.store.get_health(list(self._health))
        except StoreUnavailable as exc:
            self.events.store_error("get_health", exc)
            return
        for provider, record in records.items():
            self.merge(provider, record)

    async def follow(self, pause: float = 1.0) -> None:
        """Apply other replicas' changes as they are published; re-subscribe after a failure."""
        while True:
            try:
                async for provider, record in self.store.health_updates():
                    self.merge(provider, record)
            except StoreUnavailable as exc:
                self.events.store_error("subscribe", exc)
            await asyncio.sleep(pause)
            await self.refresh()

    async def probe_forever(self, probes: Mapping[str, Callable[[], Awaitable[None]]]) -> None:
        """Every probe interval, probe each provider that allows it; only one
        replica per provider per interval (a lock in the store)."""
        interval = self.settings.probe_interval_seconds
        if interval <= 0 or not probes:
            return
        while True:
            await asyncio.gather(*(self.probe_once(name, probe) for name, probe in probes.items()))
            await asyncio.sleep(interval)

    async def probe_once(self, provider: str, probe: Callable[[], Awaitable[None]]) -> None:
        if provider in self.unprobed or not await self._probe_lock(provider):
            return
        started = time.perf_counter()
        try:
            async with asyncio.timeout(self.settings.probe_timeout_seconds):
                await probe()
        except ProviderError as exc:
            self.events.probe(provider, exc.failure.value)
            self._probe_failed(provider, exc)
        except TimeoutError:
            self.events.probe(provider, FailureClass.TIMEOUT.value)
            self._probe_failed(provider, ProviderError(FailureClass.TIMEOUT, "the probe timed out"))
        else:
            self.events.probe(provider, "ok")
            log.debug("probe %s ok in %.1f ms", provider, (time.perf_counter() - started) * 1000)
            self._set(provider, after_probe_success(self._health[provider], self.clock()))

    def _probe_failed(self, provider: str, error: ProviderError) -> None:
        answered = self._answered.get(provider)
        recently = answered is not None and self.clock() - answered < self.settings.probe_interval_seconds
        verdict = probe_verdict(error, recently)
        if verdict is ProbeVerdict.UNSUPPORTED:
            self.unprobed[provider] = f"the probe endpoint answered {error.status_code}: probing is off"
            log.warning(
                "provider %s: the probe endpoint answered HTTP %s, so it is not probed; "
                "its health follows real requests only",
                provider,
                error.status_code,
            )
        elif verdict is ProbeVerdict.COUNTS:
            self.failure(provider, error.failure, error.retry_after)

    async def _probe_lock(self, provider: str) -> bool:
        try:
            return await self.store.try_lock(f"probe:{provider}", self.settings.probe_interval_seconds * 0.9)
        except StoreUnavailable as exc:
            self.events.store_error("try_lock", exc)
            return True  # without the store, each replica probes for itself

    async def aclose(self) -> None:
        await self.background.drain(timeout=0.5)
