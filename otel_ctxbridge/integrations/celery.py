"""Celery: the request's context published with each task and restored around it on the worker.

``pip install otel_ctxbridge[celery]``::

    from otel_ctxbridge.integrations.celery import instrument_celery

    app = Celery("orders", broker="amqp://...")
    instrument_celery(bridge, app, trusted=True)  # where publishers and workers both import it

Publishing (``before_task_publish``) writes ``traceparent`` and ``baggage`` from the current
context into the task message headers; process-local fields stay behind. On the worker,
``task_prerun`` continues from those headers and ``task_postrun`` restores the worker's
context, for every pool (solo, prefork, threads). The worker takes each field only as its
``inbound`` policy allows: ``"always"`` fields from any message, ``"trusted"`` ones only with
``trusted=True`` (your broker carries only your own services' messages). Invalid or oversized
values are dropped, counted and logged without the value, and the task runs anyway; with
``generate`` (the default) a task that arrives without a request id gets a fresh one.

Composes with other instrumentations that attach a context around tasks, such as
``opentelemetry-instrumentation-celery``: when their handlers run first (set them up before
this one), their task span stays the parent of the task's spans and gets the fields as
attributes, and the worker thread's context is restored whichever postrun handler runs last.
The baggage such an instrumentation extracted as it came is held to the same rules: with
``trusted=False`` none of its undeclared members is forwarded, and a field value a span
processor copied from it onto the task span is removed unless the worker took it.
"""

from __future__ import annotations

import logging
import threading
import uuid
import weakref
from contextvars import Token
from typing import Any

from otel_ctxbridge.errors import requires_extra

with requires_extra("celery", "otel_ctxbridge.integrations.celery"):
    from celery import Celery, signals  # type: ignore[import-untyped] # celery ships no types
from opentelemetry import trace
from opentelemetry.context import Context, create_key

from otel_ctxbridge import _runtime as rt
from otel_ctxbridge._entry import forget_copied
from otel_ctxbridge._scope import stamp
from otel_ctxbridge.bridge import ContextBridge
from otel_ctxbridge.carriers import context_from
from otel_ctxbridge.limits import parse_baggage

__all__ = ["CeleryInstrumentation", "instrument_celery"]

_logger = logging.getLogger("otel_ctxbridge")
_TOKEN = "_otel_ctxbridge_token"
_MARK = create_key("otel_ctxbridge.celery_task")
"""Context entry telling the context this module attached for a task (and those derived from
it, by ``update()`` or spans in the task) from one another instrumentation put back."""
_CARRIED = ("traceparent", "tracestate", "baggage")


class CeleryInstrumentation:
    """The signal handlers :func:`instrument_celery` connected; ``uninstrument()`` removes them."""

    def __init__(
        self, bridge: ContextBridge, app: Celery | None, *, trusted: bool, generate: bool
    ) -> None:
        self.bridge = bridge
        """The bridge whose fields travel with tasks."""
        self.app = app
        """The app whose tasks are restored on the worker (None: every app)."""
        self.trusted = trusted
        """Whether ``inbound="trusted"`` fields are taken from task messages."""
        self.generate = generate
        """Whether missing generate-able fields (the request id) get a fresh value."""
        self._told_untrusted = trusted  # said once that trusted fields were left out
        self._last_checked = False  # checked once that our handlers run after the others'
        self._order_lock = threading.Lock()
        trusted_headers = [f.header for f in bridge.fields.values() if f.inbound == "trusted"]
        self._untrusted_keys = ("baggage", *(h for h in trusted_headers if h))
        self._uid = f"otel_ctxbridge-{uuid.uuid4()}"
        self._keys = tuple(
            dict.fromkeys((*_CARRIED, *(f.header for f in bridge.fields.values() if f.header)))
        )
        signals.before_task_publish.connect(self._publish, weak=False, dispatch_uid=self._uid)
        signals.task_prerun.connect(self._prerun, weak=False, dispatch_uid=self._uid)
        signals.task_postrun.connect(self._postrun, weak=False, dispatch_uid=self._uid)

    def uninstrument(self) -> None:
        """Disconnect the handlers; tasks running now still restore their context."""
        signals.before_task_publish.disconnect(self._publish, dispatch_uid=self._uid)
        signals.task_prerun.disconnect(self._prerun, dispatch_uid=self._uid)
        signals.task_postrun.disconnect(self._postrun, dispatch_uid=self._uid)

    # -- publisher -------------------------------------------------------------------------

    def _publish(self, sender: Any = None, headers: Any = None, **_: Any) -> None:
        if not isinstance(headers, dict):  # task protocol 1 (Celery 3) keeps no headers
            return
        try:
            self.bridge.inject(headers)
        except Exception:  # publishing never fails because of telemetry
            _logger.warning("otel_ctxbridge: could not add context to a task message")

    # -- worker ----------------------------------------------------------------------------

    def _prerun(self, sender: Any = None, task: Any = None, **_: Any) -> None:
        if task is None or (self.app is not None and getattr(task, "app", None) is not self.app):
            return
        request = getattr(task, "request", None)
        if request is None or getattr(request, "is_eager", False):
            return  # an eager task already runs in its caller's context
        try:
            base = rt.get_current()
            span = trace.get_current_span(base)
            inbound: Any = None
            if not span.get_span_context().is_valid:
                base = Context()  # start clean: nothing an earlier task left behind
            else:  # another instrumentation's task span, on the baggage it extracted as it came
                inbound = base.get(rt.BAGGAGE_KEY)
                if inbound and not self.trusted:  # an untrusted producer forwards nothing
                    base = rt.with_entry(base, rt.BAGGAGE_KEY, {})
            carrier = self._carrier(request)
            moved = not self._last_checked and self._keep_last()
            if not self.trusted:  # nothing the producer may not set, for the task or another
                self._forget(request, self._untrusted_keys)  # handler after ours
            elif moved:  # OTel's handler still runs after ours for this task: nothing unchecked
                self._forget(request, ("baggage",))
            if not self._told_untrusted:
                self._tell_if_trusted_fields_left_out(carrier)
            ctx = context_from(
                self.bridge,
                carrier,
                trusted=self.trusted,
                generate=self.generate,
                base=base,
            )
            mark = object()
            setattr(request, _TOKEN, (rt.attach(rt.with_entry(ctx, _MARK, mark)), mark))
            if span.get_span_context().is_valid:
                values = self.bridge.values_in(ctx)
                stamp(self.bridge, span, values)
                if inbound:  # what a span processor copied from that baggage, unless taken
                    forget_copied(self.bridge, span, dict(values), inbound)
        except Exception:  # a task never fails because of telemetry
            _logger.warning("otel_ctxbridge: could not restore a task's context", exc_info=True)

    def _carrier(self, request: Any) -> dict[str, Any]:
        """The carried keys, from the message headers Celery exposes on ``task.request``
        (as attributes, and under ``headers`` for some transports and protocols)."""
        nested = getattr(request, "headers", None)
        carrier: dict[str, Any] = {}
        for key in self._keys:
            value = getattr(request, key, None)
            if value is None and isinstance(nested, dict):
                value = nested.get(key)
            if value is not None:
                carrier[key] = value
        return carrier

    @staticmethod
    def _forget(request: Any, keys: tuple[str, ...]) -> None:
        """Remove ``keys`` from ``request`` once read: an untrusted producer's ``baggage`` and
        trusted fields' headers (the task, or a ``task_prerun`` handler after ours such as
        OpenTelemetry's Celery instrumentation set up later, would otherwise read them
        unchecked)."""
        nested = getattr(request, "headers", None)
        for key in keys:
            if getattr(request, key, None) is not None:
                setattr(request, key, None)
            if isinstance(nested, dict):
                nested.pop(key, None)

    def _keep_last(self) -> bool:
        """Our handlers must run after an instrumentation's that attaches a context around
        tasks: when OpenTelemetry's (any ``opentelemetry.instrumentation`` module's) was
        connected after ours (set up after ``instrument_celery``), move ours to the end, once,
        in place under the signals' locks, and say so. The task running now already had the
        other's context attached over ours. Plain handlers connected later keep their place.
        True when ours moved (the other's handler still runs after ours for this task)."""
        with self._order_lock:
            if self._last_checked:
                return False
            self._last_checked = True
            if not _instrumentation_after(signals.task_prerun, self._uid):
                return False
            for signal in (signals.task_prerun, signals.task_postrun):
                _move_last(signal, self._uid)
        _logger.warning(
            "otel_ctxbridge: an instrumentation's task_prerun handler was connected after "
            "instrument_celery's (OpenTelemetry's Celery instrumentation set up later?) and "
            "replaced the task's context; otel_ctxbridge's handlers now run last. Call "
            "instrument_celery() after it (e.g. in the same worker_process_init handler)"
        )
        return True

    def _tell_if_trusted_fields_left_out(self, carrier: dict[str, Any]) -> None:
        """Once: a message carried ``inbound="trusted"`` fields, which a worker instrumented
        with ``trusted=False`` does not take (a tenant the task then lacks). Names only."""
        raw = carrier.get("baggage")
        texts = [raw] if isinstance(raw, str) else [t for t in raw or () if isinstance(t, str)]
        members = parse_baggage(texts)[0] if texts else {}
        left_out = [
            name
            for name, field in self.bridge.fields.items()
            if field.inbound == "trusted"
            and (
                (field.header is not None and carrier.get(field.header) is not None)
                or (field.propagate and str(field.baggage_key) in members)
            )
        ]
        if left_out:
            self._told_untrusted = True
            _logger.warning(
                "otel_ctxbridge: task messages carry %s (inbound='trusted'), which "
                "instrument_celery(trusted=False) leaves out; pass trusted=True if only your "
                "own services can publish to this broker",
                ", ".join(left_out),
            )

    def _postrun(self, sender: Any = None, task: Any = None, **_: Any) -> None:
        request = getattr(task, "request", None)
        held: tuple[Token[Context], object] | None = getattr(request, _TOKEN, None)
        if held is None:
            return
        try:
            delattr(request, _TOKEN)
        except AttributeError:  # pragma: no cover - removed concurrently; nothing to restore
            return
        token, mark = held
        if rt.get_current().get(_MARK) is mark:
            rt.detach(token)
        # else an instrumentation whose prerun ran before ours has already put back what the
        # thread held before the task; resetting to what it attached would leak its context.


def _receiver_module(receiver: Any) -> str:
    target = receiver() if isinstance(receiver, weakref.ReferenceType) else receiver
    return str(getattr(target, "__module__", "") or "")


def _instrumentation_after(signal: Any, uid: str) -> bool:
    """True when a receiver of an ``opentelemetry.instrumentation`` module follows ours."""
    receivers = list(getattr(signal, "receivers", None) or ())
    keys = [key[0] for key, _ in receivers]
    if uid not in keys:
        return False
    later = receivers[keys.index(uid) + 1 :]
    return any(_receiver_module(r).startswith("opentelemetry.instrumentation") for _, r in later)


def _move_last(signal: Any, uid: str) -> None:
    """Move our receiver to the end of ``signal``'s, in place, under its lock (a send running
    now on another thread sees the list before or after, never without ours)."""
    with signal.lock:
        receivers = signal.receivers
        for index, (key, _) in enumerate(receivers):
            if key[0] == uid:
                receivers.append(receivers.pop(index))
                break
        signal.sender_receivers_cache.clear()


def instrument_celery(
    bridge: ContextBridge,
    app: Celery | None = None,
    *,
    trusted: bool = False,
    generate: bool = True,
) -> CeleryInstrumentation:
    """Publish the current context with every task and restore it around the task on the
    worker (tasks of ``app`` only, or of every app when None).

    ``trusted=True`` also takes ``inbound="trusted"`` fields (a tenant) from messages: use it
    when only your own services can publish to the broker. Call it where both the publishing
    code and the worker import it (the module that creates the app). Returns a handle whose
    ``uninstrument()`` disconnects the signal handlers.
    """
    return CeleryInstrumentation(bridge, app, trusted=trusted, generate=generate)
