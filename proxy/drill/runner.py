"""The drill's I/O: chat requests through the real routing, in-process or against a running
proxy whose admin endpoints switch providers off and, whatever happens, on again."""

from __future__ import annotations

import asyncio
import dataclasses
import sys
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import httpx
import orjson

from proxy.config import AlertSettings, Config, ConfigError, RedisSettings, load_config
from proxy.drill.report import (
    ADMIN_TIMEOUT,
    EXIT_NOT_RUN,
    REASON,
    SETTLE_SECONDS,
    DrillError,
    Plan,
    Report,
    Result,
    attempts_of,
    exit_code,
    leak_lines,
    render_json,
    render_text,
)
from proxy.sse import SSEDecoder

# --- one request ------------------------------------------------------------------------


async def ask(client: httpx.AsyncClient, route: str, index: int, plan: Plan) -> Result:
    """Send one chat request for `route` and time it; never raises for an HTTP failure."""
    body = {"model": route, "messages": [{"role": "user", "content": plan.prompt}], "stream": plan.stream}
    started = time.perf_counter()

    def elapsed() -> float:
        return (time.perf_counter() - started) * 1000

    first_byte = first_token = None
    try:
        async with client.stream("POST", "/v1/chat/completions", json=body) as response:
            first_byte = elapsed()
            if response.status_code == 200 and plan.stream:
                first_token, error = await _read_stream(response, elapsed)
            else:
                error = _body_problem(response.status_code, await response.aread())
    except httpx.HTTPError as exc:
        return Result(
            route,
            index,
            plan.stream,
            None,
            None,
            (),
            first_byte,
            first_token,
            elapsed(),
            error=f"{type(exc).__name__}: {exc}",
        )
    answered = response.status_code == 200 and error is None
    return Result(
        route,
        index,
        plan.stream,
        response.status_code,
        response.headers.get("x-proxy-provider"),
        attempts_of(response.headers, answered),
        first_byte,
        first_token,
        elapsed(),
        error,
        response.headers.get("x-request-id"),
    )


async def _read_stream(response: httpx.Response, elapsed: Callable[[], float]) -> tuple[float | None, str | None]:
    """(ms to the first content token, the stream's problem if any)."""
    decoder = SSEDecoder()
    first_token: float | None = None
    error: str | None = None
    done = False
    async for chunk in response.aiter_bytes():
        for _, data in decoder.feed(chunk):
            done, problem, token = _sse_data(data, done)
            error = error or problem
            if token and first_token is None:
                first_token = elapsed()
    for _, data in decoder.flush():
        done, problem, _token = _sse_data(data, done)
        error = error or problem
    if not done and error is None:
        error = "the stream ended without data: [DONE]"
    return first_token, error


def _sse_data(data: bytes, done: bool) -> tuple[bool, str | None, bool]:
    """(done, an in-band error, whether it carried content) for one `data:` payload."""
    if data.strip() == b"[DONE]":
        return True, None, False
    try:
        chunk = orjson.loads(data)
    except orjson.JSONDecodeError:
        return done, f"a stream event that is not JSON: {data[:80]!r}", False
    if not isinstance(chunk, dict):
        return done, None, False
    if isinstance(chunk.get("error"), dict):
        return done, f"in-band error: {chunk['error'].get('message', chunk['error'])}", False
    choices = chunk.get("choices") or [{}]
    delta = choices[0].get("delta") if isinstance(choices[0], dict) else None
    return done, None, isinstance(delta, dict) and bool(delta.get("content"))


def _body_problem(status: int, content: bytes) -> str | None:
    try:
        body = orjson.loads(content)
    except orjson.JSONDecodeError:
        return f"HTTP {status}: {content[:200].decode(errors='replace')}"
    if status == 200:
        ok = isinstance(body, dict) and bool(body.get("choices"))
        return None if ok else "a 200 answer without choices"
    error = body.get("error") if isinstance(body, dict) else None
    if isinstance(error, dict):
        return f"HTTP {status} {error.get('code') or error.get('type')}: {error.get('message')}"
    return f"HTTP {status}: {content[:200].decode(errors='replace')}"


async def run_requests(client: httpx.AsyncClient, routes: Sequence[str], plan: Plan) -> tuple[Result, ...]:
    """The drill's requests, one at a time (their latencies are then comparable)."""
    return tuple([await ask(client, route, i, plan) for route in routes for i in range(1, plan.requests + 1)])


def _client(base_url: str, key: str | None, plan: Plan) -> httpx.AsyncClient:
    headers = {"authorization": f"Bearer {key}"} if key else {}
    timeout = httpx.Timeout(max(60.0, 2 * plan.sla_ms / 1000), connect=10.0)
    return httpx.AsyncClient(base_url=base_url, headers=headers, timeout=timeout, trust_env=False)


# --- in-process ---------------------------------------------------------------------------


def isolated(config: Config) -> Config:
    """The config for the drill's own proxy: in-process state, so a switch never
    reaches the replicas sharing its Redis; no operator alerts for a drill; and
    a short drain, so that Ctrl-C does not wait for a hung provider."""
    server = dataclasses.replace(config.server, shutdown_grace_seconds=1.0)
    return dataclasses.replace(config, redis=RedisSettings(), alerts=AlertSettings(), server=server)


async def drill_in_process(config: Config, plan: Plan) -> Report:
    """Serve the real app for `config` on 127.0.0.1, switch providers off in it, and drill."""
    from starlette.applications import Starlette

    from proxy.server import bound_port, build_server
    from proxy.service import Service

    _check_names(plan.disabled, config.providers, "provider")
    _check_names(plan.routes, {**config.routes, **config.providers}, "route")
    server = build_server(isolated(config), host="127.0.0.1", port=0)
    task = asyncio.create_task(server.serve())
    try:
        while not server.started:
            if task.done():
                raise DrillError("the in-process proxy did not start (see the log above)")
            await asyncio.sleep(0.01)
        app = server.config.app
        service = app.state.service if isinstance(app, Starlette) else None
        if not isinstance(service, Service) or service.runtime is None:
            raise DrillError("the in-process proxy has no runtime")
        for name in plan.disabled:
            service.runtime.health.disable(name, f"disabled by operator: {REASON}")
        proxy = f"http://127.0.0.1:{bound_port(server)}"
        key = config.auth_keys[0] if config.auth_keys else None
        async with _client(proxy, key, plan) as client:
            results = await run_requests(client, plan.routes or tuple(config.routes), plan)
    finally:
        server.should_exit = True
        await task
    return Report("in-process", config.source or "(config)", proxy, plan, results)


def _check_names(names: Sequence[str], known: Mapping[str, object], kind: str) -> None:
    unknown = [name for name in names if name not in known]
    if unknown:
        raise DrillError(f"no {kind} named {', '.join(map(repr, unknown))} (known: {', '.join(known)})")


# --- remote -------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Remote:
    url: str
    admin_key: str | None = None
    api_key: str | None = None


async def drill_remote(remote: Remote, plan: Plan) -> Report:
    """Switch providers off through the proxy's admin endpoints, drill, and
    always switch back on what the drill switched off."""
    url = remote.url.rstrip("/")
    notes: list[str] = []
    async with _client(url, remote.api_key, plan) as client:
        to_switch = await _prepare_switches(client, remote, plan, notes)
        routes = plan.routes or await _remote_routes(client)
        switched: list[str] = []
        try:
            for name in to_switch:
                switched.append(name)  # before the call: a lost answer may still have switched it
                await _switch(client, remote, name, "disable")
            if switched:
                await asyncio.sleep(SETTLE_SECONDS)
            results = await run_requests(client, routes, plan)
        finally:
            restore_failed = await _restore(client, remote, switched)
            notes += [f"switched back on: {', '.join(switched)}"] if switched else []
    return Report("remote", url, url, plan, results, tuple(notes), restore_failed)


async def _prepare_switches(client: httpx.AsyncClient, remote: Remote, plan: Plan, notes: list[str]) -> list[str]:
    """Which providers to switch off: checks the admin endpoints and the names first."""
    if not plan.disabled:
        return []
    if not remote.admin_key:
        raise DrillError("--disable against a running proxy needs --admin-key")
    providers = _json_object(await _admin(client, remote, "GET", "/admin/status")).get("providers", {})
    _check_names(plan.disabled, providers, "provider")
    already = [name for name in plan.disabled if providers[name].get("disabled")]
    if already:
        notes.append(f"already switched off before the drill (left off afterwards): {', '.join(already)}")
    return [name for name in plan.disabled if name not in already]


async def _admin(client: httpx.AsyncClient, remote: Remote, method: str, path: str) -> httpx.Response:
    headers = {"authorization": f"Bearer {remote.admin_key}"}
    try:
        response = await client.request(
            method, path, headers=headers, json=None if method == "GET" else {"reason": REASON}, timeout=ADMIN_TIMEOUT
        )
    except httpx.HTTPError as exc:
        raise DrillError(f"{method} {path}: {type(exc).__name__}: {exc}") from exc
    if response.status_code == 404 and "admin_key" in response.text:
        raise DrillError("the proxy's admin endpoints are off: set server.admin_key")
    if response.status_code in (401, 403):
        raise DrillError("the proxy refused the admin key")
    if response.status_code != 200:
        raise DrillError(f"{method} {path}: HTTP {response.status_code}: {response.text[:200]}")
    return response


async def _switch(client: httpx.AsyncClient, remote: Remote, name: str, action: str) -> None:
    await _admin(client, remote, "POST", f"/admin/providers/{name}/{action}")


async def _restore(client: httpx.AsyncClient, remote: Remote, switched: Sequence[str]) -> tuple[str, ...]:
    failed = []
    for name in switched:
        try:
            await _switch(client, remote, name, "enable")
        except DrillError as exc:
            print(f"error: could not switch {name!r} back on: {exc}", file=sys.stderr)
            failed.append(name)
    return tuple(failed)


async def _remote_routes(client: httpx.AsyncClient) -> tuple[str, ...]:
    try:
        response = await client.get("/v1/models", timeout=ADMIN_TIMEOUT)
        response.raise_for_status()
    except httpx.HTTPError as exc:
        raise DrillError(f"GET /v1/models: {type(exc).__name__}: {exc}") from exc
    entries = _json_object(response).get("data", [])
    return tuple(e["id"] for e in entries if isinstance(e, dict) and e.get("owned_by") == "fallback-proxy:route")


def _json_object(response: httpx.Response) -> dict[str, Any]:
    try:
        body = orjson.loads(response.content)
    except orjson.JSONDecodeError as exc:
        raise DrillError(f"{response.request.url.path}: not JSON: {response.text[:200]}") from exc
    if not isinstance(body, dict):
        raise DrillError(f"{response.request.url.path}: not a JSON object: {response.text[:200]}")
    return body


# --- the command --------------------------------------------------------------------------


def run(plan: Plan, *, config_path: str | None, remote: Remote | None, as_json: bool) -> int:
    """Run the drill in-process (`config_path`) or against `remote`; print the report; the exit code."""
    if plan.requests < 1 or plan.sla_ms < 1:
        print("error: --requests and --sla-ms must be at least 1", file=sys.stderr)
        return EXIT_NOT_RUN
    try:
        report = asyncio.run(_drill(plan, config_path, remote))
    except ConfigError as exc:
        for problem in exc.problems:
            print(f"error: {problem}", file=sys.stderr)
        return EXIT_NOT_RUN
    except DrillError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return EXIT_NOT_RUN
    except KeyboardInterrupt:
        print(
            "drill interrupted (what it switched off is back on, unless an error above says otherwise)", file=sys.stderr
        )
        return 130
    if as_json:
        sys.stdout.write(render_json(report).decode() + "\n")
        for line in leak_lines(report):
            print(line, file=sys.stderr)
    else:
        print(render_text(report))
    return exit_code(report)


async def _drill(plan: Plan, config_path: str | None, remote: Remote | None) -> Report:
    if remote is not None:
        return await drill_remote(remote, plan)
    if config_path is None:
        raise DrillError("pass --config FILE (in-process) or --url URL (a running proxy)")
    config = load_config(config_path)
    print(
        f"warning: in-process drill: requests go to the REAL providers in {config_path} (this costs tokens)",
        file=sys.stderr,
        flush=True,
    )
    return await drill_in_process(config, plan)
