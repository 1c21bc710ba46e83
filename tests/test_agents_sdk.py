"""A full agent loop with the OpenAI Agents SDK (its default model class speaks the Responses
API) through the proxy: a function tool is called, its result sent back, a final answer.

`openai-agents` needs openai 3.x while this suite pins 2.x, so it runs in a virtual
environment of its own, made once under a cache directory (`FALLBACK_PROXY_TEST_CACHE`,
default `~/.cache/fallback-proxy-tests`), and the agent runs as a subprocess.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from proxy.fakes import FakeAnthropic, FakeOpenAI, FakeServer

from .conftest import ServedApp, openai_provider

AGENTS_VERSION = "0.24.0"
TIMEOUT = {"connect": 2, "first_token": 5, "total": 10, "idle": 5}

AGENT = '''
import asyncio, json, sys

from agents import Agent, OpenAIResponsesModel, Runner, function_tool, set_tracing_disabled
from openai import AsyncOpenAI

set_tracing_disabled(True)
calls = []


@function_tool
def get_weather(city: str) -> str:
    """The weather in a city."""
    calls.append(city)
    return f"sunny in {city}"


async def main(base_url: str, stream: bool) -> None:
    client = AsyncOpenAI(base_url=base_url, api_key="unused", max_retries=0)
    model = OpenAIResponsesModel(model="default", openai_client=client)
    agent = Agent(name="weather", instructions="Use the tool.", tools=[get_weather], model=model)
    kinds = []
    if stream:
        result = Runner.run_streamed(agent, "Weather in Paris?")
        async for event in result.stream_events():
            if event.type == "raw_response_event":
                kinds.append(event.data.type)
    else:
        result = await Runner.run(agent, "Weather in Paris?")
    print(json.dumps({"final": result.final_output, "calls": calls, "events": kinds}))


asyncio.run(main(sys.argv[1], sys.argv[2] == "stream"))
'''


def cache_dir() -> Path:
    return Path(os.environ.get("FALLBACK_PROXY_TEST_CACHE", Path.home() / ".cache" / "fallback-proxy-tests"))


def _works(python: Path) -> bool:
    check = [
        str(python),
        "-c",
        f"import agents, importlib.metadata as m; assert m.version('openai-agents') == '{AGENTS_VERSION}'",
    ]
    return python.exists() and subprocess.run(check, capture_output=True, timeout=120).returncode == 0


@pytest.fixture(scope="session")
def agents_python() -> Path:
    """The Python of a virtual environment with openai-agents (made on first use, then reused)."""
    home = cache_dir()
    venv = home / f"openai-agents-{AGENTS_VERSION}"
    python = venv / "bin" / "python"
    if _works(python):
        return python
    home.mkdir(parents=True, exist_ok=True)
    building = Path(tempfile.mkdtemp(prefix="openai-agents-", dir=home))
    try:
        subprocess.run([sys.executable, "-m", "venv", str(building)], check=True, timeout=300)
        pip = [str(building / "bin" / "python"), "-m", "pip", "install", "-q", f"openai-agents=={AGENTS_VERSION}"]
        subprocess.run(pip, check=True, timeout=900)
        shutil.rmtree(venv, ignore_errors=True)
        building.rename(venv)  # a venv's python and site-packages survive the move; its scripts are not used
    finally:
        shutil.rmtree(building, ignore_errors=True)
    assert _works(python), f"openai-agents {AGENTS_VERSION} did not install in {venv}"
    return python


def run_agent(python: Path, proxy: ServedApp, stream: bool) -> dict[str, Any]:
    done = subprocess.run(
        [str(python), "-c", AGENT, proxy.url + "/v1", "stream" if stream else "plain"],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    answer: dict[str, Any] = json.loads(done.stdout.strip().splitlines()[-1])
    return answer


@pytest.fixture(params=["openai", pytest.param("anthropic", marks=pytest.mark.litellm)])
def fakes(request: pytest.FixtureRequest) -> Iterator[tuple[FakeServer, FakeServer]]:
    kind = FakeOpenAI if request.param == "openai" else FakeAnthropic
    with kind("cloud") as cloud, kind("backup") as backup:
        cloud.call_tools = backup.call_tools = True
        yield cloud, backup


def provider(fake: FakeServer) -> dict[str, Any]:
    if isinstance(fake, FakeAnthropic):
        return {
            "model": "anthropic/claude-sonnet-4-5",
            "api_key": "sk-ant-test",
            "api_base": fake.url,
            "timeout": TIMEOUT,
        }
    return openai_provider(fake.url, timeout=TIMEOUT)


@pytest.mark.slow
@pytest.mark.parametrize("stream", [False, True], ids=["plain", "stream"])
@pytest.mark.parametrize("fallback", [False, True], ids=["first", "fallback"])
def test_agent_calls_a_tool_and_answers(
    agents_python: Path,
    serve: Callable[..., ServedApp],
    fakes: tuple[FakeServer, FakeServer],
    stream: bool,
    fallback: bool,
) -> None:
    cloud, backup = fakes
    proxy = serve(
        {
            "providers": {"cloud": provider(cloud), "backup": provider(backup)},
            "routes": {"default": ["cloud", "backup"]},
        }
    )
    if fallback:
        cloud.set_fault("status", status=503)
    answer = run_agent(agents_python, proxy, stream)
    who = "backup" if fallback else "cloud"
    assert answer["calls"] == ["Paris"]
    assert answer["final"] == f"Hello from {who}. The tool said: sunny in Paris"
    answering = backup if fallback else cloud
    assert "sunny in Paris" in json.dumps(answering.requests[-1].body), "the tool's result went back to the model"
    if stream:
        kinds = answer["events"]
        assert kinds.count("response.completed") == 2 and "response.function_call_arguments.delta" in kinds
        assert "response.output_text.delta" in kinds
