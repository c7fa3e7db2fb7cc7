"""The warning for a ``ContextBridgeMiddleware`` placed outside OpenTelemetry's ASGI middleware
(where the application cannot see the request context)."""

from __future__ import annotations

import logging

_logger = logging.getLogger("otel_ctxbridge.asgi")


def warn_if_otel_middleware_inside(app: object) -> None:
    """Warn when OTel's ASGI ``OpenTelemetryMiddleware`` is in the chain of ``.app`` below
    ``app``: it attaches a fresh context, so the application would not see the request's."""
    if otel_middleware_inside(app):
        _logger.warning(
            "otel_ctxbridge: ContextBridgeMiddleware is outside OpenTelemetry's ASGI "
            "middleware, which attaches a fresh context under it: the application does "
            "not see the request context. Add ContextBridgeMiddleware before "
            "OpenTelemetry's (app.add_middleware puts the last one added outermost), "
            "or use instrument_asgi"
        )


def otel_middleware_inside(app: object) -> bool:
    """True when OTel's ASGI ``OpenTelemetryMiddleware`` is in the chain of ``.app`` below."""
    seen: set[int] = set()
    while app is not None and id(app) not in seen and len(seen) < 64:
        seen.add(id(app))
        kind = type(app)
        if kind.__name__ == "OpenTelemetryMiddleware" and kind.__module__.startswith(
            "opentelemetry.instrumentation.asgi"
        ):
            return True
        app = getattr(app, "app", None)
    return False
