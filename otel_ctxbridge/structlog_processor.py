"""A structlog processor merging the bridge's fields and the trace ids into every event.

It needs nothing from structlog itself (a processor is a plain callable); install structlog
with ``pip install otel_ctxbridge[structlog]``. Recipe, JSON lines::

    import structlog
    import otel_ctxbridge as cb

    structlog.configure(
        processors=[
            cb.ContextStructlogProcessor(bridge),       # request_id, tenant_id, ..., trace ids
            structlog.processors.add_log_level,
            structlog.processors.TimeStamper(fmt="iso", key="timestamp"),
            structlog.processors.format_exc_info,       # log.exception(): the traceback
            structlog.processors.JSONRenderer(),
        ],
    )
    structlog.get_logger("app").info("order placed", order="o-1")
    # {"event": "order placed", "order": "o-1", "request_id": "r-1", "tenant_id": "acme",
    #  "trace_id": "4bf9...", "span_id": "00f0...", "level": "info", "timestamp": "..."}

Keys already in the event dict (bound with ``bind()`` or passed to the call) win. Rendered
this way, events bypass stdlib logging and so never reach OTLP. To export them too, hand them
to stdlib logging (``processors=[structlog.stdlib.render_to_log_kwargs]``,
``logger_factory=structlog.stdlib.LoggerFactory()``): they then go through
:class:`~otel_ctxbridge.ContextLogFilter` and ``configure()``'s OTel logging bridge like any
stdlib record, and this processor is not needed.
"""

from __future__ import annotations

from collections.abc import MutableMapping
from typing import TYPE_CHECKING, Any

from . import _runtime as rt
from ._state import MISSING
from .logs import SPAN_ID, TRACE_ID, trace_ids
from .spans import FieldReader

if TYPE_CHECKING:
    from .bridge import ContextBridge

__all__ = ["ContextStructlogProcessor"]

_OMIT: Any = object()


class ContextStructlogProcessor:
    """structlog processor: adds the fields set now (by their ``log_key``) and, inside a
    span, ``trace_id`` and ``span_id`` to the event dict. Never raises.

    Args:
        bridge: the bridge whose fields are added.
        default: value for unset fields; by default unset fields are left out.
        trace_ids: also add ``trace_id``/``span_id`` (hex) of the current span.
    """

    def __init__(
        self, bridge: ContextBridge, *, default: Any = _OMIT, trace_ids: bool = True
    ) -> None:
        self.bridge = bridge
        self._default = default
        self._trace_ids = trace_ids
        self._reader = FieldReader(bridge, self._items)

    def _items(self, values: tuple[Any, ...], ctx: Any) -> tuple[tuple[str, Any], ...]:
        items = [
            (entry.log_key, self._default if value is MISSING else value)
            for entry, value in zip(self._reader.entries, values, strict=True)
            if value is not MISSING or self._default is not _OMIT
        ]
        ids = trace_ids(ctx) if self._trace_ids else None
        if ids is not None:
            items += [(TRACE_ID, ids[0]), (SPAN_ID, ids[1])]
        return tuple(items)

    def __call__(
        self, logger: Any, method_name: str, event_dict: MutableMapping[str, Any]
    ) -> MutableMapping[str, Any]:
        """Merge the fields into ``event_dict`` (existing keys win) and return it."""
        try:
            for key, value in self._reader.get(rt.get_current()):
                event_dict.setdefault(key, value)
        except Exception as exc:  # logging must never fail because of context
            self._reader.warn_once(
                "structlog", "ContextStructlogProcessor failed (%s)", type(exc).__name__
            )
        return event_dict
