"""Celery: fields published with each task and restored around it on the worker.

End to end against the real RabbitMQ on 127.0.0.1:5672 with a real worker process running
``examples/celery_tasks.py``; the worker-side rules also in-process through Celery's own task
tracer (the code a worker runs), without a broker.
"""

from __future__ import annotations

import json
import logging
import os
import socket
import subprocess
import sys
import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from celery import Celery
from celery.app.trace import trace_task
from opentelemetry import baggage, trace
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

import otel_ctxbridge as cb
from otel_ctxbridge import _runtime
from otel_ctxbridge.executors import ContextExecutor
from otel_ctxbridge.integrations.celery import instrument_celery
from tests._services import unavailable

EXAMPLES = Path(__file__).resolve().parent.parent / "examples"
BROKER = ("127.0.0.1", 5672)
N = 200


# -- in-process: Celery's worker-side tracer, no broker ------------------------------------


@pytest.fixture
def local_app(bridge: cb.ContextBridge) -> Iterator[tuple[Celery, Any]]:
    """An app (never connected) with one task reporting what it sees, instrumented
    with ``trusted=False``."""
    app = Celery(f"local-{uuid.uuid4()}", set_as_current=False)
    seen: list[dict[str, Any]] = []

    @app.task(name="local.report", shared=False)
    def report(fail: bool = False, update: bool = False) -> None:
        span = trace.get_current_span().get_span_context()
        seen.append({**bridge.current(), "trace_id": span.trace_id if span.is_valid else None})
        if update:
            bridge.update(user_id="u-task")  # attached without a token, like any mid-task update
        if fail:
            raise RuntimeError("task failed")

    handle = instrument_celery(bridge, app)
    yield app, seen
    handle.uninstrument()


def _run_like_a_worker(app: Celery, headers: dict[str, Any], **kwargs: Any) -> None:
    task = app.tasks["local.report"]
    trace_task(task, str(uuid.uuid4()), (), kwargs, request={"id": "t", **headers}, app=app)


def test_worker_takes_fields_by_policy_and_restores_its_context(
    bridge: cb.ContextBridge, local_app: tuple[Celery, Any]
) -> None:
    """With ``trusted=False`` the worker takes the request id (``inbound="always"``) but not
    the tenant (``"trusted"``); after the task (which calls ``update()``) the worker thread's
    context is as before, also when the task raised."""
    app, seen = local_app
    with bridge.scope(request_id="r-1", tenant_id="acme", user_id="u-1"):
        headers = bridge.inject({"traceparent": "00-" + "ab" * 16 + "-" + "cd" * 8 + "-01"})
    before = _runtime.get_current()
    _run_like_a_worker(app, headers, update=True)
    assert _runtime.get_current() is before
    _run_like_a_worker(app, headers, fail=True, update=True)
    assert _runtime.get_current() is before
    assert seen[0] == {"request_id": "r-1", "trace_id": int("ab" * 16, 16)}
    assert seen[1] == seen[0]


def test_an_untrusted_worker_says_once_which_trusted_fields_it_leaves_out(
    bridge: cb.ContextBridge, local_app: tuple[Celery, Any], caplog: pytest.LogCaptureFixture
) -> None:
    """A message carrying the tenant (``inbound="trusted"``) to a worker instrumented with
    ``trusted=False`` is not silently half-restored: one warning names the field and
    ``trusted=True``, without its value, however many tasks follow."""
    app, seen = local_app
    with bridge.scope(request_id="r-1", tenant_id="acme"):
        headers = bridge.inject({})
    with caplog.at_level(logging.WARNING, logger="otel_ctxbridge"):
        _run_like_a_worker(app, headers)
        _run_like_a_worker(app, headers)
    told = [r.getMessage() for r in caplog.records if "leaves out" in r.getMessage()]
    assert len(told) == 1
    assert "tenant_id" in told[0]
    assert "trusted=True" in told[0]
    assert "acme" not in caplog.text
    assert [s.get("tenant_id") for s in seen] == [None, None]


def test_an_instrumentation_connected_first_keeps_its_span_and_the_thread_is_restored(
    bridge: cb.ContextBridge,
) -> None:
    """Another instrumentation whose handlers run before ours (as OpenTelemetry's Celery
    instrumentation's do when it is set up first) attaches its task span in ``task_prerun`` and
    detaches it in ``task_postrun``: the task runs under that span with our validated fields,
    and afterwards the worker thread holds exactly what it held before (neither our context
    nor the other instrumentation's span is left behind). Signal handlers run in connection
    order, so both postruns run in the same order as the prerun ones, not nested."""
    from celery import signals

    app = Celery(f"foreign-{uuid.uuid4()}", set_as_current=False)
    seen: list[dict[str, Any]] = []
    consumer = trace.NonRecordingSpan(
        trace.SpanContext(int("12" * 16, 16), int("34" * 8, 16), is_remote=False)
    )
    tokens: list[Any] = []

    def foreign_prerun(**_: Any) -> None:
        tokens.append(_runtime.attach(trace.set_span_in_context(consumer)))

    def foreign_postrun(**_: Any) -> None:
        _runtime.detach(tokens.pop())

    @app.task(name="foreign.report", shared=False)
    def report() -> None:
        span = trace.get_current_span().get_span_context()
        seen.append({**bridge.current(), "trace_id": span.trace_id})

    uid = f"foreign-{uuid.uuid4()}"
    signals.task_prerun.connect(foreign_prerun, weak=False, dispatch_uid=uid)
    signals.task_postrun.connect(foreign_postrun, weak=False, dispatch_uid=uid)
    handle = instrument_celery(bridge, app)
    try:
        with bridge.scope(request_id="r-f", tenant_id="acme"):
            headers = bridge.inject({})
        before = _runtime.get_current()
        trace_task(report, "t", (), {}, request={"id": "t", **headers}, app=app)
        after = _runtime.get_current()
    finally:
        handle.uninstrument()
        signals.task_prerun.disconnect(foreign_prerun, dispatch_uid=uid)
        signals.task_postrun.disconnect(foreign_postrun, dispatch_uid=uid)
    assert seen == [{"request_id": "r-f", "trace_id": int("12" * 16, 16)}]
    assert after is before


def test_with_opentelemetrys_celery_instrumentation_an_untrusted_message_sets_nothing_more(
    bridge: cb.ContextBridge,
) -> None:
    """OpenTelemetry's Celery instrumentation, set up first, attaches the context it extracted
    from the message as it came, and the span processor copies its baggage onto the task span.
    With ``trusted=False`` the task still forwards none of the message's undeclared baggage,
    and the task span keeps no tenant from it; the request id (``inbound="always"``) is kept
    on both. With ``trusted=True`` the tenant and the undeclared members are taken."""
    from opentelemetry.instrumentation.celery import CeleryInstrumentor

    exporter = InMemorySpanExporter()
    provider = TracerProvider()
    provider.add_span_processor(cb.ContextSpanProcessor(bridge))
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    app = Celery(f"otel-{uuid.uuid4()}", set_as_current=False)
    seen: list[dict[str, Any]] = []

    @app.task(name="otel.report", shared=False)
    def report() -> None:
        outbound = bridge.inject({}).get("baggage", "")
        seen.append(
            {"fields": bridge.current(), "baggage": dict(baggage.get_all()), "out": outbound}
        )

    headers = {
        "traceparent": "00-" + "ab" * 16 + "-" + "cd" * 8 + "-01",
        "baggage": "request_id=r-c,tenant_id=evil,role=admin",
        "x-tenant-id": "evil2",
    }
    instrumentor = CeleryInstrumentor()
    instrumentor.instrument(tracer_provider=provider)
    try:
        for trusted in (False, True):
            handle = instrument_celery(bridge, app, trusted=trusted)
            try:
                trace_task(report, "t", (), {}, request={"id": "t", **headers}, app=app)
            finally:
                handle.uninstrument()
    finally:
        instrumentor.uninstrument()
        provider.shutdown()
    untrusted, trusted_run = seen
    assert untrusted["fields"] == {"request_id": "r-c"}
    assert untrusted["baggage"] == {"request_id": "r-c"}
    assert untrusted["out"] == "request_id=r-c"
    assert trusted_run["fields"] == {"request_id": "r-c", "tenant_id": "evil2"}
    assert trusted_run["baggage"]["role"] == "admin"
    first, second = [s for s in exporter.get_finished_spans() if s.name.startswith("run/")]
    assert first.attributes is not None
    assert second.attributes is not None
    assert first.attributes["app.request_id"] == "r-c"
    assert "app.tenant_id" not in first.attributes
    assert second.attributes["app.tenant_id"] == "evil2"


def test_set_up_before_opentelemetrys_celery_instrumentation_nothing_untrusted_is_adopted(
    bridge: cb.ContextBridge, caplog: pytest.LogCaptureFixture
) -> None:
    """``instrument_celery`` first, OpenTelemetry's Celery instrumentation after (as its
    documented prefork worker setup does): the first task runs in the context OTel's handler
    attached over ours, but without the message's untrusted baggage (removed from the request
    once read), so no tenant and nothing undeclared is adopted or forwarded. Our handlers then
    move last, with one warning, and the next task has the validated fields."""
    from opentelemetry.instrumentation.celery import CeleryInstrumentor

    app = Celery(f"late-{uuid.uuid4()}", set_as_current=False)
    seen: list[dict[str, Any]] = []

    @app.task(name="late.report", shared=False)
    def report() -> None:
        out = bridge.inject({}).get("baggage", "")
        seen.append({"fields": bridge.current(), "baggage": dict(baggage.get_all()), "out": out})

    headers = {
        "traceparent": "00-" + "ab" * 16 + "-" + "cd" * 8 + "-01",
        "baggage": "request_id=r-l,tenant_id=evil,role=admin",
        "x-tenant-id": "evil2",
    }
    handle = instrument_celery(bridge, app)
    instrumentor = CeleryInstrumentor()
    instrumentor.instrument()
    try:
        with caplog.at_level(logging.WARNING, logger="otel_ctxbridge"):
            for _ in range(3):
                trace_task(report, "t", (), {}, request={"id": "t", **headers}, app=app)
    finally:
        instrumentor.uninstrument()
        handle.uninstrument()
    first, second, third = seen
    assert not {"tenant_id", "role"} & set(first["baggage"])
    assert "tenant_id" not in first["fields"]
    assert "role" not in first["out"]
    assert "evil" not in first["out"]
    assert second == third
    assert second["fields"] == {"request_id": "r-l"}
    assert second["out"] == "request_id=r-l"
    moved = [r for r in caplog.records if "run last" in r.getMessage()]
    assert len(moved) == 1


def test_a_plain_handler_connected_later_keeps_its_place_and_sees_the_fields(
    bridge: cb.ContextBridge, local_app: tuple[Celery, Any], caplog: pytest.LogCaptureFixture
) -> None:
    """Only an instrumentation's handler connected after ours moves ours last: a plain
    ``task_prerun`` handler of the application (logging task starts, say) keeps running after
    ours, seeing the task's fields, and nothing is said."""
    from celery import signals

    app, _ = local_app
    starts: list[dict[str, Any]] = []

    def on_start(**_: Any) -> None:
        starts.append(dict(bridge.current()))

    uid = f"plain-{uuid.uuid4()}"
    signals.task_prerun.connect(on_start, weak=False, dispatch_uid=uid)
    try:
        with bridge.scope(request_id="r-p"):
            headers = bridge.inject({})
        with caplog.at_level(logging.WARNING, logger="otel_ctxbridge"):
            _run_like_a_worker(app, headers)
            _run_like_a_worker(app, headers)
    finally:
        signals.task_prerun.disconnect(on_start, dispatch_uid=uid)
    assert starts == [{"request_id": "r-p"}, {"request_id": "r-p"}]
    assert not [r for r in caplog.records if "run last" in r.getMessage()]


def test_a_trusting_worker_set_up_first_adopts_no_unchecked_value_either(
    bridge: cb.ContextBridge,
) -> None:
    """With ``trusted=True`` and OpenTelemetry's Celery instrumentation set up after ours, the
    first task does not get what OTel's handler would extract unchecked (a tenant value the
    field refuses, over the valid ``x-tenant-id`` header); later tasks get the fields as the
    worker takes them."""
    from opentelemetry.instrumentation.celery import CeleryInstrumentor

    app = Celery(f"trusting-{uuid.uuid4()}", set_as_current=False)
    seen: list[dict[str, Any]] = []

    @app.task(name="trusting.report", shared=False)
    def report() -> None:
        seen.append(dict(bridge.current()))

    headers = {"baggage": "tenant_id=%20evil", "x-tenant-id": "acme", "x-request-id": "r-t"}
    handle = instrument_celery(bridge, app, trusted=True)
    instrumentor = CeleryInstrumentor()
    instrumentor.instrument()
    try:
        for _ in range(2):
            trace_task(report, "t", (), {}, request={"id": "t", **headers}, app=app)
    finally:
        instrumentor.uninstrument()
        handle.uninstrument()
    first, second = seen
    assert first.get("tenant_id") in (None, "acme")
    assert second == {"request_id": "r-t", "tenant_id": "acme"}


def test_a_trusting_worker_leaves_the_message_headers_to_the_task(
    bridge: cb.ContextBridge,
) -> None:
    """With ``trusted=True`` and no other instrumentation, a bound task still reads the
    message's headers (its ``baggage`` and the fields' headers) as they came."""
    app = Celery(f"headers-{uuid.uuid4()}", set_as_current=False)
    seen: list[dict[str, Any]] = []

    @app.task(name="headers.report", bind=True, shared=False)
    def report(self: Any) -> None:
        keys = ("baggage", "x-request-id", "x-tenant-id")
        seen.append({key: self.request.get(key) for key in keys})

    headers = {"baggage": "tenant_id=acme", "x-request-id": "r-h", "x-tenant-id": "acme"}
    handle = instrument_celery(bridge, app, trusted=True)
    try:
        trace_task(report, "t", (), {}, request={"id": "t", **headers}, app=app)
    finally:
        handle.uninstrument()
    assert seen == [headers]


def test_task_without_headers_gets_a_fresh_request_id_and_nothing_stale(
    bridge: cb.ContextBridge, local_app: tuple[Celery, Any]
) -> None:
    """A message without context (published outside a request) runs with a generated request
    id, even on a worker thread that still holds another context."""
    app, seen = local_app
    with bridge.scope(request_id="r-stale", tenant_id="stale"):
        _run_like_a_worker(app, {})
    assert set(seen[0]) == {"request_id", "trace_id"}
    assert seen[0]["request_id"] not in ("r-stale", None)
    assert seen[0]["trace_id"] is None


def test_eager_tasks_and_other_apps_keep_the_callers_context(
    bridge: cb.ContextBridge, local_app: tuple[Celery, Any]
) -> None:
    """``task.apply()`` runs in its caller's context untouched; tasks of an app that was not
    instrumented are left alone."""
    app, seen = local_app
    other = Celery(f"other-{uuid.uuid4()}", set_as_current=False)
    other_seen: list[Any] = []

    @other.task(name="other.report", shared=False)
    def other_task() -> None:
        other_seen.append(dict(bridge.current()))

    with bridge.scope(request_id="r-eager", tenant_id="acme"):
        app.tasks["local.report"].apply()
        request = {"id": "x", "baggage": "request_id=r-evil"}
        trace_task(other_task, "x", (), {}, request=request, app=other)
    assert seen == [{"request_id": "r-eager", "tenant_id": "acme", "trace_id": None}]
    assert other_seen == [{"request_id": "r-eager", "tenant_id": "acme"}]


def test_publish_writes_traceparent_and_baggage_into_task_headers(
    bridge: cb.ContextBridge, spans: InMemorySpanExporter, local_app: tuple[Celery, Any]
) -> None:
    """``before_task_publish`` writes the current context into the message headers; the
    process-local user stays behind."""
    from celery import signals

    headers: dict[str, Any] = {"id": "t"}
    tracer = trace.get_tracer("test")
    with tracer.start_as_current_span("publish") as span:
        with bridge.scope(request_id="r-pub", tenant_id="acme corp", user_id="u-1"):
            signals.before_task_publish.send(sender="local.report", headers=headers, body=())
    trace_id = f"{span.get_span_context().trace_id:032x}"
    assert headers["baggage"] == "request_id=r-pub,tenant_id=acme%20corp"
    assert headers["traceparent"].startswith(f"00-{trace_id}-")
    assert "u-1" not in json.dumps(headers)


# -- end to end: a real worker on the real broker ------------------------------------------


def _broker_reachable() -> bool:
    try:
        with socket.create_connection(BROKER, timeout=1):
            return True
    except OSError:
        return False


class WorkerLog:
    """The JSON lines a worker process writes to a file."""

    def __init__(self, path: Path, process: subprocess.Popen[bytes]) -> None:
        self.path = path
        self.process = process

    def text(self) -> str:
        return self.path.read_text(errors="replace")

    def lines(self) -> list[dict[str, Any]]:
        out = []
        for line in self.text().splitlines():
            if line.startswith("{"):
                try:
                    out.append(json.loads(line))
                except ValueError:  # a line being written right now
                    continue
        return out

    def wait_for(
        self, matches: Callable[[list[dict[str, Any]]], bool], timeout: float = 30
    ) -> list[dict[str, Any]]:
        deadline = time.monotonic() + timeout
        while True:
            lines = self.lines()
            if matches(lines):
                return lines
            if self.process.poll() is not None or time.monotonic() > deadline:
                pytest.fail(f"worker log did not show what was expected:\n{self.text()[-4000:]}")
            time.sleep(0.05)


@pytest.fixture(scope="module")
def example() -> Any:
    """``examples/celery_tasks.py`` imported in this process (the publishing side)."""
    sys.path.insert(0, str(EXAMPLES))
    try:
        import celery_tasks
    finally:
        sys.path.remove(str(EXAMPLES))
    return celery_tasks


@pytest.fixture(scope="module")
def worker(example: Any, tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[str, Any]]:
    """A real worker (thread pool, 8 threads) of the example app consuming a fresh queue."""
    if not _broker_reachable():
        message = f"RabbitMQ is not reachable on {BROKER[0]}:{BROKER[1]}"
        unavailable(message)
    queue = f"ctxbridge-test-{uuid.uuid4().hex[:12]}"
    log_path = tmp_path_factory.mktemp("celery") / "worker.log"
    command = [
        *(sys.executable, "-m", "celery", "-A", "celery_tasks", "worker"),
        *("--pool=threads", "--concurrency=8", "-Q", queue, "--loglevel=INFO"),
        *("--without-gossip", "--without-mingle"),  # a heartbeat lets SIGTERM stop it at once
        *("-n", f"{queue}@%h"),
    ]
    env = {**os.environ, "CELERY_QUEUE": queue, "PYTHONWARNINGS": "ignore"}
    with log_path.open("wb") as out:
        process = subprocess.Popen(command, cwd=EXAMPLES, env=env, stdout=out, stderr=out)
    log = WorkerLog(log_path, process)
    try:
        log.wait_for(lambda lines: any(line["message"] == "worker ready" for line in lines))
        yield queue, log
    finally:
        process.terminate()
        try:
            process.wait(15)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait(5)
        with example.app.connection_for_write() as conn:
            conn.default_channel.queue_delete(queue)
            conn.default_channel.exchange_delete(queue)


def _task_lines(lines: list[dict[str, Any]], prefix: str) -> dict[str, dict[str, Any]]:
    return {
        line["message"].removeprefix("processing order "): line
        for line in lines
        if line["name"] == "orders.tasks"
        and line["message"].startswith(f"processing order {prefix}")
    }


def test_worker_logs_each_publishing_requests_id_tenant_and_trace(
    example: Any, worker: tuple[str, WorkerLog], spans: InMemorySpanExporter
) -> None:
    """200 tasks published concurrently from 200 requests (each its own span) run on a real
    worker with 8 threads: each task's log line carries its own request id, tenant and trace
    id; the process-local user never reaches the worker."""
    queue, log = worker
    bridge, task = example.bridge, example.process_order
    tracer = trace.get_tracer("test")

    def publish(i: int) -> str:
        with (
            tracer.start_as_current_span(f"request-{i}") as span,
            bridge.scope(request_id=f"r-{i}", tenant_id=f"tenant {i}", user_id="u-secret"),
        ):
            task.apply_async((f"e2e-{i}",), queue=queue)
            return f"{span.get_span_context().trace_id:032x}"

    with ContextExecutor(max_workers=16) as pool:
        trace_ids = list(pool.map(publish, range(N)))
    lines = log.wait_for(lambda lines: len(_task_lines(lines, "e2e-")) == N)
    seen = _task_lines(lines, "e2e-")
    for i in range(N):
        line = seen[f"e2e-{i}"]
        expected = (f"r-{i}", f"tenant {i}", None, trace_ids[i])
        assert (line["request_id"], line["tenant_id"], line["user_id"], line["trace_id"]) == (
            expected
        )


def test_the_examples_publisher_sends_its_ids_and_traces_to_the_worker(
    example: Any, worker: tuple[str, WorkerLog], spans: InMemorySpanExporter
) -> None:
    """``python celery_tasks.py`` (its ``main()``): each order's worker line carries the request
    id, tenant and trace id the publisher printed for it, never the process-local user."""
    queue, log = worker
    published = example.main(queue)
    assert len(set(published.values())) == 3
    assert "0" * 32 not in published.values()
    lines = log.wait_for(lambda lines: len(_task_lines(lines, "order-")) == 3)
    seen = _task_lines(lines, "order-")
    for n, tenant in enumerate(("acme", "globex", "initech")):
        line = seen[f"order-{n}"]
        expected = (f"req-{n}", tenant, None, published[f"order-{n}"])
        assert (line["request_id"], line["tenant_id"], line["user_id"], line["trace_id"]) == (
            expected
        )


def test_worker_drops_hostile_header_values_and_runs_the_task(
    example: Any, worker: tuple[str, WorkerLog]
) -> None:
    """A message with an invalid request id, an oversized tenant and a broken traceparent:
    the task runs with a generated request id, no tenant, no trace; the worker logs each drop
    naming the field, never the raw value."""
    queue, log = worker
    bad_id = "evil-\u202e id; drop table"
    huge_tenant = "T" * 300
    headers = {
        "x-request-id": bad_id,
        "baggage": f"tenant_id={huge_tenant}",
        "traceparent": "00-garbage",
    }
    example.process_order.apply_async(("hostile",), queue=queue, headers=headers)
    lines = log.wait_for(lambda lines: "hostile" in _task_lines(lines, "hostile"))
    line = _task_lines(lines, "hostile")["hostile"]
    assert line["request_id"] not in (None, bad_id)
    assert cb.Field("r", validator=cb.REQUEST_ID_PATTERN).problem(line["request_id"]) is None
    assert (line["tenant_id"], line["trace_id"]) == (None, None)
    drops = [x["message"] for x in lines if x["message"].startswith("otel_ctxbridge: dropped")]
    assert any("'request_id'" in m for m in drops)
    assert any("'tenant_id'" in m for m in drops)
    text = log.text()
    assert "evil" not in text
    assert "drop table" not in text
    assert "TTTTTTTT" not in text
