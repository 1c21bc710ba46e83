"""The documented Prometheus metrics, on the app's own registry, and the
small helpers that keep their hot-path cost down.

Under `fallback-proxy serve --workers N` every worker process writes its metric
values to files in prometheus_client's `PROMETHEUS_MULTIPROC_DIR` (set by the
supervisor) and `/metrics` sums them, so any worker answers for all of them.
"""

from __future__ import annotations

import bisect
import time
from collections.abc import Iterable, Iterator
from typing import Generic, Literal, Protocol, TypeVar

import prometheus_client.metrics
from prometheus_client import CollectorRegistry, Counter, Gauge, GCCollector, Histogram, ProcessCollector, values
from prometheus_client.core import CounterMetricFamily
from prometheus_client.metrics_core import Metric as Family
from prometheus_client.multiprocess import MultiProcessCollector
from prometheus_client.registry import Collector
from prometheus_client.utils import floatToGoString

_LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300)
_LAG_BUCKETS = (
    0.0005, 0.001, 0.002, 0.003, 0.005, 0.0075, 0.01, 0.015, 0.02, 0.03, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3, 0.5, 1, 2, 5
)  # fmt: skip
GaugeMode = Literal["livemostrecent", "livesum"]


def shared_between_processes() -> bool:
    """True when prometheus_client keeps metric values in files shared by worker
    processes (it chose so at import, from `PROMETHEUS_MULTIPROC_DIR`)."""
    return bool(getattr(values.ValueClass, "_multiprocess", False))


class Metrics:
    """The documented metrics, registered on the app's own registry.

    In multi-process mode the metrics themselves are registered nowhere (their
    values live in this process's files) and the app's registry instead holds a
    collector that sums every worker's files. A gauge is one process's view, so
    across workers it shows the most recently set value of the live ones, except
    where each worker holds its own share of a total (the store's replay queue):
    that gauge sums the live workers.
    """

    def __init__(self, registry: CollectorRegistry) -> None:
        self.registry = registry
        self.multiprocess = shared_between_processes()
        if self.multiprocess:
            MultiProcessCollector(registry)  # type: ignore[no-untyped-call]
        else:  # the process's own figures: CPU, memory, descriptors, garbage collections (one process only)
            ProcessCollector(registry=registry)
            GCCollector(registry=registry)
        own: CollectorRegistry | None = None if self.multiprocess else registry
        gauge_mode: GaugeMode = "livemostrecent"
        # What every request counts: tallies (plain numbers, exposed when scraped), or in
        # multi-process mode prometheus_client's metrics on the shared files.
        tallies = RequestTallies() if own is not None else None
        self.requests = _counter(
            tallies,
            "fallback_proxy_requests",
            "Requests answered, by route, answering provider and outcome.",
            ("route", "provider", "outcome"),
        )
        self.attempts = _counter(
            tallies,
            "fallback_proxy_attempts",
            "Provider attempts and skips, by provider and outcome class.",
            ("provider", "outcome"),
        )
        self.fallbacks = _counter(
            tallies,
            "fallback_proxy_fallbacks",
            "Fallbacks from one provider to the next, with the reason.",
            ("route", "from_provider", "to_provider", "reason"),
        )
        self.continuations = Counter(
            "fallback_proxy_continuations",
            "Streams continued by the next provider after one failed mid-stream.",
            ["route", "from_provider", "to_provider", "reason"],
            registry=own,
        )
        self.latency = _histogram(
            tallies, "fallback_proxy_request_duration_seconds", "Whole request time as seen by the proxy.", ("route",)
        )
        # By endpoint (chat, responses, embeddings): families of their own, so that the
        # label sets of `requests` and `request_duration_seconds` stay what dashboards use.
        self.endpoint_requests = _counter(
            tallies,
            "fallback_proxy_endpoint_requests",
            "Requests answered, by endpoint (chat, responses, embeddings), route and outcome.",
            ("endpoint", "route", "outcome"),
        )
        self.endpoint_latency = _histogram(
            tallies,
            "fallback_proxy_endpoint_request_duration_seconds",
            "Whole request time as seen by the proxy, by endpoint.",
            ("endpoint",),
        )
        self.ttft = _histogram(
            tallies,
            "fallback_proxy_time_to_first_token_seconds",
            "Time to the first token of streamed answers.",
            ("provider",),
        )
        self.tokens = _counter(tallies, "fallback_proxy_tokens", "Tokens reported by providers.", ("provider", "kind"))
        if tallies is not None:
            registry.register(tallies)
        self.health = Gauge(
            "fallback_proxy_provider_health",
            "Provider health: 0 healthy, 1 slow, 2 degraded, 3 offline.",
            ["provider"],
            registry=own,
            multiprocess_mode=gauge_mode,
        )
        self.breaker_open = Gauge(
            "fallback_proxy_breaker_open",
            "1 while the provider's circuit breaker is open.",
            ["provider"],
            registry=own,
            multiprocess_mode=gauge_mode,
        )
        self.breaker_opened = Counter(
            "fallback_proxy_breaker_opened",
            "Times a provider's breaker opened.",
            ["provider"],
            registry=own,
        )
        self.recoveries = Counter(
            "fallback_proxy_recoveries",
            "Times a provider came back (its breaker closed).",
            ["provider"],
            registry=own,
        )
        self.malformed = Counter(
            "fallback_proxy_malformed_chunks",
            "Upstream stream events that could not be read and were skipped (the stream went on).",
            ["provider"],
            registry=own,
        )
        self.probes = Counter(
            "fallback_proxy_probes",
            "Active health probes, by outcome.",
            ["provider", "outcome"],
            registry=own,
        )
        self.store_errors = Counter(
            "fallback_proxy_store_errors",
            "State store calls that failed, by operation.",
            ["operation"],
            registry=own,
        )
        self.store_pending = Gauge(
            "fallback_proxy_store_pending",
            "Quota settles and stream lease releases that failed and wait for the store to answer.",
            registry=own,
            multiprocess_mode="livesum",
        )
        self.store_replayed = Counter(
            "fallback_proxy_store_replayed",
            "Queued settles and releases applied once the store answered.",
            registry=own,
        )
        self.store_dropped = Counter(
            "fallback_proxy_store_dropped",
            "Queued settles and releases given up (the queue was full, or the store closed).",
            registry=own,
        )
        self.quota_remaining = Gauge(
            "fallback_proxy_quota_remaining",
            "What is left of today's quota (as of this replica's last admit).",
            ["provider", "kind"],
            registry=own,
            multiprocess_mode=gauge_mode,
        )
        self.quota_exhausted = Counter(
            "fallback_proxy_quota_exhausted",
            "Calls refused because today's quota is spent.",
            ["provider"],
            registry=own,
        )
        self.reloads = Counter(
            "fallback_proxy_config_reloads",
            "Config reloads, by outcome (ok, rejected).",
            ["outcome"],
            registry=own,
        )
        self.alerts = Counter(
            "fallback_proxy_alerts",
            "Operator alerts, by kind, webhook format and outcome.",
            ["kind", "format", "outcome"],
            registry=own,
        )
        self.quota_fail_closed = Counter(
            "fallback_proxy_quota_fail_closed",
            "Calls not made because the quota store could not answer (fail closed).",
            ["provider"],
            registry=own,
        )
        self.quota_uncertain = Counter(
            "fallback_proxy_quota_uncertain",
            "Calls counted by the quota that the provider may or may not have received (cancelled, or"
            " the connection broke with no answer).",
            ["provider"],
            registry=own,
        )
        self.in_flight = Gauge(
            "fallback_proxy_in_flight",
            "Requests in flight (a stream until its last byte); summed over workers.",
            registry=own,
            multiprocess_mode="livesum",
        )
        self.shed = Counter(
            "fallback_proxy_shed",
            "Requests refused at once with 503 server_overloaded: the worker was at server.max_in_flight.",
            registry=own,
        )
        self.loop_lag = Histogram(
            "fallback_proxy_event_loop_lag_seconds",
            "How late the event loop ran a timer that was due (sampled every 50 ms per worker).",
            buckets=_LAG_BUCKETS,
            registry=own,
        )
        self.health_excused = Counter(
            "fallback_proxy_health_excused",
            "Failures not counted against a provider because the proxy itself was the cause"
            " (a timeout while the event loop lagged).",
            ["provider", "failure", "reason"],
            registry=own,
        )


class AlertCounters:
    """Alert delivery outcomes as metrics (the alerts module's counters)."""

    def __init__(self, metrics: Metrics) -> None:
        self.counter = metrics.alerts

    def delivered(self, kind: str, fmt: str) -> None:
        self.counter.labels(kind, fmt, "delivered").inc()

    def failed(self, kind: str, fmt: str) -> None:
        self.counter.labels(kind, fmt, "failed").inc()

    def suppressed(self, kind: str) -> None:
        self.counter.labels(kind, "-", "suppressed").inc()


Metric = TypeVar("Metric", Counter, Gauge, Histogram)


class Children(Generic[Metric]):
    """A metric's labelled children, looked up once per label values.

    `metric.labels(...)` validates and converts its arguments on every call;
    the label values a request can carry are bounded by the config (routes,
    providers, outcome classes), so the children are kept by their tuple.
    """

    __slots__ = ("_children", "_metric")

    def __init__(self, metric: Metric) -> None:
        self._metric: Metric = metric
        self._children: dict[tuple[str, ...], Metric] = {}

    def __call__(self, *labels: str) -> Metric:
        child = self._children.get(labels)
        if child is None:
            child = self._children[labels] = self._metric.labels(*labels)
        return child


# --- what every request counts ------------------------------------------------------------

Labels = tuple[str, ...]


class CountsBy(Protocol):
    """A counter family by label values (in order of the family's label names)."""

    def inc(self, labels: Labels, amount: float = 1.0) -> None: ...


class ObservesBy(Protocol):
    """A histogram family by label values."""

    def observe(self, labels: Labels, value: float) -> None: ...


def _created_series() -> bool:
    """Whether `_created` samples are exposed (prometheus_client's
    `disable_created_metrics()` turns them off for its own metrics: the same here)."""
    return bool(getattr(prometheus_client.metrics, "_use_created", True))


class Tally:
    """A counter family kept as plain numbers, one per label values, and
    exposed when scraped, exactly as prometheus_client's `Counter` exposes it
    (`_total` and `_created`). A count is one dict update: a `Counter`'s
    `labels(...).inc()` is a dozen Python calls and a lock, which every request
    paid several times over."""

    __slots__ = ("_created", "_values", "documentation", "labelnames", "name")

    def __init__(self, name: str, documentation: str, labelnames: Labels) -> None:
        self.name = name
        self.documentation = documentation
        self.labelnames = labelnames
        self._values: dict[Labels, float] = {}
        self._created: dict[Labels, float] = {}

    def inc(self, labels: Labels, amount: float = 1.0) -> None:
        values = self._values
        if labels in values:
            values[labels] += amount
        else:
            values[labels] = amount
            self._created[labels] = time.time()

    def collect(self) -> Family:
        family = CounterMetricFamily(self.name, self.documentation, labels=self.labelnames)
        created = self._created if _created_series() else None
        for labels, value in list(self._values.items()):
            family.add_metric(labels, value, created=None if created is None else created[labels])
        return family


class TallyHistogram:
    """A histogram family kept as plain numbers (per label values: a count per
    bucket and the sum), exposed when scraped as prometheus_client's
    `Histogram` exposes it. An observation is a bisection and two updates."""

    __slots__ = ("_bounds", "_created", "_les", "_rows", "_sums", "documentation", "labelnames", "name")

    def __init__(self, name: str, documentation: str, labelnames: Labels, buckets: Iterable[float]) -> None:
        self.name = name
        self.documentation = documentation
        self.labelnames = labelnames
        self._bounds = (*sorted(float(bound) for bound in buckets), float("inf"))
        self._les: tuple[str, ...] = tuple(floatToGoString(bound) for bound in self._bounds)  # type: ignore[no-untyped-call]
        self._rows: dict[Labels, list[int]] = {}
        self._sums: dict[Labels, float] = {}
        self._created: dict[Labels, float] = {}

    def observe(self, labels: Labels, value: float) -> None:
        row = self._rows.get(labels)
        if row is None:
            row = self._rows[labels] = [0] * len(self._bounds)
            self._sums[labels] = 0.0
            self._created[labels] = time.time()
        row[bisect.bisect_left(self._bounds, value)] += 1
        self._sums[labels] += value

    def collect(self) -> Family:
        family = Family(self.name, self.documentation, "histogram")
        names = self.labelnames
        bounds = self._les
        created = _created_series()
        for labels, row in list(self._rows.items()):
            named = dict(zip(names, labels, strict=True))
            total = 0
            for bound, count in zip(bounds, row, strict=True):
                total += count
                family.add_sample(self.name + "_bucket", {**named, "le": bound}, float(total))
            family.add_sample(self.name + "_count", named, float(total))
            family.add_sample(self.name + "_sum", named, self._sums[labels])
            if created:
                family.add_sample(self.name + "_created", named, self._created[labels])
        return family


class RequestTallies(Collector):
    """The tallies of one registry, scraped with it (registered once they are all made)."""

    def __init__(self) -> None:
        self.families: list[Tally | TallyHistogram] = []

    def describe(self) -> Iterator[Family]:
        for family in self.families:
            yield Family(family.name, family.documentation, "counter" if isinstance(family, Tally) else "histogram")

    def collect(self) -> Iterator[Family]:
        for family in self.families:
            yield family.collect()


class _SharedCounter:
    """A counter family on prometheus_client's shared files (several workers)."""

    __slots__ = ("_children",)

    def __init__(self, name: str, documentation: str, labelnames: Labels) -> None:
        self._children = Children(Counter(name, documentation, labelnames, registry=None))

    def inc(self, labels: Labels, amount: float = 1.0) -> None:
        self._children(*labels).inc(amount)


class _SharedHistogram:
    """A histogram family on prometheus_client's shared files (several workers)."""

    __slots__ = ("_children",)

    def __init__(self, name: str, documentation: str, labelnames: Labels, buckets: Iterable[float]) -> None:
        self._children = Children(Histogram(name, documentation, labelnames, buckets=tuple(buckets), registry=None))

    def observe(self, labels: Labels, value: float) -> None:
        self._children(*labels).observe(value)


def _counter(tallies: RequestTallies | None, name: str, documentation: str, labelnames: Labels) -> CountsBy:
    if tallies is None:
        return _SharedCounter(name, documentation, labelnames)
    family = Tally(name, documentation, labelnames)
    tallies.families.append(family)
    return family


def _histogram(tallies: RequestTallies | None, name: str, documentation: str, labelnames: Labels) -> ObservesBy:
    if tallies is None:
        return _SharedHistogram(name, documentation, labelnames, _LATENCY_BUCKETS)
    family = TallyHistogram(name, documentation, labelnames, _LATENCY_BUCKETS)
    tallies.families.append(family)
    return family
