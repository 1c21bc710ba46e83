"""The config's typed, frozen objects: what the rest of the proxy reads."""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Final

FAILURE_CLASSES: Final[frozenset[str]] = frozenset(
    {
        "timeout",
        "connection_error",
        "rate_limited",
        "server_error",
        "auth_error",
        "misconfigured",
        "context_window_exceeded",
        "content_filtered",
        "unhealthy",
        "quota_exhausted",
        "unsupported",
        "policy",
        "proxy_saturated",
    }
)
EDGE_KEYS: Final[frozenset[str]] = FAILURE_CLASSES | {"default"}
# What a request may need of a provider; `json_schema`: structured outputs (response_format json_schema).
CAPABILITIES: Final[frozenset[str]] = frozenset({"vision", "tools", "json_schema"})
# How a provider is asked to continue another's partial answer (see proxy.stream.splice).
CONTINUE_FORMS: Final[frozenset[str]] = frozenset({"prefill", "instruction", "vllm"})


class ConfigError(Exception):
    """Raised with every problem found; each names the key path it is about."""

    problems: tuple[str, ...]

    def __init__(self, problems: Iterable[str]) -> None:
        self.problems = tuple(problems)
        count = len(self.problems)
        head = "invalid config" if count == 1 else f"invalid config ({count} problems)"
        super().__init__("\n  ".join((head + ":", *self.problems)))


@dataclass(frozen=True, slots=True)
class Timeouts:
    """Per-attempt deadlines, in seconds."""

    connect: float = 5.0
    first_token: float = 30.0
    total: float = 300.0
    idle: float = 30.0  # max gap between stream chunks after the first token
    pool: float = 1.0  # max wait for one of the provider's `max_connections` slots (then: proxy_saturated)


@dataclass(frozen=True, slots=True)
class Quota:
    requests_per_day: int | None = None
    tokens_per_day: int | None = None


def _no_headers() -> Mapping[str, str]:
    return MappingProxyType({})


@dataclass(frozen=True, slots=True)
class ProviderConfig:
    name: str
    model: str  # the litellm model string as written
    litellm_provider: str  # the prefix before the first "/", "openai" when there is none
    upstream_model: str  # the part after the prefix, sent to the upstream
    openai_compatible: bool  # the OpenAI wire format can be relayed as is
    api_base: str | None  # as given, else the known default, else None
    api_key: str | None = field(default=None, repr=False)
    timeout: Timeouts = Timeouts()
    quota: Quota | None = None
    context_window: int | None = None
    capabilities: frozenset[str] | None = None  # None: not declared, every request may try it
    local: bool = False
    warmup: bool = False
    system_prompt: str | None = None
    retries: int = 0
    headers: Mapping[str, str] = field(default_factory=_no_headers)
    probe: bool = True  # active health probes allowed
    # Non-stream requests are streamed upstream (so first_token and idle bound them)
    # and assembled; False keeps plain non-stream calls for a server that cannot stream.
    stream_upstream: bool = True
    continue_with: str = "instruction"  # how it is asked to continue a partial answer: a CONTINUE_FORMS value
    embedding_space: str | None = None  # embeddings fall back only within one space (None: the model string)

    @property
    def space(self) -> str:
        """The vector space of this provider's embeddings: two providers in one
        space give interchangeable vectors for the same input."""
        return self.embedding_space or self.model

    needs: frozenset[str] = frozenset()  # api_key, api_base: without them the provider is disabled
    # Why the config leaves this provider out ("OPENAI_API_KEY not set"): skipped in every walk
    # without a call, never probed or warmed up. None: in use.
    disabled_reason: str | None = None
    max_connections: int = 0  # calls in flight to this provider at once; 0 = no limit


@dataclass(frozen=True, slots=True)
class Route:
    name: str
    first: str
    edges: Mapping[str, Mapping[str, str]]  # node -> {failure class or "default" -> next node}
    local_only: bool = False
    form: str = "chain"  # "chain" | "graph" | "provider"
    continuation: bool = True
    fallback_on_content_filter: bool = False  # a content filter's refusal goes to the next node, not the client
    hedge_after_ms: int | None = None
    budget: float | None = None  # seconds for the whole walk


@dataclass(frozen=True, slots=True)
class ServerConfig:
    host: str = "127.0.0.1"
    port: int = 8080
    max_body_bytes: int = 10 * 1024 * 1024
    admin_key: str | None = field(default=None, repr=False)
    shutdown_grace_seconds: float = 30.0  # in-flight streams may finish this long after SIGTERM
    reload_check_seconds: float = 2.0  # how often the config file is checked for changes; 0 = never
    workers: int = 1  # processes sharing the port (`serve`); several need Redis for shared state
    # Requests in flight per worker above which new ones are refused at once (503
    # server_overloaded); 0 = no ceiling. What one worker still carries without a
    # failed request on `python -m tests.benchmarks.run --slow-streams` (3,000
    # streams of 10 chunks a second, slowly: first tokens wait seconds); past it
    # deadlines start to expire for the proxy's own lateness. docs/scaling.md.
    max_in_flight: int = 4000
    # Origins whose web pages may call the proxy from a browser (CORS): "*" or
    # scheme://host[:port] each. None: every origin when `auth.keys` are set (a
    # page must hold a key, as with OpenAI's API), none when the proxy is keyless
    # (any page the user opens could otherwise spend its providers' quotas).
    cors_origins: tuple[str, ...] | None = None


@dataclass(frozen=True, slots=True)
class RedisSettings:
    """Where shared state lives; ``url`` None means in-process state (one instance)."""

    url: str | None = field(default=None, repr=False)  # may hold a password; a cluster's seeds comma-separated
    prefix: str = "fp"
    timeout: float = 0.1  # seconds per Redis call before it counts as failed
    breaker_seconds: float = 2.0  # after a failure, Redis is not asked for this long
    max_connections: int = 64  # pooled connections per replica (pub/sub has its own headroom)
    pool_wait: float = 0.5  # seconds a call may wait for a free pooled connection
    breaker_timeouts: int = 3  # consecutive timeouts that open the breaker (a refused connection opens it at once)
    cluster: bool = False  # url names the seed nodes of a Redis Cluster
    health_ttl: float = 86_400.0  # seconds a provider's health record lives in Redis after its last change


@dataclass(frozen=True, slots=True)
class LimitSettings:
    """What one client may ask of the proxy; 0 turns a per-client limit off."""

    requests_per_minute: int = 0  # per client key, shared by replicas through the store
    concurrent_streams: int = 0  # per client key, shared by replicas through the store
    max_messages: int = 2000
    max_header_bytes: int = 32768
    client_write_timeout_seconds: float = 30.0  # a client that reads a stream slower than this is dropped
    max_upstream_bytes: int = 32 * 1024 * 1024  # a provider's answer larger than this is a failure
    upstream_max_connections: int = 0  # each provider's `max_connections` unless it sets its own; 0 = no limit


@dataclass(frozen=True, slots=True)
class HealthSettings:
    """Thresholds of the per-provider health state machine."""

    failure_threshold: int = 3  # consecutive failures that open a provider's breaker
    cooldown_seconds: float = 30.0  # how long an open breaker skips the provider before a trial
    probe_interval_seconds: float = 10.0  # active probes (free endpoints), 0 = off
    probe_timeout_seconds: float = 3.0
    slow_ttft_seconds: float = 10.0  # a provider whose time to first token averages above this is SLOW
    # A timeout that expires while this process's event loop lags by at least this
    # much is the proxy's lateness, not the provider's: it does not count against it.
    loop_lag_seconds: float = 0.25


ALERT_KINDS: Final[frozenset[str]] = frozenset(
    {
        "failover",
        "breaker_open",
        "recovered",
        "quota_exhausted",
        "quota_fail_closed",
        "store_down",
        "store_up",
        "config_reload_failed",
    }
)
ALERT_FORMATS: Final[frozenset[str]] = frozenset({"json", "slack", "telegram"})


@dataclass(frozen=True, slots=True)
class WebhookSettings:
    url: str = field(repr=False)  # may carry a token (Slack, Telegram)
    format: str = "json"
    events: frozenset[str] = ALERT_KINDS
    chat_id: str | None = None  # telegram
    timeout: float = 5.0


@dataclass(frozen=True, slots=True)
class AlertSettings:
    """Operator alerts: each event kind de-duplicated per provider within the window."""

    webhooks: tuple[WebhookSettings, ...] = ()
    dedupe_seconds: float = 300.0


SAMPLERS: Final[frozenset[str]] = frozenset(
    {
        "always_on",
        "always_off",
        "traceidratio",
        "parentbased_always_on",
        "parentbased_always_off",
        "parentbased_traceidratio",
    }
)
COMPRESSIONS: Final[frozenset[str]] = frozenset({"none", "gzip", "deflate"})


@dataclass(frozen=True, slots=True)
class TelemetrySettings:
    """OpenTelemetry traces, exported over OTLP/HTTP (protobuf) in the background.
    Off unless an endpoint is configured; `endpoint` is the full traces URL."""

    enabled: bool = False
    endpoint: str = "http://localhost:4318/v1/traces"
    headers: Mapping[str, str] = field(default_factory=_no_headers, repr=False)  # may carry a token
    service_name: str = "fallback-proxy"
    resource_attributes: Mapping[str, str] = field(default_factory=_no_headers)
    sampler: str = "parentbased_always_on"
    sampler_arg: float = 1.0  # the ratio of the *traceidratio samplers
    timeout: float = 10.0  # seconds for one export (the exporter's own retries included)
    compression: str = "none"
    certificate: str | None = None  # CA bundle for an https endpoint
    client_key: str | None = None
    client_certificate: str | None = None
    max_queue_size: int = 2048  # ended spans waiting for export; past this, new spans are dropped
    max_export_batch_size: int = 512
    schedule_delay: float = 5.0  # seconds between exports


_NO_EDGES: Final[Mapping[str, Mapping[str, str]]] = MappingProxyType({})


@dataclass(frozen=True, slots=True)
class Config:
    providers: Mapping[str, ProviderConfig]
    routes: Mapping[str, Route]
    redis: RedisSettings = RedisSettings()
    auth_keys: tuple[str, ...] = field(default=(), repr=False)
    server: ServerConfig = ServerConfig()
    health: HealthSettings = HealthSettings()
    quota_timezone: str = "UTC"  # the day of daily quotas starts at midnight here
    alerts: AlertSettings = AlertSettings()
    limits: LimitSettings = LimitSettings()
    telemetry: TelemetrySettings = TelemetrySettings()
    source: str | None = None
    warnings: tuple[str, ...] = ()

    @property
    def redis_url(self) -> str | None:
        return self.redis.url

    def route_for(self, model: str) -> Route | None:
        """The route named ``model``, a single-provider route, or None."""
        route = self.routes.get(model)
        if route is not None or model not in self.providers:
            return route
        return Route(name=model, first=model, edges=_NO_EDGES, form="provider")
