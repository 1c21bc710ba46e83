"""Streaming, in one place: a provider's live stream held until its first
token (`live`), continuation without splicing (`splice`), a stream assembled
into one body for non-stream clients (`assemble`), the client's wire format
(`encoders`), the session that owns a client stream from first token to end
(`session`), and its ASGI response (`response`)."""

from __future__ import annotations

from proxy.stream.assemble import Assembler
from proxy.stream.encoders import ChatEncoder, Encoder
from proxy.stream.live import LiveStream, close_stream, first_token
from proxy.stream.response import SERVER_SHUTTING_DOWN, SSEResponse
from proxy.stream.session import CLIENT_DISCONNECTED, INTERNAL_ERROR, StreamSession, continuable
from proxy.stream.splice import CONTINUE_FORMS, CONTINUE_INSTRUCTION, INSTRUCTION, PREFILL, VLLM, continuation_body

__all__ = [
    "CLIENT_DISCONNECTED",
    "CONTINUE_FORMS",
    "CONTINUE_INSTRUCTION",
    "INSTRUCTION",
    "INTERNAL_ERROR",
    "PREFILL",
    "SERVER_SHUTTING_DOWN",
    "VLLM",
    "Assembler",
    "ChatEncoder",
    "Encoder",
    "LiveStream",
    "SSEResponse",
    "StreamSession",
    "close_stream",
    "continuable",
    "continuation_body",
    "first_token",
]
