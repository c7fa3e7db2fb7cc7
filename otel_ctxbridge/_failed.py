"""The context of a request an exception escaped from, kept on the exception: a record of it
written after the request ended (the server's own ``Exception in ASGI application``) gets that
request's fields and trace ids from :class:`~otel_ctxbridge.ContextLogFilter` and
:class:`~otel_ctxbridge.logs.OTelLoggingBridge`.

An exception instance raised again by another request (a cached error, a shared future) keeps
the context of the first request it escaped from, and so does one that went through nested
middlewares (the innermost's): its later records name that request.
"""

from __future__ import annotations

import contextlib
import logging
from typing import TYPE_CHECKING

from opentelemetry.context import Context
from opentelemetry.trace import get_current_span

from ._state import state_in

if TYPE_CHECKING:
    from .bridge import ContextBridge

__all__ = ["context_for_record", "remember_failed_context"]

_FAILED_CONTEXT = "_otel_ctxbridge_context"


def remember_failed_context(exc: BaseException, ctx: Context) -> None:
    """Keep ``ctx`` on ``exc`` (unless it keeps one already); never raises."""
    with contextlib.suppress(Exception):  # an exception type without a __dict__ keeps nothing
        if not isinstance(getattr(exc, _FAILED_CONTEXT, None), Context):
            setattr(exc, _FAILED_CONTEXT, ctx)


def context_for_record(record: logging.LogRecord, ctx: Context, bridge: ContextBridge) -> Context:
    """``ctx``, or, for a record of an exception that escaped a request written outside any
    request (no valid span and no state of ``bridge`` in ``ctx``), that request's context."""
    exc_info = record.exc_info
    if not isinstance(exc_info, tuple) or len(exc_info) < 2:  # (type, exc, tb)
        return ctx
    failed = getattr(exc_info[1], _FAILED_CONTEXT, None)
    if not isinstance(failed, Context) or state_in(ctx, bridge._key) is not None:  # a request
        return ctx
    if get_current_span(ctx).get_span_context().is_valid:
        return ctx
    return failed
