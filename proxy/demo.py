"""`fallback-proxy demo`: a fake cloud, a fake local model and the proxy in
front of them, with lines a newcomer can paste to see an answer, a fallback
and the headers that explain it."""

from __future__ import annotations

import asyncio
import contextlib
import shlex
import sys
from collections.abc import Callable
from typing import Any

import httpx
import orjson
import uvicorn

from proxy.config import Config, Timeouts, parse_config
from proxy.fakes import FakeOllama, FakeOpenAI, Fault
from proxy.server import bound_port, build_server
from proxy.sse import payload_decoder

CLOUD_REPLY = "Hello from the cloud (a fake OpenAI server)."
LOCAL_REPLY = "Hello from the local model (a fake Ollama daemon)."
CLOUD_TIMEOUTS = Timeouts(connect=2, first_token=5, total=30)


def fault_note(fault: Fault, timeouts: Timeouts = CLOUD_TIMEOUTS) -> str:
    """What the proxy will do about a fault of the fake cloud, in a sentence."""
    first = f"{timeouts.first_token:g}"
    waits = f"the proxy waits up to {first}s for the first token (streamed or not), then falls back to the local model"
    kind = fault.kind
    if kind == "hang":
        return f"the fake cloud now hangs (accepts requests, never answers): {waits}..."
    if kind == "slow":
        delay = f"{fault.first_token_delay:g}s"
        if fault.first_token_delay > timeouts.first_token:
            return f"the fake cloud now takes {delay} to its first token: {waits}..."
        return f"the fake cloud is now slow ({delay} to its first token, {fault.token_delay:g}s between tokens)"
    if kind == "status":
        return f"the fake cloud now answers HTTP {fault.status}: the proxy falls back to the local model at once"
    if kind in ("die_midstream", "stream_error", "stall"):
        how = {"die_midstream": "cuts its connection", "stream_error": "sends an error event", "stall": "stalls"}[kind]
        return (
            f"the fake cloud now {how} after {fault.after_chunks} chunks: a stream is continued by the local "
            "model from where it stopped"
        )
    return "the fake cloud answers normally again"


async def announce_faults(cloud: FakeOpenAI, say: Callable[[str], None], every: float = 0.2) -> None:
    """Say on the console what each fault set on the fake cloud will do, so a
    fault that makes the proxy wait does not look like a hung demo."""
    seen = cloud.fault
    while True:
        await asyncio.sleep(every)
        fault = cloud.fault
        if fault != seen:
            say(f"-> {fault_note(fault)}")
            seen = fault


def _say(line: str) -> None:
    print(line, flush=True)


def demo_config(cloud_url: str, local_url: str, port: int) -> Config:
    return parse_config(
        {
            "server": {"host": "127.0.0.1", "port": port},
            "providers": {
                "cloud": {
                    "model": "openai/gpt-4o-mini-2024-07-18",
                    "api_base": cloud_url + "/v1",
                    "api_key": "demo-cloud-key",
                    "timeout": {
                        "connect": CLOUD_TIMEOUTS.connect,
                        "first_token": CLOUD_TIMEOUTS.first_token,
                        "total": CLOUD_TIMEOUTS.total,
                    },
                },
                "local": {
                    "model": "ollama_chat/qwen2.5:7b",
                    "api_base": local_url,
                    "local": True,
                    "context_window": 32768,
                },
            },
            "routes": {
                "default": ["cloud", "local"],
                "private": {"local_only": True, "chain": ["local"]},
            },
        },
        environ={},
        source="(demo)",
    )


def instructions(proxy: str, cloud: str, local: str, python: str | None = None) -> str:
    """The text the demo prints. Step 3 runs this very interpreter (`python`,
    default `sys.executable`): a fresh shell's `python` may lack the venv (and
    so the `openai` package)."""
    ask = (
        f"curl -s {proxy}/v1/chat/completions -H 'content-type: application/json' "
        """-d '{"model":"default","messages":[{"role":"user","content":"Hello!"}]}'"""
    )
    sdk = (
        f"{shlex.quote(python or sys.executable)} "
        '-c "from openai import OpenAI; '
        f"c = OpenAI(base_url='{proxy}/v1', api_key='none'); "
        "s = c.chat.completions.create(model='default', stream=True, "
        "messages=[{'role': 'user', 'content': 'Hello!'}]); "
        "print(''.join(x.choices[0].delta.content or '' for x in s if x.choices))\""
    )
    return f"""
fallback-proxy demo: the proxy is listening on {proxy}
  fake cloud  (OpenAI wire format)  {cloud}   provider "cloud"
  fake local  (Ollama native API)   {local}   provider "local"
  routes: default = cloud -> local;  private = local only

1. An answer (the cloud answers; headers name it):
   {ask} -i

2. A fallback: break the cloud, ask again; the local model answers and
   x-proxy-fallbacks says why:
   curl -s -X POST {cloud}/_fault -d '{{"kind":"status","status":503}}'
   {ask} -i

3. The same from the official OpenAI SDK, streaming:
   {sdk}

Put the cloud back with: curl -s -X DELETE {cloud}/_fault
Other faults: {{"kind":"hang"}}, {{"kind":"slow","first_token_delay":20}}, {{"kind":"die_midstream"}}
(this console says what each one will do when you set it).
Press Ctrl-C to stop.
"""


async def selftest(proxy: str, cloud: FakeOpenAI) -> list[str]:
    """Walk the three steps of the instructions; return the problems found."""
    problems: list[str] = []
    request = {"model": "default", "messages": [{"role": "user", "content": "Hello!"}]}
    async with httpx.AsyncClient(base_url=proxy, timeout=30) as client:
        first = await client.post("/v1/chat/completions", json=request)
        _expect(problems, "1. answer", first, provider="cloud", text=CLOUD_REPLY)
        cloud.set_fault("status", status=503)
        second = await client.post("/v1/chat/completions", json=request)
        _expect(problems, "2. fallback", second, provider="local", text=LOCAL_REPLY)
        if second.headers.get("x-proxy-fallbacks") != "cloud=server_error":
            problems.append(f"2. fallback: x-proxy-fallbacks={second.headers.get('x-proxy-fallbacks')!r}")
        async with client.stream("POST", "/v1/chat/completions", json={**request, "stream": True}) as streamed:
            text = await _streamed_text(streamed)
        if text != LOCAL_REPLY:
            problems.append(f"3. stream: got {text!r}")
        print(f"3. stream: {streamed.headers.get('x-proxy-provider')} streamed {text!r}")
        cloud.clear_fault()
    return problems


def _expect(problems: list[str], step: str, response: httpx.Response, *, provider: str, text: str) -> None:
    answered = response.headers.get("x-proxy-provider")
    content = response.json()["choices"][0]["message"]["content"] if response.status_code == 200 else None
    print(
        f"{step}: HTTP {response.status_code} from {answered}: {content!r} "
        f"(fallbacks: {response.headers.get('x-proxy-fallbacks', 'none')})"
    )
    if response.status_code != 200 or answered != provider or content != text:
        problems.append(f"{step}: expected {provider!r} to answer {text!r}")


async def _streamed_text(response: httpx.Response) -> str:
    """The text of a chat stream, read as a client reads it."""
    decoder = payload_decoder("sse")
    deltas = [_delta(data) async for block in response.aiter_bytes() for data in decoder.feed(block)]
    return "".join(deltas + [_delta(data) for data in decoder.flush()])


def _delta(data: bytes) -> str:
    if data == b"[DONE]":
        return ""
    chunk: Any = orjson.loads(data)
    choices = chunk.get("choices") or [{}]
    return str(choices[0].get("delta", {}).get("content") or "")


def run_demo(port: int, check: bool) -> int:
    with (
        FakeOpenAI("cloud", reply=CLOUD_REPLY, api_key="demo-cloud-key") as cloud,
        FakeOllama("local", reply=LOCAL_REPLY) as local,
    ):
        server = build_server(demo_config(cloud.url, local.url, port))
        return asyncio.run(_serve(server, cloud, local.url, check))


async def _serve(server: uvicorn.Server, cloud: FakeOpenAI, local_url: str, check: bool) -> int:
    task = asyncio.create_task(server.serve())
    while not server.started:
        if task.done():
            return 1  # uvicorn already said why (e.g. the port is taken)
        await asyncio.sleep(0.01)
    proxy = f"http://127.0.0.1:{bound_port(server)}"
    if not check:
        print(instructions(proxy, cloud.url, local_url), flush=True)
        announcer = asyncio.create_task(announce_faults(cloud, _say))
        with contextlib.suppress(asyncio.CancelledError):
            await task
        announcer.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await announcer
        return 0
    problems = await selftest(proxy, cloud)
    server.should_exit = True
    await task
    for problem in problems:
        print(f"problem: {problem}")
    print("demo self-test: " + ("FAILED" if problems else "ok"))
    return 1 if problems else 0
