#!/opt/venv/bin/python
"""A stand-in for the `ollama` command of the ollama/ollama image, for the compose test.

* ``ollama serve``: the project's fake Ollama (`proxy.fakes.FakeOllama`, as ``python -m
  proxy.fakes ollama`` runs it), reachable on ``$OLLAMA_HOST`` (0.0.0.0:11434 in the image) by
  a TCP relay, because the fake listens on loopback only.
* ``ollama list`` and ``ollama pull MODEL``: clients of ``$OLLAMA_HOST``, as the real ones. The
  fake already holds its one model, so a pull succeeds when the server lists it (what a real
  pull of a model already present ends with) and fails as the real one does otherwise.
"""

from __future__ import annotations

import asyncio
import json
import os
import signal
import sys
import urllib.request

from proxy.fakes import FakeOllama


def _address() -> tuple[str, int]:
    host = os.environ.get("OLLAMA_HOST", "127.0.0.1:11434").removeprefix("http://").rstrip("/")
    name, _, port = host.rpartition(":")
    return (name or "127.0.0.1"), int(port or 11434)


def _url(path: str) -> str:
    host, port = _address()
    return f"http://{'127.0.0.1' if host == '0.0.0.0' else host}:{port}{path}"


async def _pipe(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    try:
        while data := await reader.read(65536):
            writer.write(data)
            await writer.drain()
    except ConnectionError:
        pass
    finally:
        writer.close()


async def _relay(target: int) -> None:
    async def accept(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        up_reader, up_writer = await asyncio.open_connection("127.0.0.1", target)
        await asyncio.gather(_pipe(reader, up_writer), _pipe(up_reader, writer))

    host, port = _address()
    server = await asyncio.start_server(accept, host, port)
    print(f"stand-in ollama listening on {host}:{port}", flush=True)
    async with server:
        await server.serve_forever()


def serve() -> int:
    # PID 1 gets no default SIGTERM action: stop at once, as the real server does.
    signal.signal(signal.SIGTERM, lambda *_: os._exit(0))
    with FakeOllama("ollama") as fake:
        asyncio.run(_relay(fake.port))
    return 0


def _tags() -> list[str]:
    with urllib.request.urlopen(_url("/api/tags"), timeout=5) as answer:
        return [model["name"] for model in json.load(answer)["models"]]


def list_models() -> int:
    try:
        names = _tags()
    except OSError as exc:
        print(f"Error: could not connect to ollama server: {exc}", file=sys.stderr)
        return 1
    print("NAME")
    print("\n".join(names))
    return 0


def pull(model: str) -> int:
    print("pulling manifest", flush=True)
    try:
        names = _tags()
    except OSError as exc:
        print(f"Error: could not connect to ollama server: {exc}", file=sys.stderr)
        return 1
    if model not in names:
        print("Error: pull model manifest: file does not exist", file=sys.stderr)
        return 1
    print("success", flush=True)
    return 0


def main(argv: list[str]) -> int:
    match argv:
        case ["serve"]:
            return serve()
        case ["list"]:
            return list_models()
        case ["pull", model]:
            return pull(model)
    print(f"stand-in ollama: unsupported command {argv}", file=sys.stderr)
    return 2


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
