"""Fast access to OpenTelemetry's current context, and running code inside a captured one.

OpenTelemetry keeps the current :class:`~opentelemetry.context.Context` in a ``ContextVar``
behind ``opentelemetry.context``. On the hot path (``get``, scope entry, span start, log filter)
the bridge reads and sets that variable directly when the runtime context is the default
``ContextVarsRuntimeContext``; with any other runtime it goes through the public API.
"""

from __future__ import annotations

import functools
import inspect
import logging
from collections.abc import Awaitable, Callable, Coroutine
from contextvars import ContextVar, Token
from typing import Any, ParamSpec, TypeVar, cast

from opentelemetry import context as otel_context
from opentelemetry.baggage import _BAGGAGE_KEY  # the key is stable since 1.0
from opentelemetry.context import Context
from opentelemetry.context.contextvars_context import ContextVarsRuntimeContext
from opentelemetry.trace.propagation import _SPAN_KEY  # the key is stable since 1.0

__all__ = [
    "BAGGAGE_KEY",
    "SPAN_KEY",
    "attach",
    "bind_context",
    "detach",
    "get_current",
    "with_entry",
]

P = ParamSpec("P")
R = TypeVar("R")

BAGGAGE_KEY: str = _BAGGAGE_KEY
SPAN_KEY: str = _SPAN_KEY
_logger = logging.getLogger("otel_ctxbridge")

detach_failures = 0
"""How many detaches failed because the token belonged to another context (a leak)."""


def _runtime_var() -> ContextVar[Context] | None:
    runtime = getattr(otel_context, "_RUNTIME_CONTEXT", None)
    if type(runtime) is ContextVarsRuntimeContext:
        var = getattr(runtime, "_current_context", None)
        if isinstance(var, ContextVar):
            return var
    return None


_VAR = _runtime_var()

get_current: Callable[[], Context]
attach: Callable[[Context], Token[Context]]
if _VAR is not None:
    get_current = _VAR.get
    attach = _VAR.set
else:  # pragma: no cover - only with a custom OTEL_PYTHON_CONTEXT runtime
    get_current = otel_context.get_current
    attach = otel_context.attach


def detach(token: Token[Context]) -> None:
    """Restore the context from before ``attach``; a foreign token is logged, never raised."""
    global detach_failures  # noqa: PLW0603 - a process-wide diagnostic counter
    try:
        if _VAR is not None:
            _VAR.reset(token)
        else:  # pragma: no cover - custom runtime context
            otel_context.detach(token)
    except (ValueError, RuntimeError):
        detach_failures += 1
        _logger.warning(
            "otel_ctxbridge: failed to detach a context (entered in another task or thread); "
            "a scope or attached context was left open"
        )


def with_entry(ctx: Context, key: str, value: object) -> Context:
    """A copy of ``ctx`` with ``key`` set: one copy instead of ``set_value``'s two."""
    new = Context(ctx)
    dict.__setitem__(new, key, value)
    return new


def run_in(ctx: Context, fn: Callable[..., R], *args: Any, **kwargs: Any) -> R:
    """Call ``fn`` with ``ctx`` attached; an awaitable result is run inside ``ctx`` too."""
    token = attach(ctx)
    try:
        result = fn(*args, **kwargs)
    finally:
        detach(token)
    if inspect.iscoroutine(result):
        return cast(R, _await_in(ctx, result))
    return result


async def _await_in(ctx: Context, awaitable: Awaitable[R]) -> R:
    token = attach(ctx)
    try:
        return await awaitable
    finally:
        detach(token)


def call_in(ctx: Context, fn: Callable[..., R], *args: Any, **kwargs: Any) -> R:
    """Like :func:`run_in`, but a coroutine function is called inside ``ctx`` as a whole."""
    if inspect.iscoroutinefunction(fn):
        return cast(R, _call_async_in(ctx, fn, args, kwargs))
    return run_in(ctx, fn, *args, **kwargs)


async def _call_async_in(
    ctx: Context,
    fn: Callable[..., Coroutine[Any, Any, R]],
    args: tuple[Any, ...],
    kwargs: dict[str, Any],
) -> R:
    token = attach(ctx)
    try:
        return await fn(*args, **kwargs)
    finally:
        detach(token)


def bind_context(fn: Callable[P, R], ctx: Context | None = None) -> Callable[P, R]:
    """Wrap ``fn`` so that it runs in ``ctx`` (default: the context current now)."""
    captured = get_current() if ctx is None else ctx
    if inspect.iscoroutinefunction(fn):
        async_fn = cast(Callable[..., Coroutine[Any, Any, Any]], fn)

        @functools.wraps(fn)
        async def bound_async(*args: Any, **kwargs: Any) -> Any:
            return await _call_async_in(captured, async_fn, args, kwargs)

        return cast(Callable[P, R], bound_async)

    @functools.wraps(fn)
    def bound(*args: P.args, **kwargs: P.kwargs) -> R:
        return call_in(captured, fn, *args, **kwargs)

    return bound
