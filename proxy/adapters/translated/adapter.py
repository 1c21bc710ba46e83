"""`TranslatedAdapter`: a dialect's calls over the shared aiohttp session, socket bytes to
OpenAI chunks in one generator; providers without a dialect go through `acompletion`."""

from __future__ import annotations

import importlib
from collections import OrderedDict
from collections.abc import AsyncGenerator
from typing import Any

import httpx
import orjson

from proxy.adapters import classify
from proxy.adapters.base import (
    AdapterHooks,
    AttemptLimits,
    Chunk,
    Completion,
    Embeddings,
    HttpClients,
    Usage,
    with_trace,
)
from proxy.adapters.http import (
    ConnectionSlots,
    Silence,
    done_with,
    fetch,
    open_stream,
    stream_error,
    too_large,
)
from proxy.adapters.translated.acompletion import Acompletion
from proxy.adapters.translated.dialects import DIALECTS, Dialect, Ollama
from proxy.adapters.translated.embed import EMBEDDERS, Embedder
from proxy.adapters.translated.wire import (
    OPENAI_ARGS,
    PARAMS_CACHE_SIZE,
    TRANSLATED_TRANSPORT_ERRORS,
    Call,
    ChunkWriter,
    LitellmLog,
    MalformedEvent,
    Parser,
    Piece,
    json_default,
    malformed,
    translation_errors,
)
from proxy.config import ProviderConfig
from proxy.errors import FailureClass, ProviderError
from proxy.litellm_import import load_litellm
from proxy.sse import payload_decoder


class TranslatedAdapter:
    """Adapter for providers litellm translates (Anthropic, Ollama's native API,
    Gemini, and through `acompletion` any other), over the app's pooled clients:
    the aiohttp session for the dialects, the httpx client for `acompletion`."""

    def __init__(self, provider: ProviderConfig, clients: HttpClients, hooks: AdapterHooks | None = None) -> None:
        self.provider = provider
        self._session = clients.session
        self._hooks = hooks or AdapterHooks()
        self._client = clients.client
        self._slots = ConnectionSlots.of(provider)  # for the dialects' calls (not `acompletion`'s)
        litellm = load_litellm()
        self._errors = translation_errors(litellm)
        self._get_optional_params: Any = importlib.import_module("litellm.utils").get_optional_params
        core = importlib.import_module("litellm.litellm_core_utils.core_helpers")
        self._map_finish_reason: Any = core.map_finish_reason
        reserved = importlib.import_module("litellm.types.utils").all_litellm_params
        self._reserved = frozenset(litellm.OPENAI_CHAT_COMPLETION_PARAMS) | frozenset(reserved) | {"model", "messages"}
        self._params_cache: OrderedDict[bytes, bytes] = OrderedDict()
        dialect = DIALECTS.get(provider.litellm_provider)
        self._dialect: Dialect | None = dialect(provider, litellm) if dialect is not None else None
        self._fallback = Acompletion(provider, clients.client, litellm) if dialect is None else None
        embedder = EMBEDDERS.get(provider.litellm_provider)
        self._embedder: Embedder | None = embedder(provider, litellm) if embedder is not None else None
        self._litellm = litellm

    def __repr__(self) -> str:
        how = "acompletion" if self._dialect is None else type(self._dialect).__name__.strip("_").lower()
        return f"TranslatedAdapter({self.provider.name!r}, {self.provider.model!r}, via={how})"

    # -- the adapter protocol ------------------------------------------------------------------

    async def complete(self, body: dict[str, Any], limits: AttemptLimits) -> Completion:
        if self._dialect is None:
            assert self._fallback is not None
            return await self._fallback.complete(self._split(body), body, limits)
        call = self._prepare(self._dialect, body, stream=False)
        answer = await fetch(
            self._session,
            "POST",
            call.url,
            headers=with_trace(call.headers),
            data=call.content,
            limits=limits,
            slots=self._slots,
        )
        # litellm reads a whole answer from an httpx response: one is built, no I/O.
        raw = httpx.Response(answer.status, headers=list(answer.headers.items()), content=answer.content)
        return self._completion(self._dialect, call, raw)

    async def stream(self, body: dict[str, Any], limits: AttemptLimits) -> AsyncGenerator[Chunk, None]:
        if self._dialect is None:
            assert self._fallback is not None
            async for chunk in self._fallback.stream(self._split(body), body, limits):
                yield chunk
            return
        dialect = self._dialect
        call = self._prepare(dialect, body, stream=True)
        silence = Silence(limits.read)
        response = await open_stream(
            self._session,
            call.url,
            headers=with_trace(call.headers),
            data=call.content,
            limits=limits,
            silence=silence,
            slots=self._slots,
        )
        try:
            if response.status >= 400:
                raise await stream_error(response, limits, silence)
            # Socket bytes → payloads → litellm's parser → OpenAI chunks, in this generator.
            parser: Parser = self._reading(dialect.parser, call, response.headers)
            writer = ChunkWriter(self.provider.upstream_model, call.include_usage, self._map_finish_reason)
            payloads = payload_decoder(dialect.framing)
            reader = response.content
            max_bytes = limits.max_bytes
            size = 0
            try:
                while True:
                    silence.expect(reader)
                    block = await reader.readany()
                    silence.got()
                    if not block:
                        break
                    size += len(block)
                    if size > max_bytes:
                        raise too_large(max_bytes)
                    chunks, failure = self._chunks(parser, writer, payloads.feed(block))
                    del block
                    for chunk in chunks:
                        yield chunk
                        del chunk  # nothing sent is held while the next read waits
                    del chunks
                    if failure is not None:
                        raise failure
                chunks, failure = self._chunks(parser, writer, payloads.flush())
                for chunk in chunks:
                    yield chunk
                if failure is not None:
                    raise failure
            except TRANSLATED_TRANSPORT_ERRORS:
                # After the upstream's own end of answer, a broken tail loses nothing.
                if not parser.complete:
                    raise
            if not parser.complete:
                raise classify.incomplete_stream()
            for last in writer.finish():
                yield last
        except TRANSLATED_TRANSPORT_ERRORS as exc:
            raise classify.from_exception(exc) from exc
        finally:
            silence.close()
            done_with(response)
            if self._slots is not None:
                self._slots.give()

    async def embed(self, body: dict[str, Any], limits: AttemptLimits) -> Embeddings:
        embedder = self._embedder
        if embedder is None:
            if self.provider.litellm_provider == "anthropic":
                raise ProviderError(FailureClass.UNSUPPORTED, "Anthropic has no embeddings API", sent=False)
            fallback = self._fallback or Acompletion(self.provider, self._client, self._litellm)
            return await fallback.embed(body, limits)
        try:
            url, headers, content = embedder.request(body)
        except self._errors as exc:
            raise classify.untranslatable(exc) from exc
        answer = await fetch(self._session, "POST", url, headers=headers, data=content, limits=limits)
        embeddings: Embeddings = self._reading(embedder.answer, body, answer.content)
        return embeddings

    async def probe(self, limits: AttemptLimits) -> None:
        if self._dialect is None:
            return
        dialect = self._dialect
        try:
            target = dialect.probe_request()
        except self._errors as exc:
            raise classify.untranslatable(exc) from exc
        if target is None:
            return
        url, headers = target
        content = await self._exchange("GET", url, headers, None, limits)
        dialect.check_probe(content)

    async def warmup(self) -> None:
        """Load an Ollama model and keep it resident (`keep_alive: -1`); a no-op elsewhere."""
        if not isinstance(self._dialect, Ollama):
            return
        dialect = self._dialect
        timeouts = self.provider.timeout
        payload = {"model": dialect.model, "prompt": "", "keep_alive": -1}
        headers = {"content-type": "application/json", **dialect.auth_headers()}
        limits = AttemptLimits(connect=timeouts.connect, read=timeouts.total)
        await self._exchange("POST", dialect.base + "/api/generate", headers, orjson.dumps(payload), limits)

    async def _exchange(
        self, method: str, url: str, headers: dict[str, str], data: bytes | None, limits: AttemptLimits
    ) -> bytes:
        """A small request, read whole: its body, or the classified failure."""
        return (await fetch(self._session, method, url, headers=headers, data=data, limits=limits)).content

    # -- translation ---------------------------------------------------------------------------

    def _chunks(
        self, parser: Parser, writer: ChunkWriter, payloads: list[bytes]
    ) -> tuple[list[Chunk], ProviderError | None]:
        """The chunks of one upstream read, each but the last marked `more` (they
        go to the client as one write), and a failure that came after them
        (raised once they are out)."""
        chunks: list[Chunk] = []
        failure: ProviderError | None = None
        try:
            for data in payloads:
                piece = self._piece(parser, data)
                if piece is not None and (out := writer.chunk(piece)) is not None:
                    chunks.append(out)
        except ProviderError as exc:
            failure = exc
        for chunk in chunks[:-1]:
            chunk.more = True
        return chunks, failure

    def _piece(self, parser: Parser, data: bytes) -> Piece | None:
        """One payload's piece of the answer; an unreadable payload is skipped (and told)."""
        try:
            piece: Piece | None = self._reading(parser.feed, data)
        except MalformedEvent:
            self._hooks.malformed(self.provider.name, data)
            return None
        return piece

    def _reading(self, step: Any, *args: Any) -> Any:
        """Run one litellm step that reads the upstream's answer; what it raises leaves classified."""
        try:
            return step(*args)
        except self._errors as exc:
            raise classify.unreadable(exc) from exc

    def _split(self, body: dict[str, Any]) -> tuple[dict[str, Any], dict[str, Any]]:
        """The body's OpenAI params and provider extras (litellm's reserved names dropped)."""
        named: dict[str, Any] = {}
        extras: dict[str, Any] = {}
        for key, value in body.items():
            if key in OPENAI_ARGS:
                named[key] = value
            elif key not in self._reserved:
                extras[key] = value
        # A preloaded Ollama model stays resident unless the client says otherwise:
        # a request without keep_alive would reset it to the daemon's 5 minutes.
        if self.provider.warmup and self.provider.litellm_provider == "ollama_chat":
            extras.setdefault("keep_alive", -1)
        return named, extras

    def _optional_params(self, named: dict[str, Any], extras: dict[str, Any]) -> dict[str, Any]:
        """litellm's provider params for these OpenAI params. Pure in its inputs
        (the model and provider are fixed per adapter), so memoised by their JSON;
        each call gets a fresh copy since the transformations mutate it."""
        key = orjson.dumps((named, extras))
        cached = self._params_cache.get(key)
        if cached is None:
            own_named, own_extras = orjson.loads(key)  # litellm may edit what it is given
            params = self._get_optional_params(
                model=self.provider.upstream_model,
                custom_llm_provider=self.provider.litellm_provider,
                drop_params=True,
                **own_extras,
                **own_named,
            )
            cached = orjson.dumps(params, default=json_default)
            self._params_cache[key] = cached
            if len(self._params_cache) > PARAMS_CACHE_SIZE:
                self._params_cache.popitem(last=False)
        else:
            self._params_cache.move_to_end(key)
        fresh: dict[str, Any] = orjson.loads(cached)
        return fresh

    def _prepare(self, dialect: Dialect, body: dict[str, Any], *, stream: bool) -> Call:
        named, extras = self._split(body)
        named["stream"] = stream
        stream_options = named.get("stream_options")
        include_usage = stream and isinstance(stream_options, dict) and stream_options.get("include_usage") is True

        def translate() -> Call:
            # A private copy: the transformations edit messages in place, and the
            # caller may send the same body to the next provider.
            messages = dialect.config.translate_developer_role_to_system_role(
                messages=orjson.loads(orjson.dumps(body.get("messages") or []))
            )
            optional_params = self._optional_params(named, extras)
            json_mode = bool(optional_params.pop("json_mode", False))
            extra_body = optional_params.pop("extra_body", None)
            litellm_params: dict[str, Any] = {"api_base": self.provider.api_base, "drop_params": True}
            url, headers, data = dialect.build(messages, optional_params, litellm_params, stream)
            if isinstance(extra_body, dict):
                data = {**data, **extra_body}
            content = orjson.dumps(data, default=json_default)
            return Call(
                url=url,
                headers=headers,
                content=content,
                messages=messages,
                optional_params=optional_params,
                litellm_params=litellm_params,
                data=data,
                json_mode=json_mode,
                include_usage=include_usage,
                log=LitellmLog(named),
            )

        try:
            return translate()
        except self._errors as exc:
            raise classify.untranslatable(exc) from exc

    def _completion(self, dialect: Dialect, call: Call, response: httpx.Response) -> Completion:
        try:
            parsed = orjson.loads(response.content)
        except orjson.JSONDecodeError as exc:
            raise malformed("answer", response.content) from exc
        if not isinstance(parsed, dict):
            raise malformed("answer", response.content)
        if "error" in parsed:
            raise classify.from_stream_error(parsed)
        answer = self._reading(dialect.answer, call, response, parsed)
        out: dict[str, Any] = answer.model_dump()
        model = dialect.served_model(answer, parsed)
        out["model"] = model
        return Completion(
            body=orjson.dumps(out, default=json_default), model=model, usage=Usage.from_openai(out.get("usage"))
        )
