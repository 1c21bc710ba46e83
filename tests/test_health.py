"""The health state machine (pure) and the board that shares it between replicas."""

from __future__ import annotations

import asyncio

import pytest
from prometheus_client import CollectorRegistry

from proxy.config import HealthSettings, parse_config
from proxy.errors import FailureClass, ProviderError
from proxy.health import (
    Breaker,
    Decision,
    Health,
    HealthBoard,
    ProbeVerdict,
    ProviderHealth,
    after_failure,
    after_probe_success,
    after_success,
    begin_trial,
    decide,
    excused,
    probe_verdict,
)
from proxy.metrics import Metrics
from proxy.observe import OperatorEvents
from proxy.state import MemoryStore, RedisStore

from .redis_server import free_port

SETTINGS = HealthSettings(failure_threshold=3, cooldown_seconds=30, slow_ttft_seconds=2)
HEALTHY = ProviderHealth()


def fail(
    health: ProviderHealth,
    now: float,
    failure: FailureClass = FailureClass.SERVER_ERROR,
    retry_after: float | None = None,
) -> ProviderHealth:
    return after_failure(health, SETTINGS, now, failure, retry_after)


def test_consecutive_failures_degrade_then_open_the_breaker() -> None:
    one = fail(HEALTHY, 100)
    assert (one.state, one.breaker, one.failures) == (Health.DEGRADED, Breaker.CLOSED, 1)
    assert decide(one, 100) is Decision.CALL
    three = fail(fail(one, 101), 102)
    assert (three.state, three.breaker) == (Health.OFFLINE, Breaker.OPEN)
    assert decide(three, 102) is Decision.SKIP
    assert decide(three, 102 + 29.9) is Decision.SKIP
    assert decide(three, 102 + 30) is Decision.TRIAL


def test_a_success_resets_the_count() -> None:
    two = fail(fail(HEALTHY, 1), 2)
    assert after_success(two, SETTINGS, 3).failures == 0
    assert fail(after_success(two, SETTINGS, 3), 4).breaker is Breaker.CLOSED


def test_request_specific_failures_do_not_count() -> None:
    for failure in (
        FailureClass.CONTEXT_WINDOW_EXCEEDED,
        FailureClass.CLIENT_ERROR,
        FailureClass.CONTENT_FILTERED,
        FailureClass.QUOTA_EXHAUSTED,
    ):
        assert fail(HEALTHY, 1, failure) is HEALTHY


def test_auth_error_opens_at_once() -> None:
    health = fail(HEALTHY, 10, FailureClass.AUTH_ERROR)
    assert (health.state, health.breaker) == (Health.OFFLINE, Breaker.OPEN)
    assert "key" in health.reason


def test_rate_limit_honours_retry_after() -> None:
    health = fail(HEALTHY, 10, FailureClass.RATE_LIMITED, retry_after=5)
    assert decide(health, 14.9) is Decision.SKIP
    assert decide(health, 15) is Decision.TRIAL


def test_half_open_trial_success_closes_failure_reopens() -> None:
    opened = fail(HEALTHY, 0, FailureClass.AUTH_ERROR)
    trial = begin_trial(opened, SETTINGS, 31)
    assert trial.breaker is Breaker.HALF_OPEN
    assert decide(trial, 32) is Decision.SKIP  # one trial at a time
    closed = after_success(trial, SETTINGS, 33)
    assert (closed.state, closed.breaker) == (Health.HEALTHY, Breaker.CLOSED)
    reopened = fail(trial, 33, FailureClass.TIMEOUT)
    assert reopened.breaker is Breaker.OPEN and reopened.retry_at == 63


def test_probe_success_lets_the_trial_through_now() -> None:
    opened = fail(HEALTHY, 0, FailureClass.CONNECTION_ERROR, None)
    opened = fail(fail(opened, 0, FailureClass.CONNECTION_ERROR), 0, FailureClass.CONNECTION_ERROR)
    assert decide(opened, 5) is Decision.SKIP
    assert decide(after_probe_success(opened, 5), 5) is Decision.TRIAL
    assert after_probe_success(HEALTHY, 5) is HEALTHY


def test_slow_time_to_first_token_marks_slow_and_recovers() -> None:
    slow = after_success(after_success(HEALTHY, SETTINGS, 1, ttft=5.0), SETTINGS, 2, ttft=5.0)
    assert slow.state is Health.SLOW and "first token" in slow.reason
    fast = slow
    for t in range(10):
        fast = after_success(fast, SETTINGS, 3 + t, ttft=0.2)
    assert fast.state is Health.HEALTHY


def test_record_round_trip() -> None:
    health = fail(after_success(HEALTHY, SETTINGS, 1, ttft=0.5), 2)
    assert ProviderHealth.from_record(health.to_record()) == health


def board(store: MemoryStore, clock: list[float]) -> HealthBoard:
    config = parse_config({"providers": {"p": {"model": "openai/x"}}, "health": {"failure_threshold": 2}}, environ={})
    return HealthBoard(
        config.health, config.providers, store, OperatorEvents(Metrics(CollectorRegistry())), clock=lambda: clock[0]
    )


@pytest.mark.asyncio
async def test_replicas_share_an_open_breaker_and_its_recovery() -> None:
    store, clock = MemoryStore(), [1000.0]
    one, two = board(store, clock), board(store, clock)
    followers = [asyncio.create_task(b.follow(pause=0.01)) for b in (one, two)]
    await asyncio.sleep(0)
    one.failure("p", FailureClass.TIMEOUT)
    one.failure("p", FailureClass.TIMEOUT)
    for _ in range(100):
        if two.view("p").breaker is Breaker.OPEN:
            break
        await asyncio.sleep(0.01)
    assert two.decide("p") is Decision.SKIP
    clock[0] += 31
    assert two.decide("p") is Decision.TRIAL
    two.success("p")
    for _ in range(100):
        if one.view("p").breaker is Breaker.CLOSED:
            break
        await asyncio.sleep(0.01)
    assert one.decide("p") is Decision.CALL
    for follower in followers:
        follower.cancel()
    await one.aclose()
    await two.aclose()


@pytest.mark.asyncio
async def test_probes_detect_failure_and_recovery() -> None:
    clock = [1000.0]
    store = MemoryStore(clock=lambda: clock[0])
    b = board(store, clock)
    up = [False]

    async def probe() -> None:
        if not up[0]:
            raise ProviderError(FailureClass.CONNECTION_ERROR, "refused")

    await b.probe_once("p", probe)
    clock[0] += 10
    await b.probe_once("p", probe)
    assert b.view("p").state is Health.OFFLINE and b.decide("p") is Decision.SKIP
    up[0] = True
    clock[0] += 10
    await b.probe_once("p", probe)
    assert b.decide("p") is Decision.TRIAL
    b.success("p")
    assert b.view("p").state is Health.HEALTHY
    await b.aclose()


def test_a_misconfigured_provider_opens_at_once() -> None:
    health = fail(HEALTHY, 10, FailureClass.MISCONFIGURED)
    assert (health.state, health.breaker) == (Health.OFFLINE, Breaker.OPEN)


@pytest.mark.parametrize(
    ("error", "recently", "verdict"),
    [
        (ProviderError(FailureClass.SERVER_ERROR, "HTTP 404", status_code=404), False, ProbeVerdict.UNSUPPORTED),
        (ProviderError(FailureClass.CLIENT_ERROR, "HTTP 405", status_code=405), False, ProbeVerdict.UNSUPPORTED),
        (ProviderError(FailureClass.SERVER_ERROR, "HTTP 501", status_code=501), False, ProbeVerdict.UNSUPPORTED),
        (ProviderError(FailureClass.SERVER_ERROR, "HTTP 503", status_code=503), False, ProbeVerdict.COUNTS),
        (ProviderError(FailureClass.CONNECTION_ERROR, "refused"), False, ProbeVerdict.COUNTS),
        (ProviderError(FailureClass.AUTH_ERROR, "HTTP 401", status_code=401), False, ProbeVerdict.COUNTS),
        (ProviderError(FailureClass.RATE_LIMITED, "HTTP 429", status_code=429), False, ProbeVerdict.IGNORED),
        (ProviderError(FailureClass.CLIENT_ERROR, "HTTP 400", status_code=400), False, ProbeVerdict.IGNORED),
        (ProviderError(FailureClass.CONNECTION_ERROR, "refused"), True, ProbeVerdict.IGNORED),
    ],
)
def test_what_a_failed_probe_means(error: ProviderError, recently: bool, verdict: ProbeVerdict) -> None:
    assert probe_verdict(error, recently) is verdict


@pytest.mark.asyncio
async def test_a_probe_endpoint_that_does_not_exist_turns_probing_off_not_the_provider() -> None:
    clock = [1000.0]
    b = board(MemoryStore(clock=lambda: clock[0]), clock)
    calls = [0]

    async def probe() -> None:
        calls[0] += 1
        raise ProviderError(FailureClass.SERVER_ERROR, "HTTP 404: Not Found", status_code=404)

    for _ in range(5):
        await b.probe_once("p", probe)
        clock[0] += 10
    assert calls[0] == 1 and "404" in b.unprobed["p"]
    assert b.view("p").state is Health.HEALTHY and b.decide("p") is Decision.CALL
    await b.aclose()


@pytest.mark.asyncio
async def test_real_traffic_outranks_a_probe() -> None:
    clock = [1000.0]
    b = board(MemoryStore(clock=lambda: clock[0]), clock)

    calls = [0]

    async def probe() -> None:
        calls[0] += 1
        raise ProviderError(FailureClass.TIMEOUT, "the probe timed out")

    for _ in range(5):
        clock[0] += 9.5  # past the probe lock of the last round
        b.success("p")  # a request answered just now
        clock[0] += 0.2
        await b.probe_once("p", probe)
    assert calls[0] == 5 and b.view("p").state is Health.HEALTHY
    clock[0] += 60  # no traffic since: the probes count again
    for _ in range(3):
        await b.probe_once("p", probe)
        clock[0] += 10
    assert b.view("p").breaker is Breaker.OPEN
    await b.aclose()


def test_the_proxys_own_saturation_never_counts_against_a_provider() -> None:
    health = HEALTHY
    for t in range(10):
        health = fail(health, t, FailureClass.PROXY_SATURATED)
    assert health is HEALTHY


def test_only_a_timeout_during_loop_lag_is_excused() -> None:
    assert excused(FailureClass.TIMEOUT, 0.3, HealthSettings(loop_lag_seconds=0.25))
    assert not excused(FailureClass.TIMEOUT, 0.2, HealthSettings(loop_lag_seconds=0.25))
    assert not excused(FailureClass.CONNECTION_ERROR, 5.0, HealthSettings(loop_lag_seconds=0.25))
    assert not excused(FailureClass.SERVER_ERROR, 5.0, HealthSettings(loop_lag_seconds=0.25))


def test_the_board_excuses_timeouts_while_the_loop_lags_and_counts_them_after() -> None:
    config = parse_config({"providers": {"p": {"model": "openai/x"}}, "health": {"failure_threshold": 1}}, environ={})
    registry = CollectorRegistry()
    lag = [1.0]
    board = HealthBoard(
        config.health, config.providers, MemoryStore(), OperatorEvents(Metrics(registry)), loop_lag=lambda: lag[0]
    )
    board.failure("p", FailureClass.TIMEOUT)
    assert board.view("p") == ProviderHealth()
    labels = {"provider": "p", "failure": "timeout", "reason": "event_loop_lag"}
    assert registry.get_sample_value("fallback_proxy_health_excused_total", labels) == 1
    lag[0] = 0.001
    board.failure("p", FailureClass.TIMEOUT)
    assert board.view("p").breaker is Breaker.OPEN


def counted(registry: CollectorRegistry, name: str, **labels: str) -> float:
    return registry.get_sample_value(name, labels) or 0.0


@pytest.mark.asyncio
async def test_a_board_whose_store_cannot_answer_decides_alone_and_says_so() -> None:
    """Redis down (nobody listens on its port): publishing, reading and the probe lock each
    fail and are counted; the replica's own view still opens the breaker, and it probes
    for itself."""
    registry, clock = CollectorRegistry(), [1000.0]
    config = parse_config({"providers": {"p": {"model": "openai/x"}}, "health": {"failure_threshold": 2}}, environ={})
    store = RedisStore.from_url(f"redis://127.0.0.1:{free_port()}/0", breaker_seconds=0)
    b = HealthBoard(config.health, config.providers, store, OperatorEvents(Metrics(registry)), clock=lambda: clock[0])
    try:
        b.failure("p", FailureClass.SERVER_ERROR)
        b.failure("p", FailureClass.SERVER_ERROR)
        assert b.view("p").breaker is Breaker.OPEN and b.decide("p") is Decision.SKIP
        await b.background.drain(timeout=5)  # the publishes run in the background: let them end
        assert counted(registry, "fallback_proxy_store_errors_total", operation="put_health") == 2
        await b.refresh()
        assert counted(registry, "fallback_proxy_store_errors_total", operation="get_health") == 1
        assert b.view("p").breaker is Breaker.OPEN  # nothing read, nothing lost
        probes = [0]

        async def probe() -> None:
            probes[0] += 1

        await b.probe_once("p", probe)
        assert probes[0] == 1 and counted(registry, "fallback_proxy_store_errors_total", operation="try_lock") == 1
        assert b.decide("p") is Decision.TRIAL  # the probe answered: the next request may try
    finally:
        await b.aclose()
        await store.aclose()


@pytest.mark.asyncio
async def test_a_probe_that_hangs_is_a_timeout_and_counts_against_the_provider() -> None:
    registry, clock = CollectorRegistry(), [1000.0]
    config = parse_config(
        {
            "providers": {"p": {"model": "openai/x"}},
            "health": {"failure_threshold": 1, "probe_timeout_seconds": 0.05},
        },
        environ={},
    )
    store = MemoryStore(clock=lambda: clock[0])
    b = HealthBoard(config.health, config.providers, store, OperatorEvents(Metrics(registry)), clock=lambda: clock[0])

    async def hangs() -> None:
        await asyncio.Event().wait()

    await asyncio.wait_for(b.probe_once("p", hangs), 5)
    assert counted(registry, "fallback_proxy_probes_total", provider="p", outcome="timeout") == 1
    assert b.view("p").breaker is Breaker.OPEN and b.view("p").reason.startswith("timeout")
    await b.aclose()


@pytest.mark.asyncio
async def test_a_malformed_record_from_another_replica_is_ignored(caplog: pytest.LogCaptureFixture) -> None:
    clock = [1000.0]
    b = board(MemoryStore(clock=lambda: clock[0]), clock)
    b.failure("p", FailureClass.SERVER_ERROR)
    before = b.view("p")
    b.merge("p", {"replica": "other", "state": "on fire", "breaker": "closed", "updated": "2000"})
    b.merge("p", {"replica": "other", "state": "healthy"})  # no breaker, no time
    assert b.view("p") == before
    assert caplog.text.count("ignoring a malformed health record for p") == 2
    await b.aclose()
