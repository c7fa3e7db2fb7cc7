"""ContextSpanProcessor on a real SDK TracerProvider with an in-memory exporter."""

from __future__ import annotations

import json
import logging
import threading

import pytest
from opentelemetry import trace
from opentelemetry.exporter.otlp.proto.common.trace_encoder import encode_spans
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from opentelemetry.trace import SpanKind

import otel_ctxbridge as cb
from otel_ctxbridge import _runtime
from otel_ctxbridge.spans import ContextSpanProcessor

SECRET = "alice@example.com"


@pytest.fixture
def traced(bridge: cb.ContextBridge, spans: InMemorySpanExporter) -> InMemorySpanExporter:
    """The shared in-memory provider with the bridge's span processor installed."""
    provider = trace.get_tracer_provider()
    assert isinstance(provider, TracerProvider)
    provider.add_span_processor(ContextSpanProcessor(bridge))
    return spans


def _attributes(exporter: InMemorySpanExporter, name: str) -> dict[str, object]:
    found = [s for s in exporter.get_finished_spans() if s.name == name]
    assert len(found) == 1, [s.name for s in exporter.get_finished_spans()]
    return dict(found[0].attributes or {})


def test_server_internal_and_client_spans_all_carry_the_fields(
    bridge: cb.ContextBridge, traced: InMemorySpanExporter
) -> None:
    """Every span kind started in a scope gets every set field under its prefixed attribute."""
    tracer = trace.get_tracer("test")
    with bridge.scope(request_id="r-1", tenant_id="acme", user_id="u-7"):
        with tracer.start_as_current_span("server", kind=SpanKind.SERVER):
            with tracer.start_as_current_span("work"):
                tracer.start_span("call", kind=SpanKind.CLIENT).end()
    expected = {"app.request_id": "r-1", "app.tenant_id": "acme", "app.user_id": "u-7"}
    for name in ("server", "work", "call"):
        attributes = _attributes(traced, name)
        assert {k: attributes.get(k) for k in expected} == expected, name


def test_only_fields_that_are_set_appear(
    bridge: cb.ContextBridge, traced: InMemorySpanExporter
) -> None:
    """Unset fields add no attribute at all (no placeholder), and outside a scope none do."""
    tracer = trace.get_tracer("test")
    tracer.start_span("outside").end()
    with bridge.scope(request_id="r-2"):
        tracer.start_span("inside").end()
    assert _attributes(traced, "outside") == {}
    assert _attributes(traced, "inside") == {"app.request_id": "r-2"}


def test_an_attribute_the_span_already_has_is_kept(
    bridge: cb.ContextBridge, traced: InMemorySpanExporter
) -> None:
    """An attribute passed to start_span wins over the context's value."""
    tracer = trace.get_tracer("test")
    with bridge.scope(request_id="r-3", tenant_id="acme"):
        tracer.start_span("explicit", attributes={"app.request_id": "mine", "x": 1}).end()
    assert _attributes(traced, "explicit") == {
        "app.request_id": "mine",
        "x": 1,
        "app.tenant_id": "acme",
    }


def test_fields_come_from_the_parent_context_given_to_start_span(
    bridge: cb.ContextBridge, traced: InMemorySpanExporter
) -> None:
    """A span started with an explicit context reads that context, not the current one."""
    tracer = trace.get_tracer("test")
    with bridge.scope(request_id="r-parent"):
        parent_ctx = _runtime.get_current()
    with bridge.scope(request_id="r-current"):
        tracer.start_span("explicit-parent", context=parent_ctx).end()
        tracer.start_span("implicit").end()
    assert _attributes(traced, "explicit-parent")["app.request_id"] == "r-parent"
    assert _attributes(traced, "implicit")["app.request_id"] == "r-current"


def test_nested_scopes_and_span_order(
    bridge: cb.ContextBridge, traced: InMemorySpanExporter
) -> None:
    """A nested scope overlays its fields for spans inside it and restores after."""
    tracer = trace.get_tracer("test")
    with bridge.scope(request_id="r-outer", tenant_id="acme"):
        with bridge.scope(tenant_id="globex"):
            tracer.start_span("nested").end()
        tracer.start_span("after").end()
    assert _attributes(traced, "nested")["app.tenant_id"] == "globex"
    assert _attributes(traced, "after")["app.tenant_id"] == "acme"


def test_a_span_started_before_the_value_is_caught_up(
    bridge: cb.ContextBridge, traced: InMemorySpanExporter
) -> None:
    """Entering a scope and update() stamp the current span, started before the values."""
    tracer = trace.get_tracer("test")
    with tracer.start_as_current_span("early"):
        with bridge.scope(request_id="r-late"):
            bridge.update(user_id="u-late")
    assert _attributes(traced, "early") == {"app.request_id": "r-late", "app.user_id": "u-late"}


def test_a_span_that_has_ended_is_not_changed_by_a_later_stamp(
    bridge: cb.ContextBridge, traced: InMemorySpanExporter
) -> None:
    """A scope entered with an ended span still current (a span ended by hand, or a request's
    server span after its response) leaves the exported span as it was."""
    tracer = trace.get_tracer("test")
    span = tracer.start_span("ended")
    span.end()
    with trace.use_span(span), bridge.scope(request_id="r-after"):
        bridge.update(user_id="u-after")
    assert _attributes(traced, "ended") == {}


def test_the_direct_attribute_write_skips_a_span_ended_in_between(
    spans: InMemorySpanExporter,
) -> None:
    """The fast attribute write checks the end under the span's lock, as the SDK does: a span
    ended after its caller looked (another thread ending it) is not changed under its
    exporter."""
    from otel_ctxbridge._span_write import write_attributes

    span = trace.get_tracer("test").start_span("raced")
    write_attributes(span, {"app.before": "kept"})
    span.end()
    write_attributes(span, {"app.after": "dropped"})
    write_attributes(span, {"app.after": "dropped"}, overwrite=False)
    assert dict(spans.get_finished_spans()[0].attributes or {}) == {"app.before": "kept"}


def test_an_update_made_in_a_worker_thread_reaches_later_spans_of_the_request(
    bridge: cb.ContextBridge, traced: InMemorySpanExporter
) -> None:
    """Within a request frame, update() in another thread is seen by spans started after."""
    tracer = trace.get_tracer("test")
    frame = bridge.new_frame(())
    ctx = bridge.derive(_runtime.get_current(), {"request_id": "r-frame"}, frame=frame)
    token = _runtime.attach(ctx)
    try:
        tracer.start_span("before").end()
        worker = threading.Thread(target=bridge.bind(lambda: bridge.update(user_id="u-thread")))
        worker.start()
        worker.join(5)
        tracer.start_span("after").end()
    finally:
        _runtime.detach(token)
    assert "app.user_id" not in _attributes(traced, "before")
    assert _attributes(traced, "after") == {"app.request_id": "r-frame", "app.user_id": "u-thread"}


def test_concurrent_requests_never_see_each_others_fields(
    bridge: cb.ContextBridge, traced: InMemorySpanExporter
) -> None:
    """Spans started at once from many threads, each in its own scope and nested spans,
    carry their own request's values (the per-context caches are shared by all threads)."""
    tracer = trace.get_tracer("test")
    start = threading.Barrier(8)

    def request(n: int) -> None:
        start.wait(5)
        for i in range(30):
            with bridge.scope(request_id=f"r-{n}", tenant_id=f"t-{n}"):
                with tracer.start_as_current_span(f"{n}/{i}"):
                    tracer.start_span(f"{n}/{i}/child").end()

    workers = [threading.Thread(target=request, args=(n,)) for n in range(8)]
    for worker in workers:
        worker.start()
    for worker in workers:
        worker.join(30)
    finished = traced.get_finished_spans()
    assert len(finished) == 8 * 30 * 2
    for span in finished:
        n = span.name.split("/")[0]
        assert dict(span.attributes or {}) == {
            "app.request_id": f"r-{n}",
            "app.tenant_id": f"t-{n}",
        }


def test_process_local_non_string_values_and_non_scalars(
    traced: InMemorySpanExporter,
) -> None:
    """Process-local scalars of any type are set as they are; other objects are skipped."""
    provider = trace.get_tracer_provider()
    assert isinstance(provider, TracerProvider)
    local = cb.ContextBridge(
        [cb.Field("user_id", propagate=False), cb.Field("session", propagate=False)],
        attribute_prefix="my.",
    )
    provider.add_span_processor(ContextSpanProcessor(local))
    with local.scope(user_id=42, session={"not": "a scalar"}):
        trace.get_tracer("test").start_span("local").end()
    assert _attributes(traced, "local") == {"my.user_id": 42}


@pytest.fixture
def secret_bridge() -> cb.ContextBridge:
    """A bridge whose email field is hashed and whose card field is masked."""
    return cb.ContextBridge(
        [
            cb.Field("request_id"),
            cb.Field("email", redact=True),
            cb.Field("card", redact="mask", propagate=False),
        ]
    )


def test_redacted_fields_never_appear_in_clear_in_exported_spans(
    secret_bridge: cb.ContextBridge, spans: InMemorySpanExporter
) -> None:
    """Neither the OTLP bytes nor the JSON of any exported span holds a redacted value,
    whether set at span start, on scope entry or by update()."""
    provider = trace.get_tracer_provider()
    assert isinstance(provider, TracerProvider)
    provider.add_span_processor(ContextSpanProcessor(secret_bridge))
    tracer = trace.get_tracer("test")
    with tracer.start_as_current_span("stamped-on-entry"):
        with secret_bridge.scope(request_id="r-9", email=SECRET, card="4111111111111111"):
            with tracer.start_as_current_span("started-inside"):
                secret_bridge.update(email="bob@example.com")
    finished = spans.get_finished_spans()
    assert len(finished) == 2
    wire = encode_spans(finished).SerializeToString()
    text = " ".join(s.to_json() for s in finished)
    for clear in (SECRET, "bob@example.com", "4111111111111111"):
        assert clear.encode() not in wire
        assert clear not in text
    inside = dict(next(s for s in finished if s.name == "started-inside").attributes or {})
    assert inside["app.card"] == "****"
    assert str(inside["app.email"]).startswith("sha256:")
    assert json.loads(finished[0].to_json())["attributes"]["app.request_id"] == "r-9"


def test_a_failing_redactor_hides_the_value_and_is_logged_once(
    spans: InMemorySpanExporter, caplog: pytest.LogCaptureFixture
) -> None:
    """A redactor that raises never lets the clear value through, never raises into the
    caller, and is reported once however many spans it fails on."""

    def broken(value: str) -> str:
        raise RuntimeError(value)  # the message would hold the clear value

    bridge = cb.ContextBridge([cb.Field("request_id"), cb.Field("email", redact=broken)])
    provider = trace.get_tracer_provider()
    assert isinstance(provider, TracerProvider)
    provider.add_span_processor(ContextSpanProcessor(bridge))
    tracer = trace.get_tracer("test")
    caplog.set_level(logging.WARNING, logger="otel_ctxbridge")
    with bridge.scope(request_id="r-1", email=SECRET):
        for i in range(3):
            tracer.start_span(f"s{i}").end()
    with bridge.scope(request_id="r-2", email="other@example.com"):
        tracer.start_span("s3").end()
    for span in spans.get_finished_spans():
        assert set(span.attributes or {}) == {"app.request_id"}
    reports = [r for r in caplog.records if "redactor" in r.getMessage()]
    assert len(reports) == 1
    assert SECRET not in caplog.text


def test_the_processor_works_with_span_limits_through_the_public_path(
    bridge: cb.ContextBridge,
) -> None:
    """With attribute limits configured, values go through the SDK's validating setter
    (truncated to the limit) and existing attributes are still kept."""
    from opentelemetry.sdk.trace import SpanLimits

    exporter = InMemorySpanExporter()
    provider = TracerProvider(span_limits=SpanLimits(max_span_attribute_length=4))
    provider.add_span_processor(ContextSpanProcessor(bridge))
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    tracer = provider.get_tracer("test")
    with bridge.scope(request_id="abcdefgh", tenant_id="acme-corp"):
        tracer.start_span("limited", attributes={"app.tenant_id": "keep"}).end()
    provider.shutdown()
    assert dict(exporter.get_finished_spans()[0].attributes or {}) == {
        "app.tenant_id": "keep",
        "app.request_id": "abcd",
    }


def test_baggage_written_around_the_bridge_is_validated(
    spans: InMemorySpanExporter, caplog: pytest.LogCaptureFixture
) -> None:
    """Baggage set with the plain OTel API (or extracted by a raw propagator) is checked
    like inbound data: invalid values and values whose validator raises are dropped,
    counted and logged once, without the value; valid ones are stamped."""
    from opentelemetry import baggage

    def exploding(value: str) -> bool:
        raise ValueError(value)

    bridge = cb.ContextBridge(
        [
            cb.Field("request_id", validator=cb.REQUEST_ID_PATTERN),
            cb.Field("tenant_id", validator=exploding),
            cb.Field("plan"),
        ]
    )
    provider = trace.get_tracer_provider()
    assert isinstance(provider, TracerProvider)
    provider.add_span_processor(ContextSpanProcessor(bridge))
    caplog.set_level(logging.WARNING, logger="otel_ctxbridge")
    ctx = baggage.set_baggage("request_id", "not a valid id\n")
    ctx = baggage.set_baggage("tenant_id", "acme", ctx)
    ctx = baggage.set_baggage("plan", "gold", ctx)
    tracer = trace.get_tracer("test")
    for i in range(3):
        tracer.start_span(f"raw-{i}", context=ctx).end()
        tracer.start_span(f"child-{i}", context=ctx).end()
    for span in spans.get_finished_spans():
        assert dict(span.attributes or {}) == {"app.plan": "gold"}
    assert set(bridge.drop_counts()) == {"request_id", "tenant_id"}
    warnings = [r.getMessage() for r in caplog.records]
    assert len(warnings) == 2
    assert not any("not a valid id" in w or "acme" in w for w in warnings)


def test_processor_lifecycle_methods(bridge: cb.ContextBridge) -> None:
    """force_flush reports success and shutdown is a no-op (nothing is buffered)."""
    processor = ContextSpanProcessor(bridge)
    assert processor.force_flush() is True
    processor.shutdown()


def test_numbers_in_process_local_fields_are_exportable_and_redacted(
    traced: InMemorySpanExporter,
) -> None:
    """An int beyond 64 bits (which OTLP cannot carry, failing the whole batch) is set as
    its text; a redacted field holding a number is hashed, at span start and on scope entry,
    never shown in clear; the spans encode to OTLP."""
    provider = trace.get_tracer_provider()
    assert isinstance(provider, TracerProvider)
    local = cb.ContextBridge(
        [
            cb.Field("big", propagate=False),
            cb.Field("account", propagate=False, redact=True),
        ],
        attribute_prefix="my.",
    )
    provider.add_span_processor(ContextSpanProcessor(local))
    tracer = trace.get_tracer("test")
    with tracer.start_as_current_span("entry"), local.scope(big=2**70, account=123456789):
        tracer.start_span("child").end()
    hashed = local.fields["account"].shown("123456789")
    for name in ("entry", "child"):
        assert _attributes(traced, name) == {"my.big": str(2**70), "my.account": hashed}
    wire = encode_spans(traced.get_finished_spans()).SerializeToString()
    assert b"123456789" not in wire
