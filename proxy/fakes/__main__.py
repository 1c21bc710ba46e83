"""``python -m proxy.fakes openai|anthropic|ollama|gemini [--port N] [--name NAME] [--reply TEXT]``: run one fake until Ctrl-C."""

from __future__ import annotations

import argparse
import threading

from . import FakeAnthropic, FakeGemini, FakeOllama, FakeOpenAI, FakeServer


def main(argv: list[str] | None = None) -> None:
    """Run one fake provider in the foreground, printing its URL."""
    kinds: dict[str, type[FakeServer]] = {
        "openai": FakeOpenAI,
        "anthropic": FakeAnthropic,
        "ollama": FakeOllama,
        "gemini": FakeGemini,
    }
    parser = argparse.ArgumentParser(prog="python -m proxy.fakes", description="Run a fake LLM provider server.")
    parser.add_argument("provider", choices=sorted(kinds))
    parser.add_argument("--port", type=int, default=0, help="port on 127.0.0.1 (default: any free port)")
    parser.add_argument("--name", help="name shown in replies (default: the provider)")
    parser.add_argument("--reply", help='reply text (default: "Hello from <name>.")')
    parser.add_argument("--model", help="model to report (ollama: the one model it serves)")
    args = parser.parse_args(argv)
    with kinds[args.provider](args.name, reply=args.reply, model=args.model, port=args.port) as fake:
        print(f"fake {args.provider} {fake.name!r} listening on {fake.url}", flush=True)
        print(f'break it:  curl -X POST {fake.url}/_fault -d \'{{"kind":"status","status":503}}\'', flush=True)
        print(f"fix it:    curl -X DELETE {fake.url}/_fault", flush=True)
        try:
            threading.Event().wait()
        except KeyboardInterrupt:
            print("stopping", flush=True)


if __name__ == "__main__":
    main()
