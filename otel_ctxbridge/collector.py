"""Embedded OTLP collector (rotel) and an in-memory OTLP/HTTP recording sink, for demo and tests.

``python -m otel_ctxbridge.collector`` runs both and prints what arrives until Ctrl-C.
"""

from __future__ import annotations

import argparse
import collections
import importlib.util
import os
import re
import signal
import socket
import subprocess
import sys
import sysconfig
import threading
import time
import weakref
from collections.abc import Sequence
from pathlib import Path
from typing import IO, Any, NoReturn

from .errors import requires_extra

with requires_extra("collector", "otel_ctxbridge.collector"):
    from .otlp_sink import RecordingSink

__all__ = ["CollectorStartError", "EmbeddedCollector", "RecordingSink", "main"]

_HOST = "127.0.0.1"
_ANSI = re.compile(r"\x1b\[[0-9;]*m")


class CollectorStartError(RuntimeError):
    """The embedded collector is missing or did not come up; the message carries its output."""


def _free_ports() -> tuple[int, int]:
    with socket.socket() as a, socket.socket() as b:
        a.bind((_HOST, 0))
        b.bind((_HOST, 0))
        return a.getsockname()[1], b.getsockname()[1]


def _agent_binary() -> str:
    spec = importlib.util.find_spec("rotel")
    if spec is None or spec.origin is None:
        raise CollectorStartError("rotel is not installed: pip install 'otel_ctxbridge[collector]'")
    return str(Path(spec.origin).parent / "rotel-agent")


def _drain(stream: IO[bytes], lines: collections.deque[str]) -> None:
    for raw in iter(stream.readline, b""):
        lines.append(_ANSI.sub("", raw.decode("utf-8", "replace")).rstrip())
    stream.close()


def _terminate(proc: subprocess.Popen[bytes], grace: float = 5.0) -> None:
    if proc.poll() is None:
        proc.terminate()
        try:
            proc.wait(grace)
        except subprocess.TimeoutExpired:
            proc.kill()
    proc.wait()


class EmbeddedCollector:
    """The real ``rotel-agent`` OTLP collector on local ports, exporting OTLP/HTTP (gzipped).

    By default it owns a ``RecordingSink`` and exports there; pass ``sink`` to share one (it is
    then not stopped by ``stop()``), or ``export_endpoint`` (an OTLP/HTTP base URL) to forward
    elsewhere. Ports 0 mean free ports, chosen at the first ``start()`` and kept afterwards.
    """

    def __init__(
        self,
        sink: RecordingSink | None = None,
        *,
        export_endpoint: str | None = None,
        grpc_port: int = 0,
        http_port: int = 0,
        batch_timeout: str = "100ms",
        startup_timeout: float = 15.0,
        extra_args: Sequence[str] = (),
    ) -> None:
        """Configure only; nothing runs before ``start()``."""
        self._own_sink = sink is None and export_endpoint is None
        self._sink = RecordingSink() if self._own_sink else sink
        self._export_endpoint = export_endpoint
        self._requested = self._ports = (grpc_port, http_port)
        self._batch_timeout, self._startup_timeout = batch_timeout, startup_timeout
        self._extra_args = list(extra_args)
        self._proc: subprocess.Popen[bytes] | None = None
        self._reader: threading.Thread | None = None
        self._output: collections.deque[str] = collections.deque(maxlen=200)
        self._finalizer: weakref.finalize[Any, Any] | None = None

    @property
    def sink(self) -> RecordingSink:
        """The sink it exports to (RuntimeError when exporting to ``export_endpoint``)."""
        if self._sink is None:
            raise RuntimeError("this collector exports to an external endpoint, not a sink")
        return self._sink

    @property
    def otlp_http_endpoint(self) -> str:
        """OTLP/HTTP base URL, as for ``OTEL_EXPORTER_OTLP_ENDPOINT``: ``http://127.0.0.1:PORT``."""
        return f"http://{_HOST}:{self._ports[1]}"

    @property
    def otlp_grpc_endpoint(self) -> str:
        """OTLP/gRPC endpoint (plaintext): ``http://127.0.0.1:PORT``."""
        return f"http://{_HOST}:{self._ports[0]}"

    @property
    def pid(self) -> int | None:
        """Process id of the agent while started, else None."""
        return self._proc.pid if self._proc is not None else None

    @property
    def running(self) -> bool:
        """True while the agent process is alive."""
        return self._proc is not None and self._proc.poll() is None

    def output(self) -> list[str]:
        """The agent's last 200 stdout/stderr lines (colours stripped)."""
        return list(self._output)

    def start(self) -> EmbeddedCollector:
        """Start the sink (if owned) and the agent; return once it serves. Idempotent.

        Ports chosen by the first start are kept: a later ``start()`` (say, after an outage made
        with ``stop()``) serves on the same endpoints.
        """
        if not self.running:
            if self._sink is not None:
                self._sink.start()
            keep = all(self._ports)
            try:
                self._launch_retrying(keep_ports=keep)
            except BaseException:
                self._ports = self._ports if keep else self._requested
                self.stop()
                raise
        return self

    def restart(self) -> EmbeddedCollector:
        """Stop the agent and start it again on the same ports (the sink keeps running)."""
        self._stop_process()
        return self.start()

    def stop(self) -> None:
        """Terminate the agent (SIGKILL after 5 s), reap it, and stop an owned sink."""
        self._stop_process()
        if self._own_sink and self._sink is not None:
            self._sink.stop()

    def _launch_retrying(self, keep_ports: bool) -> None:
        # fresh free ports may be taken by a racer; ours may be busy for a moment after a stop;
        # ports the user chose are not retried
        tries = 3 if not keep_ports else 10 if self._ports != self._requested else 1
        for attempt in range(1, tries + 1):
            if not keep_ports:
                free = _free_ports()
                self._ports = (self._requested[0] or free[0], self._requested[1] or free[1])
            try:
                return self._launch()
            except CollectorStartError:
                if attempt == tries or not any("in use" in ln for ln in self._output):
                    raise
                time.sleep(0.2 if keep_ports else 0)

    def _launch(self) -> None:
        target = self._export_endpoint or self.sink.endpoint
        grpc, http = self._ports
        args = [
            _agent_binary(), "start",
            "--otlp-grpc-endpoint", f"{_HOST}:{grpc}", "--otlp-http-endpoint", f"{_HOST}:{http}",
            "--exporter", "otlp", "--otlp-exporter-protocol", "http",
            "--otlp-exporter-endpoint", target, "--batch-timeout", self._batch_timeout,
            "--otlp-exporter-retry-initial-backoff", "100ms",
            "--otlp-exporter-retry-max-backoff", "1s", *self._extra_args,
        ]  # fmt: skip
        env = {k: v for k, v in os.environ.items() if not k.startswith("ROTEL_")}
        libdirs = [sysconfig.get_config_var("LIBDIR") or "", env.get("LD_LIBRARY_PATH", "")]
        env["LD_LIBRARY_PATH"] = os.pathsep.join(d for d in libdirs if d)
        self._output.clear()
        try:
            proc = subprocess.Popen(
                args, env=env, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                stderr=subprocess.STDOUT, start_new_session=True,
            )  # fmt: skip
        except OSError as exc:
            raise CollectorStartError(f"cannot run {args[0]}: {exc}") from exc
        self._proc = proc
        self._finalizer = weakref.finalize(self, _terminate, proc, 1.0)
        assert proc.stdout is not None
        self._reader = threading.Thread(target=_drain, args=(proc.stdout, self._output))
        self._reader.daemon = True
        self._reader.start()
        deadline = time.monotonic() + self._startup_timeout
        while proc.poll() is None:
            try:
                socket.create_connection((_HOST, http), timeout=0.25).close()
                break
            except OSError:
                if time.monotonic() > deadline:
                    self._fail(f"rotel-agent did not open {_HOST}:{http} in time")
                time.sleep(0.05)
        time.sleep(0.2)  # the open port may be someone else's: is the agent still alive?
        if proc.poll() is not None:
            self._fail(f"rotel-agent exited with code {proc.returncode} at startup")

    def _fail(self, message: str) -> NoReturn:
        self._stop_process()
        tail = "\n".join(self._output) or "(no output)"
        raise CollectorStartError(f"{message}; its output:\n{tail}")

    def _stop_process(self) -> None:
        proc, self._proc = self._proc, None
        if self._finalizer is not None:
            self._finalizer.detach()
        if proc is not None:
            _terminate(proc)
        if self._reader is not None:
            self._reader.join(5)

    def __enter__(self) -> EmbeddedCollector:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()


def _interrupt(signum: int, frame: object) -> None:
    raise KeyboardInterrupt


def main(argv: Sequence[str] | None = None) -> int:
    """Run a collector and a sink until Ctrl-C, printing each span and log record received."""
    ap = argparse.ArgumentParser(
        prog="python -m otel_ctxbridge.collector", description=main.__doc__
    )
    ap.add_argument("--http-port", type=int, default=4318, help="OTLP/HTTP port (0: any free)")
    ap.add_argument("--grpc-port", type=int, default=4317, help="OTLP/gRPC port (0: any free)")
    opts = ap.parse_args(argv)
    signal.signal(signal.SIGTERM, _interrupt)  # `kill` stops it as cleanly as Ctrl-C
    col = EmbeddedCollector(grpc_port=opts.grpc_port, http_port=opts.http_port)
    try:
        col.start()
        print(f"OTEL_EXPORTER_OTLP_ENDPOINT={col.otlp_http_endpoint}")
        print(f"OTLP/gRPC: {col.otlp_grpc_endpoint}; Ctrl-C to stop.", flush=True)
        seen = [0, 0]
        while col.running:
            time.sleep(0.5)
            for i, records in enumerate((col.sink.spans(), col.sink.logs())):
                for r in records[seen[i] :]:
                    what = f"span {r['name']}" if i == 0 else f"log {r['body']!r}"
                    print(f"[{r['service']}] {what} trace={r['trace_id']} {r['attributes']}")
                seen[i] = len(records)
            sys.stdout.flush()
        print("rotel-agent exited:\n" + "\n".join(col.output()), file=sys.stderr)
    except CollectorStartError as exc:
        print(f"error: {exc}", file=sys.stderr)
    except KeyboardInterrupt:
        return 0
    finally:
        col.stop()
    return 1


if __name__ == "__main__":
    sys.exit(main())
