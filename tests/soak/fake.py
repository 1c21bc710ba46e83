"""`python -m tests.soak.fake --port N --name NAME --reply TEXT`: a fake OpenAI provider
(`python -m proxy.fakes openai`) that also answers `GET /_stats` with how many chat
completions it received, the ground truth the soak compares the quota counters with."""

from __future__ import annotations

import argparse
import contextlib
import threading

from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import BaseRoute, Route

from proxy.fakes import FakeOpenAI, count_words, prompt_words

CHAT_PATH = "/v1/chat/completions"


class CountingFake(FakeOpenAI):
    """A FakeOpenAI with `GET /_stats`: the chat completions it received, and the
    tokens their usage says (what a token quota should count for answers that completed)."""

    def _routes(self) -> list[BaseRoute]:
        return [Route("/_stats", self._stats, methods=["GET"]), *super()._routes()]

    async def _stats(self, request: Request) -> Response:
        chats = [r for r in self.requests if r.method == "POST" and r.path == CHAT_PATH]
        # The usage each answer reports (prompt words + reply words), had it been completed.
        each = [
            prompt_words(r.body.get("messages")) + count_words(self.reply) for r in chats if isinstance(r.body, dict)
        ]
        return JSONResponse(
            {
                "name": self.name,
                "chat": len(chats),
                "tokens": sum(each),
                "most_tokens": max(each, default=0),  # of one call: bounds what a call not answered could be worth
                "all": self.request_count,
            }
        )


def main() -> None:
    parser = argparse.ArgumentParser(prog="python -m tests.soak.fake")
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--name", required=True)
    parser.add_argument("--reply", required=True)
    args = parser.parse_args()
    with CountingFake(args.name, reply=args.reply, port=args.port) as fake:
        print(f"fake {fake.name!r} listening on {fake.url}", flush=True)
        with contextlib.suppress(KeyboardInterrupt):
            threading.Event().wait()


if __name__ == "__main__":
    main()
