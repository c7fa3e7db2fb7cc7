"""Where the bridge keeps values inside an OpenTelemetry context, and the per-request frame.

Propagated fields live in OTel baggage. Process-local values live in a :class:`State` under a
private context key of each bridge; so does a reference to the request's :class:`Frame`, the one
mutable cell that lets ``update()`` made anywhere in a request (a thread, a nested span) reach
the rest of that request.
"""

from __future__ import annotations

import itertools
import threading
from collections.abc import Mapping
from types import MappingProxyType
from typing import Any

from opentelemetry.trace import Span

MISSING: Any = object()
"""Marks a value that is not set (or removed by an update)."""
EMPTY: Mapping[str, object] = MappingProxyType({})

_generation = itertools.count(1)


def next_generation() -> int:
    """A process-wide increasing number ordering context writes against frame updates."""
    return next(_generation)


class State:
    """Immutable: the process-local values of a context, its frame and when it was written."""

    __slots__ = ("frame", "generation", "local")

    def __init__(self, local: Mapping[str, object], frame: Frame | None, generation: int) -> None:
        self.local = local
        self.frame = frame
        self.generation = generation


class Frame:
    """Mutable per-request cell: the values ``update()`` set and the spans to catch up."""

    __slots__ = ("_lock", "spans", "updates")

    def __init__(self, spans: tuple[Span, ...] = ()) -> None:
        self.updates: dict[str, tuple[object, int]] = {}
        self.spans = spans
        self._lock = threading.Lock()

    def record(self, values: Mapping[str, object], generation: int) -> None:
        """Remember ``values`` (``MISSING`` removes) as written at ``generation``."""
        with self._lock:
            for name, value in values.items():
                self.updates[name] = (value, generation)
