"""The store API: scope, get, current, require, update, run, bind — sync, async and threads."""

from __future__ import annotations

import asyncio
import email.message
import logging
import random
import threading
from collections.abc import Coroutine
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import pytest
from opentelemetry import baggage, trace
from opentelemetry.propagators.textmap import Setter
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

import otel_ctxbridge as cb
from otel_ctxbridge import _runtime as rt
from tests._coroutines import NonNativeCoroutine


def test_scope_sets_and_restores_values(bridge: cb.ContextBridge) -> None:
    """Inside a scope get/current/require see the values; outside they are gone."""
    assert bridge.get("request_id") is None
    assert bridge.get("request_id", "none") == "none"
    with bridge.scope(request_id="r-1", tenant_id="acme", user_id="u-1"):
        assert bridge.get("request_id") == "r-1"
        assert bridge.require("tenant_id") == "acme"
        assert dict(bridge.current()) == {
            "request_id": "r-1",
            "tenant_id": "acme",
            "user_id": "u-1",
        }
    assert dict(bridge.current()) == {}
    with pytest.raises(cb.MissingContextError, match="tenant_id"):
        bridge.require("tenant_id")


def test_propagated_fields_are_otel_baggage_and_local_fields_are_not(
    bridge: cb.ContextBridge,
) -> None:
    """Propagated values are readable with the plain OTel baggage API; process-local are not."""
    with bridge.scope(request_id="r-1", user_id="u-1"):
        assert baggage.get_baggage("request_id") == "r-1"
        assert baggage.get_baggage("user_id") is None
        assert "user_id" not in str(bridge.inject({}))


def test_current_is_read_only(bridge: cb.ContextBridge) -> None:
    """current() is a read-only mapping."""
    with bridge.scope(request_id="r-1"):
        view = bridge.current()
        with pytest.raises(TypeError):
            view["request_id"] = "x"  # type: ignore[index]


def test_nested_scopes_overlay_and_restore_even_when_raising(bridge: cb.ContextBridge) -> None:
    """An inner scope overrides some fields, keeps the others, and restores on exceptions."""
    with bridge.scope(request_id="outer", tenant_id="acme"):
        with pytest.raises(RuntimeError), bridge.scope(request_id="inner"):
            assert dict(bridge.current()) == {"request_id": "inner", "tenant_id": "acme"}
            raise RuntimeError("boom")
        assert bridge.get("request_id") == "outer"
        with bridge.scope(tenant_id=None):
            assert bridge.get("tenant_id") is None
        assert bridge.get("tenant_id") == "acme"
    assert bridge.get("request_id") is None


def test_unknown_field_and_bad_values_raise_at_write_time(bridge: cb.ContextBridge) -> None:
    """Undeclared names and invalid values raise when the scope is entered, naming the field."""
    with pytest.raises(cb.UnknownFieldError, match="nope"), bridge.scope(nope="x"):
        pass
    with pytest.raises(cb.UnknownFieldError):
        bridge.get("nope")
    with pytest.raises(cb.ContextValueError, match="tenant_id") as info:
        with bridge.scope(tenant_id=123):
            pass
    assert info.value.field == "tenant_id"
    with pytest.raises(cb.ContextValueError, match="request_id"):
        with bridge.scope(request_id="bad id\r\n"):
            pass
    with pytest.raises(cb.ContextValueError, match="max_length"):
        with bridge.scope(tenant_id="t" * 300):
            pass


def test_a_scope_object_is_entered_once(bridge: cb.ContextBridge) -> None:
    """Re-entering a scope object, while active or after, is refused instead of corrupting
    state; bridge.scope() makes a new one."""
    scope = bridge.scope(request_id="r")
    with scope, pytest.raises(RuntimeError, match="already entered"), scope:
        pass
    with pytest.raises(RuntimeError, match="entered once"), scope:
        pass


async def test_async_with_scope(bridge: cb.ContextBridge) -> None:
    """``async with`` works like ``with`` and survives awaits."""
    async with bridge.scope(request_id="a-1"):
        await asyncio.sleep(0)
        assert bridge.get("request_id") == "a-1"
    assert bridge.get("request_id") is None


async def test_scope_as_decorator_sync_and_async(bridge: cb.ContextBridge) -> None:
    """A scope decorates sync and async functions; each call gets its own scope."""

    @bridge.scope(tenant_id="acme")
    def sync_fn() -> str | None:
        return bridge.get("tenant_id")  # type: ignore[no-any-return]

    @bridge.scope(tenant_id="beta")
    async def async_fn() -> str | None:
        await asyncio.sleep(0)
        return bridge.get("tenant_id")  # type: ignore[no-any-return]

    assert sync_fn() == "acme"
    assert await asyncio.gather(async_fn(), async_fn()) == ["beta", "beta"]
    assert bridge.get("tenant_id") is None


def test_scope_decorator_validates_at_decoration(bridge: cb.ContextBridge) -> None:
    """A decorator with a bad value fails when applied, not on some later call."""
    with pytest.raises(cb.ContextValueError, match="tenant_id"):
        bridge.scope(tenant_id=1)(lambda: None)


def test_scope_refuses_to_decorate_generators(bridge: cb.ContextBridge) -> None:
    """Decorating a generator would leak the scope into its consumer: refused clearly."""

    def gen() -> object:
        yield 1

    with pytest.raises(TypeError, match="generator"), bridge.scope(request_id="r")(gen):
        pass


async def test_run_with_sync_and_async_callables(bridge: cb.ContextBridge) -> None:
    """run returns fn's result; with an async fn the whole coroutine runs in the scope."""

    def read(name: str) -> object:
        return bridge.get(name)

    async def read_later(name: str) -> object:
        await asyncio.sleep(0.001)
        return bridge.get(name)

    assert bridge.run({"request_id": "s-1"}, read, "request_id") == "s-1"
    assert await bridge.run({"request_id": "a-1"}, read_later, "request_id") == "a-1"
    assert bridge.get("request_id") is None


def test_update_changes_the_rest_of_the_scope_only(bridge: cb.ContextBridge) -> None:
    """update() changes values until the enclosing scope ends."""
    with bridge.scope(request_id="r-1"):
        bridge.update(user_id="u-7", tenant_id="acme")
        assert dict(bridge.current()) == {
            "request_id": "r-1",
            "user_id": "u-7",
            "tenant_id": "acme",
        }
        assert baggage.get_baggage("tenant_id") == "acme"
    assert dict(bridge.current()) == {}


def test_update_inside_a_frame_reaches_the_request_from_a_thread(
    bridge: cb.ContextBridge, spans: InMemorySpanExporter
) -> None:
    """Inside a request frame, update() from a worker thread reaches the rest of the request,
    the frame's span and later inner scopes, with the newest write winning."""
    from otel_ctxbridge import _runtime as rt

    tracer = trace.get_tracer("t")
    with tracer.start_as_current_span("server") as server:
        frame = bridge.new_frame((server,))
        token = rt.attach(bridge.derive(rt.get_current(), {"request_id": "r-1"}, frame=frame))
        try:
            worker = threading.Thread(target=bridge.bind(lambda: bridge.update(user_id="u-7")))
            worker.start()
            worker.join()
            assert bridge.get("user_id") == "u-7"
            with tracer.start_as_current_span("inner"), bridge.scope(user_id="system"):
                assert bridge.get("user_id") == "system"
            assert bridge.current()["user_id"] == "u-7"
        finally:
            rt.detach(token)
    inner, server_span = spans.get_finished_spans()
    assert server_span.attributes is not None
    assert inner.attributes is not None
    assert server_span.attributes["app.user_id"] == "u-7"
    assert inner.attributes["app.user_id"] == "system"


def test_scope_entry_and_update_stamp_the_current_span(
    bridge: cb.ContextBridge, spans: InMemorySpanExporter
) -> None:
    """A span started before the values were set still gets them (scope entry and update)."""
    tracer = trace.get_tracer("t")
    with tracer.start_as_current_span("handler"), bridge.scope(request_id="r-9"):
        bridge.update(tenant_id="acme")
    (span,) = spans.get_finished_spans()
    assert span.attributes is not None
    assert span.attributes["app.request_id"] == "r-9"
    assert span.attributes["app.tenant_id"] == "acme"


async def test_2000_concurrent_tasks_never_see_each_others_values(
    bridge: cb.ContextBridge,
) -> None:
    """2,000 tasks, each in its own scope and awaiting at random points, read only their own
    values; nothing is left behind when they finish."""
    rng = random.Random(7)
    delays = [[rng.random() * 0.002 for _ in range(3)] for _ in range(2000)]

    async def request(i: int) -> list[str]:
        seen = []
        async with bridge.scope(request_id=f"req-{i}", tenant_id=f"t{i % 7}", user_id=f"u{i}"):
            for delay in delays[i]:
                await asyncio.sleep(delay)
                current = bridge.current()
                seen.append(f"{current['request_id']}|{current['tenant_id']}|{current['user_id']}")
        return seen

    results = await asyncio.gather(*(request(i) for i in range(2000)))
    for i, seen in enumerate(results):
        assert seen == [f"req-{i}|t{i % 7}|u{i}"] * 3
    assert dict(bridge.current()) == {}


def test_bind_carries_the_context_into_threads_and_pools(bridge: cb.ContextBridge) -> None:
    """A bound callable sees the scope in a Thread and a ThreadPoolExecutor; unbound ones
    see nothing."""
    seen: dict[str, object] = {}

    def record(key: str) -> None:
        seen[key] = bridge.get("request_id")

    with bridge.scope(request_id="r-t"):
        bound = bridge.bind(record)
        plain = threading.Thread(target=record, args=("plain",))
        carried = threading.Thread(target=bound, args=("bound",))
        for thread in (plain, carried):
            thread.start()
            thread.join()
        with ThreadPoolExecutor(2) as pool:
            pool.submit(bound, "pool-bound").result()
            pool.submit(record, "pool-plain").result()
    assert seen == {"plain": None, "bound": "r-t", "pool-bound": "r-t", "pool-plain": None}


async def test_bind_async_function_runs_the_whole_coroutine_in_context(
    bridge: cb.ContextBridge,
) -> None:
    """Binding a coroutine function keeps the captured values across its awaits."""

    async def read() -> object:
        await asyncio.sleep(0)
        return bridge.get("tenant_id")

    with bridge.scope(tenant_id="acme"):
        bound = bridge.bind(read)
    assert asyncio.iscoroutinefunction(bound)
    assert await bound() == "acme"


def test_inject_writes_traceparent_and_encoded_baggage(
    bridge: cb.ContextBridge, spans: InMemorySpanExporter
) -> None:
    """inject adds traceparent of the current span and W3C-encoded baggage (space as %20)."""
    tracer = trace.get_tracer("t")
    with tracer.start_as_current_span("client") as span, bridge.scope(tenant_id="a b+c"):
        carrier = bridge.inject({})
    trace_id = format(span.get_span_context().trace_id, "032x")
    assert carrier["traceparent"].split("-")[1] == trace_id
    assert carrier["baggage"] == "tenant_id=a%20b%2Bc"


def test_extract_applies_policy_and_validation_without_raising(bridge: cb.ContextBridge) -> None:
    """'always' fields come from anyone, 'trusted' ones only when trusted; invalid values are
    dropped and counted, never raised; headers win over baggage."""
    carrier = {"X-Request-ID": "hdr-1", "baggage": "request_id=bag-1,tenant_id=acme"}
    assert bridge.extract(carrier) == {"request_id": "hdr-1"}
    assert bridge.extract(carrier, trusted=True) == {"request_id": "hdr-1", "tenant_id": "acme"}
    assert bridge.extract({"baggage": "request_id=bag-1"}) == {"request_id": "bag-1"}
    assert bridge.extract({"x-request-id": "bad\r\nid"}) == {}
    assert bridge.drop_counts()["request_id"] == 1
    assert bridge.extract({"baggage": "user_id=u1"}, trusted=True) == {}  # local: never baggage
    assert bridge.extract(None) == {}  # type: ignore[arg-type]
    assert bridge.extract({"baggage": f"request_id={'x' * 5000},tenant_id=%ZZ"}) == {}
    assert bridge.drop_counts()["baggage"] == 1


def test_extract_logs_drops_without_the_raw_value(
    bridge: cb.ContextBridge, caplog: pytest.LogCaptureFixture
) -> None:
    """A dropped inbound value is logged once, without echoing it."""
    secret = "evil\x00value-SECRET"
    for _ in range(3):
        bridge.extract({"x-request-id": secret})
    records = [r for r in caplog.records if "dropped" in r.getMessage()]
    assert len(records) == 1
    assert "SECRET" not in records[0].getMessage()


async def test_run_and_bind_scope_coroutines_that_plain_functions_return(
    bridge: cb.ContextBridge,
) -> None:
    """run() and bind() run the whole body of a coroutine a plain function returns, native
    or not, inside the context (not just its creation)."""

    async def read_later() -> object:
        await asyncio.sleep(0.001)
        return bridge.get("tenant_id")

    def native() -> Coroutine[Any, Any, object]:  # a plain function returning a coroutine
        return read_later()

    def other() -> Coroutine[Any, Any, object]:
        return NonNativeCoroutine(read_later())

    assert await bridge.run({"tenant_id": "native"}, native) == "native"
    assert await bridge.run({"tenant_id": "other"}, other) == "other"
    with bridge.scope(tenant_id="bound"):
        bound = bridge.bind(native)
        bound_other = bridge.bind(other)
    assert await bound() == "bound"
    assert await bound_other() == "bound"
    assert bridge.get("tenant_id") is None


def test_a_bound_function_called_from_many_threads_at_once(bridge: cb.ContextBridge) -> None:
    """Each call of a bound function runs in its own copy of the captured context: 16
    concurrent calls never see each other's changes."""
    als: cb.AsyncLocalStorage[int] = cb.AsyncLocalStorage()
    barrier = threading.Barrier(16)

    def work(i: int) -> tuple[object, object]:
        als.enter_with(i)
        barrier.wait()
        return als.get_store(), bridge.get("request_id")

    with bridge.scope(request_id="r-b"):
        bound = bridge.bind(work)
    with ThreadPoolExecutor(16) as pool:
        results = list(pool.map(bound, range(16)))
    assert results == [(i, "r-b") for i in range(16)]


async def test_a_scope_left_in_another_task_is_logged_not_raised(
    bridge: cb.ContextBridge, caplog: pytest.LogCaptureFixture
) -> None:
    """Leaving a scope in another task than the one that entered it cannot restore that
    task's context: it is counted and logged, never raised, and the leaver's context stays."""
    scope = bridge.scope(request_id="r-x")

    async def enter() -> None:
        scope.__enter__()

    await asyncio.create_task(enter())
    before = rt.detach_failures
    scope.__exit__(None, None, None)
    assert rt.detach_failures == before + 1
    assert "failed to detach" in caplog.text
    assert bridge.get("request_id") is None


def test_inject_into_any_carrier_with_item_assignment_or_a_setter(
    bridge: cb.ContextBridge, spans: InMemorySpanExporter
) -> None:
    """traceparent and baggage both go into a carrier that is not a dict (message headers),
    and through an OTel Setter into any other."""

    class ListSetter(Setter[list[tuple[str, str]]]):
        def set(self, carrier: list[tuple[str, str]], key: str, value: str) -> None:
            carrier.append((key, value))

    with trace.get_tracer("t").start_as_current_span("c"), bridge.scope(tenant_id="acme"):
        message = bridge.inject(email.message.Message())
        pairs = bridge.inject([], setter=ListSetter())
    assert message["baggage"] == "tenant_id=acme"
    assert message["traceparent"] is not None
    assert [k for k, _ in pairs] == ["traceparent", "baggage"]


def test_extract_reads_bytes_pairs_and_repeated_headers(bridge: cb.ContextBridge) -> None:
    """Carriers come as dicts or (name, value) pairs (ASGI headers), with str or bytes, a list
    for a repeated header; a None value is no value (never the text "None")."""
    assert bridge.extract({b"X-Request-ID": b"r-bytes"}) == {"request_id": "r-bytes"}
    assert bridge.extract([(b"x-request-id", b"r-pair"), (b"baggage", b"tenant_id=a")], True) == {
        "request_id": "r-pair",
        "tenant_id": "a",
    }
    assert bridge.extract({"x-request-id": ["bad id!", "r-second"]}) == {"request_id": "r-second"}
    assert bridge.extract({"x-request-id": None, "baggage": None}) == {}
    assert bridge.extract({"x-request-id": [None, "r-list"]}) == {"request_id": "r-list"}
    assert bridge.extract({1: "x", "x-request-id": "r-int-key"}) == {"request_id": "r-int-key"}


def test_an_unreadable_carrier_is_counted_and_logged_once(
    bridge: cb.ContextBridge, caplog: pytest.LogCaptureFixture
) -> None:
    """A carrier that cannot be read gives no fields, is counted under "carrier" and logged
    once, without a traceback on every request."""
    for _ in range(3):
        assert bridge.extract(42) == {}  # type: ignore[arg-type]
    assert bridge.drop_counts()["carrier"] == 3
    warnings = [r for r in caplog.records if r.levelno >= logging.WARNING]
    assert len(warnings) == 1
    assert warnings[0].exc_info is None


def test_drops_are_logged_rate_limited_with_the_count(
    bridge: cb.ContextBridge, caplog: pytest.LogCaptureFixture
) -> None:
    """A long-running worker keeps hearing about hostile input: the 1st, 10th and 100th drop
    of a field are logged with the count, the others only counted."""
    for _ in range(100):
        bridge.extract({"x-request-id": "bad\nid"})
    logged = [r.getMessage() for r in caplog.records if "dropped an inbound" in r.getMessage()]
    assert len(logged) == 3
    assert "(100 dropped so far)" in logged[-1]
    assert bridge.drop_counts()["request_id"] == 100
