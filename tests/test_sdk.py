"""configure(): providers, processors, logging bridge and OTLP export, against real receivers."""

from __future__ import annotations

import http.server
import logging
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from opentelemetry import propagate, trace
from opentelemetry.sdk._logs.export import InMemoryLogRecordExporter
from opentelemetry.sdk.trace import SpanProcessor, TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor, SpanExportResult
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from opentelemetry.trace import SpanKind, format_trace_id

import otel_ctxbridge as cb
from otel_ctxbridge.collector import CollectorStartError, EmbeddedCollector
from otel_ctxbridge.logs import ContextLogFilter
from otel_ctxbridge.otlp_sink import RecordingSink
from otel_ctxbridge.sdk import Telemetry, active_telemetry, configure
from tests._providers import reset_providers, unconfigured
from tests._services import IN_CI

OTEL_ENV = (
    "OTEL_EXPORTER_OTLP_ENDPOINT",
    "OTEL_EXPORTER_OTLP_HEADERS",
    "OTEL_EXPORTER_OTLP_PROTOCOL",
    "OTEL_EXPORTER_OTLP_TIMEOUT",
    "OTEL_SERVICE_NAME",
    "OTEL_RESOURCE_ATTRIBUTES",
    "OTEL_TRACES_EXPORTER",
    "OTEL_LOGS_EXPORTER",
    "OTEL_PROPAGATORS",
)


@pytest.fixture(autouse=True)
def clean_env(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    """No OTEL_* variable from the outside leaks into these tests; nothing stays configured."""
    for name in OTEL_ENV:
        monkeypatch.delenv(name, raising=False)
    with unconfigured():
        yield


@pytest.fixture
def sink() -> Iterator[RecordingSink]:
    """A real OTLP/HTTP receiver on 127.0.0.1."""
    with RecordingSink() as receiver:
        yield receiver


@pytest.fixture
def app_logger() -> Iterator[logging.Logger]:
    """Logger ``app`` at INFO (records propagate to the root logger's handlers)."""
    logger = logging.getLogger("app")
    logger.setLevel(logging.INFO)
    yield logger
    logger.setLevel(logging.NOTSET)


def _closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _shutdown_within(telemetry: Telemetry, seconds: float) -> None:
    """Shut down in a thread and require it to return within ``seconds``."""
    done = threading.Thread(target=telemetry.shutdown)
    done.start()
    done.join(seconds)
    assert not done.is_alive(), f"shutdown() did not return within {seconds} s"


def test_spans_and_logs_reach_the_collector_with_the_fields(
    bridge: cb.ContextBridge, sink: RecordingSink, app_logger: logging.Logger
) -> None:
    """One configure(): spans and stdlib log lines are exported over OTLP/HTTP (paths
    appended to the base URL) with service.name, the fields as attributes, and the trace id."""
    telemetry = configure(bridge, service_name="orders", endpoint=sink.endpoint + "/")
    tracer = trace.get_tracer("test")
    with (
        bridge.scope(request_id="r-1", tenant_id="acme", user_id="u-1"),
        tracer.start_as_current_span("GET /orders", kind=SpanKind.SERVER) as span,
    ):
        app_logger.info("listing orders")
    assert telemetry.force_flush()
    assert sink.wait_for(lambda s: bool(s.spans()) and bool(s.logs()), timeout=10)
    (exported,) = sink.spans()
    assert exported["service"] == "orders"
    assert exported["attributes"]["app.request_id"] == "r-1"
    assert exported["attributes"]["app.user_id"] == "u-1"
    (log,) = [r for r in sink.logs() if r["body"] == "listing orders"]
    assert log["service"] == "orders"
    assert log["trace_id"] == format_trace_id(span.get_span_context().trace_id)
    assert log["attributes"]["app.tenant_id"] == "acme"
    assert log["attributes"]["app.user_id"] == "u-1"


def test_plain_filter_keys_are_not_duplicated_into_otel_logs(
    bridge: cb.ContextBridge, sink: RecordingSink, app_logger: logging.Logger
) -> None:
    """With a ContextLogFilter on another root handler too, OTel log records carry only the
    namespaced attributes, not request_id/trace_id copies of the record's keys; an
    ``extra=`` key of the app's own still goes through."""
    console = logging.NullHandler()
    console.addFilter(ContextLogFilter(bridge))
    root = logging.getLogger()
    root.addHandler(console)
    try:
        telemetry = configure(bridge, service_name="orders", endpoint=sink.endpoint)
        root.handlers.remove(console)
        root.handlers.insert(0, console)  # the filter runs before the OTel bridge handler
        with bridge.scope(request_id="r-2"):
            app_logger.warning("with extra", extra={"order_id": "o-9"})
        telemetry.force_flush()
        assert sink.wait_for(lambda s: bool(s.logs()), timeout=10)
    finally:
        root.removeHandler(console)
    attributes = sink.logs()[0]["attributes"]
    assert attributes["app.request_id"] == "r-2"
    assert attributes["order_id"] == "o-9"
    assert not {"request_id", "tenant_id", "trace_id", "span_id"} & set(attributes)


def test_standard_env_variables_are_honoured(
    bridge: cb.ContextBridge, sink: RecordingSink, monkeypatch: pytest.MonkeyPatch
) -> None:
    """OTEL_EXPORTER_OTLP_ENDPOINT, OTEL_SERVICE_NAME and OTEL_RESOURCE_ATTRIBUTES apply
    when the arguments are left out."""
    monkeypatch.setenv("OTEL_EXPORTER_OTLP_ENDPOINT", sink.endpoint)
    monkeypatch.setenv("OTEL_SERVICE_NAME", "from-env")
    monkeypatch.setenv("OTEL_RESOURCE_ATTRIBUTES", "deployment.environment=test,team=core")
    telemetry = configure(bridge)
    trace.get_tracer("test").start_span("env").end()
    telemetry.force_flush()
    assert sink.wait_for(lambda s: bool(s.spans()), timeout=10)
    exported = sink.spans()[0]
    assert exported["service"] == "from-env"
    assert exported["resource"]["deployment.environment"] == "test"
    assert exported["resource"]["team"] == "core"


class _HeaderRecorder(http.server.BaseHTTPRequestHandler):
    seen: list[tuple[str, dict[str, str]]] = []  # noqa: RUF012 - set per server below

    def do_POST(self) -> None:
        self.rfile.read(int(self.headers.get("content-length", 0)))
        self.seen.append((self.path, {k.lower(): v for k, v in self.headers.items()}))
        self.send_response(200)
        self.send_header("content-type", "application/x-protobuf")
        self.send_header("content-length", "0")
        self.end_headers()

    def log_message(self, format: str, *args: object) -> None:
        pass


@pytest.fixture
def header_server() -> Iterator[tuple[str, list[tuple[str, dict[str, str]]]]]:
    """An HTTP server answering 200 to every POST and recording paths and headers."""
    seen: list[tuple[str, dict[str, str]]] = []
    handler = type("Recorder", (_HeaderRecorder,), {"seen": seen})
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=server.serve_forever, args=(0.05,), daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_address[1]}", seen
    server.shutdown()
    server.server_close()
    thread.join(5)


def test_headers_from_the_environment_and_from_the_argument(
    bridge: cb.ContextBridge,
    header_server: tuple[str, list[tuple[str, dict[str, str]]]],
    monkeypatch: pytest.MonkeyPatch,
    app_logger: logging.Logger,
) -> None:
    """OTEL_EXPORTER_OTLP_HEADERS is sent with every export, unless headers= is given."""
    url, seen = header_server
    monkeypatch.setenv("OTEL_EXPORTER_OTLP_HEADERS", "x-api-key=from-env")
    telemetry = configure(bridge, endpoint=url)
    trace.get_tracer("test").start_span("h").end()
    app_logger.warning("h")
    telemetry.force_flush()
    telemetry.shutdown()
    assert {path for path, _ in seen} == {"/v1/traces", "/v1/logs"}
    assert {headers.get("x-api-key") for _, headers in seen} == {"from-env"}
    reset_providers()
    seen.clear()
    telemetry = configure(bridge, endpoint=url, headers={"x-api-key": "from-arg"})
    trace.get_tracer("test").start_span("h").end()
    telemetry.force_flush()
    assert {headers.get("x-api-key") for _, headers in seen} == {"from-arg"}


@pytest.mark.parametrize("protocol", ["http/protobuf", "grpc"])
def test_a_closed_port_neither_blocks_nor_breaks_the_app(
    bridge: cb.ContextBridge, app_logger: logging.Logger, protocol: str
) -> None:
    """With no collector listening, spans and logs are still made (an in-memory exporter
    sees them, with the fields), nothing raises, and shutdown returns in bounded time."""
    memory = InMemorySpanExporter()
    logs = InMemoryLogRecordExporter()
    telemetry = configure(
        bridge,
        service_name="lonely",
        endpoint=f"http://127.0.0.1:{_closed_port()}",
        protocol=protocol,
        span_processors=[SimpleSpanProcessor(memory)],
        log_exporters=[logs],
    )
    tracer = trace.get_tracer("test")
    for i in range(50):
        with bridge.scope(request_id=f"r-{i}"), tracer.start_as_current_span(f"op-{i}"):
            app_logger.info("working %d", i)
    assert len(memory.get_finished_spans()) == 50
    assert memory.get_finished_spans()[-1].attributes["app.request_id"] == "r-49"  # type: ignore[index]
    _shutdown_within(telemetry, 15)
    assert len(logs.get_finished_logs()) == 50
    assert telemetry.closed
    assert active_telemetry() is None


def test_grpc_export_to_a_real_collector(
    bridge: cb.ContextBridge, monkeypatch: pytest.MonkeyPatch
) -> None:
    """OTEL_EXPORTER_OTLP_PROTOCOL=grpc exports through the embedded rotel collector."""
    with RecordingSink() as sink:
        collector = EmbeddedCollector(sink)
        try:
            collector.start()
        except CollectorStartError as exc:
            if IN_CI:
                pytest.fail(f"rotel-agent cannot start (CI=true): {exc}")
            pytest.skip(f"rotel-agent cannot start here: {exc}")
        try:
            monkeypatch.setenv("OTEL_EXPORTER_OTLP_PROTOCOL", "grpc")
            telemetry = configure(
                bridge, service_name="grpc-svc", endpoint=collector.otlp_grpc_endpoint
            )
            with bridge.scope(request_id="r-grpc"):
                trace.get_tracer("test").start_span("over-grpc").end()
            telemetry.force_flush()
            assert sink.wait_for(lambda s: bool(s.spans()), timeout=15), collector.output()
        finally:
            collector.stop()
    exported = sink.spans()[0]
    assert exported["service"] == "grpc-svc"
    assert exported["attributes"]["app.request_id"] == "r-grpc"


def test_configure_refuses_to_install_twice(bridge: cb.ContextBridge) -> None:
    """A second configure() raises AlreadyConfiguredError while the first is active, and
    after shutdown too (OTel's global providers can be set once per process)."""
    telemetry = configure(bridge, otlp=False)
    with pytest.raises(cb.AlreadyConfiguredError, match="already called") as raised:
        configure(bridge, otlp=False)
    # Not a hint to shut down and configure again: that is refused too (below).
    assert "once per process" in str(raised.value)
    assert "shutdown() the handle first" not in str(raised.value)
    telemetry.shutdown()
    telemetry.shutdown()  # idempotent
    with pytest.raises(cb.AlreadyConfiguredError, match=r"earlier configure\(\) that was shut"):
        configure(bridge, otlp=False)


def test_a_module_run_as_a_script_and_imported_by_name_is_told_it_ran_twice(
    tmp_path: Path,
) -> None:
    """A script calling configure() and then imported by its own name (what dictConfig's
    ``ext://app.bridge`` does to ``python app.py``) calls configure() twice from one line: the
    error says the file ran twice, as ``__main__`` and by name, rather than only "already
    called"."""
    script = tmp_path / "twice_app.py"
    script.write_text(
        "import otel_ctxbridge as cb\n"
        "bridge = cb.ContextBridge([cb.Field('request_id')])\n"
        "telemetry = cb.configure(bridge, otlp=False, flush_on_sigterm=False)\n"
        "if __name__ == '__main__':\n"
        "    import twice_app  # as ext://twice_app.bridge would\n",
        encoding="utf-8",
    )
    ran = subprocess.run(
        [sys.executable, str(script)],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert ran.returncode != 0
    assert "AlreadyConfiguredError" in ran.stderr
    assert "executed twice" in ran.stderr
    assert "'__main__'" in ran.stderr
    assert "'twice_app'" in ran.stderr


def test_configure_refuses_a_foreign_global_provider(bridge: cb.ContextBridge) -> None:
    """If the app (or auto-instrumentation) already set a TracerProvider, configure() says
    how to add the processor instead of silently not installing it."""
    trace.set_tracer_provider(TracerProvider())
    with pytest.raises(cb.AlreadyConfiguredError, match="ContextSpanProcessor"):
        configure(bridge, otlp=False)
    assert active_telemetry() is None


def test_the_w3c_propagator_is_installed(bridge: cb.ContextBridge) -> None:
    """configure() installs tracecontext + the W3C-correct baggage propagator globally."""
    with configure(bridge, otlp=False):
        carrier: dict[str, str] = {}
        with (
            bridge.scope(tenant_id="a b+c"),
            trace.get_tracer("t").start_as_current_span("out"),
        ):
            propagate.inject(carrier)
    assert carrier["baggage"] == "tenant_id=a%20b%2Bc"
    assert "traceparent" in carrier


def test_otel_propagators_variable_wins(
    bridge: cb.ContextBridge, monkeypatch: pytest.MonkeyPatch
) -> None:
    """With OTEL_PROPAGATORS set, configure() leaves the global textmap alone."""
    monkeypatch.setenv("OTEL_PROPAGATORS", "tracecontext")
    before = propagate.get_global_textmap()
    with configure(bridge, otlp=False):
        assert propagate.get_global_textmap() is before


def test_extra_exporters_and_exporter_variables(
    bridge: cb.ContextBridge, monkeypatch: pytest.MonkeyPatch, app_logger: logging.Logger
) -> None:
    """Extra exporters sit behind batch processors (flushed by force_flush); the logging
    bridge skips OTel's own loggers; OTEL_TRACES_EXPORTER=none adds no OTLP exporter."""
    monkeypatch.setenv("OTEL_TRACES_EXPORTER", "none")
    monkeypatch.setenv("OTEL_LOGS_EXPORTER", "none")
    spans, logs = InMemorySpanExporter(), InMemoryLogRecordExporter()
    telemetry = configure(
        bridge, endpoint="http://127.0.0.1:9", span_exporters=[spans], log_exporters=[logs]
    )
    with bridge.scope(request_id="r-x"):
        trace.get_tracer("t").start_span("batched").end()
        app_logger.info("kept")
        logging.getLogger("opentelemetry.sdk.test").warning("self-diagnostics")
    assert spans.get_finished_spans() == ()
    assert telemetry.force_flush()
    assert [s.name for s in spans.get_finished_spans()] == ["batched"]
    assert [r.log_record.body for r in logs.get_finished_logs()] == ["kept"]
    handler = telemetry.logging_handler
    assert handler in logging.getLogger().handlers
    start = time.monotonic()
    telemetry.shutdown()
    assert time.monotonic() - start < 10
    assert handler not in logging.getLogger().handlers


def test_bridge_logging_can_be_left_off(bridge: cb.ContextBridge) -> None:
    """bridge_logging=False installs no handler on the root logger."""
    before = list(logging.getLogger().handlers)
    with configure(bridge, otlp=False, bridge_logging=False) as telemetry:
        assert telemetry.logging_handler is None
        assert logging.getLogger().handlers == before


class _Stuck(threading.Event):
    """Span and log exporter whose export hangs until the event is set (a collector that
    accepts the connection and never answers)."""

    def export(self, batch: object) -> SpanExportResult:
        self.wait(30)
        return SpanExportResult.SUCCESS

    def shutdown(self) -> None:
        """Nothing to release."""

    def force_flush(self, timeout_millis: int = 30000) -> bool:
        return True


@pytest.fixture
def hung(
    bridge: cb.ContextBridge, app_logger: logging.Logger
) -> Iterator[tuple[Telemetry, _Stuck]]:
    """configure() with span and log exports that hang until ``stuck.set()``, a span and a
    log record buffered; released at teardown."""
    stuck = _Stuck()
    telemetry = configure(
        bridge,
        otlp=False,
        span_exporters=[stuck],  # type: ignore[list-item] # an exporter by its methods
        log_exporters=[stuck],  # type: ignore[list-item] # an exporter by its methods
    )
    try:
        with bridge.scope(request_id="r-1"), trace.get_tracer("t").start_as_current_span("op"):
            app_logger.info("stuck")
        yield telemetry, stuck
    finally:
        stuck.set()


def test_shutdown_returns_within_its_timeout_when_both_exports_hang(
    hung: tuple[Telemetry, _Stuck],
) -> None:
    """With the span and the log export both hanging, shutdown(timeout) waits for the two
    providers together: about `timeout` seconds in all, not `timeout` for each."""
    telemetry, _ = hung
    started = time.monotonic()
    telemetry.shutdown(timeout=2.0)
    assert time.monotonic() - started < 3.5  # both providers waited for in parallel
    assert telemetry.closed


def test_force_flush_returns_false_at_its_timeout_while_an_export_hangs(
    hung: tuple[Telemetry, _Stuck],
) -> None:
    """The SDK's batch processors export on the caller's thread and ignore the flush timeout:
    with the span and log exports hanging, force_flush(timeout_millis) still returns, False,
    after about that long (both providers waited for together); once the exporter answers,
    a flush completes and says True."""
    telemetry, stuck = hung
    started = time.monotonic()
    assert telemetry.force_flush(timeout_millis=500) is False
    assert time.monotonic() - started < 2.0
    stuck.set()
    assert telemetry.force_flush(timeout_millis=5000) is True


class _FailingFlush(SpanProcessor):
    """A span processor whose flush raises (a broken exporter plugin)."""

    def force_flush(self, timeout_millis: int = 30000) -> bool:
        raise RuntimeError("flush failed")


def test_force_flush_that_raises_says_false_and_does_not_raise(bridge: cb.ContextBridge) -> None:
    """A processor raising in force_flush makes it report False; nothing reaches the caller."""
    telemetry = configure(bridge, otlp=False, span_processors=[_FailingFlush()])
    assert telemetry.force_flush(timeout_millis=1000) is False
    telemetry.shutdown()


def test_force_flush_during_an_outage_keeps_one_flush_in_flight_per_provider(
    hung: tuple[Telemetry, _Stuck],
) -> None:
    """Flushing again and again while the exports hang (an app flushing after every task
    during a collector outage) does not pile up threads: each call finds the last flush still
    running, waits for it until its own deadline and says False; no new thread is queued."""
    telemetry, stuck = hung
    assert telemetry.force_flush(timeout_millis=50) is False
    threads = threading.active_count()
    for _ in range(20):
        assert telemetry.force_flush(timeout_millis=20) is False
    assert threading.active_count() == threads
    stuck.set()
    assert telemetry.force_flush(timeout_millis=5000) is True


def test_background_call_runs_inline_where_no_thread_can_start(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """At interpreter exit Python 3.12 refuses new threads ("can't create new thread at
    interpreter shutdown"): a flush or shutdown called from an atexit handler then runs on the
    caller's thread instead of raising."""
    from otel_ctxbridge._background import BackgroundCall, wait_all

    def refuse(self: threading.Thread) -> None:
        raise RuntimeError("can't create new thread at interpreter shutdown")

    monkeypatch.setattr(threading.Thread, "start", refuse)
    ran: list[str] = []
    call = BackgroundCall(lambda: ran.append("flushed") or True).start()
    assert ran == ["flushed"]
    assert wait_all([call], time.monotonic() + 1.0) is True
