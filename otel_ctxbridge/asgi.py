"""ASGI integration: the request context for every HTTP request and websocket connection.

``app = instrument_asgi(app, bridge, trust=TrustPolicy(networks=["10.0.0.0/8"]))`` wraps an ASGI
application (FastAPI, Starlette, ...) with, from the outside in:

1. :class:`~otel_ctxbridge._shield.TraceHeaderShield`: ``traceparent``/``tracestate`` checked as
   W3C Trace Context Level 1 says; ``baggage`` (and other configured propagators' baggage
   headers), the trust secret and headers OTel cannot decode (it would answer 500) hidden
   from OTel;
2. ``opentelemetry-instrumentation-asgi``'s ``OpenTelemetryMiddleware``: the server span, a
   child of a valid inbound ``traceparent`` (send/receive spans off unless ``exclude_spans``
   is given), named, once the router has matched a route, after its template
   (``GET /items/{item_id}``, with ``http.route``) as FastAPI's own instrumentation names
   it, rather than after the raw path;
3. :class:`ContextBridgeMiddleware`: the request context, inside the server span, whose
   attributes get the request's fields as soon as they are read (just after the span
   started: a sampler does not see them).

The order matters: OTel's middleware attaches a fresh context extracted from the headers (so a
context attached outside it is lost) and starts the server span before inner middleware runs.
:class:`ContextBridgeMiddleware` therefore builds the request context on top of OTel's and keeps
a request frame so that ``bridge.update()`` anywhere in the request (a FastAPI dependency in a
worker thread included) reaches the server span and the access log. Under
``instrument_asgi``, or while a span is current, it also keeps FastAPI's native telemetry and
Starlette's ``OpenTelemetryMiddleware`` from starting another server span on a context
extracted afresh from the headers (FastAPI does the same when OTel's middleware is in its own
stack): that holds for requests OTel does not record too (unsampled, excluded URLs). Use
:class:`ContextBridgeMiddleware` alone when OTel's middleware is already outside it (then OTel
parses the trace headers itself).

Request ids: a valid inbound id (the field's validator, or :data:`~otel_ctxbridge.
REQUEST_ID_PATTERN` when it has none: UUIDs, 32-hex ids, nginx ``$request_id``, safe tokens up
to 128 characters) is kept; otherwise one is generated. A refused id is never echoed and is
logged (once, by field) without its value. The id goes back in the field's header on every
response, 500s and exception-handler responses included, and on ``websocket.accept``.

Access log: one line per HTTP request on the ``otel_ctxbridge.access`` logger (INFO; its level
is set to INFO when unset), written once the response is complete, message
``"GET /path 200 3.1ms"``, with ``extra`` keys ``method``, ``path``, ``status_code``,
``duration_ms``, ``client_addr``, ``trace_id``, ``span_id`` and each field set in the request
under its ``log_key``, values set with ``update()`` included. Unhandled exceptions are logged
with the same keys on ``otel_ctxbridge.asgi`` (then re-raised, so the server logs them too: the
request's context stays with the exception in the request's task, where ``ContextLogFilter``
and ``OTelLoggingBridge`` use it for a record of it written after the request, such as
uvicorn's ``Exception in ASGI application``).
"""

from __future__ import annotations

import logging
from typing import Any

from . import _runtime as rt
from ._app_headers import headers_for_app, hide_unchecked
from ._derive import derive_context
from ._entry import derive_dropping, forget_copied
from ._exchange import Exchange, default_span_name, echo_value
from ._failed import remember_failed_context
from ._foreign_baggage import baggage_prefixes
from ._inbound import (
    ORIGINAL_HEADERS,
    UNTRUSTED_HEADERS,
    ASGIApp,
    InboundReader,
    Receive,
    Scope,
    Send,
)
from ._misplaced import warn_if_otel_middleware_inside
from ._scope import stamp
from ._shield import TraceHeaderShield
from ._state import Frame
from .bridge import ContextBridge
from .errors import ContextValueError, requires_extra
from .fields import new_request_id
from .trust import TrustPolicy

__all__ = ["ACCESS_LOGGER", "ContextBridgeMiddleware", "TraceHeaderShield", "instrument_asgi"]

ACCESS_LOGGER = "otel_ctxbridge.access"
"""Name of the logger that receives one line per request."""
_logger = logging.getLogger("otel_ctxbridge.asgi")
_RESERVED = frozenset(vars(logging.makeLogRecord({}))) | {"message", "asctime"}
_REQUEST_KEYS = ("method", "path", "status_code", "duration_ms", "client_addr")
_NAMED = "otel_ctxbridge.span_name"
_FASTAPI_TELEMETRY = "fastapi.telemetry"
_STARLETTE_TELEMETRY = "starlette.opentelemetry"


def instrument_asgi(
    app: ASGIApp,
    bridge: ContextBridge,
    trust: TrustPolicy | None = None,
    access_log: bool = True,
    *,
    request_id_field: str = "request_id",
    log_errors: bool = True,
    **otel_kwargs: Any,
) -> ASGIApp:
    """Wrap ``app`` with OTel's ASGI middleware and the context bridge, in the right order.

    Args:
        app: the ASGI application.
        bridge: the field registry.
        trust: who may set ``inbound="trusted"`` fields and forward undeclared baggage;
            default: nobody.
        access_log: write one line per request on ``otel_ctxbridge.access``.
        request_id_field: the field echoed on every response under its ``header``.
        log_errors: log unhandled exceptions (with the request's fields) on
            ``otel_ctxbridge.asgi`` before they propagate to the server.
        otel_kwargs: passed to ``OpenTelemetryMiddleware`` (``tracer_provider``,
            ``excluded_urls``, ...); ``exclude_spans`` defaults to ``["receive", "send"]``.
    """
    with requires_extra("asgi", "instrument_asgi"):
        from opentelemetry.instrumentation.asgi import (  # noqa: PLC0415 - optional extra "asgi"
            OpenTelemetryMiddleware,
        )

    trust = trust if trust is not None else TrustPolicy()
    inner = ContextBridgeMiddleware(
        app,
        bridge,
        trust,
        access_log=access_log,
        request_id_field=request_id_field,
        log_errors=log_errors,
    )
    otel_kwargs.setdefault("exclude_spans", ["receive", "send"])
    if "default_span_details" not in otel_kwargs:
        # The default span name without OTel's per-request environment lookups, remembered so
        # that the span can be named after its route once the router has matched one.
        otel_kwargs["default_span_details"] = inner.span_details
    # OTel's middleware is outside for every request: even when it records nothing (an unsampled
    # request, an excluded URL) no inner telemetry may start a span on a fresh context.
    inner.traced_outside = True
    traced = OpenTelemetryMiddleware(inner, **otel_kwargs)
    # A layer outside OTel's: OTel decodes the Host header before it calls any hook.
    return TraceHeaderShield(traced, bridge=bridge, hidden=(trust.secret_header,))


class ContextBridgeMiddleware:
    """Pure ASGI middleware: the request context of the declared fields for each request.

    It reads each field from its ``header`` and from ``baggage`` per its ``inbound`` policy and
    ``trust``, generates missing ones (``Field.generate``), keeps undeclared baggage only from
    trusted peers (from an untrusted one, ``baggage`` and the headers of ``inbound="trusted"``
    fields are removed from the scope the application gets), stamps the current (server)
    span (and, when OTel's middleware read the raw ``baggage`` header, removes from it the
    field values a span processor copied from that baggage where this request did not set its
    own), echoes the request id on every response (500s included), and writes the access log.
    Non-HTTP scopes (lifespan) pass through untouched; websocket connections get the context
    for their whole life and the request id on ``websocket.accept``. Place it inside OTel's
    ``OpenTelemetryMiddleware``.
    """

    def __init__(
        self,
        app: ASGIApp,
        bridge: ContextBridge,
        trust: TrustPolicy | None = None,
        *,
        access_log: bool = True,
        request_id_field: str = "request_id",
        log_errors: bool = True,
    ) -> None:
        self.app = app
        self.bridge = bridge
        self.trust = trust if trust is not None else TrustPolicy()
        self.access_log = access_log
        self.log_errors = log_errors
        self.traced_outside = False
        """True when OTel's middleware wraps this one for every request (``instrument_asgi``
        sets it): FastAPI's native telemetry and Starlette's ``OpenTelemetryMiddleware`` are
        then kept off even for requests OTel does not record (unsampled, excluded URLs)."""
        self._reader = InboundReader(bridge, self.trust, request_id_field)
        secret = self.trust.secret_header if self.trust.has_secret else None
        self._secret = secret.encode("latin-1") if secret else None
        self._generators = [(n, f.generate) for n, f in bridge.fields.items() if f.generate]
        rid = bridge.fields.get(request_id_field)
        self._rid = request_id_field if rid is not None else ""
        self._rid_header = (rid.header or "x-request-id").encode("latin-1") if rid else b""
        self._log_keys: dict[str, str] = {}
        for name, field in bridge.fields.items():
            if field.log_key in _RESERVED or field.log_key in _REQUEST_KEYS:
                _logger.warning(
                    "otel_ctxbridge: field %r: log key %r is taken", name, field.log_key
                )
            else:
                self._log_keys[name] = str(field.log_key)
        self._access = logging.getLogger(ACCESS_LOGGER)
        if access_log and self._access.level == logging.NOTSET:
            self._access.setLevel(logging.INFO)  # asked for: on even under a WARNING root
        self._stack_checked = False

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        """Run the app inside the request context."""
        kind = scope["type"]
        if kind != "http" and kind != "websocket":  # noqa: PLR1714 - the fast comparison
            return await self.app(scope, receive, send)
        try:
            exchange = self._enter(scope, send)
        except Exception:  # telemetry never throws on the request path
            _logger.exception("otel_ctxbridge: no request context could be built")
            hide_unchecked(scope, self._reader.restricted, self._secret)
            return await self.app(scope, receive, send)
        token = rt.attach(exchange.ctx)
        try:
            if kind == "websocket":
                try:
                    await self.app(scope, receive, exchange.send_ws)
                except Exception as exc:
                    remember_failed_context(exc, exchange.ctx)  # for the server's error log
                    raise
                return
            try:
                await self.app(scope, receive, exchange.send)
            except Exception as exc:
                await exchange.fail(exc)
                raise
            finally:
                if not exchange.logged:
                    exchange.finish()
        finally:
            rt.detach(token)

    def span_details(self, scope: Scope) -> tuple[str, dict[str, Any]]:
        """OTel's ``default_span_details`` hook: the default span name (remembered, to name
        the span after its route later) and no extra attributes: the request's fields are
        set on the span as soon as the request context is built, just after it starts."""
        name = default_span_name(scope)
        scope[_NAMED] = name
        return name, {}

    def _enter(self, scope: Scope, send: Send) -> Exchange:
        named: str | None = scope.pop(_NAMED, None)  # set by span_details: OTel named the span
        values: dict[str, Any]
        values, extra = self._reader.read(scope)
        rid = self._rid
        echo: bytes | None = None
        for name, generate in self._generators:
            if name not in values:
                values[name] = value = generate()
                if name == rid and generate is new_request_id:  # a UUID: a valid header value
                    echo = value.encode("ascii")
        base = rt.get_current()
        inbound: Any = base.get(rt.BAGGAGE_KEY)  # what OTel's middleware extracted, if it did
        if extra or inbound is not None:
            # Only accepted fields (and a trusted peer's members) become the request's baggage.
            base = rt.with_entry(base, rt.BAGGAGE_KEY, extra or {})
        span: Any = base.get(rt.SPAN_KEY)
        frame = Frame((span,) if span is not None and span.is_recording() else ())
        bridge = self.bridge
        try:
            ctx = derive_context(bridge, base, values, frame)
        except ContextValueError:  # a generated value, or the baggage limits
            ctx = derive_dropping(bridge, base, values, extra, frame)
            echo = None  # the request id may be among the dropped values
        if frame.spans:
            if values:
                stamp(bridge, span, values)
            if inbound:  # OTel's middleware extracted baggage as it came (no shield, or one
                forget_copied(bridge, span, values, inbound)  # in a format it does not hide)
        if self.traced_outside:
            scope.setdefault(_FASTAPI_TELEMETRY, None)
            scope.setdefault(_STARLETTE_TELEMETRY, True)
        else:
            self._guard_native_telemetry(scope, span)
        if (
            self._secret is not None
            or ORIGINAL_HEADERS in scope
            or UNTRUSTED_HEADERS in scope
            # Under instrument_asgi the shield already put other propagators' baggage headers
            # aside (ORIGINAL_HEADERS above): only a bridge without it looks for them here.
            or (not self.traced_outside and baggage_prefixes())
        ):
            headers_for_app(scope, self.trust, self._secret)
        if echo is None:
            echo = echo_value(values.get(rid))
        return Exchange(self, scope, send, ctx, frame, echo, named)

    def _guard_native_telemetry(self, scope: Scope, span: Any) -> None:
        if self.traced_outside or (span is not None and span.get_span_context().is_valid):
            # A server span is current (recording or not), or OTel chose not to trace this URL:
            # keep FastAPI's native telemetry and Starlette's OpenTelemetryMiddleware from
            # starting another on a context extracted afresh from the headers, which would
            # drop the request context and adopt untrusted baggage (FastAPI does the same when
            # OTel's ASGI middleware is in its own stack).
            scope.setdefault(_FASTAPI_TELEMETRY, None)
            scope.setdefault(_STARLETTE_TELEMETRY, True)
        elif not self._stack_checked:  # no span outside: is OTel's middleware inside?
            self._stack_checked = True
            warn_if_otel_middleware_inside(self.app)
