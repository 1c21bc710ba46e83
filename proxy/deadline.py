"""One timer per stream for the deadline of each read or write it makes.

`asyncio.timeout` builds a context manager and a timer handle for every use;
a stream guards every chunk it reads from upstream and every chunk it writes
to the client, so it keeps one `Deadline` instead: `enter(when)` only stores a
float, and the timer, armed once, moves itself on when it fires early.
"""

from __future__ import annotations

import asyncio
import math

_SLACK = 0.001  # timers may fire this early (uvloop's clock counts milliseconds)


class Deadline:
    """Cancels its task when a guarded await outlives the deadline it entered with.

    Use as `enter(when)`, the await, `leave()`; on `CancelledError`, `expired()`
    says whether this deadline caused it (and absorbs that cancellation, as
    `asyncio.timeout` does), or whether someone else cancelled the task.
    """

    __slots__ = ("_cancelling", "_expired", "_handle", "_inside", "_loop", "_task", "_when")

    def __init__(self) -> None:
        self._loop = asyncio.get_running_loop()
        self._task: asyncio.Task[object] | None = None
        self._when = math.inf
        self._inside = False
        self._handle: asyncio.TimerHandle | None = None
        self._expired = False
        self._cancelling = 0

    def __repr__(self) -> str:
        state = "expired" if self._expired else "inside" if self._inside else "idle"
        return f"<Deadline {state} when={self._when:.3f}>"

    def now(self) -> float:
        return self._loop.time()

    def enter(self, when: float) -> None:
        """Guard the current task's next await until loop time `when`."""
        task = self._task
        if task is None:
            task = self._task = asyncio.current_task()
            assert task is not None, "a Deadline guards a task"
        self._cancelling = task.cancelling()
        self._when = when
        self._inside = True
        self._expired = False
        handle = self._handle
        if handle is None or handle.when() > when:
            if handle is not None:
                handle.cancel()
            self._handle = self._loop.call_at(when, self._fire)

    def leave(self) -> None:
        self._inside = False

    def expired(self) -> bool:
        """After a `CancelledError` in the guarded await: True when this deadline
        cancelled the task and no one else did (the error is then ours to turn
        into a timeout); False when the cancellation must go on."""
        self._inside = False
        if not self._expired:
            return False
        self._expired = False
        assert self._task is not None
        return self._task.uncancel() <= self._cancelling

    def close(self) -> None:
        self._inside = False
        if self._handle is not None:
            self._handle.cancel()
            self._handle = None

    def _fire(self) -> None:
        self._handle = None
        if not self._inside:
            return  # between awaits: the next `enter` arms the timer again
        if self._loop.time() + _SLACK < self._when:
            self._handle = self._loop.call_at(self._when, self._fire)  # moved on since it was armed
            return
        self._expired = True
        assert self._task is not None
        self._task.cancel()
