"""Leaving a scope: what an entered scope keeps alive (nothing but its context), and how
leaving finds the context to go back to (the exit record of the innermost scope)."""

from __future__ import annotations

import asyncio
import contextlib
import gc
import sys

import pytest
from opentelemetry import context as otel_context
from opentelemetry import trace

import otel_ctxbridge as cb
from otel_ctxbridge import _runtime as rt


def test_a_with_block_keeps_no_reference_to_its_scope(bridge: cb.ContextBridge) -> None:
    """While a ``with`` body runs, neither the statement (its ``__exit__``) nor the attached
    context holds the scope object: an in-flight scope costs its context and nothing more."""
    scope = bridge.scope(request_id="r-1", tenant_id="acme")
    before = sys.getrefcount(scope)
    with scope:
        assert sys.getrefcount(scope) == before
        assert bridge.get("request_id") == "r-1"
    assert bridge.get("request_id") is None


async def test_a_task_suspended_in_a_scope_keeps_no_scope_object(
    bridge: cb.ContextBridge,
) -> None:
    """Tasks suspended inside their scopes keep the values, while no scope object is alive
    (what the ``with`` entered was freed on entry), and leaving still restores the context."""
    scope_type = type(bridge.scope())
    before = rt.get_current()
    released = asyncio.Event()

    async def request(i: int) -> str | None:
        with bridge.scope(request_id=f"r-{i}"):
            await released.wait()
            seen = bridge.get("request_id")
        assert rt.get_current() is before
        return seen

    tasks = [asyncio.create_task(request(i)) for i in range(20)]
    await asyncio.sleep(0)
    gc.collect()
    assert not [o for o in gc.get_objects() if type(o) is scope_type]
    released.set()
    assert await asyncio.gather(*tasks) == [f"r-{i}" for i in range(20)]


def test_leaving_restores_over_contexts_left_attached_inside(bridge: cb.ContextBridge) -> None:
    """Contexts attached inside a scope on top of its own (``attach`` of a ``set_value``, an
    ``update()``) and never detached are dropped when the scope is left, as a token reset
    would: the context from before the scope is current again, the very same object."""
    before = rt.get_current()
    with bridge.scope(request_id="r-1"):
        otel_context.attach(otel_context.set_value("k", "v"))  # never detached
        bridge.update(tenant_id="acme")
        assert otel_context.get_value("k") == "v"
        assert bridge.get("tenant_id") == "acme"
    assert rt.get_current() is before
    assert bridge.get("request_id") is None
    assert otel_context.get_value("k") is None


def test_nested_scopes_of_two_bridges_restore_each_level(bridge: cb.ContextBridge) -> None:
    """Scopes of different bridges nest: leaving each makes the context of the level around
    it current again (the same objects), whatever bridge entered it."""
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


def test_an_exit_stack_leaves_scopes_in_reverse_order(bridge: cb.ContextBridge) -> None:
    """``contextlib.ExitStack`` (which calls ``__exit__`` with the scope as first argument)
    leaves its scopes innermost first; a scope it holds but never entered changes nothing."""
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


async def test_an_async_exit_stack_leaves_scopes(bridge: cb.ContextBridge) -> None:
    """``contextlib.AsyncExitStack`` enters scopes with ``async with`` and leaves them."""
    outside = rt.get_current()
    async with contextlib.AsyncExitStack() as stack:
        await stack.enter_async_context(bridge.scope(request_id="r-1"))
        stack.enter_context(bridge.scope(user_id="u-1"))
        assert (bridge.get("request_id"), bridge.get("user_id")) == ("r-1", "u-1")
    assert rt.get_current() is outside


def test_leaving_over_a_foreign_context_left_attached_is_logged(
    bridge: cb.ContextBridge, caplog: pytest.LogCaptureFixture
) -> None:
    """A context not derived from the scope's (``attach(Context())``), attached inside the
    scope and never detached, hides the scope's exit record: leaving is counted and logged,
    never raised, and changes nothing (the leak is the attach's)."""
    outside = rt.get_current()
    foreign = otel_context.Context()
    failures = rt.detach_failures
    with bridge.scope(request_id="r-1"):
        otel_context.attach(foreign)  # never detached
    assert rt.detach_failures == failures + 1
    assert "failed to detach" in caplog.text
    assert rt.get_current() is foreign
    rt.attach(outside)  # the test's own clean-up of the leak


def test_exit_takes_the_three_exception_arguments(bridge: cb.ContextBridge) -> None:
    """``__exit__`` takes ``(exc_type, exc, tb)``, or the scope and those three (as
    ``ExitStack`` calls it); other calls are refused without leaving anything."""
    with bridge.scope(request_id="r-1"):
        with pytest.raises(TypeError, match="3 arguments"):
            type(bridge.scope(request_id="x")).__exit__(None, None)
        assert bridge.get("request_id") == "r-1"
    assert bridge.get("request_id") is None
