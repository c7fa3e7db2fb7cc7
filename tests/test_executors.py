"""Threads and executors: work submitted from a request runs, and logs, in that request's
context; 200 concurrent submissions never mix ids; pool threads keep nothing between tasks."""

from __future__ import annotations

import asyncio
import logging
import threading
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import anyio.to_thread
import pytest
from opentelemetry import trace
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

import otel_ctxbridge as cb
from otel_ctxbridge import _runtime
from otel_ctxbridge.executors import ContextExecutor, run_in_executor, submit_with_context
from otel_ctxbridge.logs import ContextLogFilter

N = 200


class Records(logging.Handler):
    """Keeps the records of the ``work`` logger, annotated by ContextLogFilter."""

    def __init__(self, bridge: cb.ContextBridge) -> None:
        super().__init__()
        self.addFilter(ContextLogFilter(bridge, default=None))
        self.records: list[logging.LogRecord] = []
        self._guard = threading.Lock()

    def emit(self, record: logging.LogRecord) -> None:
        with self._guard:
            self.records.append(record)

    def ids_by_message(self) -> dict[str, Any]:
        return {r.getMessage(): r.__dict__["request_id"] for r in self.records}


@pytest.fixture
def logs(bridge: cb.ContextBridge) -> Iterator[Records]:
    """Records of the ``work`` logger, with the bridge's fields."""
    handler = Records(bridge)
    logger = logging.getLogger("work")
    logger.addHandler(handler)
    logger.setLevel(logging.INFO)
    yield handler
    logger.removeHandler(handler)


def _work(bridge: cb.ContextBridge) -> Callable[[int], tuple[int, Any]]:
    def work(i: int) -> tuple[int, Any]:
        logging.getLogger("work").info("task %d", i)
        return i, bridge.get("request_id")

    return work


def _assert_each_task_logged_its_submitter(logs: Records, results: list[tuple[int, Any]]) -> None:
    assert sorted(results) == [(i, f"r-{i}") for i in range(N)]
    assert logs.ids_by_message() == {f"task {i}": f"r-{i}" for i in range(N)}


async def _submit_all(
    bridge: cb.ContextBridge, submit: Callable[[int], Any]
) -> list[tuple[int, Any]]:
    """N concurrent asyncio tasks, each in its own request scope, each submitting once."""

    async def one(i: int) -> tuple[int, Any]:
        with bridge.scope(request_id=f"r-{i}", tenant_id=f"t-{i}"):
            await asyncio.sleep(0)  # interleave the scopes
            result: tuple[int, Any] = await submit(i)
            return result

    return list(await asyncio.gather(*(one(i) for i in range(N))))


async def test_context_executor_runs_each_task_in_its_submitters_context(
    bridge: cb.ContextBridge, logs: Records
) -> None:
    """ContextExecutor: 200 concurrent submissions on 8 threads each log their own request id;
    a later task submitted outside any request sees none (nothing left in pool threads)."""
    work = _work(bridge)
    with ContextExecutor(max_workers=8) as pool:
        results = await _submit_all(bridge, lambda i: asyncio.wrap_future(pool.submit(work, i)))
        _assert_each_task_logged_its_submitter(logs, results)
        leftovers = list(pool.map(lambda _: bridge.get("request_id"), range(32)))
    assert leftovers == [None] * 32


def test_context_executor_map_runs_in_the_callers_context(bridge: cb.ContextBridge) -> None:
    """``map`` goes through ``submit``: every call sees the caller's scope."""
    with ContextExecutor(max_workers=4) as pool, bridge.scope(request_id="r-map"):
        seen = set(pool.map(lambda _: bridge.get("request_id"), range(50)))
    assert seen == {"r-map"}


def test_plain_thread_pool_loses_the_context(bridge: cb.ContextBridge) -> None:
    """The problem being solved: a plain ThreadPoolExecutor task does not see the request."""
    with ThreadPoolExecutor(max_workers=1) as pool, bridge.scope(request_id="r-lost"):
        assert pool.submit(bridge.get, "request_id").result() is None
        assert submit_with_context(pool, bridge.get, "request_id").result() == "r-lost"


async def test_run_in_executor_helper_carries_the_context(
    bridge: cb.ContextBridge, logs: Records
) -> None:
    """``run_in_executor(executor, fn, *args)`` (where ``loop.run_in_executor`` copies nothing):
    200 concurrent calls on a thread pool each log their own request id."""
    work = _work(bridge)
    with ThreadPoolExecutor(max_workers=8) as pool:
        results = await _submit_all(bridge, lambda i: run_in_executor(pool, work, i))
    _assert_each_task_logged_its_submitter(logs, results)


async def test_run_in_executor_default_executor_and_bind(bridge: cb.ContextBridge) -> None:
    """The loop's default executor (``None``) through the helper, and the documented
    ``loop.run_in_executor(None, bridge.bind(fn))`` spelling, both see the request."""
    loop = asyncio.get_running_loop()
    with bridge.scope(request_id="r-default"):
        assert await loop.run_in_executor(None, bridge.get, "request_id") is None
        assert await run_in_executor(None, bridge.get, "request_id") == "r-default"
        bound = bridge.bind(bridge.get)
        assert await loop.run_in_executor(None, bound, "request_id") == "r-default"
        with ContextExecutor(max_workers=1) as pool:
            assert await run_in_executor(pool, bridge.get, "request_id", loop=loop) == "r-default"


async def test_asyncio_to_thread_carries_the_context(
    bridge: cb.ContextBridge, logs: Records
) -> None:
    """``asyncio.to_thread`` copies the context: 200 concurrent calls log their own ids."""
    work = _work(bridge)
    results = await _submit_all(bridge, lambda i: asyncio.to_thread(work, i))
    _assert_each_task_logged_its_submitter(logs, results)


async def test_anyio_to_thread_carries_the_context(bridge: cb.ContextBridge, logs: Records) -> None:
    """anyio's ``to_thread.run_sync`` copies the context too (asyncio backend)."""
    work = _work(bridge)
    results = await _submit_all(bridge, lambda i: anyio.to_thread.run_sync(work, i))
    _assert_each_task_logged_its_submitter(logs, results)


def test_thread_with_bind_sees_the_request(bridge: cb.ContextBridge, logs: Records) -> None:
    """``threading.Thread(target=bridge.bind(fn))``: the thread runs in the request; an unbound
    thread starts empty."""
    results: list[tuple[int, Any]] = []
    work = _work(bridge)
    threads = []
    for i in range(N):
        with bridge.scope(request_id=f"r-{i}"):
            target = bridge.bind(lambda i=i: results.append(work(i)))
            threads.append(threading.Thread(target=target))
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    _assert_each_task_logged_its_submitter(logs, results)
    unbound: list[Any] = []
    with bridge.scope(request_id="r-x"):
        t = threading.Thread(target=lambda: unbound.append(bridge.get("request_id")))
        t.start()
        t.join()
    assert unbound == [None]


async def test_callbacks_run_in_the_registering_context(bridge: cb.ContextBridge) -> None:
    """``loop.call_soon`` captures the context itself; a callback scheduled from another thread
    with ``call_soon_threadsafe`` gets that thread's (empty) context unless it is bound."""
    loop = asyncio.get_running_loop()
    seen: list[Any] = []
    done = asyncio.Event()

    def callback(tag: str) -> None:
        seen.append((tag, bridge.get("request_id")))
        if len(seen) == 3:
            done.set()

    with bridge.scope(request_id="r-cb"):
        loop.call_soon(callback, "call_soon")
        bound = bridge.bind(callback)
        for fn, tag in ((bound, "bound"), (callback, "unbound")):
            threading.Thread(target=loop.call_soon_threadsafe, args=(fn, tag)).start()
    await asyncio.wait_for(done.wait(), 10)
    assert sorted(seen) == [("bound", "r-cb"), ("call_soon", "r-cb"), ("unbound", None)]


def test_update_in_a_pool_task_reaches_the_request_not_the_pool_thread(
    bridge: cb.ContextBridge,
) -> None:
    """Inside a request frame, ``update()`` in a pooled task is seen by the request afterwards,
    while the pool thread's next task (another request) does not inherit it."""
    frame = bridge.new_frame(())
    ctx = bridge.derive(_runtime.get_current(), {"request_id": "r-upd"}, frame)
    with ContextExecutor(max_workers=1) as pool:
        token = _runtime.attach(ctx)
        try:
            pool.submit(bridge.update, user_id="u-1", tenant_id="acme").result()
            assert bridge.get("user_id") == "u-1"
            assert bridge.get("tenant_id") == "acme"
        finally:
            _runtime.detach(token)
        assert pool.submit(bridge.current).result() == {}


def test_spans_in_a_pool_task_are_children_of_the_submitting_span(
    bridge: cb.ContextBridge, spans: InMemorySpanExporter
) -> None:
    """Trace continuity: a span started in the task has the submitter's span as parent."""
    tracer = trace.get_tracer("test")
    with ContextExecutor(max_workers=2) as pool, tracer.start_as_current_span("request") as parent:

        def task() -> None:
            with tracer.start_as_current_span("task"):
                pass

        pool.submit(task).result()
    (child,) = [s for s in spans.get_finished_spans() if s.name == "task"]
    assert child.parent is not None
    assert child.parent.span_id == parent.get_span_context().span_id
