"""Micro-benchmark of `Observer.finish`: the per-request metrics and log line.

    python -m tests.benchmarks.observe_finish
    PROMETHEUS_MULTIPROC_DIR=$(mktemp -d) python -m tests.benchmarks.observe_finish   # as under --workers

Two records (a one-attempt answer with usage; a fallback then an answer with a
time to first token), at log levels info and warning, the log going where
`fallback-proxy serve` sends it (its JSON handler), here into /dev/null.
Prints the best of 5 runs of 20,000 calls, in µs per call.
"""

from __future__ import annotations

import functools
import logging
import timeit
from collections.abc import Callable

from prometheus_client import CollectorRegistry

from proxy.adapters import Usage
from proxy.metrics import Metrics
from proxy.observe import Observer, RequestRecord, configure_logging

CALLS = 20_000


def answered() -> RequestRecord:
    record = RequestRecord("0123456789abcdef0123456789abcdef", "default", stream=False)
    record.attempt("bench", "ok", 1.234)
    record.provider, record.model, record.usage = "bench", "gpt-4o-mini", Usage(12, 20)
    return record


def fell_back() -> RequestRecord:
    record = RequestRecord("0123456789abcdef0123456789abcdef", "default", stream=True)
    record.attempt("bench", "timeout", 10.5, "no first token within 10s")
    record.attempt("bench-b", "ok", 1.234)
    record.provider, record.model, record.usage, record.ttft_ms = "bench-b", "gpt-4o-mini", Usage(12, 20), 3.3
    return record


def main() -> None:
    with open("/dev/null", "w") as sink:
        for level in ("info", "warning"):
            configure_logging(level)
            handler = logging.getLogger().handlers[0]
            assert isinstance(handler, logging.StreamHandler)
            handler.setStream(sink)
            observer = Observer(Metrics(CollectorRegistry()))
            makers: dict[str, Callable[[], RequestRecord]] = {"answered": answered, "fell back": fell_back}
            for name, make in makers.items():
                record = make()
                best = min(timeit.repeat(functools.partial(observer.finish, record), number=CALLS, repeat=5))
                print(f"level {level:7} {name:9}: {best / CALLS * 1e6:5.1f} µs per finish")


if __name__ == "__main__":
    main()
