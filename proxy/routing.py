"""The fallback graph: pure functions over a route's edges.

A route is a small directed graph of provider names. ``first`` is where every
request starts; ``edges[node]`` maps a failure class (or ``"default"``) to the
node to try next. Config validation uses :func:`find_cycle` and
:func:`reachable`; the dispatcher follows the graph with a :class:`Walk`.
"""

from __future__ import annotations

from collections.abc import Collection, Mapping
from types import MappingProxyType
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from proxy.config import Route

Edges = Mapping[str, Mapping[str, str]]

_NO_EDGES: Mapping[str, str] = MappingProxyType({})


def next_node(route: Route, current: str, failure: str, *, visited: Collection[str] = ()) -> str | None:
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


def _cycle_from(node: str, edges: Edges, stack: tuple[str, ...], done: set[str]) -> tuple[str, ...] | None:
    if node in stack:
        return (*stack[stack.index(node) :], node)
    if node in done:
        return None
    for target in successors(edges, node):
        cycle = _cycle_from(target, edges, (*stack, node), done)
        if cycle is not None:
            return cycle
    done.add(node)
    return None


class Walk:
    """The order one request visits a route's nodes in (pure, no I/O).

    `current` is the node to visit; after it fails or is skipped, `follow`
    takes the edge for the failure class. `defer` passes over a node for now
    (a SLOW provider): it follows the default edge and the node is visited
    again only once the rest of the walk is exhausted, in the order deferred.
    """

    __slots__ = ("_late", "current", "deferred", "route", "visited")

    def __init__(self, route: Route) -> None:
        self.route = route
        self.current: str | None = route.first
        self.visited: list[str] = [route.first]
        self.deferred: list[str] = []
        self._late = False  # visiting deferred nodes now

    @property
    def can_defer(self) -> bool:
        return not self._late

    def follow(self, failure: str) -> None:
        assert self.current is not None
        self._advance(next_node(self.route, self.current, failure, visited=self.visited))

    def jump(self, node: str) -> None:
        """Go to `node` now (a hedge started early): it counts as visited."""
        self._advance(node)

    def defer(self) -> None:
        assert self.current is not None and not self._late
        self.deferred.append(self.current)
        self._advance(next_node(self.route, self.current, "default", visited=self.visited))

    def _advance(self, target: str | None) -> None:
        if self._late or target is None:
            self._late = True
            self.current = self.deferred.pop(0) if self.deferred else None
            return
        self.visited.append(target)
        self.current = target
