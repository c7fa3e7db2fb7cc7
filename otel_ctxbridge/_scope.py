"""The object ``ContextBridge.scope()`` returns: a context manager and a decorator."""

from __future__ import annotations

import functools
import inspect
from collections.abc import Callable, Mapping
from contextvars import Token
from typing import TYPE_CHECKING, Any, TypeVar, cast

from opentelemetry.context import Context

from . import _runtime as rt

if TYPE_CHECKING:
    from types import TracebackType

    from .bridge import ContextBridge

F = TypeVar("F", bound=Callable[..., Any])


def stamp(bridge: ContextBridge, span: object, values: Mapping[str, Any]) -> None:
    """Set the attributes of ``values`` on ``span`` when it is recording. Never raises."""
    if span is None:
        return
    try:
        if not span.is_recording():  # type: ignore[attr-defined] # any Span-like object
            return
        attributes: dict[str, Any] = {}
        for name, value in values.items():
            if isinstance(value, (str, bool, int, float)):
                field = bridge.fields[name]
                attributes[str(field.attribute)] = field.shown(value)
        if attributes:
            span.set_attributes(attributes)  # type: ignore[attr-defined] # any Span-like
    except Exception:  # telemetry never throws on the request path
        rt._logger.debug("otel_ctxbridge: could not stamp a span", exc_info=True)


class Scope:
    """Values set for a block (``with`` / ``async with``) or for each call of a function.

    Entering attaches a context holding the values on top of the current one and stamps the
    current recording span; leaving restores the context from before, also when the body
    raises. One ``Scope`` object is entered once at a time; as a decorator each call gets its
    own scope.
    """

    __slots__ = ("_base", "_bridge", "_derived", "_token", "_values")

    def __init__(
        self,
        bridge: ContextBridge,
        values: Mapping[str, Any],
        base: Context | None = None,
        derived: Context | None = None,
    ) -> None:
        self._bridge = bridge
        self._values = values
        # ``derived`` is ``values`` written over ``base``, computed when the scope was made;
        # reused when the scope is entered in that same context (the usual ``with`` case).
        self._base = base
        self._derived = derived
        self._token: Token[Context] | None = None

    def __enter__(self) -> Scope:
        if self._token is not None:
            raise RuntimeError("this scope is already entered; call bridge.scope() again")
        current = rt.get_current()
        if current is self._base and self._derived is not None:
            ctx = self._derived
        else:
            ctx = self._bridge.derive(current, self._values)
        self._base = self._derived = None
        self._token = rt.attach(ctx)
        if ctx.get(rt.SPAN_KEY) is not None:
            stamp(self._bridge, ctx.get(rt.SPAN_KEY), self._values)
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        token, self._token = self._token, None
        if token is not None:
            rt.detach(token)

    async def __aenter__(self) -> Scope:
        return self.__enter__()

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.__exit__(exc_type, exc, tb)

    @property
    def values(self) -> Mapping[str, Any]:
        """The values this scope sets."""
        return self._values

    def __call__(self, fn: F) -> F:
        """Decorate ``fn`` so that every call runs inside a fresh scope of these values."""
        if inspect.isgeneratorfunction(fn) or inspect.isasyncgenfunction(fn):
            raise TypeError(
                "a scope cannot decorate a generator: its frames run in the consumer's context; "
                "enter the scope inside the generator body instead"
            )
        bridge, values = self._bridge, self._values
        if inspect.iscoroutinefunction(fn):

            @functools.wraps(fn)
            async def async_scoped(*args: Any, **kwargs: Any) -> Any:
                with Scope(bridge, values):
                    return await fn(*args, **kwargs)

            return cast(F, async_scoped)

        @functools.wraps(fn)
        def scoped(*args: Any, **kwargs: Any) -> Any:
            with Scope(bridge, values):
                return fn(*args, **kwargs)

        return cast(F, scoped)
