"""The demo's processes: the embedded collector with its recording sink, and the two example
services (``gateway_service.py`` -> ``downstream_orders_service.py``) as child processes that
export spans and logs over OTLP to that collector. Used by ``demo.py`` and by the tests.

::

    with Stack(workdir) as stack:            # everything stopped on exit, errors included
        httpx.get(stack.gateway_url + "/checkout/1")
        stack.sink.wait_for(lambda sink: len(sink.spans()) >= 3)
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from pathlib import Path

from otel_ctxbridge.collector import EmbeddedCollector, RecordingSink

__all__ = ["GATEWAY", "ORDERS", "DemoError", "Stack"]

EXAMPLES = Path(__file__).resolve().parent
GATEWAY, ORDERS = "gateway", "orders-downstream"
"""The services' names (``service.name``)."""
_INHERITED_NOT = ("OTEL_", "GATEWAY_", "DOWNSTREAM_", "ORDERS_URL", "PARTNER_URL")
"""Prefixes of variables the services do not inherit: OpenTelemetry's and the examples' own
settings, which would redirect the demo's telemetry or change what the services do."""


class DemoError(RuntimeError):
    """Something the demo needs did not start; the message says what and shows its output."""


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@contextmanager
def _signals_deferred() -> Iterator[None]:
    """Python's SIGINT and SIGTERM handlers run after the block for signals that arrived in it
    (in the main thread; elsewhere Python runs no signal handler anyway). A signal mask would
    not do: it is inherited by the children started in the block, and another thread of this
    process would take the signal anyway."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    pending: list[int] = []
    previous = {
        signum: signal.signal(signum, lambda signum, frame: pending.append(signum))
        for signum in (signal.SIGINT, signal.SIGTERM)
    }
    try:
        yield
    finally:
        for signum, handler in previous.items():
            signal.signal(signum, handler if handler is not None else signal.SIG_DFL)
        for held in pending:
            signal.raise_signal(held)


def _stop(proc: subprocess.Popen[bytes], grace: float = 5.0) -> None:
    if proc.poll() is None:
        proc.terminate()
        try:
            proc.wait(grace)
        except subprocess.TimeoutExpired:
            proc.kill()
    proc.wait()


class Stack:
    """The collector (with its recording sink) and the two services, as child processes.

    ``env`` adds variables for both services (say ``OTEL_BSP_MAX_QUEUE_SIZE``); inherited
    ``OTEL_*`` variables and the examples' settings (``GATEWAY_*``, ``PARTNER_URL``...) are
    dropped so that nothing in the caller's environment changes what the demo shows.
    """

    def __init__(self, workdir: Path, env: Mapping[str, str] | None = None) -> None:
        """Configure only; ``start()`` runs it."""
        self.workdir = workdir
        self.env = dict(env or {})
        self.collector = EmbeddedCollector(batch_timeout="100ms")
        self.procs: dict[str, subprocess.Popen[bytes]] = {}
        self.urls: dict[str, str] = {}

    @property
    def sink(self) -> RecordingSink:
        """Where the collector forwards everything it receives."""
        return self.collector.sink

    @property
    def gateway_url(self) -> str:
        """Base URL of the gateway service."""
        return self.urls[GATEWAY]

    def start(self, timeout: float = 30.0) -> Stack:
        """Start the collector, then both services (in parallel); return once all serve.
        Not undone on failure: ``stop()`` (or the ``with`` statement) cleans up."""
        with _signals_deferred():  # a child started is a child recorded, Ctrl-C or not
            self.collector.start()  # CollectorStartError when rotel is missing or cannot run
        orders_port, gateway_port = _free_port(), _free_port()
        self.urls[ORDERS] = f"http://127.0.0.1:{orders_port}"
        self._spawn(ORDERS, "downstream_orders_service.py", DOWNSTREAM_PORT=str(orders_port))
        self.urls[GATEWAY] = f"http://127.0.0.1:{gateway_port}"
        self._spawn(
            GATEWAY,
            "gateway_service.py",
            GATEWAY_PORT=str(gateway_port),
            ORDERS_URL=self.urls[ORDERS],
        )
        deadline = time.monotonic() + timeout
        for name, url in self.urls.items():
            self._wait_ready(name, int(url.rsplit(":", 1)[1]), deadline)
        return self

    def _spawn(self, name: str, script: str, **env: str) -> None:
        base = {k: v for k, v in os.environ.items() if not k.startswith(_INHERITED_NOT)}
        base.update(
            OTEL_EXPORTER_OTLP_ENDPOINT=self.collector.otlp_http_endpoint,
            OTEL_SERVICE_NAME=name,
            OTEL_BSP_SCHEDULE_DELAY="200",  # export every 0.2 s (SDK default: 5 s)
            OTEL_BLRP_SCHEDULE_DELAY="200",
            PYTHONUNBUFFERED="1",
        )
        with (self.workdir / f"{name}.log").open("wb") as out, _signals_deferred():
            self.procs[name] = subprocess.Popen(
                [sys.executable, str(EXAMPLES / script)],
                env={**base, **self.env, **env},
                stdin=subprocess.DEVNULL,
                stdout=out,
                stderr=subprocess.STDOUT,
                cwd=EXAMPLES,
            )

    def _wait_ready(self, name: str, port: int, deadline: float) -> None:
        proc = self.procs[name]
        while proc.poll() is None:
            try:
                socket.create_connection(("127.0.0.1", port), timeout=0.2).close()
                return
            except OSError:
                if time.monotonic() > deadline:
                    break
                time.sleep(0.05)
        raise DemoError(f"{name} did not start (exit code {proc.poll()}):\n{self.output(name)}")

    def output(self, name: str, lines: int = 40) -> str:
        """The last ``lines`` lines a service wrote (stdout and stderr)."""
        path = self.workdir / f"{name}.log"
        text = path.read_text(errors="replace") if path.exists() else ""
        return "\n".join(text.splitlines()[-lines:])

    def stop(self) -> None:
        """Stop the services (SIGTERM, SIGKILL after 5 s), then the collector. Idempotent.

        SIGINT and SIGTERM are held back meanwhile (delivered afterwards), so a second Ctrl-C
        cannot leave a process behind."""
        with _signals_deferred():
            for name in (GATEWAY, ORDERS):
                if name in self.procs:
                    _stop(self.procs[name])
            self.collector.stop()

    def __enter__(self) -> Stack:
        try:
            return self.start()
        except BaseException:  # started halfway (or interrupted): stop what runs
            self.stop()
            raise

    def __exit__(self, *exc: object) -> None:
        self.stop()
