"""Daily quotas per provider, admitted and counted atomically in the store.

A provider with a quota is called only after the store has admitted the call
(check and increment in one round trip). If the store cannot answer, the gate
**fails closed**: that provider is not called, and the walk goes on to the
providers without a quota. Usage is settled after the call from the real
token counts. A provider without a quota never touches the store.

Each upstream call that may have been sent costs one admission (retries
included); only a call that provably never left (the connection could not be
made) gives its request back. Every admission has a call id, so its settle
applies once, and only if the admission counted (see `proxy.state`).
"""

from __future__ import annotations

import datetime as dt
import logging
import secrets
import time
import zoneinfo
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Protocol

from proxy.adapters.base import Usage
from proxy.config import ProviderConfig, Quota
from proxy.errors import FailureClass, ProviderError
from proxy.state import Admission, ReplayEvents, StateStore, StoreUnavailable
from proxy.tokens import estimate_tokens

log = logging.getLogger("fallback_proxy.quota")

TTL_MARGIN_SECONDS = 3600


def quota_day(now: float, zone: dt.tzinfo) -> str:
    """The calendar day (in the quota's time zone) that `now` falls in."""
    return dt.datetime.fromtimestamp(now, zone).date().isoformat()


def seconds_to_midnight(now: float, zone: dt.tzinfo) -> int:
    local = dt.datetime.fromtimestamp(now, zone)
    midnight = dt.datetime.combine(local.date() + dt.timedelta(days=1), dt.time(), zone)
    return max(1, int(midnight.timestamp() - now))


def refusal(quota: Quota, admission: Admission, estimate: int) -> str:
    """Why the store refused, in words for the log and the 503 body."""
    if quota.requests_per_day is not None and admission.requests_used + 1 > quota.requests_per_day:
        return f"daily quota reached: {admission.requests_used}/{quota.requests_per_day} requests"
    return f"daily quota reached: {admission.tokens_used}+~{estimate}/{quota.tokens_per_day} tokens"


@dataclass(frozen=True, slots=True)
class Reservation:
    """What admission counted for one call, to be settled after it."""

    provider: str
    day: str
    tokens_estimate: int
    ttl: int
    call_id: str = ""


def never_sent(error: ProviderError) -> bool:
    """True when a failed call provably never reached the upstream (as classified:
    `ProviderError.sent`): its request is given back."""
    return not error.sent


def maybe_received(error: ProviderError) -> bool:
    """True when nobody can tell whether the upstream received a failed call: the
    connection broke with no answer at all (the server went away, a reset). Such a
    call is counted (the safe side for a quota) and reported as uncertain."""
    return error.sent and error.unanswered and error.status_code is None


class QuotaEvents(ReplayEvents, Protocol):
    """What the gate tells operators about, and the store's replay of failed
    settles; `observe.OperatorEvents` implements it."""

    def admitted(self, provider: ProviderConfig, admission: Admission) -> None: ...
    def exhausted(self, provider: ProviderConfig, reason: str) -> None: ...
    def fail_closed(self, provider: ProviderConfig, error: StoreUnavailable) -> None: ...
    def settle_failed(self, provider: str, error: StoreUnavailable) -> None: ...
    def uncertain(self, provider: str, detail: str) -> None: ...


class QuotaGate:
    def __init__(
        self, store: StateStore, timezone: str, events: QuotaEvents, *, clock: Callable[[], float] = time.time
    ) -> None:
        self.store = store
        self.zone = zoneinfo.ZoneInfo(timezone)
        self.events = events
        self.clock = clock
        store.watch(events)  # the settles that fail wait in the store's replay queue: report it

    async def admit(self, provider: ProviderConfig, body: dict[str, Any]) -> Reservation | None:
        """Admit one call or raise `ProviderError(quota_exhausted)`; None when
        the provider has no quota (no store round trip)."""
        quota = provider.quota
        if quota is None:
            return None
        now = self.clock()
        day = quota_day(now, self.zone)
        ttl = seconds_to_midnight(now, self.zone) + TTL_MARGIN_SECONDS
        estimate = estimate_tokens(body) if quota.tokens_per_day is not None else 0
        call_id = secrets.token_hex(8)
        try:
            admission = await self.store.admit(
                provider.name,
                day,
                requests_limit=quota.requests_per_day,
                tokens_limit=quota.tokens_per_day,
                tokens_estimate=estimate,
                ttl_seconds=ttl,
                call_id=call_id,
            )
        except StoreUnavailable as exc:
            self.events.fail_closed(provider, exc)
            raise ProviderError(
                FailureClass.QUOTA_EXHAUSTED, f"quota store unavailable ({exc.reason}): not called (fail closed)"
            ) from exc
        if not admission.admitted:
            reason = refusal(quota, admission, estimate)
            self.events.exhausted(provider, reason)
            raise ProviderError(FailureClass.QUOTA_EXHAUSTED, reason)
        self.events.admitted(provider, admission)
        return Reservation(provider.name, day, estimate, ttl, call_id)

    async def settle(
        self,
        reservation: Reservation | None,
        usage: Usage | None,
        failure: FailureClass | None,
        *,
        sent: bool = True,
        uncertain: str | None = None,
    ) -> None:
        """Correct the counters after the call: real tokens instead of the
        estimate; no tokens for a failed call; no request either when it was
        never `sent`. A failed call the provider may or may not have received
        stays counted and is reported with the reason why it is `uncertain`.
        A settle that meets an unavailable store is replayed by the store once
        it answers again."""
        if reservation is None:
            return
        if uncertain is not None:
            self.events.uncertain(reservation.provider, uncertain)
        requests_delta = 0 if sent else -1
        if failure is not None or not sent:
            tokens_delta = -reservation.tokens_estimate
        elif usage is not None and reservation.tokens_estimate:
            tokens_delta = usage.total_tokens - reservation.tokens_estimate
        else:
            tokens_delta = 0  # no better number than the estimate already counted
        if requests_delta == 0 and tokens_delta == 0 and not reservation.call_id:
            return  # nothing to change, and no admission mark to clear
        try:
            await self.store.settle(
                reservation.provider,
                reservation.day,
                requests_delta=requests_delta,
                tokens_delta=tokens_delta,
                ttl_seconds=reservation.ttl,
                call_id=reservation.call_id,
            )
        except StoreUnavailable as exc:
            self.events.settle_failed(reservation.provider, exc)
