"""AsyncLocalStorage: Node's store API, plain and bridged."""

from __future__ import annotations

import asyncio
import threading

import pytest
from opentelemetry import baggage, trace
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

import otel_ctxbridge as cb
from tests._coroutines import NonNativeCoroutine


def test_run_sets_the_store_for_the_call_only() -> None:
    """run returns fn's result; the store is visible inside and gone after."""
    als: cb.AsyncLocalStorage[dict[str, str]] = cb.AsyncLocalStorage()
    store = {"request_id": "r-1"}
    assert als.run(store, lambda x: (als.get_store(), x), 5) == (store, 5)
    assert als.get_store() is None


async def test_run_with_a_coroutine_function_scopes_the_whole_coroutine() -> None:
    """With an async fn, the store survives the coroutine's awaits (not just its creation)."""
    als: cb.AsyncLocalStorage[str] = cb.AsyncLocalStorage()

    async def work() -> str | None:
        await asyncio.sleep(0.001)
        return als.get_store()

    assert await als.run("tx-1", work) == "tx-1"
    assert als.get_store() is None


async def test_tasks_inherit_the_store_at_creation() -> None:
    """A task created inside run keeps the store even when it runs after run returned."""
    als: cb.AsyncLocalStorage[str] = cb.AsyncLocalStorage()

    async def later() -> str | None:
        await asyncio.sleep(0.001)
        return als.get_store()

    task = als.run("outer", lambda: asyncio.ensure_future(later()))
    assert als.get_store() is None
    assert await task == "outer"


async def test_enter_with_inside_a_task_does_not_leak_to_the_parent() -> None:
    """enter_with changes the store for the rest of the task only."""
    als: cb.AsyncLocalStorage[str] = cb.AsyncLocalStorage()

    async def child() -> str | None:
        als.enter_with("child")
        await asyncio.sleep(0)
        return als.get_store()

    assert await asyncio.create_task(child()) == "child"
    assert als.get_store() is None


def test_enter_with_lasts_until_the_enclosing_run_ends() -> None:
    """enter_with inside run replaces the store for the rest of that run."""
    als: cb.AsyncLocalStorage[str] = cb.AsyncLocalStorage()

    def body() -> str | None:
        als.enter_with("replaced")
        return als.get_store()

    assert als.run("first", body) == "replaced"
    assert als.get_store() is None


def test_exit_runs_outside_the_store() -> None:
    """exit(fn) calls fn with no store; the store is back afterwards."""
    als: cb.AsyncLocalStorage[str] = cb.AsyncLocalStorage()

    def body() -> tuple[str | None, str | None, str | None]:
        inside = als.exit(als.get_store)
        return als.get_store(), inside, als.get_store()

    assert als.run("s", body) == ("s", None, "s")


def test_disable_until_next_run() -> None:
    """disable() makes get_store None until the next run or enter_with."""
    als: cb.AsyncLocalStorage[str] = cb.AsyncLocalStorage()

    def body() -> str | None:
        als.disable()
        return als.get_store()

    assert als.run("s", body) is None
    assert als.run("t", als.get_store) == "t"


def test_instances_are_independent() -> None:
    """Two instances keep separate stores."""
    a: cb.AsyncLocalStorage[str] = cb.AsyncLocalStorage()
    b: cb.AsyncLocalStorage[str] = cb.AsyncLocalStorage()
    assert a.run("A", lambda: b.run("B", lambda: (a.get_store(), b.get_store()))) == ("A", "B")


def test_static_bind_and_snapshot_carry_the_store_into_threads() -> None:
    """bind() and snapshot() capture the store now, for a thread that would otherwise lose it."""
    als: cb.AsyncLocalStorage[str] = cb.AsyncLocalStorage()
    seen: list[str | None] = []

    def capture() -> tuple[object, object]:
        return cb.AsyncLocalStorage.bind(als.get_store), cb.AsyncLocalStorage.snapshot()

    bound, runner = als.run("captured", capture)
    threads = [
        threading.Thread(target=lambda: seen.append(bound())),  # type: ignore[operator]
        threading.Thread(target=lambda: seen.append(runner(als.get_store))),  # type: ignore[operator]
        threading.Thread(target=lambda: seen.append(als.get_store())),
    ]
    for thread in threads:
        thread.start()
        thread.join()
    assert seen == ["captured", "captured", None]


def test_bridged_storage_puts_fields_in_baggage(bridge: cb.ContextBridge) -> None:
    """bridge.storage() stores a dict of declared fields: baggage for propagated ones."""
    als = bridge.storage()

    def body() -> tuple[object, object, object]:
        return als.get_store(), baggage.get_baggage("request_id"), bridge.get("user_id")

    store, from_baggage, user = als.run({"request_id": "r-1", "user_id": "u"}, body)
    assert store == {"request_id": "r-1", "user_id": "u"}
    assert (from_baggage, user) == ("r-1", "u")
    assert als.get_store() is None


def test_bridged_storage_run_sets_exactly_the_given_fields(bridge: cb.ContextBridge) -> None:
    """A nested bridged run replaces the store: fields it does not name are unset."""
    als = bridge.storage()
    inner = als.run(
        {"request_id": "outer", "tenant_id": "acme"},
        lambda: als.run({"request_id": "inner"}, als.get_store),
    )
    assert inner == {"request_id": "inner"}


def test_bridged_enter_with_exit_and_disable(bridge: cb.ContextBridge) -> None:
    """enter_with, exit and disable behave as on a plain instance."""
    als = bridge.storage()

    def body() -> tuple[object, object, object]:
        als.enter_with({"tenant_id": "t2"})
        outside = als.exit(als.get_store)
        after = als.get_store()
        als.disable()
        return outside, after, als.get_store()

    assert als.run({"tenant_id": "t1"}, body) == (None, {"tenant_id": "t2"}, None)


async def test_bound_coroutine_keeps_store_across_awaits_and_propagates_cancellation() -> None:
    """A bound coroutine function runs wholly in the captured context, and cancelling the
    caller cancels the inner coroutine."""
    als: cb.AsyncLocalStorage[str] = cb.AsyncLocalStorage()
    cancelled = asyncio.Event()

    async def slow() -> str | None:
        try:
            await asyncio.sleep(0.001)
            seen = als.get_store()
            await asyncio.sleep(10)
            return seen
        except asyncio.CancelledError:
            cancelled.set()
            raise

    async def read() -> str | None:
        await asyncio.sleep(0.001)
        return als.get_store()

    bound_read = als.run("captured", lambda: cb.AsyncLocalStorage.bind(read))
    assert await bound_read() == "captured"
    bound_slow = als.run("captured", lambda: cb.AsyncLocalStorage.bind(slow))
    task = asyncio.create_task(bound_slow())
    await asyncio.sleep(0.01)
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    assert cancelled.is_set()


async def test_snapshot_runner_runs_coroutines_in_the_snapshot() -> None:
    """snapshot()'s runner also scopes a coroutine function as a whole."""
    als: cb.AsyncLocalStorage[str] = cb.AsyncLocalStorage()

    async def read() -> str | None:
        await asyncio.sleep(0)
        return als.get_store()

    runner = als.run("snap", cb.AsyncLocalStorage.snapshot)
    assert await runner(read) == "snap"


def test_bridged_run_and_enter_with_are_scopes_that_update_works_in(
    bridge: cb.ContextBridge, spans: InMemorySpanExporter
) -> None:
    """A bridged run or enter_with starts a scope like bridge.scope: it stamps the current
    span and bridge.update() works inside it (and ends with it)."""
    als = bridge.storage()

    def body() -> object:
        bridge.update(user_id="u-1")
        return als.get_store()

    with trace.get_tracer("t").start_as_current_span("outer"):
        assert als.run({"request_id": "r-1"}, body) == {"request_id": "r-1", "user_id": "u-1"}

    def entered() -> object:
        als.enter_with({"tenant_id": "acme"})
        bridge.update(user_id="u-2")
        return als.get_store()

    assert bridge.run({}, entered) == {"tenant_id": "acme", "user_id": "u-2"}
    assert als.get_store() is None
    (outer,) = spans.get_finished_spans()
    assert dict(outer.attributes or {}) == {"app.request_id": "r-1", "app.user_id": "u-1"}


def test_bridged_get_store_refuses_changes_and_disable_only_hides_it(
    bridge: cb.ContextBridge,
) -> None:
    """Changing the dict get_store() returned (as a Node user changes the store object) raises
    a TypeError naming ``bridge.update`` instead of silently changing a copy; the fields stay
    as they were; disable() makes get_store() answer None while the fields still reach the
    bridge's readers."""
    als = bridge.storage()

    def body() -> tuple[object, object, object]:
        store = als.get_store()
        assert store is not None
        for change in (
            lambda: store.__setitem__("tenant_id", "changed"),
            lambda: store.update(tenant_id="changed"),
            lambda: store.pop("tenant_id"),
            lambda: store.setdefault("user_id", "u"),
            store.clear,
        ):
            with pytest.raises(TypeError, match=r"bridge\.update\(name=value\)"):
                change()
        assert store == {"tenant_id": "acme"}
        als.disable()
        return bridge.get("tenant_id"), als.get_store(), bridge.inject({})["baggage"]

    assert als.run({"tenant_id": "acme"}, body) == ("acme", None, "tenant_id=acme")


def test_bridged_get_store_reads_as_a_plain_dict(bridge: cb.ContextBridge) -> None:
    """The store serialises and copies as a dict: JSON, ``**``, ``dict()``, ``copy``,
    ``pickle`` and ``|`` give ordinary values (the copies can be changed)."""
    import copy
    import json
    import pickle

    als = bridge.storage()

    def body() -> None:
        store = als.get_store()
        assert store is not None
        assert json.loads(json.dumps(store)) == {"request_id": "r-1"}
        for plain in (
            dict(store),
            {**store},
            store.copy(),
            copy.copy(store),
            copy.deepcopy(store),
            pickle.loads(pickle.dumps(store)),
            store | {},
        ):
            assert type(plain) is dict
            assert plain == {"request_id": "r-1"}
            plain["request_id"] = "mine"

    als.run({"request_id": "r-1"}, body)


@pytest.mark.parametrize("store", ["r-1", None, [("request_id", "r-1")]])
def test_bridged_run_and_enter_with_refuse_a_store_that_is_no_mapping(
    bridge: cb.ContextBridge, store: object
) -> None:
    """A store that is not a mapping of field names (a bare request id, a list of pairs) is
    refused with a TypeError that says what the store must be, before anything is set (a
    disabled storage stays disabled)."""
    als = bridge.storage()
    als.disable()
    with pytest.raises(TypeError, match="must be a mapping of field names"):
        als.run(store, lambda: None)  # type: ignore[arg-type] # the wrong type is the test
    with pytest.raises(TypeError, match="must be a mapping of field names"):
        als.enter_with(store)  # type: ignore[arg-type] # the wrong type is the test
    with bridge.scope(request_id="r-1"):
        assert als.get_store() is None  # still disabled


async def test_run_scopes_a_coroutine_that_is_not_native() -> None:
    """run() with a function returning a non-native coroutine keeps the store for its
    whole body, as for an async def."""
    als: cb.AsyncLocalStorage[str] = cb.AsyncLocalStorage()

    async def read() -> str | None:
        await asyncio.sleep(0.001)
        return als.get_store()

    assert await als.run("tx", lambda: NonNativeCoroutine(read())) == "tx"
    assert als.get_store() is None


def test_run_exit_and_snapshot_pass_any_keyword_through_to_the_function(
    bridge: cb.ContextBridge,
) -> None:
    """The callers' own parameters are positional-only (as in ``contextvars.Context.run``), so
    a function taking ``store=``, ``fn=`` or ``values=`` gets them instead of a TypeError."""

    def save(*args: object, **kwargs: object) -> tuple[tuple[object, ...], dict[str, object]]:
        return args, kwargs

    plain: cb.AsyncLocalStorage[dict[str, int]] = cb.AsyncLocalStorage()
    keywords = {"store": "s3", "fn": "f", "values": "v"}
    expected = (("x",), keywords)
    assert plain.run({"a": 1}, save, "x", **keywords) == expected
    assert plain.exit(save, "x", **keywords) == expected
    assert cb.AsyncLocalStorage.snapshot()(save, "x", **keywords) == expected
    assert bridge.storage().run({"request_id": "r1"}, save, "x", **keywords) == expected
    assert bridge.storage().exit(save, "x", **keywords) == expected
    assert bridge.run({"request_id": "r1"}, save, "x", **keywords) == expected
