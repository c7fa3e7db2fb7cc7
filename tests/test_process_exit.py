"""How a process that called configure() ends: SIGTERM (how Kubernetes, Docker and systemd
stop a service) flushes what it installed (a real uvicorn server in its own process, exporting
to a real OTLP/HTTP receiver), and a plain exit prints no error."""

from __future__ import annotations

import signal
import subprocess
import sys
from collections.abc import Iterator

import httpx
import pytest
from _servers import free_port, wait_for_port

import otel_ctxbridge as cb
from otel_ctxbridge.otlp_sink import RecordingSink
from otel_ctxbridge.sdk import configure
from tests._providers import reset_providers, unconfigured

SERVICE = """
import sys

import uvicorn
from starlette.applications import Starlette
from starlette.responses import PlainTextResponse
from starlette.routing import Route

import otel_ctxbridge as cb

bridge = cb.ContextBridge([cb.Field("request_id", header="x-request-id", inbound="always")])
telemetry = cb.configure(bridge, service_name="sigterm", endpoint=sys.argv[1])


async def index(request):
    return PlainTextResponse("ok")


app = cb.instrument_asgi(Starlette(routes=[Route("/", index)]), bridge, access_log=False)
uvicorn.run(app, host="127.0.0.1", port=int(sys.argv[2]), log_level="warning")
"""


@pytest.fixture(autouse=True)
def configures_afresh() -> Iterator[None]:
    """Each test configures afresh; what it installed is shut down after it."""
    with unconfigured():
        yield


def test_a_uvicorn_service_stopped_with_sigterm_exports_its_buffered_spans() -> None:
    """Spans still in the batch processor's buffer (it exports every 5 s) when the server gets
    SIGTERM reach the collector: uvicorn shuts down gracefully and raises SIGTERM again, which
    without the handler ends the process before the SDK's atexit flush. The process still
    ends by SIGTERM, promptly."""
    with RecordingSink() as sink:
        port = free_port()
        server = subprocess.Popen(
            [sys.executable, "-c", SERVICE, sink.endpoint, str(port)],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
        )
        try:
            wait_for_port(port, process=server)
            with httpx.Client(base_url=f"http://127.0.0.1:{port}", timeout=10) as client:
                for i in range(5):
                    assert client.get("/", headers={"x-request-id": f"r-{i}"}).status_code == 200
            server.send_signal(signal.SIGTERM)
            returncode = server.wait(timeout=20)
        finally:
            if server.poll() is None:
                server.kill()
                server.wait()
        assert returncode == -signal.SIGTERM, server.stderr.read() if server.stderr else ""
        assert sink.wait_for(lambda s: len(s.spans()) >= 5, timeout=5)
        ids = {span["attributes"].get("app.request_id") for span in sink.spans()}
        assert ids == {f"r-{i}" for i in range(5)}


def test_configure_handles_sigterm_only_where_nothing_else_does(bridge: cb.ContextBridge) -> None:
    """Over the default disposition configure() installs its handler, and shutdown() puts
    the default back; an application's own SIGTERM handler is never replaced; and
    ``flush_on_sigterm=False`` installs nothing."""
    assert signal.getsignal(signal.SIGTERM) is signal.SIG_DFL
    telemetry = configure(bridge, otlp=False, bridge_logging=False)
    assert telemetry.flushes_on_sigterm
    assert signal.getsignal(signal.SIGTERM) is not signal.SIG_DFL
    telemetry.shutdown()
    assert signal.getsignal(signal.SIGTERM) is signal.SIG_DFL

    def own(signum: int, frame: object) -> None:
        """The application's own handler."""

    reset_providers()
    signal.signal(signal.SIGTERM, own)
    try:
        telemetry = configure(bridge, otlp=False, bridge_logging=False)
        assert not telemetry.flushes_on_sigterm
        assert signal.getsignal(signal.SIGTERM) is own
        telemetry.shutdown()
        assert signal.getsignal(signal.SIGTERM) is own
    finally:
        signal.signal(signal.SIGTERM, signal.SIG_DFL)
    reset_providers()
    telemetry = configure(bridge, otlp=False, bridge_logging=False, flush_on_sigterm=False)
    assert not telemetry.flushes_on_sigterm
    assert signal.getsignal(signal.SIGTERM) is signal.SIG_DFL


@pytest.mark.parametrize("shut_down", [False, True])
def test_a_process_that_logged_through_the_bridge_exits_without_an_error(shut_down: bool) -> None:
    """At interpreter exit ``logging.shutdown()`` flushes every handler ever made; OTel's
    logging handler flushes from a new thread, which Python 3.12+ refuses then ("can't create
    new thread at interpreter shutdown", printed at every exit). Exit is quiet, with or
    without ``shutdown()``, and the log record still reaches the exporter at exit."""
    script = f"""
import logging
import otel_ctxbridge as cb
from opentelemetry.sdk._logs.export import ConsoleLogRecordExporter

bridge = cb.ContextBridge([cb.Field("request_id")])
telemetry = cb.configure(bridge, otlp=False, log_exporters=[ConsoleLogRecordExporter()])
with bridge.scope(request_id="r-exit"):
    logging.getLogger("app").warning("last words")
if {shut_down}:
    telemetry.shutdown()
"""
    done = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, timeout=60, check=False
    )
    assert done.returncode == 0, done.stderr
    assert "Exception ignored" not in done.stderr, done.stderr
    assert "Traceback" not in done.stderr, done.stderr
    assert "last words" in done.stdout
    assert "r-exit" in done.stdout


def test_a_shutdown_from_another_thread_leaves_a_handler_the_next_configure_replaces(
    bridge: cb.ContextBridge,
) -> None:
    """Only the main thread can change signal handlers: a ``shutdown()`` elsewhere leaves the
    (now idle) handler; a later ``configure()`` takes it over rather than treating it as the
    application's, and a main-thread ``shutdown()`` puts the default back."""
    import threading

    telemetry = configure(bridge, otlp=False, bridge_logging=False)
    stopper = threading.Thread(target=telemetry.shutdown)
    stopper.start()
    stopper.join(30)
    assert telemetry.closed
    assert signal.getsignal(signal.SIGTERM) is not signal.SIG_DFL
    reset_providers()
    again = configure(bridge, otlp=False, bridge_logging=False)
    assert again.flushes_on_sigterm
    again.shutdown()
    assert signal.getsignal(signal.SIGTERM) is signal.SIG_DFL
