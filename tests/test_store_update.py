"""bridge.update(): where a change reaches, where it stops, and where it is refused."""

from __future__ import annotations

import asyncio
import threading
from concurrent.futures import ThreadPoolExecutor

import pytest
from opentelemetry import baggage, trace
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

import otel_ctxbridge as cb
from otel_ctxbridge import _runtime as rt


def _request(bridge: cb.ContextBridge, **values: str) -> object:
    """Attach a request context the way the ASGI middleware does (a request frame)."""
    return rt.attach(bridge.derive(rt.get_current(), values, frame=bridge.new_frame(())))


def test_update_outside_any_scope_is_refused_and_changes_nothing(
    bridge: cb.ContextBridge,
) -> None:
    """Outside a scope or request update() raises MissingContextError instead of leaving the
    values in the thread's context for whatever runs there next (the next pool job); the
    message names the fix for a thread started from a request (``bridge.bind``)."""
    with pytest.raises(cb.MissingContextError, match="update") as raised:
        bridge.update(user_id="u-1")
    assert "bridge.bind(fn)" in str(raised.value)
    assert dict(bridge.current()) == {}

    def job(i: int) -> object:
        if i == 0:
            try:
                bridge.update(tenant_id="leaked")
            except cb.MissingContextError:
                return "refused"
        return bridge.get("tenant_id")

    with ThreadPoolExecutor(1) as pool:  # one worker thread runs every job, context and all
        assert [pool.submit(job, i).result() for i in range(3)] == ["refused", None, None]


def test_update_survives_the_end_of_a_nested_span(
    bridge: cb.ContextBridge, spans: InMemorySpanExporter
) -> None:
    """A value set under a nested span (authentication, say) stays for the rest of the
    scope after that span ends, and reaches the span it was set under."""
    tracer = trace.get_tracer("t")
    with bridge.scope(request_id="r-1"):
        with tracer.start_as_current_span("auth"):
            bridge.update(user_id="u-7", tenant_id="acme")
        assert bridge.get("user_id") == "u-7"
        assert bridge.current()["tenant_id"] == "acme"
        assert bridge.inject({})["baggage"] == "request_id=r-1,tenant_id=acme"
    assert bridge.get("user_id") is None
    (auth,) = spans.get_finished_spans()
    assert auth.attributes is not None
    assert auth.attributes["app.user_id"] == "u-7"


def test_update_from_a_bound_thread_reaches_the_rest_of_a_plain_scope(
    bridge: cb.ContextBridge,
) -> None:
    """Outside a request too, update() in a thread running in the scope's context (bind)
    reaches the scope; current() is not served from a stale cache."""
    with bridge.scope(request_id="r-1"):
        assert dict(bridge.current()) == {"request_id": "r-1"}
        worker = threading.Thread(target=bridge.bind(lambda: bridge.update(user_id="u-9")))
        worker.start()
        worker.join()
        assert dict(bridge.current()) == {"request_id": "r-1", "user_id": "u-9"}
    assert dict(bridge.current()) == {}


async def test_update_from_a_task_reaches_the_scope_it_was_started_in(
    bridge: cb.ContextBridge,
) -> None:
    """A task created inside a scope shares that scope's frame: its update() reaches it."""
    async with bridge.scope(request_id="r-1"):

        async def authenticate() -> None:
            await asyncio.sleep(0)
            bridge.update(user_id="u-task")

        await asyncio.create_task(authenticate())
        assert bridge.get("user_id") == "u-task"
    assert bridge.get("user_id") is None


def test_an_update_inside_a_nested_scope_ends_with_it_outside_a_request(
    bridge: cb.ContextBridge,
) -> None:
    """Outside a request each scope is its own unit: a change made in a nested scope is
    restored when that scope ends, like the values it set."""
    with bridge.scope(request_id="outer"):
        with bridge.scope(tenant_id="acme"):
            bridge.update(user_id="u-inner")
            assert dict(bridge.current()) == {
                "request_id": "outer",
                "tenant_id": "acme",
                "user_id": "u-inner",
            }
        assert dict(bridge.current()) == {"request_id": "outer"}


def test_an_update_inside_a_nested_scope_reaches_the_whole_request(
    bridge: cb.ContextBridge,
) -> None:
    """Inside a request, scopes share the request frame: an update made in a nested scope
    reaches the rest of the request (its access log, its server span), while the nested
    scope's own values are restored."""
    token = _request(bridge, request_id="r-1")
    try:
        with bridge.scope(tenant_id="acme"):
            bridge.update(user_id="u-7")
        assert dict(bridge.current()) == {"request_id": "r-1", "user_id": "u-7"}
    finally:
        rt.detach(token)


def test_jobs_under_a_long_lived_scope_never_see_each_others_updates(
    bridge: cb.ContextBridge,
) -> None:
    """A worker's outer scope (held for its lifetime) does not collect the updates of the
    job scopes entered inside it, so no job inherits the previous job's user."""
    seen = []
    with bridge.scope(request_id="worker"):
        for job in range(3):
            with bridge.scope(tenant_id=f"t-{job}"):
                seen.append(bridge.get("user_id"))
                bridge.update(user_id=f"u-{job}")
            assert dict(bridge.current()) == {"request_id": "worker"}
    assert seen == [None, None, None]


def test_a_later_update_keeps_what_a_worker_thread_set(bridge: cb.ContextBridge) -> None:
    """After a sync dependency (a worker thread) set user_id, an update() of another field in
    the request keeps it: the rest of the handler, scopes entered later and outbound calls
    see both."""
    token = _request(bridge, request_id="r-1")
    try:
        worker = threading.Thread(target=bridge.bind(lambda: bridge.update(user_id="u-7")))
        worker.start()
        worker.join()
        bridge.update(tenant_id="acme")
        assert dict(bridge.current()) == {
            "request_id": "r-1",
            "user_id": "u-7",
            "tenant_id": "acme",
        }
        with bridge.scope(request_id="r-inner"):
            assert bridge.get("user_id") == "u-7"
            assert bridge.inject({})["baggage"] == "request_id=r-inner,tenant_id=acme"
        assert bridge.run({}, lambda: bridge.get("user_id")) == "u-7"
    finally:
        rt.detach(token)


def test_a_scope_entered_after_a_thread_update_starts_from_it(bridge: cb.ContextBridge) -> None:
    """A scope entered after an update made in another thread starts from the updated
    values (it does not fall back to those of the request's start)."""
    token = _request(bridge, request_id="r-1", tenant_id="before")
    try:
        worker = threading.Thread(target=bridge.bind(lambda: bridge.update(tenant_id="after")))
        worker.start()
        worker.join()
        with bridge.scope(user_id="u-1"):
            assert dict(bridge.current()) == {
                "request_id": "r-1",
                "tenant_id": "after",
                "user_id": "u-1",
            }
            assert baggage.get_baggage("tenant_id") == "after"
    finally:
        rt.detach(token)


def test_concurrent_updates_from_many_threads_are_all_kept() -> None:
    """Updates of different fields from 16 threads at once are never lost."""
    names = [f"f{i}" for i in range(16)]
    local = cb.ContextBridge([cb.Field(n, propagate=False) for n in names])
    barrier = threading.Barrier(len(names))

    def writer(name: str) -> None:
        barrier.wait()
        for round_ in range(50):
            local.update(**{name: f"{name}-{round_}"})

    with local.scope(f0="start"):
        threads = [threading.Thread(target=local.bind(writer), args=(n,)) for n in names]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
        assert dict(local.current()) == {n: f"{n}-49" for n in names}


def test_update_with_none_unsets_for_the_rest_of_the_scope(
    bridge: cb.ContextBridge, spans: InMemorySpanExporter
) -> None:
    """update(field=None) removes the value (also from what is injected) until the scope
    ends; a span keeps what it was stamped with."""
    tracer = trace.get_tracer("t")
    with tracer.start_as_current_span("handler"), bridge.scope(request_id="r-1", tenant_id="a"):
        with tracer.start_as_current_span("step"):
            bridge.update(tenant_id=None)
            assert baggage.get_baggage("tenant_id") is None
        assert bridge.get("tenant_id") is None
        assert bridge.inject({})["baggage"] == "request_id=r-1"
        bridge.update()  # nothing to change: a no-op
    step, handler = spans.get_finished_spans()
    assert handler.attributes is not None
    assert handler.attributes["app.tenant_id"] == "a"  # stamped on scope entry, kept
    assert "app.tenant_id" not in (step.attributes or {})


def test_a_refused_update_changes_nothing(bridge: cb.ContextBridge) -> None:
    """An invalid value raises naming the field, and none of the update's values is set."""
    with bridge.scope(request_id="r-1"):
        with pytest.raises(cb.ContextValueError, match="tenant_id"):
            bridge.update(user_id="u-1", tenant_id="bad\nvalue")
        assert dict(bridge.current()) == {"request_id": "r-1"}
