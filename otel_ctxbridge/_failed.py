"""The context of the request an exception escaped from, for the records the server writes
about it after the request ended (uvicorn's ``Exception in ASGI application``): they get that
request's fields and trace ids from :class:`~otel_ctxbridge.ContextLogFilter` and
:class:`~otel_ctxbridge.logs.OTelLoggingBridge`.

The middleware keeps ``(exception, request context)`` in a context variable it does not reset:
the server logs the exception in the same task that ran the request (one per request), after
the middleware has returned, and sees the value there; another request's task never does. So an
exception instance raised by several requests (a cached error, a shared future) is labelled
with the request of the task logging it.
"""

from __future__ import annotations

import logging
from contextvars import ContextVar
from typing import TYPE_CHECKING

from opentelemetry.context import Context
from opentelemetry.trace import get_current_span

from ._state import state_in

if TYPE_CHECKING:
    from .bridge import ContextBridge

__all__ = ["context_for_record", "remember_failed_context"]

_FAILED: ContextVar[tuple[BaseException, Context] | None] = ContextVar(
    "otel_ctxbridge.failed_request", default=None
)


def remember_failed_context(exc: BaseException, ctx: Context) -> None:
    """Keep ``(exc, ctx)`` for the rest of the current task (the request's); never raises."""
    _FAILED.set((exc, ctx))


def context_for_record(record: logging.LogRecord, ctx: Context, bridge: ContextBridge) -> Context:
    """``ctx``, or, for a record of the exception that escaped this task's request, written
    outside any request (no valid span and no state of ``bridge`` in ``ctx``), that request's
    context."""
    failed = _FAILED.get()
    exc_info = record.exc_info
    if failed is None or not isinstance(exc_info, tuple) or len(exc_info) < 2:  # (type, exc, tb)
        return ctx
    if exc_info[1] is not failed[0] or state_in(ctx, bridge._key) is not None:  # a request
        return ctx
    if get_current_span(ctx).get_span_context().is_valid:
        return ctx
    return failed[1]
