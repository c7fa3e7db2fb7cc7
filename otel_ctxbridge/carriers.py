"""Continuing a request's context from a plain dict of headers: processes, queues, jobs.

The sending side writes the context with ``bridge.inject({})`` (``traceparent`` and
``baggage``; process-local fields never leave). The receiving side continues from it:

- :func:`continue_from` (a ``with`` block) or :func:`context_from` (a Context to attach) when
  the receiver has the bridge: the trace continues, and each field is taken only as its
  ``inbound`` policy and ``trusted`` allow. Invalid or oversized values are dropped, counted
  and logged without the value; the work runs anyway.
- :func:`call_with_headers` when it does not (a child process started by the same
  application): it restores ``traceparent`` and the baggage as sent.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Mapping
from contextvars import Token
from types import TracebackType
from typing import Any, TypeVar

from opentelemetry import trace
from opentelemetry.context import Context
from opentelemetry.trace.propagation.tracecontext import TraceContextTextMapPropagator

from . import _runtime as rt
from .bridge import ContextBridge
from .propagation import BaggagePropagator

__all__ = ["call_with_headers", "context_from", "continue_from", "normalize_headers"]

R = TypeVar("R")
_logger = logging.getLogger("otel_ctxbridge")
_TRACE = TraceContextTextMapPropagator()
_BAGGAGE = BaggagePropagator()


def normalize_headers(headers: Mapping[Any, Any] | None) -> dict[str, str]:
    """Lower-cased ``str`` keys and ``str`` values (bytes decoded as latin-1, the first item
    of a list); other values are left out. Never raises."""
    out: dict[str, str] = {}
    if not headers:
        return out
    try:
        for key, raw in headers.items():
            name = key.decode("latin-1") if isinstance(key, bytes) else key
            value = (raw[0] if raw else None) if isinstance(raw, (list, tuple)) else raw
            if isinstance(value, bytes):
                value = value.decode("latin-1")
            if isinstance(name, str) and isinstance(value, str):
                out[name.lower()] = value
    except Exception:  # a hostile or odd carrier: take nothing rather than fail
        _logger.warning("otel_ctxbridge: unreadable headers carrier ignored")
        return {}
    return out


def context_from(
    bridge: ContextBridge,
    headers: Mapping[Any, Any] | None,
    *,
    trusted: bool = False,
    generate: bool = True,
    base: Context | None = None,
) -> Context:
    """A Context continuing the trace and fields carried by ``headers``. Never raises.

    Built on ``base`` (default: an empty Context, so nothing the current thread or a forked
    process happened to hold leaks in). The remote ``traceparent`` becomes the parent span
    unless ``base`` already has a valid span. Every declared field is reset, then set from
    ``headers`` where its ``inbound`` policy and ``trusted`` allow and the value is valid;
    with ``generate``, missing fields that have a ``generate`` callable get a fresh value.
    """
    start = Context() if base is None else base
    try:
        carrier = normalize_headers(headers)
        ctx = start
        if not trace.get_current_span(start).get_span_context().is_valid:
            ctx = _TRACE.extract(carrier, context=start)
        values: dict[str, Any] = dict.fromkeys(bridge.fields)
        values.update(bridge.extract(carrier, trusted=trusted))
        if generate:
            values = bridge.generated(values)
        try:
            return bridge.derive(ctx, values)
        except Exception:  # a generated value the field refuses: keep what was carried
            _logger.warning("otel_ctxbridge: a generated field value was refused; not set")
            values = dict.fromkeys(bridge.fields)
            values.update(bridge.extract(carrier, trusted=trusted))
            return bridge.derive(ctx, values)
    except Exception:  # telemetry never throws on the request path
        _logger.warning("otel_ctxbridge: could not continue from headers", exc_info=True)
        return start


class continue_from:
    """``with continue_from(bridge, headers, trusted=False):`` runs the block in the context
    the headers carry (see :func:`context_from`); the ``as`` target is the fields taken.

    Works in sync and async code (``with`` and ``async with``); restores the previous
    context on exit, also when the block raises.
    """

    __slots__ = ("_ctx", "_fields", "_token")

    def __init__(
        self,
        bridge: ContextBridge,
        headers: Mapping[Any, Any] | None,
        *,
        trusted: bool = False,
        generate: bool = True,
        base: Context | None = None,
    ) -> None:
        self._ctx = context_from(bridge, headers, trusted=trusted, generate=generate, base=base)
        self._fields = bridge.values_in(self._ctx)
        self._token: Token[Context] | None = None

    def __enter__(self) -> Mapping[str, Any]:
        if self._token is not None:
            raise RuntimeError("continue_from() is already entered")
        self._token = rt.attach(self._ctx)
        return self._fields

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        token, self._token = self._token, None
        if token is not None:
            rt.detach(token)

    async def __aenter__(self) -> Mapping[str, Any]:
        return self.__enter__()

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.__exit__(exc_type, exc, tb)


def call_with_headers(
    headers: Mapping[Any, Any] | None, fn: Callable[..., R], /, *args: Any, **kwargs: Any
) -> R:
    """Call ``fn(*args, **kwargs)`` in the context ``headers`` carry: the trace parent and the
    baggage as sent, on an empty Context.

    Picklable (module-level), so it is the target to hand a process pool or
    ``multiprocessing.Process``: ``pool.submit(call_with_headers, bridge.inject({}), fn, x)``.
    For a sender you do not trust, use :func:`continue_from` with the bridge instead.
    """
    carrier = normalize_headers(headers)
    ctx = _TRACE.extract(carrier, context=Context())
    ctx = _BAGGAGE.extract(carrier, context=ctx)
    token = rt.attach(ctx)
    try:
        return fn(*args, **kwargs)
    finally:
        rt.detach(token)
