"""What breaks during the soak: the flapping providers and the Redis kills."""

from __future__ import annotations

import asyncio
import random
import time
from collections import Counter
from dataclasses import dataclass, field
from typing import Any

import httpx

from tests.soak.procs import DurableRedis

# (weight, fault kind, how to draw its fields)
FAULTS: list[tuple[float, str]] = [
    (0.35, "none"),
    (0.12, "status503"),
    (0.05, "status500"),
    (0.05, "status429"),
    (0.10, "hang"),
    (0.13, "slow"),
    (0.13, "die_midstream"),
    (0.07, "stream_error"),
]


def draw_fault(rng: random.Random) -> dict[str, Any]:
    """A random `POST /_fault` body (Fault fields)."""
    kind = rng.choices([k for _, k in FAULTS], [w for w, _ in FAULTS])[0]
    if kind.startswith("status"):
        fault: dict[str, Any] = {"kind": "status", "status": int(kind[6:])}
        if fault["status"] == 429:
            fault["retry_after"] = 1
        return fault
    if kind == "slow":
        return {
            "kind": "slow",
            "first_token_delay": round(rng.uniform(0, 1.5), 2),
            "token_delay": round(rng.uniform(0.02, 0.3), 3),
        }
    if kind in ("die_midstream", "stream_error"):
        return {"kind": kind, "after_chunks": rng.randint(0, 8)}
    return {"kind": kind}


async def flap(urls: dict[str, str], end: float, rng: random.Random, changes: Counter[str]) -> None:
    """Every second, each flapping provider gets a new random fault (or keeps its own)."""
    async with httpx.AsyncClient(timeout=5) as http:
        while time.monotonic() < end:
            for url in urls.values():
                if rng.random() < 0.6:
                    fault = draw_fault(rng)
                    try:
                        (await http.post(url + "/_fault", json=fault)).raise_for_status()
                    except httpx.HTTPError as exc:  # a fake too busy to answer keeps its old fault
                        changes[f"unsent ({type(exc).__name__})"] += 1
                        continue
                    changes[f"{fault['kind']}{fault.get('status', '')}"] += 1
            await asyncio.sleep(1.0)


async def heal(urls: list[str]) -> None:
    async with httpx.AsyncClient(timeout=5) as http:
        for url in urls:
            (await http.delete(url + "/_fault")).raise_for_status()


@dataclass
class RedisTimeline:
    """When Redis was really down, and when the proxy's /readyz said its store was."""

    kills: list[tuple[float, float]] = field(default_factory=list)  # (killed, restarted), run-relative
    store_ok: list[tuple[float, bool]] = field(default_factory=list)  # (t, /readyz store ok)
    readyz_seconds: list[float] = field(default_factory=list)  # how long each /readyz took

    def recovery_lags(self) -> list[float | None]:
        """For each restart: seconds until /readyz first reported the store ok
        again (None: not before Redis was killed again, or the run ended)."""
        lags: list[float | None] = []
        for k, (_, restarted) in enumerate(self.kills):
            until = self.kills[k + 1][0] if k + 1 < len(self.kills) else float("inf")
            ok = next((t for t, good in self.store_ok if restarted <= t < until and good), None)
            lags.append(None if ok is None else ok - restarted)
        return lags

    def unavailable_seconds(self) -> float:
        pairs = zip(self.store_ok, self.store_ok[1:], strict=False)
        return sum(b[0] - a[0] for a, b in pairs if not a[1])


async def watch_store(url: str, start: float, timeline: RedisTimeline) -> None:
    """Ask /readyz every 0.25 s (until cancelled) whether the proxy's store answers,
    and how long the proxy takes to say so (its event loop's responsiveness)."""
    async with httpx.AsyncClient(timeout=2) as http:
        while True:
            asked = time.monotonic()
            try:
                status = (await http.get(url + "/readyz")).json()["store"]["status"]
            except (httpx.HTTPError, ValueError, KeyError):
                status = "no answer"
            timeline.readyz_seconds.append(time.monotonic() - asked)
            timeline.store_ok.append((time.monotonic() - start, status == "ok"))
            await asyncio.sleep(0.25)


async def kill_redis(
    redis: DurableRedis,
    start: float,
    end: float,
    kills: int,
    rng: random.Random,
    log: list[str],
    timeline: RedisTimeline,
) -> None:
    """SIGKILL Redis `kills` times, spread over the run, each down for 2-5 s,
    restarted on the same port from its append-only file; always up at the end."""
    span = end - start
    for k in range(kills):
        at = start + span * (k + 1) / (kills + 1)
        await asyncio.sleep(max(0.0, at - time.monotonic()))
        # Down for 2-5 s, but up again before the next kill and 5 s before the end.
        room = start + span * (k + 2) / (kills + 1) - time.monotonic() - 3
        down = max(0.5, min(rng.uniform(2, 5), room))
        await asyncio.to_thread(redis.kill)
        killed = time.monotonic() - start
        log.append(f"{killed:6.1f}s  redis SIGKILL (down {down:.1f}s)")
        await asyncio.sleep(down)
        await asyncio.to_thread(redis.restart)
        restarted = time.monotonic() - start
        timeline.kills.append((killed, restarted))
        log.append(f"{restarted:6.1f}s  redis restarted (pid {redis.pid})")
