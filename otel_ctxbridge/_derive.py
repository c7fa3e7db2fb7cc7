"""Writing field values into a copy of an OpenTelemetry context: the hot path of entering a
scope, of ``update()`` and of each request."""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import TYPE_CHECKING, Any

from opentelemetry.context import Context

from ._accel import speedups
from ._runtime import BAGGAGE_KEY as _BAGGAGE
from ._state import EMPTY, Frame, State, child_state, pending_values, state_in
from .errors import ContextValueError, UnknownFieldError
from .limits import MAX_MEMBER_BYTES, check_written, may_exceed_limits

if TYPE_CHECKING:
    from .bridge import ContextBridge

__all__ = ["derive_context", "derive_in_python"]

_compiled: Callable[..., Context | None] | None = speedups.derive if speedups is not None else None


def derive_context(
    bridge: ContextBridge, ctx: Context, values: Mapping[str, Any], frame: Frame | None = None
) -> Context:
    """``bridge.derive``: a copy of ``ctx`` with ``values`` written (``None`` unsets),
    validated; see :meth:`~otel_ctxbridge.ContextBridge.derive`. The compiled accelerator
    does the common case (plain valid text of propagated fields); the rest is Python."""
    if _compiled is not None:
        new = _compiled(bridge._key, bridge._plans, ctx, values, frame)
        if new is not None:
            return new
    return derive_in_python(bridge, ctx, values, frame)


def derive_in_python(  # noqa: PLR0912, PLR0915 - one loop over the values, kept inlined
    bridge: ContextBridge, ctx: Context, values: Mapping[str, Any], frame: Frame | None = None
) -> Context:
    """:func:`derive_context` in Python: every case, and the reference for the compiled one."""
    state = state_in(ctx, bridge._key)
    if state is not None and state.frame is not None and state.frame.updates:
        values = pending_values(state, values)
    bag: dict[str, object] | None = None
    local: dict[str, object] | None = None
    plans = bridge._plans
    chars = 0  # characters written to baggage, for the cheap limits bound
    for name, value in values.items():
        plan = plans.get(name)
        if plan is None:
            raise UnknownFieldError(f"no field named {name!r} (declared: {', '.join(plans)})")
        key, max_length, quick_check = plan
        if value is not None:
            if value.__class__ is str and quick_check is True:
                if (
                    len(value) > max_length
                    or not value.isprintable()
                    or (key is not None and value and (value[0] == " " or value[-1] == " "))
                ):
                    raise ContextValueError(name, str(bridge.fields[name].problem(value)))
            else:
                problem = bridge.fields[name].problem(value)
                if problem is not None:
                    raise ContextValueError(name, problem)
        if key is None:
            if local is None:
                local = dict(state.local) if state is not None else {}
            target = local
            key = name
        else:
            if bag is None:
                old: Any = ctx.get(_BAGGAGE)
                if old:
                    bag = dict(old)
                    chars = -1  # unknown: measure the whole bag below
                else:
                    bag = {}
            target = bag
            if chars >= 0 and value is not None:
                chars += len(value) + len(key) + 2
        if value is None:
            target.pop(key, None)
        else:
            target[key] = value
    unsure = bag is not None and (chars < 0 or 12 * chars > MAX_MEMBER_BYTES)
    if unsure and may_exceed_limits(bag):  # type: ignore[arg-type] # unsure => bag set
        check_written(bag, values, bridge._where)  # type: ignore[arg-type] # unsure => bag
    new = Context(ctx)
    if bag is not None:
        dict.__setitem__(new, _BAGGAGE, bag)
    if frame is None and (state is None or state.frame is None):  # child_state, inlined
        own = local if local is not None else (state.local if state is not None else EMPTY)
        dict.__setitem__(new, bridge._key, State(own, None, 0))
    else:
        dict.__setitem__(new, bridge._key, child_state(state, local, frame))
    return new
