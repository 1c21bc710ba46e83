"""``fallback-proxy healthcheck``: is the running ``serve`` answering where it listens?

A container's HEALTHCHECK runs in a new process that sees neither the command
line nor the port the server was started with: ``docker run IMAGE serve --port
9000`` must not be checked on 8080. So the check finds the ``fallback-proxy
serve`` process itself (in a container, PID 1), reads its arguments and its
environment from ``/proc``, and resolves the address exactly as ``serve`` did:
``--host``/``--port``, else the config's ``server.host``/``server.port``
(``${PROXY_PORT}`` and the like interpolated with the server's own environment).

Pure pieces (`serve_arguments`, `listen_address`, `probe_url`) decide; only
`find_serve` reads ``/proc`` and `check` makes the one HTTP request.
"""

from __future__ import annotations

import http.client
import ipaddress
import os
import urllib.error
import urllib.request
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Final

from proxy.config import Config

PROC: Final = Path("/proc")
_WILDCARDS: Final = {"0.0.0.0": "127.0.0.1", "": "127.0.0.1", "::": "::1"}


@dataclass(frozen=True, slots=True)
class ServeProcess:
    """A running ``fallback-proxy serve``: its pid, the arguments after ``serve``, its environment."""

    pid: int
    arguments: tuple[str, ...]
    environ: Mapping[str, str] = field(repr=False)


def serve_arguments(cmdline: Sequence[str]) -> tuple[str, ...] | None:
    """The arguments after ``serve`` when ``cmdline`` runs ``fallback-proxy serve``
    (the console script, whose interpreter comes first, or ``python -m proxy.cli``); else None."""
    for index, word in enumerate(cmdline):
        if os.path.basename(word) == "fallback-proxy":
            rest = cmdline[index + 1 :]
        elif word == "-m" and cmdline[index + 1 : index + 2] == ["proxy.cli"]:
            rest = cmdline[index + 2 :]
        else:
            continue
        return tuple(rest[1:]) if rest[:1] == ["serve"] else None
    return None


def find_serve(pid: int | None = None, proc: Path = PROC) -> ServeProcess | None:
    """The ``serve`` process with this pid, or else the oldest one (the lowest pid: PID 1 in a container)."""
    pids = [pid] if pid is not None else sorted(int(p.name) for p in proc.iterdir() if p.name.isdigit())
    for candidate in pids:
        try:
            cmdline = (proc / str(candidate) / "cmdline").read_bytes()
        except OSError:
            continue  # gone, or not ours to read
        arguments = serve_arguments([word.decode(errors="replace") for word in cmdline.split(b"\0")[:-1]])
        if arguments is not None:
            return ServeProcess(candidate, arguments, _environ_of(proc / str(candidate)))
    return None


def _environ_of(process: Path) -> Mapping[str, str]:
    """The process's environment at start; ours when it cannot be read (another user's process)."""
    try:
        raw = (process / "environ").read_bytes()
    except OSError:
        return dict(os.environ)
    pairs = (entry.decode(errors="replace").partition("=") for entry in raw.split(b"\0") if entry)
    return {key: value for key, sep, value in pairs if sep}


def listen_address(host: str | None, port: int | None, config: Config) -> tuple[str, int]:
    """Where ``serve --host HOST --port PORT`` listens with this config (the flags win, as in ``serve``)."""
    return host or config.server.host, config.server.port if port is None else port


def probe_url(host: str, port: int, path: str) -> str:
    """The URL to check a server bound to ``host:port``: a wildcard bind is reached on loopback."""
    target = _WILDCARDS.get(host, host)
    try:
        if ipaddress.ip_address(target).version == 6:
            target = f"[{target}]"
    except ValueError:
        pass  # a host name
    return f"http://{target}:{port}{path}"


def check(url: str, timeout: float) -> str | None:
    """GET ``url``: None when it answers 200, else what went wrong, in a few words."""
    opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))  # never via $http_proxy
    try:
        with opener.open(url, timeout=timeout) as response:
            status: int = response.status
    except urllib.error.HTTPError as exc:
        return f"{url} answered {exc.code}"
    except (OSError, http.client.HTTPException) as exc:
        reason = exc.reason if isinstance(exc, urllib.error.URLError) else exc
        return f"{url}: {reason}"
    return None if status == 200 else f"{url} answered {status}"
