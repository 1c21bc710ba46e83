"""Steady load runs no garbage collection in `fallback-proxy serve`.

A request in flight holds a few dozen container objects (coroutines, tasks,
handles, its record) and frees them by reference counting as it ends: it leaves no
reference cycle, so a cyclic collection under load frees nothing and only walks
every young object in flight. With CPython's default young threshold (700) a
proxy with a few dozen requests in flight ran one every ~20 requests (~5 % of a
short request's CPU). Seen from outside as a Prometheus scrape would see it:
`python_gc_collections_total` on `/metrics`, before and after the load.
"""

from __future__ import annotations

import asyncio
import json
import re
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
import yaml

from proxy.fakes import FakeOpenAI

from .conftest import openai_provider
from .proxy_process import ProxyProcess
from .redis_server import free_port

IN_FLIGHT = 16
ASK = {"model": "default", "messages": [{"role": "user", "content": "Say hello."}]}


@pytest.fixture
def proxy(tmp_path: Path, cloud: FakeOpenAI) -> Iterator[str]:
    config = tmp_path / "config.yaml"
    config.write_text(
        yaml.safe_dump(
            {
                "server": {"reload_check_seconds": 0},
                "providers": {"cloud": openai_provider(cloud.url)},
                "routes": {"default": ["cloud"]},
            }
        )
    )
    process = ProxyProcess(config, free_port(), tmp_path / "proxy.log")
    try:
        process.wait_ready()
        yield process.url
    finally:
        process.close()


def collections(url: str) -> dict[str, float]:
    """`python_gc_collections_total` by generation."""
    text = httpx.get(url + "/metrics", timeout=10).text
    found = {
        match["generation"]: float(match["value"])
        for match in re.finditer(
            r'^python_gc_collections_total\{generation="(?P<generation>\d)"\} (?P<value>\S+)$', text, re.M
        )
    }
    assert set(found) == {"0", "1", "2"}, text
    return found


async def load(url: str, requests: int) -> int:
    """`requests` chat completions, half of them streams, `IN_FLIGHT` at a time; how many came whole."""
    queue = iter(range(requests))
    whole = 0

    async def client(http: httpx.AsyncClient) -> None:
        nonlocal whole
        for number in queue:
            stream = number % 2 == 1
            answer = await http.post(url + "/v1/chat/completions", json={**ASK, "stream": stream})
            assert answer.status_code == 200, answer.text
            if stream:
                events = [line[6:] for line in answer.text.splitlines() if line.startswith("data: ")]
                text = "".join(
                    choice["delta"].get("content") or ""
                    for event in events[:-1]
                    for choice in json.loads(event)["choices"]
                )
                assert events[-1] == "[DONE]", answer.text
            else:
                text = answer.json()["choices"][0]["message"]["content"]
            whole += text == "Hello from cloud."

    async with httpx.AsyncClient(timeout=30, limits=httpx.Limits(max_connections=IN_FLIGHT)) as http:
        await asyncio.gather(*(client(http) for _ in range(IN_FLIGHT)))
    return whole


def test_steady_load_runs_no_garbage_collection(proxy: str) -> None:
    asyncio.run(load(proxy, 100))  # warm: pools, caches, lazy imports
    before = collections(proxy)
    whole = asyncio.run(load(proxy, 800))
    after = collections(proxy)
    assert whole == 800
    assert after == before, f"collections during the load: {before} -> {after}"
