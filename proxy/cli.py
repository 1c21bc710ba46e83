"""The ``fallback-proxy`` command line: one subcommand per operator task.

Each subcommand is a :class:`Command` in :data:`COMMANDS`: how to add its
arguments and how to run it. ``main`` parses ``argv`` and dispatches; a new
subcommand (``serve``, ``demo``, ``drill``) is one more entry there.
"""

from __future__ import annotations

import argparse
import contextlib
import importlib.metadata
import logging
import os
import sys
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from types import MappingProxyType
from typing import Final

from proxy.config import (
    CONFIG_PATH_VARIABLE,
    Config,
    ConfigError,
    ProviderConfig,
    Route,
    default_config_path,
    load_config,
    redact_url,
)
from proxy.routing import default_path, side_edges

EXIT_OK: Final = 0
EXIT_CONFIG: Final = 2  # the config is invalid (argparse also exits 2 on bad usage)
EXIT_WORKERS: Final = 3  # a worker process could not start (`serve --workers N`)
WORKERS_VARIABLE: Final = "FALLBACK_PROXY_WORKERS"
LOG_FORMAT_VARIABLE: Final = "FALLBACK_PROXY_LOG_FORMAT"
LOG_FORMATS: Final = ("text", "json")


@dataclass(frozen=True, slots=True)
class Command:
    """A subcommand: its one-line help, its arguments, and what it does."""

    help: str
    add_arguments: Callable[[argparse.ArgumentParser], None]
    run: Callable[[argparse.Namespace], int]


def build_parser() -> argparse.ArgumentParser:
    """The parser for every subcommand in :data:`COMMANDS`."""
    parser = argparse.ArgumentParser(
        prog="fallback-proxy",
        description=("An OpenAI-compatible proxy that keeps LLM answers flowing when a provider fails."),
    )
    parser.add_argument("--version", action="version", version=f"%(prog)s {package_version()}")
    _log_format_argument(parser, default=None)
    subparsers = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for name, command in COMMANDS.items():
        subparser = subparsers.add_parser(name, help=command.help, description=command.help)
        command.add_arguments(subparser)
        _log_format_argument(subparser, default=argparse.SUPPRESS)  # after the subcommand too
    return parser


def _log_format_argument(parser: argparse.ArgumentParser, default: object) -> None:
    parser.add_argument(
        "--log-format",
        choices=LOG_FORMATS,
        default=default,
        help=f"log lines on stderr as readable text or JSON (default: ${LOG_FORMAT_VARIABLE}, else text when "
        "stderr is a terminal and JSON when it is not)",
    )


def package_version() -> str:
    """The installed distribution's version (from its metadata, the one place it is set)."""
    try:
        return importlib.metadata.version("fallback-proxy")
    except importlib.metadata.PackageNotFoundError:
        return "unknown (not installed)"


def main(argv: Sequence[str] | None = None) -> int:
    """Run the subcommand named in ``argv`` (default: the process's); return the exit code."""
    args = build_parser().parse_args(argv)
    try:
        args.log_format = log_format(args.log_format, os.environ.get(LOG_FORMAT_VARIABLE), sys.stderr.isatty())
    except ValueError as exc:
        print(f"error: ${LOG_FORMAT_VARIABLE}: {exc}", file=sys.stderr)
        return EXIT_CONFIG
    return COMMANDS[args.command].run(args)


def log_format(flag: str | None, environment: str | None, terminal: bool) -> str:
    """`--log-format`, else `$FALLBACK_PROXY_LOG_FORMAT`, else text for a terminal
    and JSON for anything else (a file, a pipe, a container's log collector)."""
    if flag is not None:
        return flag
    chosen = (environment or "").strip().lower()
    if not chosen:
        return "text" if terminal else "json"
    if chosen not in LOG_FORMATS:
        raise ValueError(f"expected one of {', '.join(LOG_FORMATS)}, got {environment!r}")
    return chosen


# --- check-config ----------------------------------------------------------------


def _check_config_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("file", metavar="FILE", help="the YAML config file to check")


def run_check_config(args: argparse.Namespace) -> int:
    """Load and validate the config; print a summary, or every problem to stderr."""
    path: str = args.file
    try:
        config = load_config(path)
    except ConfigError as exc:
        for problem in exc.problems:
            print(f"error: {problem}", file=sys.stderr)
        print(f"{path}: {_count(len(exc.problems), 'problem')}", file=sys.stderr)
        return EXIT_CONFIG
    print("\n".join(summarize(config)))
    return EXIT_OK


def summarize(config: Config) -> tuple[str, ...]:
    """A human-readable summary of ``config``; never includes keys or passwords."""
    return (
        f"{config.source or 'config'}: OK",
        f"providers ({len(config.providers)}):",
        *(line for provider in config.providers.values() for line in _provider_lines(provider)),
        f"routes ({len(config.routes)}):",
        *(line for route in config.routes.values() for line in _route_lines(route)),
        "  (a provider's name also works as a model: that provider alone, no fallback)",
        f"redis: {_redis(config.redis_url)}",
        f"health: {_health(config)}",
        f"quota day: midnight {config.quota_timezone}",
        f"auth: {_count(len(config.auth_keys), 'key') if config.auth_keys else 'open (no keys)'}",
        f"server: {_server_line(config)}",
        *_warning_lines(config.warnings),
    )


def _provider_lines(provider: ProviderConfig) -> tuple[str, ...]:
    wire = "openai-compatible" if provider.openai_compatible else "litellm"
    where = "local" if provider.local else "cloud"
    base = provider.api_base or "litellm's default api_base"
    details = [f"timeouts {_timeouts(provider)}"]
    if provider.context_window is not None:
        details.append(f"context window {provider.context_window:,}")
    if provider.retries:
        details.append(f"retries {provider.retries}")
    details.extend(_flags(provider))
    return (
        f"  {provider.name}: {provider.model}",
        f"    {where}, {wire}, {base}",
        f"    quota: {_quota(provider)}; capabilities: {_capabilities(provider)}",
        f"    {', '.join(details)}",
    )


def _timeouts(provider: ProviderConfig) -> str:
    t = provider.timeout
    return f"connect {t.connect:g}s, first token {t.first_token:g}s, total {t.total:g}s, idle {t.idle:g}s"


def _quota(provider: ProviderConfig) -> str:
    quota = provider.quota
    if quota is None:
        return "none"
    parts = (
        f"{quota.requests_per_day:,} requests/day" if quota.requests_per_day else None,
        f"{quota.tokens_per_day:,} tokens/day" if quota.tokens_per_day else None,
    )
    return ", ".join(part for part in parts if part)


def _capabilities(provider: ProviderConfig) -> str:
    if provider.capabilities is None:
        return "not declared (every request may try it)"
    return ", ".join(sorted(provider.capabilities)) or "text only"


def _flags(provider: ProviderConfig) -> tuple[str, ...]:
    flags = (
        ("warmup", provider.warmup),
        ("mini mode (system prompt)", provider.system_prompt is not None),
        ("no active probes", not provider.probe),
        (f"extra headers: {', '.join(provider.headers)}", bool(provider.headers)),
    )
    return tuple(text for text, on in flags if on)


def _route_lines(route: Route) -> tuple[str, ...]:
    walk = " -> ".join(default_path(route))
    others = "; ".join(f"{fail}: {node} -> {target}" for node, fail, target in side_edges(route))
    options = [route.form]
    if route.local_only:
        options.append("local_only")
    if not route.continuation:
        options.append("no mid-stream continuation")
    if route.hedge_after_ms is not None:
        options.append(f"hedge after {route.hedge_after_ms} ms")
    if route.budget is not None:
        options.append(f"budget {route.budget:g}s")
    return (
        f"  {route.name}: {walk}" + (f"  ({others})" if others else ""),
        f"    {', '.join(options)}",
    )


def _redis(url: str | None) -> str:
    return "in-process (single instance)" if url is None else redact_url(url)


def _health(config: Config) -> str:
    h = config.health
    probes = f"probes every {h.probe_interval_seconds:g}s" if h.probe_interval_seconds else "no active probes"
    return (
        f"breaker opens after {h.failure_threshold} failures for {h.cooldown_seconds:g}s, {probes}, "
        f"slow above {h.slow_ttft_seconds:g}s to first token"
    )


def _server_line(config: Config) -> str:
    server = config.server
    admin = "admin key set" if server.admin_key else "no admin key"
    return f"{server.host}:{server.port}, max body {server.max_body_bytes:,} bytes, {admin}"


def _warning_lines(warnings: Sequence[str]) -> tuple[str, ...]:
    if not warnings:
        return ("warnings: none",)
    return (f"warnings ({len(warnings)}):", *(f"  warning: {warning}" for warning in warnings))


def _count(n: int, noun: str) -> str:
    return f"{n} {noun}" if n == 1 else f"{n} {noun}s"


# --- serve ------------------------------------------------------------------------


def _serve_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--config",
        metavar="FILE",
        default=None,
        help=f"the YAML config (default: ${CONFIG_PATH_VARIABLE})",
    )
    parser.add_argument("--host", default=None, help="interface to bind (default: the config's server.host)")
    parser.add_argument("--port", type=int, default=None, help="port (default: the config's server.port)")
    parser.add_argument(
        "--workers",
        type=_positive_int,
        default=None,
        metavar="N",
        help=f"worker processes sharing the port (default: ${WORKERS_VARIABLE}, else the config's "
        "server.workers, else 1); more than 1 needs redis.url to share health and quotas",
    )
    parser.add_argument("--log-level", default="info", choices=["debug", "info", "warning", "error"])


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        value = 0
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected a whole number of at least 1, got {text!r}")
    return value


def worker_count(args: argparse.Namespace, config: Config) -> int:
    """`--workers`, else `$FALLBACK_PROXY_WORKERS`, else the config's `server.workers`."""
    if args.workers is not None:
        return int(args.workers)
    from_env = os.environ.get(WORKERS_VARIABLE, "").strip()
    return _positive_int(from_env) if from_env else config.server.workers


def run_serve(args: argparse.Namespace) -> int:
    """Load the config and serve until SIGINT/SIGTERM."""
    from proxy.observe import configure_logging
    from proxy.server import build_server, raise_open_files_limit, serve_workers

    path: str | None = args.config or default_config_path()
    if path is None:
        print(f"error: no config: pass --config FILE or set ${CONFIG_PATH_VARIABLE}", file=sys.stderr)
        return EXIT_CONFIG
    try:
        config = load_config(path)
    except ConfigError as exc:
        for problem in exc.problems:
            print(f"error: {problem}", file=sys.stderr)
        return EXIT_CONFIG
    try:
        workers = worker_count(args, config)
    except argparse.ArgumentTypeError as exc:
        print(f"error: ${WORKERS_VARIABLE}: {exc}", file=sys.stderr)
        return EXIT_CONFIG
    configure_logging(args.log_level, args.log_format)
    for warning in config.warnings:
        logging.getLogger("fallback_proxy").warning("config: %s", warning)
    raise_open_files_limit()  # workers inherit it
    if workers > 1:
        started = serve_workers(
            config,
            workers=workers,
            log_level=args.log_level,
            host=args.host,
            port=args.port,
            log_format=args.log_format,
        )
        return EXIT_OK if started else EXIT_WORKERS
    # Ctrl-C: uvicorn shuts down gracefully, then raises the signal again for
    # asyncio's runner, which reports it so (`uvicorn.run` swallows it the same way).
    with contextlib.suppress(KeyboardInterrupt):
        build_server(config, host=args.host, port=args.port).run()
    return EXIT_OK


# --- healthcheck ----------------------------------------------------------------------


def _healthcheck_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--ready", action="store_true", help="check /readyz (ready to serve) instead of /healthz (alive)"
    )
    parser.add_argument("--url", default=None, help="check this URL instead of finding the running serve")
    parser.add_argument(
        "--pid", type=int, default=None, help="the serve process to check (default: the oldest, PID 1 in a container)"
    )
    parser.add_argument("--timeout", type=float, default=2.0, help="seconds to wait for the answer (default 2)")


def run_healthcheck(args: argparse.Namespace) -> int:
    """Exit 0 when the running `serve` answers on the address it was started with
    (its --host/--port, else its config's server.host/port), else 1 with the reason."""
    from proxy.healthcheck import check, find_serve, listen_address, probe_url

    path = "/readyz" if args.ready else "/healthz"
    url: str | None = args.url
    if url is None:
        serve = find_serve(args.pid)
        if serve is None:
            print("unhealthy: no `fallback-proxy serve` process found (pass --url)", file=sys.stderr)
            return 1
        try:  # the server started with these arguments, so they parse
            served = build_parser().parse_args(["serve", *serve.arguments])
            config = load_config(served.config or default_config_path(serve.environ) or "", serve.environ)
        except SystemExit:
            return 1
        except ConfigError as exc:
            print(f"unhealthy: cannot read the server's config: {exc}", file=sys.stderr)
            return 1
        host, port = listen_address(served.host, served.port, config)
        if port == 0:
            print("unhealthy: the server picked a free port (port 0): pass --url", file=sys.stderr)
            return 1
        url = probe_url(host, port, path)
    problem = check(url, args.timeout)
    if problem is not None:
        print(f"unhealthy: {problem}", file=sys.stderr)
        return 1
    print(f"healthy: {url}")
    return EXIT_OK


# --- demo ---------------------------------------------------------------------------


def _demo_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--port", type=int, default=8080, help="the proxy's port (default 8080; 0 = any free port)")
    parser.add_argument(
        "--check",
        action="store_true",
        help="walk the demo's steps automatically, print what happened and exit (0 = all as expected)",
    )
    parser.add_argument("--log-level", default="warning", choices=["debug", "info", "warning", "error"])


def run_demo(args: argparse.Namespace) -> int:
    """Start a fake cloud, a fake local model and the proxy; show a fallback."""
    from proxy.demo import run_demo as demo
    from proxy.observe import configure_logging

    configure_logging(args.log_level, args.log_format)
    return demo(port=args.port, check=args.check)


# --- drill ---------------------------------------------------------------------------


def _drill_arguments(parser: argparse.ArgumentParser) -> None:
    target = parser.add_mutually_exclusive_group()
    target.add_argument(
        "--config",
        metavar="FILE",
        default=None,
        help=f"drill the real app for this config, in-process (default: ${CONFIG_PATH_VARIABLE}); "
        "its REAL providers are called",
    )
    target.add_argument("--url", default=None, help="drill a running proxy instead, e.g. http://proxy:8080")
    parser.add_argument("--admin-key", default=None, help="the running proxy's server.admin_key (for --disable)")
    parser.add_argument("--api-key", default=None, help="a client key of the running proxy (auth.keys)")
    parser.add_argument(
        "--disable",
        metavar="NAME",
        action="append",
        default=[],
        help="switch this provider off for the drill (repeatable)",
    )
    parser.add_argument(
        "--route",
        metavar="NAME",
        action="append",
        default=[],
        help="drill this route (repeatable; default: every route)",
    )
    parser.add_argument("--prompt", default=None, help="the user message to send")
    parser.add_argument("--requests", type=int, default=3, help="requests per route (default 3)")
    parser.add_argument(
        "--stream", action=argparse.BooleanOptionalAction, default=True, help="stream the answers (default) or not"
    )
    parser.add_argument(
        "--sla-ms",
        type=int,
        default=30000,
        help="a request holds the SLA when answered (200) within this many ms (default 30000)",
    )
    parser.add_argument("--json", action="store_true", help="print one JSON document instead of a table")


def run_drill(args: argparse.Namespace) -> int:
    """Switch providers off on purpose and show who answers; exit 0 when every request was answered in time."""
    from proxy.drill import DEFAULT_PROMPT, Plan, Remote, run

    plan = Plan(
        disabled=tuple(args.disable),
        routes=tuple(args.route),
        prompt=args.prompt or DEFAULT_PROMPT,
        requests=args.requests,
        stream=args.stream,
        sla_ms=args.sla_ms,
    )
    remote = Remote(args.url, args.admin_key, args.api_key) if args.url else None
    return run(plan, config_path=args.config or default_config_path(), remote=remote, as_json=args.json)


# --- the dispatch table -----------------------------------------------------------
# drill is added here, as one more Command.

COMMANDS: Final[Mapping[str, Command]] = MappingProxyType(
    {
        "serve": Command(
            help="serve the proxy with a config file",
            add_arguments=_serve_arguments,
            run=run_serve,
        ),
        "check-config": Command(
            help="validate a config file and print what it sets up",
            add_arguments=_check_config_arguments,
            run=run_check_config,
        ),
        "healthcheck": Command(
            help="exit 0 when the running serve answers on its own port (a container HEALTHCHECK)",
            add_arguments=_healthcheck_arguments,
            run=run_healthcheck,
        ),
        "demo": Command(
            help="run a fake cloud, a fake local model and the proxy, and show a fallback",
            add_arguments=_demo_arguments,
            run=run_demo,
        ),
        "drill": Command(
            help="switch providers off on purpose and prove the fallback answers",
            add_arguments=_drill_arguments,
            run=run_drill,
        ),
    }
)


if __name__ == "__main__":
    raise SystemExit(main())
