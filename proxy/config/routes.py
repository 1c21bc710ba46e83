"""The ``routes`` section: chains and graphs, checked for cycles, reachability and locality."""

from __future__ import annotations

import itertools
from collections.abc import Mapping
from types import MappingProxyType
from typing import Final

from proxy.config.model import EDGE_KEYS, ProviderConfig, Route
from proxy.config.providers import Scope, valid_name
from proxy.config.values import (
    Context,
    boolean,
    get,
    kind_of,
    opt,
    positive_int,
    positive_number,
    read_items,
    read_section,
    read_value,
    text,
    unknown,
)
from proxy.routing import find_cycle, reachable

_ROUTE_KEYS: Final = frozenset(
    {"chain", "first", "on", "local_only", "continuation", "fallback_on_content_filter", "hedge_after_ms", "budget"}
)
_Edges = dict[str, dict[str, str]]


def parse_routes(node: object, providers: Mapping[str, ProviderConfig], scope: Scope, ctx: Context) -> dict[str, Route]:
    routes: dict[str, Route] = {}
    for name, body in (read_section(node, "routes", ctx, None) or {}).items():
        path = f"routes.{name}"
        if not valid_name(name, path, ctx):
            continue
        if name in scope.providers:
            ambiguous = f"the model {name!r} would be ambiguous"
            ctx.error(path, f"a provider has the same name, so {ambiguous}")
        route = _parse_route(name, body, path, scope, ctx)
        if route is not None and _route_is_sound(route, path, providers, ctx):
            routes[name] = route
            _warn_if_all_disabled(route, path, providers, ctx)
    return routes


def _warn_if_all_disabled(route: Route, path: str, providers: Mapping[str, ProviderConfig], ctx: Context) -> None:
    """A route whose every provider is disabled (no key, no server) can only answer 503: say so up front."""
    nodes = [providers.get(node) for node in reachable(route)]
    reasons = [p.disabled_reason for p in nodes if p is not None]
    if reasons and all(reasons):
        ctx.warn(path, "every provider it reaches is disabled: it answers 503 until one of them is set up")


def _parse_route(name: str, node: object, path: str, scope: Scope, ctx: Context) -> Route | None:
    if isinstance(node, list):
        chain = _chain(node, path, scope, ctx)
        return None if chain is None else Route(name=name, first=chain[0], edges=_freeze(chain[1]))
    if not isinstance(node, Mapping):
        ctx.error(
            path,
            "expected a list of providers (a chain), or a mapping with chain: or first:/on:",
        )
        return None
    m = read_section(node, path, ctx, _ROUTE_KEYS)
    shape = None if m is None else _route_shape(m, path, scope, ctx)
    if m is None or shape is None:
        return None
    first, edges, form = shape
    return Route(
        name=name,
        first=first,
        edges=_freeze(edges),
        form=form,
        local_only=get(m, "local_only", path, ctx, boolean, False),
        continuation=get(m, "continuation", path, ctx, boolean, True),
        fallback_on_content_filter=get(m, "fallback_on_content_filter", path, ctx, boolean, False),
        hedge_after_ms=opt(m, "hedge_after_ms", path, ctx, positive_int),
        budget=opt(m, "budget", path, ctx, positive_number),
    )


def _route_shape(m: Mapping[str, object], path: str, scope: Scope, ctx: Context) -> tuple[str, _Edges, str] | None:
    """``(first, edges, form)`` from a route mapping, or None after an error."""
    if "chain" in m and ("first" in m or "on" in m):
        ctx.error(path, "use either chain: or first:/on:, not both")
        return None
    if "chain" in m:
        chain = m["chain"]
        if not isinstance(chain, list):
            ctx.error(f"{path}.chain", f"expected a list of providers, got {kind_of(chain)}")
            return None
        parsed = _chain(chain, f"{path}.chain", scope, ctx)
        return None if parsed is None else (*parsed, "chain")
    if "first" not in m:
        ctx.error(path, "needs chain: [...] or first: with on: {...}")
        return None
    return _graph(m, path, scope, ctx)


def _chain(items: list[object], path: str, scope: Scope, ctx: Context) -> tuple[str, _Edges] | None:
    """A chain's first node and default edges, or None after an error (reported)."""
    if not items:
        ctx.error(path, "chain is empty")
        return None
    errors = len(ctx.errors)
    nodes: list[str] = []
    for where, item in read_items(items, path, ctx):
        name = _reference(item, where, scope, ctx)
        if name in nodes:
            why = "a request visits each provider at most once"
            ctx.error(where, f"{name!r} appears twice ({why})")
        elif name is not None:
            nodes.append(name)
    if len(ctx.errors) > errors:
        return None
    return nodes[0], {node: {"default": target} for node, target in itertools.pairwise(nodes)}


def _graph(m: Mapping[str, object], path: str, scope: Scope, ctx: Context) -> tuple[str, _Edges, str] | None:
    errors = len(ctx.errors)
    first = _reference(m["first"], f"{path}.first", scope, ctx)
    edges: _Edges = {}
    on = read_section(m.get("on"), f"{path}.on", ctx, None) or {}
    for node, out in on.items():
        if node not in scope.providers:
            ctx.error(f"{path}.on", unknown("provider", node, scope.providers))
            continue
        edges[node] = _edge_map(out, f"{path}.on.{node}", scope, ctx)
    if first is None or len(ctx.errors) > errors:
        return None
    return first, edges, "graph"


def _edge_map(node: object, path: str, scope: Scope, ctx: Context) -> dict[str, str]:
    out: dict[str, str] = {}
    for key, raw in (read_section(node, path, ctx, None) or {}).items():
        if key not in EDGE_KEYS:
            ctx.error(path, unknown("failure class", key, EDGE_KEYS))
            continue
        target = _reference(raw, f"{path}.{key}", scope, ctx)
        if target is not None:
            out[key] = target
    return out


def _reference(raw: object, path: str, scope: Scope, ctx: Context) -> str | None:
    """The provider named by ``raw``, or None after an error (reported)."""
    errors = len(ctx.errors)
    name = read_value(raw, path, ctx, text)
    if name is None:
        if len(ctx.errors) == errors:
            ctx.error(path, "expected a provider name")
        return None
    if name in scope.providers:
        return name
    if name in scope.routes:
        ctx.error(path, f"{name!r} is a route; a route's nodes must be providers")
    else:
        ctx.error(path, unknown("provider", name, scope.providers))
    return None


def _freeze(edges: _Edges) -> Mapping[str, Mapping[str, str]]:
    return MappingProxyType({node: MappingProxyType(out) for node, out in edges.items()})


def _route_is_sound(route: Route, path: str, providers: Mapping[str, ProviderConfig], ctx: Context) -> bool:
    """Check the walk: no cycle, every edge source reachable, local_only kept."""
    errors = len(ctx.errors)
    cycle = find_cycle(route.first, route.edges)
    if cycle is not None:
        ctx.error(path, "cycle " + " -> ".join(cycle))
    walk = reachable(route)
    for node in route.edges:
        if node not in walk:
            message = f"not reachable from first {route.first!r}; no edge leads here"
            ctx.error(f"{path}.on.{node}", message)
    for node in walk if route.local_only else ():
        provider = providers.get(node)
        if provider is not None and not provider.local:
            ctx.error(path, f"local_only route reaches non-local provider {node!r}")
    return len(ctx.errors) == errors
