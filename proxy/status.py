"""The operator's status page (`GET /status`): one HTML page, built here from
plain values, that shows at a glance every route's fallback graph, each
provider's health, breaker, quota and last error, and the recent failovers.

No JavaScript: a `<meta http-equiv="refresh">` reloads it, and the page's
Content-Security-Policy allows nothing but its own inline style. Every value
that comes from outside this module (provider and route names, error texts,
the config path) is HTML-escaped where it is written; nothing here knows a key.
Gathering the values (the quota store, the health board) is the caller's job.
"""

from __future__ import annotations

import html
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Final

from proxy.config import Config, Route
from proxy.errors import Attempt
from proxy.health import ProviderHealth
from proxy.observe import Failover, LastError
from proxy.routing import reachable

DEFAULT_REFRESH_SECONDS: Final = 5
MAX_REFRESH_SECONDS: Final = 3600
REALM: Final = "fallback-proxy status"
HEADERS: Final = {
    "cache-control": "no-store",
    "content-security-policy": "default-src 'none'; style-src 'unsafe-inline'; frame-ancestors 'none'",
    "referrer-policy": "no-referrer",
    "x-content-type-options": "nosniff",
    "x-frame-options": "DENY",
}


@dataclass(frozen=True, slots=True)
class Usage:
    """One kind of today's quota: used so far, and the daily limit (None: no limit)."""

    used: int
    limit: int | None

    @property
    def left(self) -> int | None:
        return None if self.limit is None else max(0, self.limit - self.used)


@dataclass(frozen=True, slots=True)
class QuotaToday:
    """A provider's quota today, or why the store could not say (`error`)."""

    day: str
    requests: Usage | None = None
    tokens: Usage | None = None
    error: str = ""


@dataclass(frozen=True, slots=True)
class ProviderView:
    """What the page (and `GET /admin/providers`) shows of one provider."""

    name: str
    local: bool
    health: ProviderHealth
    quota: QuotaToday | None  # None: the provider has no quota
    last_error: LastError | None


@dataclass(frozen=True, slots=True)
class StatusView:
    """Everything one rendering of the page needs."""

    config: Config
    providers: Mapping[str, ProviderView]
    failovers: Sequence[Failover]
    store: str
    config_sha256: str
    now: float
    refresh_seconds: int = DEFAULT_REFRESH_SECONDS


def refresh_seconds(query: str | None) -> int:
    """The `?refresh=N` of a request: 0 turns the reload off; bad values get the default."""
    if query is None or not query.isascii() or not query.isdigit():
        return DEFAULT_REFRESH_SECONDS
    return min(int(query), MAX_REFRESH_SECONDS)


def render(view: StatusView) -> str:
    """The whole page."""
    refresh = f'<meta http-equiv="refresh" content="{view.refresh_seconds}">' if view.refresh_seconds else ""
    return "".join(
        (
            '<!doctype html>\n<html lang="en"><head><meta charset="utf-8">',
            refresh,
            '<meta name="viewport" content="width=device-width, initial-scale=1">',
            "<title>fallback-proxy status</title><style>",
            _STYLE,
            "</style></head><body>",
            _header(view),
            _providers_section(view),
            _routes_section(view),
            _failovers_section(view),
            "</body></html>\n",
        )
    )


def _e(value: object) -> str:
    """Escaped for text and for quoted attributes."""
    return html.escape(str(value), quote=True)


def _clock(at: float) -> str:
    return time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime(at))


def _ago(at: float, now: float) -> str:
    seconds = max(0, round(now - at))
    if seconds < 120:
        return f"{seconds}s ago"
    if seconds < 7200:
        return f"{seconds // 60} min ago"
    return f"{seconds // 3600} h ago"


def _header(view: StatusView) -> str:
    config = view.config
    sha = f" (sha256 {_e(view.config_sha256[:12])})" if view.config_sha256 else ""
    refresh = f"reloads every {view.refresh_seconds} s" if view.refresh_seconds else "no automatic reload"
    return (
        "<header><h1>fallback-proxy status</h1><p>"
        f'at <time id="generated">{_e(_clock(view.now))}</time> · config <code>{_e(config.source or "(in memory)")}</code>'
        f"{sha} · {len(config.providers)} providers, {len(config.routes)} routes · state store: {_e(view.store)}"
        f" · {refresh}. Health and breakers are shared by every replica through the store; last errors and"
        " failovers are this process's own.</p></header>"
    )


# -- providers ---------------------------------------------------------------------------


def _providers_section(view: StatusView) -> str:
    rows = "".join(_provider_row(provider, view.now) for provider in view.providers.values())
    return (
        '<section id="providers"><h2>Providers</h2><table><thead><tr><th>provider</th><th>where</th>'
        "<th>state</th><th>breaker</th><th>why</th><th>time to first token</th><th>quota today</th>"
        f"<th>last error</th></tr></thead><tbody>{rows}</tbody></table></section>"
    )


def _provider_row(provider: ProviderView, now: float) -> str:
    health = provider.health
    ttft = "-" if health.ttft is None else f"{health.ttft:.2f} s"
    return (
        f'<tr data-provider="{_e(provider.name)}"><th scope="row">{_e(provider.name)}</th>'
        f"<td>{'local' if provider.local else 'cloud'}</td>{_state_cell(provider)}{_breaker_cell(health)}"
        f'<td class="reason">{_e(health.reason) or "-"}</td><td>{ttft}</td>'
        f"{_quota_cell(provider.quota)}{_last_error_cell(provider.last_error, now)}</tr>"
    )


def _state_cell(provider: ProviderView) -> str:
    state = provider.health.state.value
    label = state.upper() + (" (disabled)" if provider.health.disabled else "")
    return f'<td class="state state-{_e(state)}">{_e(label)}</td>'


def _breaker_cell(health: ProviderHealth) -> str:
    breaker = health.breaker.value
    return f'<td class="breaker breaker-{_e(breaker)}">{_e(breaker.replace("_", "-"))}</td>'


def _quota_cell(quota: QuotaToday | None) -> str:
    if quota is None:
        return '<td class="quota">no quota</td>'
    if quota.error:
        return f'<td class="quota">{_e(quota.day)}: store unavailable ({_e(quota.error)})</td>'
    parts = [_usage("requests", quota.requests), _usage("tokens", quota.tokens)]
    return f'<td class="quota">{"<br>".join(part for part in parts if part)}</td>'


def _usage(kind: str, usage: Usage | None) -> str:
    if usage is None:
        return ""
    if usage.limit is None:
        return f"{kind}: {usage.used:,} used"
    return f"{kind}: {usage.used:,} used, {usage.left:,} left of {usage.limit:,}"


def _last_error_cell(error: LastError | None, now: float) -> str:
    if error is None:
        return '<td class="last-error">-</td>'
    detail = f": {_e(error.detail)}" if error.detail else ""
    return (
        f'<td class="last-error"><span title="{_e(_clock(error.at))}">{_e(_ago(error.at, now))}</span> '
        f"<b>{_e(error.outcome)}</b>{detail}</td>"
    )


# -- routes ------------------------------------------------------------------------------


def _routes_section(view: StatusView) -> str:
    routes = "".join(_route(route, view) for route in view.config.routes.values())
    return f'<section id="routes"><h2>Routes</h2>{routes or "<p>No routes.</p>"}</section>'


def _route(route: Route, view: StatusView) -> str:
    rows = "".join(_node_row(index, node, route, view) for index, node in enumerate(reachable(route), 1))
    return (
        f'<article class="route" data-route="{_e(route.name)}"><h3>{_e(route.name)} '
        f"<small>{_e(_route_options(route))}</small></h3><table><thead><tr><th>#</th><th>node</th>"
        "<th>state</th><th>breaker</th><th>quota today</th><th>last error</th><th>on failure, next</th>"
        f"</tr></thead><tbody>{rows}</tbody></table></article>"
    )


def _route_options(route: Route) -> str:
    options = [route.form]
    if route.local_only:
        options.append("local only")
    if not route.continuation:
        options.append("no mid-stream continuation")
    if route.hedge_after_ms is not None:
        options.append(f"hedge after {route.hedge_after_ms} ms")
    if route.budget is not None:
        options.append(f"budget {route.budget:g} s")
    return ", ".join(options)


def _node_row(index: int, node: str, route: Route, view: StatusView) -> str:
    provider = view.providers.get(node)
    if provider is None:  # a node the config names but this view lacks: shown, not guessed
        cells = '<td colspan="4">unknown</td>'
    else:
        cells = (
            _state_cell(provider)
            + _breaker_cell(provider.health)
            + _quota_cell(provider.quota)
            + _last_error_cell(provider.last_error, view.now)
        )
    return (
        f'<tr data-node="{_e(node)}"><td>{index}</td><th scope="row">{_e(node)}</th>{cells}'
        f'<td class="edges">{_edges(route.edges.get(node, {}))}</td></tr>'
    )


def _edges(edges: Mapping[str, str]) -> str:
    """`default → b; rate_limited → c`, the default first; the end of the walk when none."""
    if not edges:
        return "end of the walk"
    ordered = sorted(edges.items(), key=lambda item: item[0] != "default")
    return "; ".join(f"{_e(failure)} → {_e(target)}" for failure, target in ordered)


# -- failovers ---------------------------------------------------------------------------


def _failovers_section(view: StatusView) -> str:
    if not view.failovers:
        body = '<p class="none">No failovers since this process started.</p>'
    else:
        rows = "".join(_failover_row(failover, view.now) for failover in view.failovers)
        body = (
            "<table><thead><tr><th>time</th><th>route</th><th>from → to</th><th>reason</th></tr></thead>"
            f"<tbody>{rows}</tbody></table>"
        )
    return f'<section id="failovers"><h2>Last failovers ({len(view.failovers)})</h2>{body}</section>'


def _failover_row(failover: Failover, now: float) -> str:
    first = failover.failed[0].provider if failover.failed else _interrupted_provider(failover)
    reasons = [_reason(attempt) for attempt in failover.failed]
    if failover.interruption is not None:
        reasons.append(_reason(failover.interruption, " after its first token"))
    return (
        f'<tr class="failover" data-request="{_e(failover.request_id)}">'
        f'<td><span title="{_e(_clock(failover.at))}">{_e(time.strftime("%H:%M:%S", time.gmtime(failover.at)))}'
        f"</span> <small>{_e(_ago(failover.at, now))}</small></td><td>{_e(failover.route)}</td>"
        f"<td>{_e(first)} → {_destination(failover)}</td><td>{'<br>'.join(reasons)}</td></tr>"
    )


def _destination(failover: Failover) -> str:
    if failover.answered_by is None:
        return f"nobody (HTTP {failover.status})"
    if failover.outcome == "stream_interrupted":
        return "nobody (the stream ended with an in-band error)"
    if failover.outcome != "ok":
        return f"{_e(failover.answered_by)} ({_e(failover.outcome)})"
    return _e(failover.answered_by)


def _interrupted_provider(failover: Failover) -> str:
    return failover.interruption.provider if failover.interruption is not None else "-"


def _reason(attempt: Attempt, when: str = "") -> str:
    detail = f": {_e(attempt.detail)}" if attempt.detail else ""
    return f"{_e(attempt.provider)} <b>{_e(attempt.outcome)}</b>{_e(when)}{detail}"


_STYLE = """
body{font:14px/1.4 system-ui,sans-serif;margin:1.5em;color:#1d1d1f;background:#fafafa}
h1{font-size:1.4em;margin:0 0 .2em}h2{font-size:1.15em;margin:1.4em 0 .4em}h3{font-size:1em;margin:1em 0 .3em}
header p{color:#555;margin:0}small{color:#666;font-weight:normal}
table{border-collapse:collapse;width:100%;background:#fff}
th,td{border:1px solid #ddd;padding:.3em .5em;text-align:left;vertical-align:top}
thead th{background:#f0f0f0}tbody th{font-weight:600}
.state{font-weight:700}.state-healthy{color:#16794a}.state-slow{color:#8a6d00}
.state-degraded{color:#b45309}.state-offline{color:#fff;background:#c62828}
.breaker-open{color:#c62828;font-weight:700}.breaker-half_open{color:#b45309}
.edges,.reason,.last-error{font-size:.92em}.none{color:#555}
"""
