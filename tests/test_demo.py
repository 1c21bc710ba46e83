"""`fallback-proxy demo`'s console: step 3 runs the venv's own python, and a
fault set on the fake cloud says what the proxy will do about it (a fault that
makes the proxy wait says how long)."""

from __future__ import annotations

import asyncio
import shlex
import subprocess
import sys

import httpx
import pytest

from proxy.demo import CLOUD_TIMEOUTS, announce_faults, fault_note, instructions
from proxy.fakes import FakeOpenAI, Fault


def test_step_3_runs_this_very_python() -> None:
    text = instructions("http://127.0.0.1:8080", "http://127.0.0.1:1", "http://127.0.0.1:2")
    step3 = text.split("3. ", 1)[1].splitlines()[1].strip()
    assert step3.startswith(f"{shlex.quote(sys.executable)} -c ")
    quoted = instructions("http://p", "http://c", "http://l", python="/opt/my venv/bin/python")
    assert "'/opt/my venv/bin/python' -c " in quoted


def test_step_3_works_as_printed(cloud: FakeOpenAI) -> None:
    """The printed command, run by a shell whose PATH has no venv, streams an answer
    (here straight from the fake cloud, which speaks the same API)."""
    text = instructions(cloud.url, cloud.url, "http://127.0.0.1:9")
    command = text.split("3. ", 1)[1].splitlines()[1].strip()
    env = {"PATH": "/usr/bin:/bin", "HOME": "/nonexistent"}
    done = subprocess.run(command, shell=True, capture_output=True, text=True, timeout=120, env=env)
    assert (done.returncode, done.stdout, done.stderr) == (0, "Hello from cloud.\n", "")


@pytest.mark.parametrize(
    ("fault", "words"),
    [
        (
            Fault("hang"),
            f"hangs (accepts requests, never answers): the proxy waits up to {CLOUD_TIMEOUTS.first_token:g}s",
        ),
        (Fault("slow", first_token_delay=20), "takes 20s to its first token: the proxy waits up to 5s"),
        (Fault("slow", first_token_delay=1, token_delay=0.5), "slow (1s to its first token, 0.5s between tokens)"),
        (Fault("status", status=503), "answers HTTP 503: the proxy falls back to the local model at once"),
        (Fault("die_midstream", after_chunks=3), "cuts its connection after 3 chunks"),
        (Fault(), "answers normally again"),
    ],
)
def test_each_fault_is_explained(fault: Fault, words: str) -> None:
    assert words in fault_note(fault)


def test_a_fault_set_over_http_is_announced(cloud: FakeOpenAI) -> None:
    async def watch() -> list[str]:
        said: asyncio.Queue[str] = asyncio.Queue()
        task = asyncio.create_task(announce_faults(cloud, said.put_nowait, every=0.01))
        await asyncio.sleep(0)  # the watcher takes its first look (no fault) before one is set
        await asyncio.to_thread(httpx.post, cloud.url + "/_fault", json={"kind": "hang"})
        first = await asyncio.wait_for(said.get(), 10)
        await asyncio.to_thread(httpx.delete, cloud.url + "/_fault")
        second = await asyncio.wait_for(said.get(), 10)
        task.cancel()
        return [first, second]

    assert asyncio.run(watch()) == [f"-> {fault_note(Fault('hang'))}", f"-> {fault_note(Fault())}"]
