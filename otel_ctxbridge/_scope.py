"""The object ``ContextBridge.scope()`` returns: a context manager and a decorator."""

from __future__ import annotations

import functools
import inspect
import threading
from collections.abc import Callable, Mapping
from contextvars import Token
from inspect import Parameter, Signature
from types import MethodType
from typing import TYPE_CHECKING, Any, TypeVar, cast

from opentelemetry.attributes import BoundedAttributes
from opentelemetry.context import Context
from opentelemetry.sdk.trace import _Span as SDKSpan  # the class of the SDK's spans

from . import _runtime as rt
from ._accel import speedups
from ._derive import derive_context, derive_in_python
from ._span_write import write_attributes
from ._state import EMPTY, MISSING, child_state
from .fields import attribute_value
from .limits import MAX_MEMBER_BYTES, may_exceed_limits

_stamp_plain = speedups.stamp_plain if speedups is not None else None
"""The compiled common case of :func:`stamp_recording` (True), else NotImplemented."""

if TYPE_CHECKING:
    from types import TracebackType

    from .bridge import ContextBridge

F = TypeVar("F", bound=Callable[..., Any])
S = TypeVar("S", bound="PyScopeCore")


def span_attributes(bridge: ContextBridge, values: Mapping[str, Any]) -> dict[str, Any]:
    """The span attributes of ``values``: each set field under its attribute name, shown as the
    field says (redacted); objects that are not attribute values, and values whose redactor
    raises, are left out."""
    attributes: dict[str, Any] = {}
    plain = bridge._plain_attributes
    for name, value in values.items():
        if value is None:
            continue
        if value.__class__ is str and name in plain:  # plain text: shown as it is
            attributes[plain[name]] = value
            continue
        field = bridge.fields[name]
        try:
            shown = attribute_value(field.shown(value))
        except Exception:  # a user redactor that raises: the value is hidden, never shown
            rt._logger.debug("otel_ctxbridge: redacting %r raised", name, exc_info=True)
            continue
        if shown is not None:
            attributes[str(field.attribute)] = shown
    return attributes


def stamp(bridge: ContextBridge, span: object, values: Mapping[str, Any]) -> None:
    """Set the attributes of ``values`` on ``span`` when it is recording. Never raises.

    Values are shown as the fields say (redacted); objects that are not attribute values
    (a connection, a dict) are left out, and an unset (None) value leaves the span as it is."""
    if span is None:
        return
    try:
        if span.is_recording():  # type: ignore[attr-defined] # any Span-like object
            stamp_recording(bridge, span, values)
    except Exception:  # telemetry never throws on the request path
        rt._logger.debug("otel_ctxbridge: could not stamp a span", exc_info=True)


def stamp_recording(bridge: ContextBridge, span: object, values: Mapping[str, Any]) -> None:
    """:func:`stamp` for a span known to be recording (may raise). Plain text of fields shown
    as they are goes in one compiled call; anything else through :func:`span_attributes`."""
    if _stamp_plain is None or _stamp_plain(span, bridge._plain_attributes, values) is not True:
        attributes = span_attributes(bridge, values)
        if attributes:
            write_attributes(span, attributes)


def entered(bridge: ContextBridge, ctx: Context, values: Mapping[str, Any]) -> Context:
    """The context of a new scope of ``values`` on top of ``ctx`` (validated; see
    ``bridge.derive``), after stamping the current recording span with the values."""
    new = bridge.derive(ctx, values)
    stamp(bridge, ctx.get(rt.SPAN_KEY), values)
    return new


class PyScopeCore:
    """Entering and leaving a scope, in Python: the reference for the compiled
    ``_speedups.ScopeCore``, and what runs where that is not built (see :data:`ScopeCore`).

    It keeps a ContextVar token. The compiled core does too, except in a ``with`` block, whose
    way back it keeps in the scope's baggage dict (``_speedups_scope_state.h``): the same
    behaviour (``tests/test_scope_exit.py``) with fewer objects alive while the block runs."""

    __slots__ = ("_bridge", "_token", "_values")

    def __init__(self, bridge: ContextBridge, values: Mapping[str, Any]) -> None:
        self._bridge = bridge
        self._values: Mapping[str, Any] | None = values
        self._token: Token[Context] | None = None

    def __enter__(self: S) -> S:
        if self._token is not None:
            raise RuntimeError("this scope is already entered; call bridge.scope() again")
        values = self._values
        if values is None:
            raise RuntimeError("a scope is entered once; call bridge.scope() again")
        ctx = derive_context(self._bridge, rt.get_current(), values)
        self._token = token = rt.attach(ctx)
        self._values = None  # an in-flight request keeps only the token alive
        span = ctx.get(rt.SPAN_KEY)
        if span is not None:
            try:
                stamp(self._bridge, span, values)
            except BaseException:  # stamp() never raises Exception: an interrupt, say
                self._token = None  # the scope is not entered: leave nothing attached
                rt.detach(token)
                raise
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        token, self._token = self._token, None
        if token is not None:
            try:
                rt.reset(token)
            except (ValueError, RuntimeError):
                rt.detach_failed()


def _configured() -> Any:
    """The compiled module, told what it works with; None when it is not in use (not
    built, switched off, or refusing this OpenTelemetry: then a warning says so)."""
    if speedups is None:
        return None
    try:
        speedups.configure(
            var=rt._VAR,
            context_type=Context,
            baggage_key=rt.BAGGAGE_KEY,
            span_key=rt.SPAN_KEY,
            derive=derive_in_python,  # the compiled enter has tried its own fast path
            stamp=stamp,
            detach_failed=rt.detach_failed,
            child_state=child_state,
            empty=EMPTY,
            may_exceed_limits=may_exceed_limits,
            member_limit=MAX_MEMBER_BYTES,
            bounded_type=BoundedAttributes,
            span_type=SDKSpan,  # its writes may skip free locks under the GIL (_speedups.c)
            lock_type=type(threading.Lock()),
            # What inspect.signature() shows of the compiled bridge.scope and bridge.get:
            scope_signature=Signature([Parameter("values", Parameter.VAR_KEYWORD)]),
            get_signature=Signature(
                [
                    Parameter("name", Parameter.POSITIONAL_OR_KEYWORD, annotation="str"),
                    Parameter("default", Parameter.POSITIONAL_OR_KEYWORD, default=None),
                ]
            ),
        )
    except Exception as exc:  # an OpenTelemetry change the compiled code does not accept
        rt._logger.warning(
            "otel_ctxbridge: the compiled accelerator is not used (%s); running on the "
            "pure-Python code",
            exc,
        )
        return None
    return speedups


_compiled = _configured()

if TYPE_CHECKING:
    ScopeCore = PyScopeCore
else:
    ScopeCore = _compiled.ScopeCore if _compiled is not None else PyScopeCore
"""What entering and leaving a scope runs on: the compiled core when it is available."""


class Scope(ScopeCore):
    """Values set for a block (``with`` / ``async with``) or for each call of a function.

    Entering attaches a context holding the values on top of the current one and stamps the
    current recording span; leaving restores the context from before, also when the body
    raises, and with it every ``update()`` made inside. A ``Scope`` object is entered once;
    as a decorator each call gets its own scope. Leave it in the task or thread that entered
    it: leaving it elsewhere cannot restore that context (the failure is logged and counted
    in ``otel_ctxbridge._runtime.detach_failures``, which the pytest leak detector checks).
    """

    __slots__ = ()

    async def __aenter__(self) -> Scope:
        return self.__enter__()

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.__exit__(exc_type, exc, tb)

    def __call__(self, fn: F) -> F:
        """Decorate ``fn`` so that every call runs inside a fresh scope of these values."""
        if inspect.isgeneratorfunction(fn) or inspect.isasyncgenfunction(fn):
            raise TypeError(
                "a scope cannot decorate a generator: its frames run in the consumer's context; "
                "enter the scope inside the generator body instead"
            )
        bridge, values = self._bridge, self._values
        if values is None:
            raise RuntimeError("this scope was already entered; call bridge.scope() again")
        bridge.derive(rt.get_current(), values)  # bad values fail at decoration, not per call
        if inspect.iscoroutinefunction(fn):

            @functools.wraps(fn)
            async def async_scoped(*args: Any, **kwargs: Any) -> Any:
                with bridge.scope(**values):
                    return await fn(*args, **kwargs)

            return cast(F, async_scoped)

        @functools.wraps(fn)
        def scoped(*args: Any, **kwargs: Any) -> Any:
            with bridge.scope(**values):
                return fn(*args, **kwargs)

        return cast(F, scoped)


def use_compiled(bridge: ContextBridge, base: type[ContextBridge]) -> None:
    """Give ``bridge`` the compiled ``scope`` and ``get`` when the accelerator is in use:
    the same behaviour in one C call (``get`` answers cached reads and calls ``base.get``
    for the rest). Each checks, cheaply, that the bridge's class still has ``base``'s
    method, and calls the class's own otherwise: a subclass's ``scope`` or ``get``, or one
    patched onto the class (``mock.patch.object(ContextBridge, "get")``), is honoured."""
    if _compiled is None:
        return
    attributes = bridge.__dict__
    scope: Callable[..., Any] = base.__dict__["scope"]
    get: Callable[..., Any] = base.__dict__["get"]
    if getattr(type(bridge), "scope", None) is scope:
        attributes["scope"] = _compiled.ScopeMaker(bridge, Scope, scope)
    if getattr(type(bridge), "get", None) is get:
        python_get = MethodType(get, bridge)
        attributes["get"] = _compiled.FieldGetter(bridge, attributes, MISSING, python_get, get)
