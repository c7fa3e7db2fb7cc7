"""Shared fixtures: a real OTel SDK with in-memory exporters, and global OTel state reset."""

from __future__ import annotations

from collections.abc import Iterator

import pytest
from opentelemetry import propagate, trace
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from opentelemetry.util._once import Once

import otel_ctxbridge as cb
from otel_ctxbridge import _runtime


def _reset_trace_globals() -> None:
    trace._TRACER_PROVIDER_SET_ONCE = Once()  # type: ignore[attr-defined]
    trace._TRACER_PROVIDER = None  # type: ignore[attr-defined]


def _reset_log_globals() -> None:
    from opentelemetry._logs import _internal as logs_internal

    logs_internal._LOGGER_PROVIDER_SET_ONCE = Once()
    logs_internal._LOGGER_PROVIDER = None


@pytest.fixture(autouse=True)
def reset_otel_globals() -> Iterator[None]:
    """Every test starts and ends with no global providers, the default propagator, and no
    attached context left behind."""
    saved_propagator = propagate.get_global_textmap()
    before = _runtime.get_current()
    _reset_trace_globals()
    _reset_log_globals()
    yield
    propagate.set_global_textmap(saved_propagator)
    _reset_trace_globals()
    _reset_log_globals()
    assert _runtime.get_current() is before, "a test left an OTel context attached"


@pytest.fixture
def bridge() -> cb.ContextBridge:
    """The bridge of the design document: request id, tenant, process-local user."""
    return cb.ContextBridge(
        fields=[
            cb.Field(
                "request_id",
                header="x-request-id",
                generate=cb.new_request_id,
                inbound="always",
                validator=cb.REQUEST_ID_PATTERN,
            ),
            cb.Field("tenant_id", header="x-tenant-id", inbound="trusted"),
            cb.Field("user_id", propagate=False),
        ],
        attribute_prefix="app.",
    )


@pytest.fixture
def spans() -> Iterator[InMemorySpanExporter]:
    """A global SDK TracerProvider exporting synchronously to memory."""
    exporter = InMemorySpanExporter()
    provider = TracerProvider()
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    trace.set_tracer_provider(provider)
    yield exporter
    provider.shutdown()
