"""The Redis store's circuit breaker, and how a failed Redis call counts toward it.

A connection failure opens the breaker at once; timeouts only when several come
in a row (one slow answer on a busy machine says little about Redis). While it
is open, calls are refused without I/O; then one trial call decides.
"""

from __future__ import annotations

from collections.abc import Callable


class StoreBreaker:
    """Opens after a connection failure, or after `timeouts` calls in a row that
    timed out (one slow answer on a busy machine says little about Redis); stays
    open for `seconds`; then one trial call, whose success closes it."""

    def __init__(self, seconds: float, clock: Callable[[], float], timeouts: int = 3) -> None:
        self.seconds = seconds
        self.clock = clock
        self.timeouts = max(1, timeouts)
        self.opened_at: float | None = None
        self.trial = False
        self.reason = ""
        self.timed_out = 0  # calls in a row that timed out

    def cooling(self) -> bool:
        return self.opened_at is not None and (self.trial or self.clock() - self.opened_at < self.seconds)

    def admit(self) -> bool | None:
        """None: refuse; True: this call is the trial; False: an ordinary call."""
        if self.opened_at is None:
            return False
        if self.cooling():
            return None
        self.trial = True
        return True

    def success(self, trial: bool) -> None:
        self.timed_out = 0
        # An ordinary call that started before the breaker opened proves nothing.
        if trial:
            self.opened_at, self.trial = None, False

    def abandon(self, trial: bool) -> None:
        """The trial ended without a verdict: let the next call be the trial."""
        if trial:
            self.trial = False

    def failure(self, reason: str, *, timeout: bool = False, trial: bool = False) -> None:
        if timeout and not trial:
            self.timed_out += 1
            if self.timed_out < self.timeouts:
                return
        self.opened_at, self.trial, self.reason = self.clock(), False, reason


def is_timeout(exc: BaseException) -> bool:
    """Whether a failed call timed out (rather than failed outright)."""
    from redis.exceptions import TimeoutError as RedisTimeout

    return isinstance(exc, (TimeoutError, RedisTimeout))


def describe_failure(exc: BaseException, hard_timeout: float) -> str:
    """A failed Redis call in words: Redis's own error code first (`READONLY ...`)."""
    from redis.exceptions import RedisError

    if isinstance(exc, RedisError):
        code = exc.status_code
        if code in ("MOVED", "ASK"):  # only a cluster client follows these
            return f"{code} {exc}: this is a Redis Cluster node (set redis.cluster: true)"
        return f"{code} {exc}" if code else f"{type(exc).__name__}: {exc}"
    if isinstance(exc, TimeoutError):
        return str(exc) or f"no answer within {hard_timeout * 1000:.0f} ms"
    return f"{type(exc).__name__}: {exc}"
