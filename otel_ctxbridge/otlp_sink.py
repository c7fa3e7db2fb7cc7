"""An in-memory OTLP/HTTP receiver that decodes what a collector forwards, for demos and tests."""

from __future__ import annotations

import gzip
import http.server
import threading
import time
from collections.abc import Callable, Sequence
from typing import Any, ClassVar

from opentelemetry.proto.collector.logs.v1.logs_service_pb2 import ExportLogsServiceRequest
from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import ExportTraceServiceRequest
from opentelemetry.proto.common.v1.common_pb2 import AnyValue, InstrumentationScope, KeyValue
from opentelemetry.proto.resource.v1.resource_pb2 import Resource
from opentelemetry.proto.trace.v1.trace_pb2 import Span

__all__ = ["Record", "RecordingSink"]

Record = dict[str, Any]
"""A flattened span or log record, as returned by ``RecordingSink.spans()`` / ``logs()``."""
_HOST = "127.0.0.1"
_MAX_BODY = 64 * 1024 * 1024


def _value(v: AnyValue) -> Any:
    kind = v.WhichOneof("value")
    if kind == "array_value":
        return [_value(x) for x in v.array_value.values]
    if kind == "kvlist_value":
        return _attrs(v.kvlist_value.values)
    return None if kind is None else getattr(v, kind)


def _attrs(kvs: Sequence[KeyValue]) -> dict[str, Any]:
    return {kv.key: _value(kv.value) for kv in kvs}


def _base(resource: Resource, scope: InstrumentationScope) -> Record:
    res = _attrs(resource.attributes)
    return {"service": res.get("service.name"), "resource": res, "scope": scope.name}


def _spans(body: bytes) -> list[Record]:
    req = ExportTraceServiceRequest.FromString(body)
    return [
        {**_base(rs.resource, ss.scope), "name": s.name, "trace_id": s.trace_id.hex(),
         "span_id": s.span_id.hex(), "parent_span_id": s.parent_span_id.hex() or None,
         "kind": Span.SpanKind.Name(s.kind).removeprefix("SPAN_KIND_"),
         "attributes": _attrs(s.attributes)}
        for rs in req.resource_spans for ss in rs.scope_spans for s in ss.spans
    ]  # fmt: skip


def _logs(body: bytes) -> list[Record]:
    req = ExportLogsServiceRequest.FromString(body)
    return [
        {**_base(rl.resource, sl.scope), "body": _value(r.body), "severity": r.severity_text,
         "severity_number": int(r.severity_number), "trace_id": r.trace_id.hex() or None,
         "span_id": r.span_id.hex() or None, "attributes": _attrs(r.attributes)}
        for rl in req.resource_logs for sl in rl.scope_logs for r in sl.log_records
    ]  # fmt: skip


class _Handler(http.server.BaseHTTPRequestHandler):
    sink: ClassVar[RecordingSink]

    def log_message(self, format: str, *args: Any) -> None:
        pass  # quiet

    def _reply(self, status: int, body: bytes = b"", ctype: str = "text/plain") -> None:
        self.send_response(status)
        self.send_header("Content-Type", ctype)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def _body(self) -> bytes:
        coding = self.headers.get("Transfer-Encoding", "").strip().lower()
        if coding == "chunked":
            data = self._chunked()
        elif coding not in ("", "identity"):
            raise ValueError(f"unsupported Transfer-Encoding {coding!r}")
        else:
            length = int(self.headers.get("Content-Length") or 0)
            if not 0 <= length <= _MAX_BODY:
                raise ValueError("bad Content-Length")
            data = self.rfile.read(length)
        encoding = self.headers.get("Content-Encoding", "").strip().lower()
        if encoding not in ("gzip", "identity", ""):
            raise ValueError(f"unsupported Content-Encoding {encoding!r}")
        return gzip.decompress(data) if encoding == "gzip" else data

    def _chunked(self) -> bytes:
        """A ``Transfer-Encoding: chunked`` body (sent by exporters streaming their payload),
        at most ``_MAX_BODY`` bytes."""
        data = bytearray()
        while True:
            size = int(self.rfile.readline(1024).split(b";", 1)[0].strip() or b"x", 16)
            if size < 0 or len(data) + size > _MAX_BODY:
                raise ValueError("bad chunk size")
            if size == 0:
                while self.rfile.readline(1024).strip():  # trailer fields, then a blank line
                    pass
                return bytes(data)
            data += self.rfile.read(size)
            if self.rfile.read(2) != b"\r\n":
                raise ValueError("bad chunk")

    def _discard_unread(self) -> None:
        """Read what the client still sends (briefly, bounded) before the connection closes:
        closing with unread input resets it, and the client could lose the 400."""
        try:
            self.connection.settimeout(0.2)
            received = 0
            while received < _MAX_BODY:
                chunk = self.connection.recv(65536)
                if not chunk:
                    break
                received += len(chunk)
        except OSError:  # timeout or reset: nothing more to wait for
            pass

    def do_POST(self) -> None:
        sink, path = self.sink, self.path.split("?", 1)[0]
        if path not in ("/v1/traces", "/v1/logs", "/v1/metrics"):
            self._reply(404, b"not found")
            return
        try:
            if "json" in self.headers.get("Content-Type", ""):
                raise ValueError("only application/x-protobuf is supported")
            data = self._body()
            if path == "/v1/traces":
                sink._add(spans=_spans(data))
            elif path == "/v1/logs":
                sink._add(logs=_logs(data))
        except Exception as exc:  # malformed input must never take the sink down
            sink._reject()
            self.close_connection = True
            self._reply(400, f"bad OTLP request: {type(exc).__name__}: {exc}".encode())
            self._discard_unread()
            return
        self._reply(200, b"", "application/x-protobuf")  # empty Export*ServiceResponse


class _Server(http.server.ThreadingHTTPServer):
    daemon_threads = True

    def handle_error(self, request: Any, client_address: Any) -> None:
        """A client that hangs up mid-request (a collector killed mid-export) is not an error."""
        import sys  # noqa: PLC0415 - only on the error path

        if isinstance(sys.exc_info()[1], ConnectionError):
            return
        super().handle_error(request, client_address)


class RecordingSink:
    """OTLP/HTTP protobuf receiver on 127.0.0.1 keeping flattened spans and log records in memory.

    Accepts ``POST /v1/traces``, ``/v1/logs`` and ``/v1/metrics`` (ignored), gzipped or not.
    Malformed bodies are answered 400 and counted in ``bad_requests``. Thread-safe. Records:
    spans ``{service, name, trace_id, span_id, parent_span_id, kind, attributes, resource, scope}``
    and logs ``{service, body, severity, severity_number, trace_id, span_id, attributes, resource,
    scope}``; ids are lowercase hex (None when absent), kind is e.g. ``"SERVER"``.
    """

    def __init__(self, port: int = 0) -> None:
        """Prepare a sink on ``port`` (0: a free port, chosen at ``start()``)."""
        self._port = port
        self._cond = threading.Condition(threading.RLock())
        self._spans: list[Record] = []
        self._logs: list[Record] = []
        self._bad = 0
        self._server: _Server | None = None
        self._thread: threading.Thread | None = None

    def start(self) -> RecordingSink:
        """Bind and serve from a background thread; idempotent. Returns self."""
        if self._server is None:
            handler = type("_SinkHandler", (_Handler,), {"sink": self})
            self._server = _Server((_HOST, self._port), handler)
            self._port = self._server.server_address[1]
            self._thread = threading.Thread(target=self._server.serve_forever, args=(0.05,))
            self._thread.daemon = True
            self._thread.start()
        return self

    def stop(self) -> None:
        """Stop serving and close the socket; received data is kept, the port reused on start."""
        server, self._server = self._server, None
        if server is not None:
            server.shutdown()
            server.server_close()
        if self._thread is not None:
            self._thread.join(5)

    @property
    def endpoint(self) -> str:
        """Base URL ``http://127.0.0.1:PORT``; exporters append ``/v1/traces`` or ``/v1/logs``."""
        if self._server is None:
            raise RuntimeError("RecordingSink is not started")
        return f"http://{_HOST}:{self._port}"

    def spans(self) -> list[Record]:
        """Snapshot of received spans, in arrival order."""
        with self._cond:
            return list(self._spans)

    def logs(self) -> list[Record]:
        """Snapshot of received log records, in arrival order."""
        with self._cond:
            return list(self._logs)

    @property
    def bad_requests(self) -> int:
        """How many requests were rejected as malformed or unsupported."""
        with self._cond:
            return self._bad

    def clear(self) -> None:
        """Forget everything received so far (and reset ``bad_requests``)."""
        with self._cond:
            self._spans, self._logs, self._bad = [], [], 0

    def wait_for(self, predicate: Callable[[RecordingSink], bool], timeout: float = 5.0) -> bool:
        """Wait until ``predicate(self)`` holds (re-checked on each arrival); False on timeout."""
        deadline = time.monotonic() + timeout
        with self._cond:
            while not predicate(self):
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    return False
                self._cond.wait(min(remaining, 0.1))
        return True

    def _add(self, spans: Sequence[Record] = (), logs: Sequence[Record] = ()) -> None:
        with self._cond:
            self._spans.extend(spans)
            self._logs.extend(logs)
            self._cond.notify_all()

    def _reject(self) -> None:
        with self._cond:
            self._bad += 1
            self._cond.notify_all()

    def __enter__(self) -> RecordingSink:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()
