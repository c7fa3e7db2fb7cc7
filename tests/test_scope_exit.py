"""Leaving a scope restores exactly the context from before it, in the task or thread that
entered it, and nowhere else: what any cheaper way of leaving (see the memory target of the
core benchmark) must keep. A scope that recorded only "the context to go back to" and left
"the innermost scope of the current context" fails most of these."""

from __future__ import annotations

import asyncio
import contextlib
import contextvars
import gc
import threading
import weakref
from collections.abc import Iterator

import pytest
from opentelemetry import baggage, propagate, trace
from opentelemetry import context as otel_context

import otel_ctxbridge as cb
from otel_ctxbridge import _runtime as rt


def test_leaving_drops_contexts_left_attached_inside(bridge: cb.ContextBridge) -> None:
    """Contexts attached inside a scope and never detached are dropped when the scope is
    left: one derived from the scope's (``set_value``), and one that is not (a message's
    extracted headers, which start from an empty context). The context from before the
    scope is current again, the very same object: no tenant of that message outlives it."""
    before = rt.get_current()
    with bridge.scope(request_id="job-1"):
        otel_context.attach(otel_context.set_value("k", "v"))  # never detached
        otel_context.attach(propagate.extract({"baggage": "tenant_id=acme"}))  # nor this
        assert baggage.get_baggage("tenant_id") == "acme"
    assert rt.get_current() is before
    assert baggage.get_all() == {}
    assert otel_context.get_value("k") is None


async def test_leaving_from_another_task_keeps_that_tasks_own_scope(
    bridge: cb.ContextBridge, caplog: pytest.LogCaptureFixture
) -> None:
    """A scope entered by one task and left by another (an ``AsyncExitStack`` entered at
    start-up and closed in a request) cannot restore the first task's context: the failure
    is logged and counted, and the leaving task's own scopes stay as they are."""
    stack = contextlib.AsyncExitStack()

    async def start() -> None:
        await stack.enter_async_context(bridge.scope(user_id="component"))

    await asyncio.create_task(start())
    failures = rt.detach_failures
    with bridge.scope(request_id="r-2", tenant_id="acme"):
        await stack.aclose()
        assert (bridge.get("request_id"), bridge.get("tenant_id")) == ("r-2", "acme")
    assert rt.detach_failures == failures + 1
    assert "failed to detach" in caplog.text


async def test_a_generator_closed_in_another_task_leaves_the_closers_scopes(
    bridge: cb.ContextBridge,
) -> None:
    """A generator suspended inside its scope (a cached paginator) and closed by a task that
    is inside scopes of its own changes nothing in that task: its inner block keeps its
    tenant and the request keeps its id."""
    kept: list[Iterator[int]] = []

    def rows() -> Iterator[int]:
        with bridge.scope(tenant_id="producer"):
            yield 1
            yield 2

    async def produce() -> None:
        generator = rows()
        next(generator)
        kept.append(generator)

    await asyncio.create_task(produce())
    with bridge.scope(request_id="r-2", tenant_id="admin"):
        with bridge.scope(tenant_id="customer-7"):
            kept.pop().close()
            assert bridge.get("tenant_id") == "customer-7"
        assert (bridge.get("request_id"), bridge.get("tenant_id")) == ("r-2", "admin")


def test_leaving_a_scope_twice_leaves_it_once(bridge: cb.ContextBridge) -> None:
    """A second ``__exit__`` of the same scope (by hand, or a scope both in ``with`` and on
    an ``ExitStack``) does nothing: the enclosing scope stays."""
    with bridge.scope(request_id="r-1"):
        with bridge.scope(tenant_id="acme") as inner:
            inner.__exit__(None, None, None)
            assert bridge.get("tenant_id") is None
        assert bridge.get("request_id") == "r-1"
    assert bridge.get("request_id") is None


def test_an_exit_stack_leaves_scopes_in_reverse_order(bridge: cb.ContextBridge) -> None:
    """``contextlib.ExitStack`` leaves its scopes innermost first, each back to the context
    it was entered on; a scope it holds but never entered changes nothing."""
    outside = rt.get_current()
    seen: list[object] = []
    with contextlib.ExitStack() as stack:
        stack.enter_context(bridge.scope(request_id="r-1"))
        first = rt.get_current()
        stack.callback(lambda: seen.append(rt.get_current()))
        stack.push(bridge.scope(request_id="never entered"))
        stack.enter_context(bridge.scope(tenant_id="acme"))
        assert (bridge.get("request_id"), bridge.get("tenant_id")) == ("r-1", "acme")
    assert seen == [first]
    assert rt.get_current() is outside


def test_nested_scopes_of_two_bridges_restore_each_level(bridge: cb.ContextBridge) -> None:
    """Scopes of different bridges nest: leaving each makes the context of the level around
    it current again (the same objects), also with a span started inside."""
    other = cb.ContextBridge([cb.Field("job", propagate=False)])
    outside = rt.get_current()
    with bridge.scope(request_id="r-1"):
        first = rt.get_current()
        with other.scope(job="j-1"):
            second = rt.get_current()
            with bridge.scope(tenant_id="acme"), trace.get_tracer("t").start_as_current_span("s"):
                assert (bridge.get("request_id"), other.get("job")) == ("r-1", "j-1")
            assert rt.get_current() is second
        assert rt.get_current() is first
    assert rt.get_current() is outside


def test_scopes_entered_and_never_left_do_not_keep_each_other(bridge: cb.ContextBridge) -> None:
    """Scopes entered and never left (misuse; ``storage().enter_with`` is the way to set
    values for the rest of a context) hold no chain of the contexts before them: each
    earlier context is freed once nothing else uses it."""

    def leak() -> weakref.ref[object]:
        bridge.scope(request_id="first").__enter__()
        first = weakref.ref(rt.get_current())
        for i in range(100):
            bridge.scope(request_id=f"r-{i}").__enter__()
        return first

    leaked_in = contextvars.copy_context()  # the leaks stay in this copy, alive below
    first = leaked_in.run(leak)
    gc.collect()
    assert first() is None
    assert leaked_in.run(bridge.get, "request_id") == "r-99"


def test_a_generator_closed_in_another_thread_changes_nothing_there(
    bridge: cb.ContextBridge,
) -> None:
    """A generator suspended inside its scope and closed by another thread (inside a scope of
    its own, in a thread that never set a context before) leaves that thread's context as it
    is: the failure is counted, and the thread's scope is left normally afterwards."""
    failures = rt.detach_failures
    outside = rt.get_current()

    def rows() -> Iterator[int]:
        with bridge.scope(tenant_id="producer"):
            yield 1

    generator = rows()
    next(generator)
    seen: list[object] = []

    def close_elsewhere() -> None:
        before = rt.get_current()
        with bridge.scope(request_id="r-3"):
            generator.close()
            seen.append(bridge.get("request_id"))
            seen.append(bridge.get("tenant_id"))
        seen.append(rt.get_current() is before)

    worker = threading.Thread(target=close_elsewhere)
    worker.start()
    worker.join()
    assert seen == ["r-3", None, True]
    assert rt.detach_failures == failures + 1
    assert bridge.get("tenant_id") == "producer"  # still attached here: it never left
    rt.attach(outside)  # the test's own clean-up (the fixture checks what is left attached)


@pytest.mark.parametrize("by_hand", [False, True], ids=["with block", "by hand"])
def test_a_scope_left_while_entering_another_does_not_come_back(by_hand: bool) -> None:
    """A generator suspended in its scope and collected (in a cycle) while another scope is
    being entered leaves its scope then; leaving the other scope goes back to the context
    current when it attached its own, so the generator's tenant does not come back."""

    def collecting(value: str) -> bool:  # a collection while entering, as allocation may run
        gc.collect()
        return True

    bridge = cb.ContextBridge([cb.Field("tenant_id"), cb.Field("request_id", validator=collecting)])

    def rows() -> Iterator[int]:
        with bridge.scope(tenant_id="producer"):
            yield 1

    generator = rows()
    next(generator)
    assert bridge.get("tenant_id") == "producer"
    cycle: list[object] = [generator]
    cycle.append(cycle)
    del generator, cycle
    scope = bridge.scope(request_id="r-1")
    if by_hand:
        scope.__enter__()
        scope.__exit__(None, None, None)
    else:
        with scope:
            pass
    assert bridge.get("tenant_id") is None
