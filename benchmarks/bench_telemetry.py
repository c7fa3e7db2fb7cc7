"""Telemetry hot paths: ContextSpanProcessor per span and ContextLogFilter per log record.

Every candidate and its anchors are timed in the same run, in alternating rounds; an
"overhead" is the time a variant adds over the plain operation measured in that same round.
"""

from __future__ import annotations

import io
import logging
import os
import statistics
from collections.abc import Callable

from opentelemetry import trace
from opentelemetry.instrumentation.logging import LoggingInstrumentor
from opentelemetry.processor.baggage import ALLOW_ALL_BAGGAGE_KEYS, BaggageSpanProcessor
from opentelemetry.sdk.trace import TracerProvider

import otel_ctxbridge as cb
from otel_ctxbridge.logs import ContextLogFilter
from otel_ctxbridge.spans import ContextSpanProcessor

from ._timing import per_call_ns

Row = tuple[str, float, float]
VALUES = {
    "request_id": "5f0c6a6e-8d6b-4a58-9f73-0c2f1d8e6b11",
    "tenant_id": "acme",
    "user_id": "u-42",
}
ROUNDS = 9
VERBOSE = bool(os.environ.get("BENCH_VERBOSE"))


def _bridge() -> cb.ContextBridge:
    return cb.ContextBridge([cb.Field(name) for name in VALUES], attribute_prefix="app.")


def _rounds(variants: dict[str, Callable[[], object]], number: int) -> list[dict[str, float]]:
    """Per round, ns per call of each variant; the variants alternate within every round."""
    rounds = []
    for _ in range(ROUNDS):
        rounds.append({name: per_call_ns(fn, number) for name, fn in variants.items()})
    return rounds


def _overhead_ratio(rounds: list[dict[str, float]], ours: str, theirs: str, base: str) -> float:
    """Median over rounds of (ours - base) / (theirs - base), each round's own baseline."""
    ratios = []
    for r in rounds:
        theirs_cost = r[theirs] - r[base]
        if theirs_cost > 0:
            ratios.append(max(r[ours] - r[base], 0.0) / theirs_cost)
    return statistics.median(ratios) if ratios else float("inf")


def _show(rounds: list[dict[str, float]]) -> None:
    """With BENCH_VERBOSE set, print each variant's median time."""
    if VERBOSE:
        for name in rounds[0]:
            print(f"    {name:<12} {statistics.median(r[name] for r in rounds):9.0f} ns")


def _tracer(*processors: object) -> trace.Tracer:
    provider = TracerProvider()
    for processor in processors:
        provider.add_span_processor(processor)  # type: ignore[arg-type] # SDK processors
    return provider.get_tracer("bench")


def span_rows() -> list[Row]:
    """Per-span overhead of ContextSpanProcessor against BaggageSpanProcessor and by hand."""
    bridge = _bridge()
    plain = _tracer()
    ours = _tracer(ContextSpanProcessor(bridge))
    theirs = _tracer(BaggageSpanProcessor(ALLOW_ALL_BAGGAGE_KEYS))
    attributes = [(f"app.{k}", v) for k, v in VALUES.items()]

    def by_hand() -> None:
        span = plain.start_span("op")
        for key, value in attributes:
            span.set_attribute(key, value)
        span.end()

    with bridge.scope(**VALUES):  # 3 baggage entries, as both processors read them
        rounds = _rounds(
            {
                "plain": lambda: plain.start_span("op").end(),
                "ours": lambda: ours.start_span("op").end(),
                "baggage": lambda: theirs.start_span("op").end(),
                "hand": by_hand,
            },
            number=5_000,
        )
    _show(rounds)
    return [
        (
            "ContextSpanProcessor / BaggageSpanProcessor (per-span overhead)",
            _overhead_ratio(rounds, "ours", "baggage", "plain"),
            0.5,
        ),
        (
            "ContextSpanProcessor / 3 set_attribute by hand (overhead)",
            _overhead_ratio(rounds, "ours", "hand", "plain"),
            1.0,
        ),
    ]


def _logger(name: str, *filters: logging.Filter) -> logging.Logger:
    handler = logging.StreamHandler(io.StringIO())
    handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s %(message)s"))
    for f in filters:
        handler.addFilter(f)
    logger = logging.getLogger(f"otel_ctxbridge.bench.{name}")
    logger.handlers[:] = [handler]
    logger.propagate = False
    logger.setLevel(logging.INFO)
    return logger


def log_rows() -> list[Row]:
    """ContextLogFilter's overhead per record against LoggingInstrumentor's, inside a span."""
    bridge = _bridge()
    plain = _logger("plain")
    ours = _logger("ours", ContextLogFilter(bridge))
    tracer = _tracer()
    instrumentor = LoggingInstrumentor()
    number = 5_000
    rounds: list[dict[str, float]] = []

    def info(logger: logging.Logger) -> Callable[[], None]:
        return lambda: logger.info("order %s", 1)

    with bridge.scope(**VALUES), tracer.start_as_current_span("request"):
        for _ in range(ROUNDS):
            r = {"plain": per_call_ns(info(plain), number), "ours": per_call_ns(info(ours), number)}
            instrumentor.instrument(
                tracer_provider=trace.NoOpTracerProvider(),
                inject_trace_context=True,
                enable_log_auto_instrumentation=False,
            )
            try:
                r["instrumented"] = per_call_ns(info(plain), number)
            finally:
                instrumentor.uninstrument()
            rounds.append(r)
    _show(rounds)
    return [
        (
            "ContextLogFilter / LoggingInstrumentor (in-span overhead)",
            _overhead_ratio(rounds, "ours", "instrumented", "plain"),
            0.35,
        ),
    ]


def run() -> list[Row]:
    """All telemetry rows: (name, measured ratio, target)."""
    return span_rows() + log_rows()


if __name__ == "__main__":
    for row in run():
        print(f"{row[0]:<66} {row[1]:6.2f} <= {row[2]:.2f}")
