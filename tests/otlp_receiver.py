"""Collectors for the traces tests, each a real server on 127.0.0.1 in a thread:

* `OtlpReceiver`: an OTLP/HTTP trace receiver (`POST /v1/traces`) that decodes
  each `ExportTraceServiceRequest` with `opentelemetry-proto`, as a collector
  does, and keeps the raw bytes too (to prove what was never sent);
* `HangingCollector`: accepts connections, reads what is sent, never answers.
"""

from __future__ import annotations

import contextlib
import gzip
import socket
import threading
import time
import zlib
from collections.abc import Callable
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import (
    ExportTraceServiceRequest,
    ExportTraceServiceResponse,
)
from opentelemetry.proto.common.v1.common_pb2 import AnyValue
from opentelemetry.proto.trace.v1.trace_pb2 import Span

SERVER = Span.SpanKind.SPAN_KIND_SERVER
CLIENT = Span.SpanKind.SPAN_KIND_CLIENT
STATUS_ERROR = 2  # Status.StatusCode.STATUS_CODE_ERROR


def value_of(value: AnyValue) -> Any:
    """A protobuf attribute value as Python (arrays as tuples)."""
    kind = value.WhichOneof("value")
    if kind == "array_value":
        return tuple(value_of(v) for v in value.array_value.values)
    return getattr(value, kind) if kind else None


@dataclass(frozen=True)
class Exported:
    """One span as the collector saw it, its attributes decoded."""

    name: str
    kind: int
    trace_id: str
    span_id: str
    parent_span_id: str
    attributes: dict[str, Any]
    events: list[tuple[str, dict[str, Any]]]
    status: int
    start: int
    end: int
    resource: dict[str, Any]

    @classmethod
    def of(cls, span: Span, resource: dict[str, Any]) -> Exported:
        return cls(
            name=span.name,
            kind=span.kind,
            trace_id=span.trace_id.hex(),
            span_id=span.span_id.hex(),
            parent_span_id=span.parent_span_id.hex(),
            attributes={a.key: value_of(a.value) for a in span.attributes},
            events=[(e.name, {a.key: value_of(a.value) for a in e.attributes}) for e in span.events],
            status=span.status.code,
            start=span.start_time_unix_nano,
            end=span.end_time_unix_nano,
            resource=resource,
        )


class OtlpReceiver:
    """`with OtlpReceiver() as receiver:` ... `receiver.url` is the endpoint
    (`/v1/traces` appended by the proxy), `receiver.spans` what arrived."""

    def __init__(self) -> None:
        self.raw: list[bytes] = []  # every request body, decompressed
        self.spans: list[Exported] = []
        self.paths: list[str] = []
        self.headers: list[dict[str, str]] = []
        self._changed = threading.Condition()
        receiver = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                body = self.rfile.read(int(self.headers.get("content-length", "0")))
                encoding = self.headers.get("content-encoding", "")
                if encoding == "gzip":
                    body = gzip.decompress(body)
                elif encoding == "deflate":
                    body = zlib.decompress(body)
                request = ExportTraceServiceRequest.FromString(body)
                answer = ExportTraceServiceResponse().SerializeToString()
                self.send_response(200)
                self.send_header("content-type", "application/x-protobuf")
                self.send_header("content-length", str(len(answer)))
                self.end_headers()
                self.wfile.write(answer)
                receiver._received(self.path, dict(self.headers.items()), body, request)

            def log_message(self, format: str, *args: Any) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True, name="otlp-receiver")

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.server.server_address[1]}"

    def _received(self, path: str, headers: dict[str, str], body: bytes, request: ExportTraceServiceRequest) -> None:
        spans = []
        for resource_spans in request.resource_spans:
            resource = {a.key: value_of(a.value) for a in resource_spans.resource.attributes}
            for scope_spans in resource_spans.scope_spans:
                spans += [Exported.of(span, resource) for span in scope_spans.spans]
        with self._changed:
            self.paths.append(path)
            self.headers.append({k.lower(): v for k, v in headers.items()})
            self.raw.append(body)
            self.spans += spans
            self._changed.notify_all()

    def wait_for(self, ready: Callable[[list[Exported]], bool], timeout: float = 30.0) -> list[Exported]:
        """The spans once `ready(spans)` holds; AssertionError after `timeout` seconds."""
        deadline = time.monotonic() + timeout
        with self._changed:
            while not ready(self.spans):
                left = deadline - time.monotonic()
                if left <= 0:
                    raise AssertionError(f"spans never got ready; received {[s.name for s in self.spans]}")
                self._changed.wait(left)
            return list(self.spans)

    def __enter__(self) -> OtlpReceiver:
        self.thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.server.shutdown()
        self.server.server_close()


class HangingCollector:
    """A port that accepts connections and reads them, and never answers."""

    def __init__(self) -> None:
        self.sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self.sock.bind(("127.0.0.1", 0))
        self.sock.listen(64)
        self.received = 0  # bytes read, over every connection
        self._held: list[socket.socket] = []
        self._stop = threading.Event()
        self.thread = threading.Thread(target=self._accept, daemon=True, name="hanging-collector")

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.sock.getsockname()[1]}"

    def _accept(self) -> None:
        self.sock.settimeout(0.1)
        while not self._stop.is_set():
            try:
                conn, _ = self.sock.accept()
            except TimeoutError:
                continue
            except OSError:
                return
            self._held.append(conn)
            threading.Thread(target=self._read, args=(conn,), daemon=True).start()

    def _read(self, conn: socket.socket) -> None:
        with contextlib.suppress(OSError):
            while data := conn.recv(65536):
                self.received += len(data)

    def __enter__(self) -> HangingCollector:
        self.thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self.thread.join(timeout=5)
        for conn in self._held:
            conn.close()
        self.sock.close()
