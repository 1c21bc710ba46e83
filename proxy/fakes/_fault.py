"""Fault descriptions for the fake provider servers, and the thread-safe holder for them."""

from __future__ import annotations

import dataclasses
import threading
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, Final

FAULT_KINDS: Final = ("none", "hang", "slow", "status", "stream_error", "die_midstream", "stall", "malformed")
_INT_FIELDS: Final = frozenset({"status", "after_chunks"})
_FLOAT_FIELDS: Final = frozenset({"first_token_delay", "token_delay"})


@dataclass
class Fault:
    """What a fake server does wrong on its next generation requests.

    Kinds:
      * ``none``: answer normally.
      * ``hang``: accept the request and never answer (until the client goes away or the fake stops).
      * ``slow``: wait ``first_token_delay`` before the first token (before anything at all for
        non-stream requests) and ``token_delay`` between stream chunks.
      * ``status``: answer ``status`` with the provider's real error body (``Retry-After`` when
        ``retry_after`` is set; ``error_code`` selects special errors such as
        ``context_length_exceeded``).
      * ``stream_error``: stream ``after_chunks`` content chunks, then the provider's in-band error
        event; non-stream requests get a 500.
      * ``die_midstream``: stream ``after_chunks`` content chunks, then close the connection without
        finishing the response; non-stream requests see the connection closed without a response.
      * ``stall``: stream ``after_chunks`` content chunks, then send nothing more with the connection
        left open (until the client goes away or the fake stops).
      * ``malformed``: stream ``after_chunks`` content chunks, then one event that is not JSON, then
        the rest of the answer as usual.

    "Connection refused" is not a fault kind: ``fake.stop()`` closes the port. A TCP-level black
    hole (connects that hang) is the separate :class:`~proxy.fakes.Blackhole` server.

    ``times`` limits the fault to the next N generation requests, after which the fake reverts to
    ``none``; ``None`` keeps it until changed. Only generation endpoints (chat / messages /
    generate) see faults; listing and control endpoints always answer normally.
    """

    kind: str = "none"
    status: int = 500
    retry_after: float | None = None
    error_code: str | None = None
    first_token_delay: float = 0.0
    token_delay: float = 0.0
    after_chunks: int = 2
    times: int | None = None

    def __post_init__(self) -> None:
        if self.kind not in FAULT_KINDS:
            raise ValueError(f"unknown fault kind {self.kind!r}; expected one of {', '.join(FAULT_KINDS)}")
        if not 100 <= self.status <= 599:
            raise ValueError(f"status must be an HTTP status code, got {self.status}")
        if self.after_chunks < 0:
            raise ValueError("after_chunks must be >= 0")
        if self.times is not None and self.times < 0:
            raise ValueError("times must be >= 0 or None")
        if self.first_token_delay < 0 or self.token_delay < 0:
            raise ValueError("delays must be >= 0")

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> Fault:
        """Build a Fault from JSON-ish data, rejecting unknown fields and wrong types with ValueError."""
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise ValueError(f"unknown fault field(s): {', '.join(unknown)}")
        for key, value in data.items():
            _check_field_type(key, value)
        return cls(**data)

    def to_dict(self) -> dict[str, Any]:
        """The fault as a JSON-serialisable dict."""
        return dataclasses.asdict(self)


def _check_field_type(key: str, value: object) -> None:
    """Raise ValueError unless ``value`` has the JSON type Fault expects for ``key``."""
    is_number = isinstance(value, int | float) and not isinstance(value, bool)
    if key in _INT_FIELDS:
        ok = isinstance(value, int) and not isinstance(value, bool)
    elif key == "times":
        ok = value is None or (isinstance(value, int) and not isinstance(value, bool))
    elif key in _FLOAT_FIELDS:
        ok = is_number
    elif key == "retry_after":
        ok = value is None or is_number
    elif key == "error_code":
        ok = value is None or isinstance(value, str)
    else:
        ok = isinstance(value, str)
    if not ok:
        raise ValueError(f"fault field {key!r} has the wrong type: {value!r}")


class FaultState:
    """The current fault of one fake plus its remaining ``times`` budget, guarded by a lock."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._fault = Fault()
        self._remaining: int | None = None

    @property
    def fault(self) -> Fault:
        with self._lock:
            return self._fault

    @fault.setter
    def fault(self, fault: Fault) -> None:
        with self._lock:
            self._fault = fault
            self._remaining = fault.times

    @property
    def remaining(self) -> int | None:
        """How many more requests the current fault applies to (None = unlimited)."""
        with self._lock:
            return self._remaining

    def take(self) -> Fault:
        """The fault for the request being handled now, consuming one of its ``times``."""
        with self._lock:
            fault = self._fault
            if fault.kind == "none" or self._remaining is None:
                return fault
            if self._remaining <= 0:
                self._fault, self._remaining = Fault(), None
                return self._fault
            self._remaining -= 1
            if self._remaining == 0:
                self._fault, self._remaining = Fault(), None
            return fault
