"""A W3C Baggage propagator that reads and writes baggage exactly as the specification says.

Install it in place of OpenTelemetry's ``W3CBaggagePropagator`` (``configure()`` does) so that
every OTel instrumentation (httpx, requests, ...) injects values that W3C parsers and OTel
Python both read back unchanged, and extracts properties as metadata rather than as part of
the value.
"""

from __future__ import annotations

import logging

from opentelemetry.context import Context
from opentelemetry.propagators.composite import CompositePropagator
from opentelemetry.propagators.textmap import (
    CarrierT,
    Getter,
    Setter,
    TextMapPropagator,
    default_getter,
    default_setter,
)
from opentelemetry.trace.propagation.tracecontext import TraceContextTextMapPropagator

from . import _runtime as rt
from .limits import format_baggage, parse_baggage

__all__ = ["BaggagePropagator", "default_propagator"]

_logger = logging.getLogger("otel_ctxbridge")
_HEADER = "baggage"


class BaggagePropagator(TextMapPropagator):
    """W3C Baggage: percent-encoded UTF-8 values, ``+`` literal, properties as metadata."""

    def extract(
        self,
        carrier: CarrierT,
        context: Context | None = None,
        getter: Getter[CarrierT] = default_getter,
    ) -> Context:
        """Add the carrier's baggage members to ``context``; malformed members are dropped."""
        ctx = rt.get_current() if context is None else context
        try:
            headers = getter.get(carrier, _HEADER)
            if not headers:
                return ctx
            members, dropped = parse_baggage(list(headers))
        except Exception:  # telemetry never throws on the request path
            _logger.warning("otel_ctxbridge: unreadable baggage header dropped")
            return ctx
        if dropped:
            _logger.debug(
                "otel_ctxbridge: dropped %d baggage members (malformed or past the limits)",
                dropped,
            )
        if not members:
            return ctx
        bag: dict[str, object] = dict(ctx.get(rt.BAGGAGE_KEY) or {})  # type: ignore[call-overload]
        bag.update(members)
        return rt.with_entry(ctx, rt.BAGGAGE_KEY, bag)

    def inject(
        self,
        carrier: CarrierT,
        context: Context | None = None,
        setter: Setter[CarrierT] = default_setter,
    ) -> None:
        """Write the context's baggage as one ``baggage`` header (none when it is empty)."""
        ctx = rt.get_current() if context is None else context
        bag = ctx.get(rt.BAGGAGE_KEY)
        if not bag or not isinstance(bag, dict):
            return
        header = format_baggage(bag)
        if header:
            setter.set(carrier, _HEADER, header)

    @property
    def fields(self) -> set[str]:
        """The header this propagator writes."""
        return {_HEADER}


def default_propagator() -> TextMapPropagator:
    """W3C Trace Context plus :class:`BaggagePropagator`, for ``set_global_textmap``."""
    return CompositePropagator([TraceContextTextMapPropagator(), BaggagePropagator()])
