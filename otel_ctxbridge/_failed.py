"""The context of the request an exception escaped from, for the records the server writes
about it after the request ended (uvicorn's ``Exception in ASGI application``): they get that
request's fields and trace ids from :class:`~otel_ctxbridge.ContextLogFilter` and
:class:`~otel_ctxbridge.logs.OTelLoggingBridge`.

The middleware keeps ``(exception, request context)`` in a context variable it does not reset:
the server logs the exception in the task that ran the request (one per request), after the
middleware has returned, and sees the value there; another request's task never does, so an
exception instance several requests raise (a cached error, a shared future) is labelled with
the request of the task logging it. Where the middleware ran in a child task (inside an anyio
task group: a ``BaseHTTPMiddleware`` outside it) or the exception is logged in another thread
(Starlette's ``TestClient``), the context also kept on the exception is used: the last request
it escaped from.
"""

from __future__ import annotations

import contextlib
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
_ON_EXCEPTION = "_otel_ctxbridge_context"


def remember_failed_context(exc: BaseException, ctx: Context) -> None:
    """Keep ``(exc, ctx)`` for the rest of the current task (the request's), and ``ctx`` on
    ``exc`` for a record written elsewhere; never raises."""
    _FAILED.set((exc, ctx))
    with contextlib.suppress(Exception):  # an exception type without a __dict__ keeps nothing
        setattr(exc, _ON_EXCEPTION, ctx)


def context_for_record(record: logging.LogRecord, ctx: Context, bridge: ContextBridge) -> Context:
    """``ctx``, or, for a record of the exception that escaped this task's request, written
    outside any request (no valid span and no state of ``bridge`` in ``ctx``), that request's
    context."""
    exc_info = record.exc_info
    if not isinstance(exc_info, tuple) or len(exc_info) < 2:  # (type, exc, tb)
        return ctx
    exc = exc_info[1]
    here = _FAILED.get()
    failed = here[1] if here is not None and here[0] is exc else getattr(exc, _ON_EXCEPTION, None)
    if not isinstance(failed, Context) or state_in(ctx, bridge._key) is not None:  # a request
        return ctx
    if get_current_span(ctx).get_span_context().is_valid:
        return ctx
    return failed
