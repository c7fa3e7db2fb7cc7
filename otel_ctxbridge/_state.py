"""Where the bridge keeps values inside an OpenTelemetry context, and the frames of scopes.

Propagated fields live in OTel baggage. Process-local values live in a :class:`State` under a
private context key of each bridge; so does a reference to a :class:`Frame`, the one mutable
cell that lets ``update()`` made anywhere in a scope or request (a thread, a task, a nested
span) reach the rest of it.

- A *request frame* (made by the ASGI middleware, or ``bridge.new_frame``) is shared by every
  scope entered inside the request: ``update()`` anywhere in the request reaches all of it.
- Outside a request, each scope is its own unit: its frame is created by the first
  ``update()`` inside it (:func:`frame_of`), is not inherited by nested scopes, and ends with
  the scope. Scopes without updates cost no frame.
"""

from __future__ import annotations

import itertools
import threading
from collections.abc import Mapping
from types import MappingProxyType
from typing import TYPE_CHECKING, Any

from opentelemetry.trace import Span

from ._accel import speedups

MISSING: Any = object()
"""Marks a value that is not set (or removed by an update)."""
EMPTY: Mapping[str, Any] = MappingProxyType({})

CHANGES: list[int] = [0]
"""``CHANGES[0]`` changes (to a new int object) whenever any frame records an update: a
value computed from a context stays valid while it is the same object (see the caches)."""

_generation = itertools.count(1)
_lock = threading.Lock()  # writers only; readers see whole mappings (copy-on-write)
CACHE_LOCK = _lock
"""Held while a frame records an update: a cache keeps an answer only if ``CHANGES`` did not
move while it was computed (checked under this lock)."""


def next_generation() -> int:
    """A process-wide increasing number ordering context writes against frame updates."""
    return next(_generation)


class PyState:
    """The process-local values of a context, its frame and when it was written.

    Immutable, except that a scope's frame is set once, by the first ``update()`` in it.
    (:data:`State` is this class, or its compiled twin when the accelerator is in use.)"""

    __slots__ = ("frame", "generation", "local")

    def __init__(self, local: Mapping[str, object], frame: Frame | None, generation: int) -> None:
        self.local = local
        self.frame = frame
        self.generation = generation


if TYPE_CHECKING:
    State = PyState
else:
    State = speedups.State if speedups is not None else PyState

_STATE_TYPES: frozenset[type] = frozenset(
    (PyState, speedups.State, speedups.ScopeState) if speedups is not None else (PyState,)
)


def state_in(ctx: Mapping[str, object], key: str) -> State | None:
    """The :class:`State` a bridge keeps under ``key`` in ``ctx``, or None.

    None also when something else is there: a snapshot of a context taken inside a ``with``
    block (``dict(ctx)``) and copied with :func:`copy.deepcopy` or :mod:`pickle` holds a plain
    dict there (the copy of the block's state, which is also its baggage dict). Its propagated
    values still read from the baggage; reading never raises on it."""
    state = ctx.get(key)
    return state if type(state) in _STATE_TYPES else None  # type: ignore[return-value] # checked


class Frame:
    """Mutable cell of a request (or scope): the values ``update()`` set, and the spans to
    catch up.

    ``updates`` maps a field name to ``(value, generation)`` (``MISSING`` for a removed
    value). It is replaced, never changed in place, on every :meth:`record`: readers in other
    threads see a consistent mapping without a lock.
    """

    __slots__ = ("spans", "updates")
    shared = True
    """True for a request frame: scopes entered inside the request share it."""

    def __init__(self, spans: tuple[Span, ...] = ()) -> None:
        self.spans = spans
        self.updates: Mapping[str, tuple[object, int]] = EMPTY

    def record(self, values: Mapping[str, object], generation: int) -> None:
        """Remember ``values`` (``MISSING`` removes) as written at ``generation``."""
        with _lock:
            updates = dict(self.updates)
            for name, value in values.items():
                updates[name] = (value, generation)
            self.updates = updates
            CHANGES[0] = CHANGES[0] + 1


class ScopeFrame(Frame):
    """The frame of one scope outside a request: nested scopes do not share it."""

    __slots__ = ()
    shared = False


def child_state(
    parent: State | None, local: Mapping[str, object] | None, frame: Frame | None
) -> State:
    """The state of a context written on top of one holding ``parent``.

    ``local``: the new process-local values (None: ``parent``'s). ``frame``: a request frame
    to start, or the frame an ``update()`` writes in; None keeps ``parent``'s request frame
    (a scope inside a request) or else leaves the new scope without a frame until its first
    update. A state made before any update of its frame has generation 0 (all the frame's
    updates are newer), else a new generation (older updates are not its own)."""
    own = local if local is not None else (parent.local if parent is not None else EMPTY)
    parent_frame = parent.frame if parent is not None else None
    if frame is None:
        if parent_frame is not None and parent_frame.shared:  # a scope inside a request
            return State(own, parent_frame, next_generation())
        return State(own, None, 0)
    if frame.updates or frame is parent_frame:  # a write inside an existing frame
        return State(own, frame, next_generation())
    return State(own, frame, 0)


def pending_values(state: State, values: Mapping[str, Any]) -> Mapping[str, Any]:
    """``values`` over the updates of ``state``'s frame that ``state`` does not hold yet (as
    ``None`` for a removed value): what a context written on top of it starts from."""
    frame = state.frame
    if frame is None or not frame.updates:
        return values
    pending: dict[str, Any] = {
        name: None if value is MISSING else value
        for name, (value, generation) in frame.updates.items()
        if generation > state.generation
    }
    if not pending:
        return values
    pending.update(values)
    return pending


def frame_of(state: State) -> Frame:
    """``state``'s frame; a new :class:`ScopeFrame` when it has none yet (set once, so that
    every context of the scope, in any thread, gets the same one)."""
    frame = state.frame
    if frame is None:
        with _lock:
            frame = state.frame
            if frame is None:
                frame = state.frame = ScopeFrame()
    return frame
