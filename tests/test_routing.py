"""Tests for proxy.routing: the pure walk over a route's fallback graph."""

from __future__ import annotations

from collections.abc import Mapping

import pytest

from proxy.config import Route
from proxy.routing import default_path, find_cycle, next_node, reachable, side_edges, successors


def route(first: str, edges: Mapping[str, Mapping[str, str]], form: str = "graph") -> Route:
    return Route(name="r", first=first, edges=edges, form=form)


CODING = route(
    "openai-4o",
    {
        "openai-4o": {"rate_limited": "claude", "context_window_exceeded": "claude", "default": "local-qwen"},
        "claude": {"default": "local-qwen"},
    },
)
CHAIN = route("a", {"a": {"default": "b"}, "b": {"default": "c"}}, form="chain")


@pytest.mark.parametrize(
    ("current", "failure", "expected"),
    [
        ("openai-4o", "rate_limited", "claude"),
        ("openai-4o", "context_window_exceeded", "claude"),
        ("openai-4o", "timeout", "local-qwen"),
        ("openai-4o", "server_error", "local-qwen"),
        ("claude", "rate_limited", "local-qwen"),
        ("local-qwen", "timeout", None),
        ("unknown", "timeout", None),
    ],
)
def test_next_node_prefers_the_class_edge_then_default(current: str, failure: str, expected: str | None) -> None:
    assert next_node(CODING, current, failure) == expected


def test_next_node_without_default_edge() -> None:
    only_timeouts = route("a", {"a": {"timeout": "b"}})
    assert next_node(only_timeouts, "a", "timeout") == "b"
    assert next_node(only_timeouts, "a", "rate_limited") is None


def test_next_node_never_offers_a_visited_node() -> None:
    assert next_node(CODING, "openai-4o", "rate_limited", visited={"openai-4o", "claude"}) is None
    assert next_node(CODING, "claude", "timeout", visited=("openai-4o", "claude")) == "local-qwen"
    looping = route("a", {"a": {"default": "b"}, "b": {"default": "a"}})
    assert next_node(looping, "b", "timeout", visited=["a", "b"]) is None


def test_chain_walk() -> None:
    assert next_node(CHAIN, "a", "timeout") == "b"
    assert next_node(CHAIN, "b", "policy") == "c"
    assert next_node(CHAIN, "c", "timeout") is None
    assert reachable(CHAIN) == default_path(CHAIN) == ("a", "b", "c")


def test_reachable_is_depth_first_default_edge_first() -> None:
    assert reachable(CODING) == ("openai-4o", "local-qwen", "claude")
    branching = route(
        "a",
        {
            "a": {"timeout": "x", "rate_limited": "y", "default": "b"},
            "b": {"server_error": "z", "default": "c"},
            "x": {"default": "x2"},
        },
    )
    assert reachable(branching) == ("a", "b", "c", "z", "x", "x2", "y")


def test_reachable_ignores_unreachable_edges_and_survives_cycles() -> None:
    assert reachable(route("a", {"a": {}, "q": {"default": "r"}})) == ("a",)
    assert reachable(route("a", {"a": {"default": "b"}, "b": {"timeout": "a"}})) == ("a", "b")


def test_default_path_follows_only_default_edges() -> None:
    assert default_path(CODING) == ("openai-4o", "local-qwen")
    assert default_path(route("a", {})) == ("a",)
    assert default_path(route("a", {"a": {"default": "b"}, "b": {"default": "a"}})) == ("a", "b")


def test_side_edges_in_walk_order() -> None:
    assert side_edges(CODING) == (
        ("openai-4o", "rate_limited", "claude"),
        ("openai-4o", "context_window_exceeded", "claude"),
    )
    assert side_edges(CHAIN) == ()


def test_successors_default_first_without_duplicates() -> None:
    assert successors(CODING.edges, "openai-4o") == ("local-qwen", "claude")
    assert successors(CODING.edges, "local-qwen") == ()


@pytest.mark.parametrize(
    ("first", "edges", "cycle"),
    [
        ("a", {"a": {"default": "b"}, "b": {"default": "c"}}, None),
        ("a", {}, None),
        ("a", {"a": {"default": "a"}}, ("a", "a")),
        ("a", {"a": {"default": "b"}, "b": {"rate_limited": "a"}}, ("a", "b", "a")),
        ("a", {"a": {"default": "b"}, "b": {"default": "c"}, "c": {"timeout": "b"}}, ("b", "c", "b")),
        # a diamond is not a cycle
        ("a", {"a": {"default": "b", "timeout": "c"}, "b": {"default": "d"}, "c": {"default": "d"}}, None),
        # a cycle that cannot be reached from first is not reported
        ("a", {"a": {"default": "b"}, "x": {"default": "y"}, "y": {"default": "x"}}, None),
    ],
)
def test_find_cycle(first: str, edges: Mapping[str, Mapping[str, str]], cycle: tuple[str, ...] | None) -> None:
    assert find_cycle(first, edges) == cycle


def test_walk_follows_edges_and_visits_deferred_nodes_last() -> None:
    from proxy.config import parse_config
    from proxy.routing import Walk

    providers = {name: {"model": f"openai/{name}"} for name in ("a", "b", "c")}
    config = parse_config({"providers": providers, "routes": {"r": ["a", "b", "c"]}}, environ={})
    walk = Walk(config.routes["r"])
    assert walk.current == "a"
    walk.defer()  # a is slow: try it after the rest
    assert walk.current == "b"
    walk.follow("timeout")
    assert walk.current == "c"
    walk.follow("server_error")
    assert walk.current == "a" and not walk.can_defer
    walk.follow("timeout")
    assert walk.current is None
