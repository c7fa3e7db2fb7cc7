"""Fast access to OpenTelemetry's current context, and running code inside a captured one.

OpenTelemetry keeps the current :class:`~opentelemetry.context.Context` in a ``ContextVar``
behind ``opentelemetry.context``. On the hot path (``get``, scope entry, span start, log filter)
the bridge reads and sets that variable directly when the runtime context is the default
``ContextVarsRuntimeContext``; with any other runtime it goes through the public API.
"""

from __future__ import annotations

import contextvars
import functools
import inspect
import logging
from collections.abc import Awaitable, Callable, Coroutine, Generator
from contextvars import ContextVar, Token
from types import CoroutineType
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
    "is_coroutine",
    "run_coroutine_in",
    "run_in_snapshot",
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
reset: Callable[[Token[Context]], None]
if _VAR is not None:
    get_current = _VAR.get
    attach = _VAR.set
    reset = _VAR.reset
else:  # pragma: no cover - only with a custom OTEL_PYTHON_CONTEXT runtime
    get_current = otel_context.get_current
    attach = otel_context.attach
    reset = otel_context.detach


def detach(token: Token[Context]) -> None:
    """Restore the context from before ``attach``; a foreign token is logged, never raised."""
    try:
        reset(token)
    except (ValueError, RuntimeError):
        detach_failed()


def detach_failed() -> None:
    """Count and log a detach that failed (the token belongs to another context)."""
    global detach_failures  # noqa: PLW0603 - a process-wide diagnostic counter
    detach_failures += 1
    _logger.warning(
        "otel_ctxbridge: failed to detach a context (entered in another task or thread); "
        "a scope or attached context was left open"
    )


PLAIN_TYPES: frozenset[type] = frozenset(
    {type(None), bool, int, float, str, bytes, dict, list, tuple, set, frozenset}
)
"""Result types that are surely not coroutines: they skip the slower ABC check."""


def is_coroutine(obj: object) -> bool:
    """True for a coroutine: a native one, or any other ``collections.abc.Coroutine`` (made
    by Cython or mypyc, say), whose body runs only when it is awaited."""
    cls = obj.__class__
    return cls is CoroutineType or (cls not in PLAIN_TYPES and isinstance(obj, Coroutine))


def with_entry(ctx: Context, key: str, value: object) -> Context:
    """A copy of ``ctx`` with ``key`` set: one copy instead of ``set_value``'s two."""
    new = Context(ctx)
    dict.__setitem__(new, key, value)
    return new


def call_in(ctx: Context, fn: Callable[..., R], /, *args: Any, **kwargs: Any) -> R:
    """Call ``fn`` with ``ctx`` attached and return its result.

    A coroutine result (``fn`` is a coroutine function, or returns a coroutine) is wrapped
    so that the whole coroutine runs inside ``ctx`` when awaited, not just its creation.
    Other awaitables (futures, tasks, objects with ``__await__``) are returned as they are."""
    token = attach(ctx)
    try:
        result = fn(*args, **kwargs)
    finally:
        try:
            reset(token)
        except (ValueError, RuntimeError):
            detach_failed()
    if result.__class__ is CoroutineType or is_coroutine(result):
        return cast(R, await_in(ctx, cast(Awaitable[R], result)))
    return result


async def await_in(ctx: Context, awaitable: Awaitable[R]) -> R:
    """Await ``awaitable`` with ``ctx`` attached."""
    token = attach(ctx)
    try:
        return await awaitable
    finally:
        detach(token)


def bind_context(fn: Callable[P, R]) -> Callable[P, R]:
    """Wrap ``fn`` so that it runs in a copy of the ``contextvars`` context current now.

    That carries OTel's context (baggage, the current span), every ``AsyncLocalStorage``
    and any other context variable. Each call runs in a fresh copy, so concurrent calls (from
    many threads) never share changes. A coroutine function's whole body runs in the copy;
    so does a coroutine that a plain function returns (``lambda: fetch()``)."""
    captured = contextvars.copy_context()
    if inspect.iscoroutinefunction(fn):

        @functools.wraps(fn)
        async def bound_async(*args: Any, **kwargs: Any) -> Any:
            ctx = captured.copy()
            return await run_coroutine_in(ctx, ctx.run(fn, *args, **kwargs))

        return cast(Callable[P, R], bound_async)

    @functools.wraps(fn)
    def bound(*args: P.args, **kwargs: P.kwargs) -> R:
        return run_in_snapshot(captured, fn, *args, **kwargs)

    return bound


def run_in_snapshot(
    captured: contextvars.Context, fn: Callable[..., R], /, *args: Any, **kwargs: Any
) -> R:
    """Call ``fn`` in a copy of ``captured``; a coroutine result runs wholly in that copy."""
    ctx = captured.copy()
    result = ctx.run(fn, *args, **kwargs)
    if result.__class__ is CoroutineType or is_coroutine(result):
        return cast(R, run_coroutine_in(ctx, cast(Coroutine[Any, Any, Any], result)))
    return result


class _Suspend:
    """Passes a value the inner coroutine yielded (a future) out to the event loop."""

    __slots__ = ("value",)

    def __init__(self, value: object) -> None:
        self.value = value

    def __await__(self) -> Generator[Any, Any, Any]:
        return (yield self.value)


async def run_coroutine_in(ctx: contextvars.Context, coro: Coroutine[Any, Any, R]) -> R:
    """Drive ``coro`` with every step run inside ``ctx`` (``create_task(context=)`` needs
    Python 3.11; this works from 3.10 and keeps the caller's task)."""
    send: Any = None
    error: BaseException | None = None
    while True:
        try:
            yielded = ctx.run(coro.send, send) if error is None else ctx.run(coro.throw, error)
        except StopIteration as stop:
            return cast(R, stop.value)
        try:
            send, error = await _Suspend(yielded), None
        except BaseException as exc:  # cancellation included: thrown into the inner coroutine
            send, error = None, exc
