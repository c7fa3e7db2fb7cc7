"""Processes and plain header dicts: the context crosses a process boundary as W3C headers;
the receiving side validates by the bridge's field policies and never fails the work."""

from __future__ import annotations

import asyncio
import io
import logging
import multiprocessing
import os
from collections.abc import Iterator
from concurrent.futures import ProcessPoolExecutor
from typing import Any

import pytest
from opentelemetry import baggage, trace
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

import otel_ctxbridge as cb
from otel_ctxbridge import _runtime
from otel_ctxbridge.carriers import (
    call_with_headers,
    context_from,
    continue_from,
    normalize_headers,
)
from otel_ctxbridge.executors import (
    ContextProcessExecutor,
    context_headers,
    run_in_executor,
    submit_with_context,
)
from otel_ctxbridge.logs import ContextLogFilter

# The fork pools are tested on purpose (a forked worker inherits the submitter's state): the
# warning Python 3.12+ gives for forking a process that has threads (the SDK's exporters, the
# event loop's executor) is about that choice, not about the library.
pytestmark = pytest.mark.filterwarnings(
    "ignore:This process .* is multi-threaded, use of fork:DeprecationWarning"
)

N = 200
# Module-level so that a worker process (spawned: it re-imports this module) has one too.
CHILD_BRIDGE = cb.ContextBridge(
    fields=[
        cb.Field("request_id", header="x-request-id", validator=cb.REQUEST_ID_PATTERN),
        cb.Field("tenant_id", header="x-tenant-id"),
        cb.Field("user_id", propagate=False),
    ]
)


def child_task(i: int) -> dict[str, Any]:
    """Runs in a worker process: logs one line with the fields and reports what it saw."""
    stream = io.StringIO()
    handler = logging.StreamHandler(stream)
    handler.addFilter(ContextLogFilter(CHILD_BRIDGE, default="-"))
    handler.setFormatter(logging.Formatter("%(message)s request_id=%(request_id)s"))
    logger = logging.getLogger(f"child.{i}")
    logger.addHandler(handler)
    logger.propagate = False
    logger.warning("task %d", i)
    logger.removeHandler(handler)
    span = trace.get_current_span().get_span_context()
    return {
        "pid": os.getpid(),
        "i": i,
        "log": stream.getvalue().strip(),
        "request_id": baggage.get_baggage("request_id"),
        "tenant_id": CHILD_BRIDGE.get("tenant_id"),
        "user_id": CHILD_BRIDGE.get("user_id"),
        "trace_id": f"{span.trace_id:032x}" if span.is_valid else None,
    }


@pytest.fixture(scope="module", params=["spawn", "fork"])
def pool(request: pytest.FixtureRequest) -> Iterator[ContextProcessExecutor]:
    """A 2-process ContextProcessExecutor per start method (spawn re-imports, fork inherits)."""
    context = multiprocessing.get_context(request.param)
    with ContextProcessExecutor(max_workers=2, mp_context=context) as executor:
        executor.submit(child_task, -1).result(timeout=60)  # start the workers once
        yield executor


def test_process_pool_tasks_log_their_submitters_request_id(
    bridge: cb.ContextBridge, spans: InMemorySpanExporter, pool: ContextProcessExecutor
) -> None:
    """200 submissions from 200 different scopes (and traces) run in 2 worker processes:
    each logs its own request id, reads its tenant and trace; process-local fields stay home."""
    tracer = trace.get_tracer("test")
    futures = []
    trace_ids = {}
    for i in range(N):
        with (
            tracer.start_as_current_span(f"request-{i}") as span,
            bridge.scope(request_id=f"r-{i}", tenant_id=f"t {i}", user_id=f"u-{i}"),
        ):
            trace_ids[i] = f"{span.get_span_context().trace_id:032x}"
            futures.append(pool.submit(child_task, i))
    results = [f.result(timeout=60) for f in futures]
    assert os.getpid() not in {seen.pop("pid") for seen in results}
    for i, seen in enumerate(results):
        assert seen == {
            "i": i,
            "log": f"task {i} request_id=r-{i}",
            "request_id": f"r-{i}",
            "tenant_id": f"t {i}",
            "user_id": None,
            "trace_id": trace_ids[i],
        }


def test_task_submitted_outside_a_request_sees_no_leftover(
    bridge: cb.ContextBridge, pool: ContextProcessExecutor
) -> None:
    """A worker process (even a forked one, which inherits the forking thread's context)
    runs a task submitted outside any request with no fields and no trace."""
    with bridge.scope(request_id="r-before"):
        pool.submit(child_task, 0).result(timeout=60)
    seen = pool.submit(child_task, 1).result(timeout=60)
    assert (seen["request_id"], seen["tenant_id"], seen["trace_id"]) == (None, None, None)


async def test_plain_process_pool_through_the_helpers(bridge: cb.ContextBridge) -> None:
    """``run_in_executor`` and ``submit_with_context`` on a plain ProcessPoolExecutor send the
    context along with the task."""
    context = multiprocessing.get_context("fork")
    with ProcessPoolExecutor(max_workers=1, mp_context=context) as plain:
        with bridge.scope(request_id="r-loop", tenant_id="acme"):
            via_loop = await run_in_executor(plain, child_task, 1)
            via_submit = await asyncio.wrap_future(submit_with_context(plain, child_task, 2))
    assert (via_loop["request_id"], via_loop["tenant_id"]) == ("r-loop", "acme")
    assert (via_submit["request_id"], via_submit["tenant_id"]) == ("r-loop", "acme")


@pytest.mark.parametrize(
    "helper", ["submit_with_context", "run_in_executor", "ContextProcessExecutor"]
)
async def test_a_worker_forked_by_a_helper_inside_a_request_keeps_nothing_of_it(
    helper: str,
) -> None:
    """A pool starts its workers when tasks are submitted. A worker forked while a helper
    submits a request's task must not keep that request's context: the plain ``submit`` calls
    it runs afterwards (in that request or outside any) see no request id, no propagated
    tenant and no process-local user."""
    context = multiprocessing.get_context("fork")
    kind = ContextProcessExecutor if helper == "ContextProcessExecutor" else ProcessPoolExecutor
    with kind(max_workers=1, mp_context=context) as pool:
        with CHILD_BRIDGE.scope(request_id="r-a", tenant_id="acme", user_id="alice"):
            if helper == "run_in_executor":
                first = await run_in_executor(pool, child_task, 1)
            elif helper == "submit_with_context":
                first = submit_with_context(pool, child_task, 1).result(timeout=60)
            else:
                first = pool.submit(child_task, 1).result(timeout=60)
            later = ProcessPoolExecutor.submit(pool, child_task, 2).result(timeout=60)
        after = ProcessPoolExecutor.submit(pool, child_task, 3).result(timeout=60)
    assert (first["request_id"], first["tenant_id"], first["user_id"]) == ("r-a", "acme", None)
    for seen in (later, after):
        assert (seen["request_id"], seen["tenant_id"], seen["user_id"]) == (None, None, None)


async def test_late_updates_reach_a_plain_process_pool_when_the_bridge_is_passed(
    bridge: cb.ContextBridge,
) -> None:
    """In a request frame, a tenant set by ``update()`` in a worker thread (a FastAPI sync
    dependency) is not in the current context's baggage; ``run_in_executor(..., bridge=)``
    still sends it to a plain process pool, as ``submit_with_context(..., bridge=)`` does."""
    frame = bridge.new_frame(())
    token = _runtime.attach(bridge.derive(_runtime.get_current(), {"request_id": "r-l"}, frame))
    try:
        await asyncio.to_thread(bridge.update, tenant_id="late")
        assert bridge.get("tenant_id") == "late"
        context = multiprocessing.get_context("fork")
        with ProcessPoolExecutor(max_workers=1, mp_context=context) as plain:
            via_loop = await run_in_executor(plain, child_task, 1, bridge=bridge)
            via_submit = submit_with_context(plain, child_task, 2, bridge=bridge).result(60)
    finally:
        _runtime.detach(token)
    assert (via_loop["request_id"], via_loop["tenant_id"]) == ("r-l", "late")
    assert (via_submit["request_id"], via_submit["tenant_id"]) == ("r-l", "late")


def test_call_with_headers_restores_trace_and_baggage_on_an_empty_context(
    bridge: cb.ContextBridge, spans: InMemorySpanExporter
) -> None:
    """The child-side entry point: the trace parent and the baggage as sent, nothing of the
    calling thread's own context, and the previous context restored afterwards."""
    tracer = trace.get_tracer("test")
    with tracer.start_as_current_span("sender") as sender, bridge.scope(request_id="r-h"):
        headers = context_headers(bridge)
    before = _runtime.get_current()
    with bridge.scope(request_id="r-stale", tenant_id="stale"):
        seen = call_with_headers(headers, child_task, 5)
    assert _runtime.get_current() is before
    assert seen["request_id"] == "r-h"
    assert seen["tenant_id"] is None
    assert seen["trace_id"] == f"{sender.get_span_context().trace_id:032x}"


# -- the receiving side: validation by the bridge's policies ------------------------------


def test_continue_from_takes_fields_by_policy_and_continues_the_trace(
    bridge: cb.ContextBridge, spans: InMemorySpanExporter
) -> None:
    """A worker trusts only what its policy allows: ``always`` fields from anyone,
    ``trusted`` ones only with ``trusted=True``; the remote span becomes the parent."""
    tracer = trace.get_tracer("test")
    with tracer.start_as_current_span("publisher") as publisher:
        with bridge.scope(request_id="r-q", tenant_id="acme corp", user_id="u-1"):
            headers = bridge.inject({})
    with continue_from(bridge, headers) as taken:
        assert dict(taken) == {"request_id": "r-q"}
        assert bridge.get("tenant_id") is None
    with continue_from(bridge, headers, trusted=True) as taken:
        assert dict(taken) == {"request_id": "r-q", "tenant_id": "acme corp"}
        with tracer.start_as_current_span("consumer"):
            pass
    (consumer,) = [s for s in spans.get_finished_spans() if s.name == "consumer"]
    assert consumer.parent is not None
    assert consumer.parent.span_id == publisher.get_span_context().span_id
    assert consumer.context.trace_id == publisher.get_span_context().trace_id


def test_invalid_or_oversized_values_are_dropped_logged_without_the_value(
    bridge: cb.ContextBridge, caplog: pytest.LogCaptureFixture
) -> None:
    """Hostile headers: an invalid request id and an oversized tenant are dropped, counted and
    logged without the raw value; the work still runs, with a freshly generated request id."""
    bad_id = "evil id\r\nx-injected: 1"
    headers = {
        "x-request-id": bad_id,
        "x-tenant-id": "T" * 5000,
        "baggage": f"tenant_id={'T' * 300}",
        "traceparent": "garbage",
    }
    ran = []
    with caplog.at_level(logging.WARNING, "otel_ctxbridge"):
        with continue_from(bridge, headers, trusted=True) as taken:
            ran.append(dict(taken))
    assert len(ran) == 1
    assert set(ran[0]) == {"request_id"}
    assert ran[0]["request_id"] != bad_id
    assert bridge.drop_counts() == {"request_id": 1, "tenant_id": 2}
    text = caplog.text
    assert "request_id" in text
    assert "tenant_id" in text
    assert "evil" not in text
    assert "TTTT" not in text


def test_context_from_keeps_a_running_span_and_resets_stale_fields(
    bridge: cb.ContextBridge, spans: InMemorySpanExporter
) -> None:
    """With a ``base`` that already has a span (a queue instrumentation's consumer span), that
    span stays current; declared fields of the base that the headers do not carry are unset."""
    tracer = trace.get_tracer("test")
    with tracer.start_as_current_span("consumer") as consumer:
        with bridge.scope(request_id="r-old", tenant_id="old", user_id="old"):
            base = _runtime.get_current()
    remote = "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01"
    ctx = context_from(
        bridge, {"traceparent": remote, "x-request-id": "r-new"}, base=base, generate=False
    )
    assert trace.get_current_span(ctx) is consumer
    assert bridge.values_in(ctx) == {"request_id": "r-new"}


def test_never_raises_on_unreadable_carriers(bridge: cb.ContextBridge) -> None:
    """A carrier that raises, or holds odd types, yields an empty (generated) context."""

    class Hostile(dict[str, str]):
        def items(self) -> Any:
            raise RuntimeError("boom")

    assert normalize_headers(Hostile()) == {}
    assert normalize_headers({b"X-Request-ID": [b"r-1"], "n": 5, "Baggage": "a=b"}) == {
        "x-request-id": "r-1",
        "baggage": "a=b",
    }
    with continue_from(bridge, Hostile()) as taken:
        assert set(taken) == {"request_id"}
    with continue_from(bridge, None, generate=False) as taken:
        assert dict(taken) == {}
