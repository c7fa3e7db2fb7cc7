"""One request on its way out: the echoed request id, the status, the server span named after
the matched route, the access-log line, and the 500 (with the id) when the application fails
before answering. Used by :class:`~otel_ctxbridge.asgi.ContextBridgeMiddleware`."""

from __future__ import annotations

import logging
from time import perf_counter
from typing import TYPE_CHECKING, Any

from opentelemetry.context import Context
from opentelemetry.trace import format_span_id, format_trace_id

from ._accel import speedups
from ._failed import remember_failed_context
from ._inbound import Message, Scope, Send
from ._routes import route_template
from ._runtime import SPAN_KEY
from ._span_write import rename_span
from ._state import Frame

if TYPE_CHECKING:
    from .asgi import ContextBridgeMiddleware

_logger = logging.getLogger("otel_ctxbridge.asgi")
_METHODS = frozenset(
    ("GET", "HEAD", "POST", "PUT", "DELETE", "CONNECT", "OPTIONS", "TRACE", "PATCH", "QUERY")
)
_ROUTE = "http.route"
_append_header = speedups.append_header if speedups is not None else None
_response_started = speedups.response_started if speedups is not None else None
"""The compiled common case of :meth:`Exchange._started` (True), else NotImplemented."""
_500 = [(b"content-type", b"text/plain; charset=utf-8"), (b"connection", b"close")]


class Exchange:
    """One request on its way out: the echo header, the status, the access-log line.

    ``mw`` is the middleware (its settings), ``send_next`` the ``send`` it wraps, ``ctx`` and
    ``frame`` the request context, ``echo`` the request id as a header value (or None),
    ``named`` the name the server span was started with (None: not named by the middleware)."""

    __slots__ = (
        "ctx",
        "echo",
        "frame",
        "logged",
        "mw",
        "named",
        "scope",
        "send_next",
        "start",
        "status",
    )

    def __init__(  # noqa: PLR0917 - private, called once per request
        self,
        mw: ContextBridgeMiddleware,
        scope: Scope,
        send_next: Send,
        ctx: Context,
        frame: Frame,
        echo: bytes | None,
        named: str | None = None,
    ) -> None:
        self.mw = mw
        self.scope = scope
        self.send_next = send_next
        self.ctx = ctx
        self.frame = frame
        self.echo = echo
        self.start = perf_counter()
        self.logged = not mw.access_log  # True: no access-log line to write
        self.status = 0  # 0 until the response starts
        self.named = named  # the server span's name, when the middleware's hook gave it

    def _add_echo(self, message: Message) -> None:
        mw = self.mw
        echo = self.echo
        updates = self.frame.updates
        if updates and mw._rid in updates:  # changed with update()
            echo = echo_value(mw.bridge.values_in(self.ctx).get(mw._rid))
        if echo is None:
            return
        name = mw._rid_header
        if _append_header is not None and _append_header(message, name, echo) is not None:
            return  # the loop below, compiled
        headers = message.get("headers") or ()
        for key, _ in headers:
            if key.lower() == name:
                return  # the application set its own
        message["headers"] = [*headers, (name, echo)]

    def _started(self, message: Message) -> None:
        """The response starts: echo the request id; once the router has matched a route,
        rename the server span from ``"GET /items/42"`` to ``"GET /items/{item_id}"`` (the
        template Starlette and FastAPI leave in ``scope["route"]``, mount prefix included) and
        set ``http.route``, as FastAPI's instrumentation does. A 404 or 405 that matched no
        route is named after its method alone (``"GET"``), as FastAPI's instrumentation names
        unmatched requests, so that scanners probing random paths do not make a span name
        each. A span renamed since (by the application or a hook) keeps its name."""
        self._add_echo(message)
        named = self.named
        if named is None or not self.frame.spans:
            return
        method, sep, _ = named.partition(" ")
        if not sep:
            return
        route = route_template(self.scope)
        if route:
            rename_span(self.frame.spans[0], named, f"{method} {route}", {_ROUTE: route})
        elif route is None and (self.status == 404 or self.status == 405):  # noqa: PLR1714
            rename_span(self.frame.spans[0], named, method, {})

    async def send(self, message: Message) -> None:
        """The ``send`` the application sees for an HTTP request."""
        kind = message["type"]
        if kind == "http.response.start":
            self.status = message.get("status", 200)
            try:
                if _response_started is None or _response_started(self, message) is not True:
                    self._started(message)
            except Exception:  # telemetry never throws on the request path
                _logger.debug("otel_ctxbridge: could not add the request id", exc_info=True)
        elif kind == "http.response.body" and not message.get("more_body", False):
            await self.send_next(message)
            if not self.logged:
                self.finish()
            return
        await self.send_next(message)

    async def send_ws(self, message: Message) -> None:
        """The ``send`` the application sees for a websocket connection."""
        if message["type"] == "websocket.accept":
            try:
                self._add_echo(message)
            except Exception:  # telemetry never throws on the request path
                _logger.debug("otel_ctxbridge: could not add the request id", exc_info=True)
        await self.send_next(message)

    async def fail(self, exc: Exception) -> None:
        """The app raised: answer 500 (with the id) if nothing was sent, log the error with
        the request's fields, and keep the request's context for the server's own error log,
        written after the request ended (kept after the 500 is sent: what the server starts
        while sending it, a keep-alive timer, would copy the current context with it)."""
        if not self.status:
            try:
                await self.send({"type": "http.response.start", "status": 500, "headers": _500})
                await self.send({"type": "http.response.body", "body": b"Internal Server Error"})
            except Exception:
                _logger.debug("otel_ctxbridge: could not send the 500", exc_info=True)
        if self.mw.log_errors and not is_disconnect(exc):
            method, path = self.scope.get("method"), printable(self.scope.get("path", ""))
            extra = self.fields_extra()
            _logger.error("unhandled exception in %s %s", method, path, exc_info=exc, extra=extra)
        remember_failed_context(exc, self.ctx)

    def fields_extra(self) -> dict[str, Any]:
        """The log ``extra`` of this request: each field set now under its log key (redacted
        as configured), and ``trace_id``/``span_id`` of its span."""
        extra: dict[str, Any] = {}
        bridge, log_keys = self.mw.bridge, self.mw._log_keys
        for name, value in bridge.values_in(self.ctx).items():
            key = log_keys.get(name)
            if key is not None:
                extra[key] = bridge.fields[name].shown(value)
        span: Any = self.ctx.get(SPAN_KEY)
        if span is not None:
            span_context = span.get_span_context()
            if span_context.is_valid:
                extra["trace_id"] = format_trace_id(span_context.trace_id)
                extra["span_id"] = format_span_id(span_context.span_id)
        return extra

    def finish(self) -> None:
        """Write the access-log line (once), with the fields as they are now."""
        self.logged = True
        mw = self.mw
        if not mw.access_log or not mw._access.isEnabledFor(logging.INFO):
            return
        try:
            scope = self.scope
            duration = (perf_counter() - self.start) * 1000.0
            method = scope.get("method", "")
            path = printable(scope.get("path", ""))
            status = self.status or 500  # no response: the server answers 500
            client = scope.get("client")
            extra = self.fields_extra()
            extra["method"] = method
            extra["path"] = path
            extra["status_code"] = status
            extra["duration_ms"] = round(duration, 3)
            extra["client_addr"] = f"{client[0]}:{client[1]}" if client else None
            mw._access.info("%s %s %s %.1fms", method, path, status, duration, extra=extra)
        except Exception:  # telemetry never throws on the request path
            _logger.debug("otel_ctxbridge: could not write the access log", exc_info=True)


def default_span_name(scope: Scope) -> str:
    """OTel's default server span name (``"GET /path"``; the path for websockets), without
    its per-request environment lookup for the common methods."""
    path = str(scope.get("path", "")).strip()
    method = str(scope.get("method", "")).strip()
    if method not in _METHODS:
        from opentelemetry.util.http import sanitize_method  # noqa: PLC0415 - rare methods only

        method = sanitize_method(method)
        method = "HTTP" if method == "_OTHER" else method
    if method and path:
        return f"{method} {path}"
    return path or method


def echo_value(value: object) -> bytes | None:
    """``value`` as a response header value, if it is a visible-ASCII token."""
    if (
        isinstance(value, str)
        and value
        and value.isascii()
        and value.isprintable()
        and " " not in value
    ):
        return value.encode("ascii")
    return None


def printable(path: Any) -> str:
    """``path`` for a log line: at most 2048 characters, control characters escaped."""
    text = str(path)[:2048]
    if text.isprintable():
        return text
    return text.encode("unicode_escape").decode("ascii")  # no CR/LF/ESC in log lines


def is_disconnect(exc: BaseException) -> bool:
    """True for the exceptions servers and Starlette raise when the client went away."""
    return isinstance(exc, OSError) or type(exc).__name__ in (
        "ClientDisconnect",
        "ClientDisconnected",
    )
