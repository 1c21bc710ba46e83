"""The fallback graph: pure functions over a route's edges.

A route is a small directed graph of provider names. ``first`` is where every
request starts; ``edges[node]`` maps a failure class (or ``"default"``) to the
node to try next. Config validation uses :func:`find_cycle` and
:func:`reachable`; the dispatcher follows the graph with :func:`next_node`.
"""

from __future__ import annotations

from collections.abc import Collection, Mapping
from types import MappingProxyType
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from proxy.config import Route

Edges = Mapping[str, Mapping[str, str]]

_NO_EDGES: Mapping[str, str] = MappingProxyType({})


def next_node(
    route: Route, current: str, failure: str, *, visited: Collection[str] = ()
) -> str | None:
    """The node to try after ``current`` failed with ``failure``, or None.

    The edge for the failure class wins over ``default``. A node already in
    ``visited`` is never offered again, so a request visits each node once.
    """
    out = route.edges.get(current, _NO_EDGES)
    target = out.get(failure) or out.get("default")
    if target is None or target in visited:
        return None
    return target


def successors(edges: Edges, node: str) -> tuple[str, ...]:
    """Distinct targets of ``node``'s edges: the default first, then config order."""
    out = edges.get(node, _NO_EDGES)
    ordered = [out["default"]] if "default" in out else []
    ordered.extend(target for key, target in out.items() if key != "default")
    return tuple(dict.fromkeys(ordered))


def reachable(route: Route) -> tuple[str, ...]:
    """Every node reachable from ``route.first``, in depth-first walk order."""
    order: dict[str, None] = {}
    stack = [route.first]
    while stack:
        node = stack.pop()
        if node in order:
            continue
        order[node] = None
        stack.extend(reversed(successors(route.edges, node)))
    return tuple(order)


def default_path(route: Route) -> tuple[str, ...]:
    """``route.first``, then the nodes reached by following only default edges."""
    path = [route.first]
    while True:
        target = route.edges.get(path[-1], _NO_EDGES).get("default")
        if target is None or target in path:
            return tuple(path)
        path.append(target)


def side_edges(route: Route) -> tuple[tuple[str, str, str], ...]:
    """The non-default edges as ``(node, failure class, target)``, in walk order."""
    return tuple(
        (node, failure, target)
        for node in reachable(route)
        for failure, target in route.edges.get(node, _NO_EDGES).items()
        if failure != "default"
    )


def find_cycle(first: str, edges: Edges) -> tuple[str, ...] | None:
    """A cycle reachable from ``first`` as ``(a, b, ..., a)``, or None if there is none."""
    return _cycle_from(first, edges, (), set())


def _cycle_from(
    node: str, edges: Edges, stack: tuple[str, ...], done: set[str]
) -> tuple[str, ...] | None:
    if node in stack:
        return stack[stack.index(node) :] + (node,)
    if node in done:
        return None
    for target in successors(edges, node):
        cycle = _cycle_from(target, edges, stack + (node,), done)
        if cycle is not None:
            return cycle
    done.add(node)
    return None
