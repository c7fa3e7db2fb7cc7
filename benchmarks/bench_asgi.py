"""ASGI middleware throughput: uvicorn (one worker each) on loopback, load from this process.

Variants (three server processes each, all started first, then measured in interleaved
rounds, each round on the next process of each variant):

- ``bare``: a Starlette app answering ``GET /`` with ``ok``.
- ``otel``: OTel's ``OpenTelemetryMiddleware`` with its default spans (send/receive on).
- ``otel-nospans``: OTel's middleware with ``exclude_spans=["receive", "send"]``.
- ``cid``: ``asgi-correlation-id``'s ``CorrelationIdMiddleware`` alone.
- ``otel+cid``: OTel's middleware (default spans) outside ``CorrelationIdMiddleware``: what users
  assemble today.
- ``otel-nospans+cid``: the same with OTel's send/receive spans off: the cost of generating and
  echoing a request id alone, next to the ``otel-nospans`` anchor.
- ``ctxbridge``: ``instrument_asgi`` with its defaults (request id + 2 more fields, send/receive
  spans off), access log off.
- ``otel-nospans@service`` and ``ctxbridge@service``: the same two servers under the requests
  of a service calling another (:data:`SERVICE_REQUEST`: a ``traceparent``, an ``X-Request-ID``
  to keep and the headers an HTTP client sends), reported beside the targets without one of
  their own (the issue's anchors are measured with the plain request).

Every server uses an SDK ``TracerProvider`` with a ``BatchSpanProcessor`` into an exporter that
drops the spans. The load generator keeps 32 keep-alive connections busy with raw HTTP/1.1
requests (no ``X-Request-ID``: both middlewares generate one) and counts responses. With two
CPUs or more, the load generator runs on one and the servers (one measured at a time) on
another.
"""

from __future__ import annotations

import asyncio
import os
import statistics
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, Literal

Row = tuple[str, float, float]
VARIANTS = (
    "bare",
    "cid",
    "otel",
    "otel-nospans+cid",
    "otel+cid",
    "ctxbridge",
    "otel-nospans",
    "otel-nospans@service",
    "ctxbridge@service",
)
"""In measuring order: each ratio with a target compares neighbours (``ctxbridge`` between
its two anchors), measured about a second apart, so drift in the machine's load cancels."""
SERVERS_PER_VARIANT = 3
"""Server processes per variant, taking turns round by round: a process's own layout (hash
seed, addresses) moves its speed by a few percent for its whole life, which a run of one
process per variant turned into run-to-run swings of the ratios (0.90-0.97)."""
CONNECTIONS = 32
WARMUP_S = 0.5
ROUND_S = 0.5
ROUNDS = 15
REQUEST = b"GET / HTTP/1.1\r\nHost: 127.0.0.1\r\nUser-Agent: bench\r\n\r\n"
SERVICE_REQUEST = (
    b"GET / HTTP/1.1\r\nHost: 127.0.0.1\r\nAccept: */*\r\nAccept-Encoding: gzip, deflate\r\n"
    b"Connection: keep-alive\r\nUser-Agent: python-httpx/0.28.1\r\n"
    b"traceparent: 00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01\r\n"
    b"X-Request-ID: 3f1c2a9e-8d6b-4c1e-9a2f-7b5d3e4c1a90\r\n"
    b"X-Forwarded-For: 10.0.0.7\r\nContent-Type: application/json\r\n\r\n"
)
"""What a service calling another sends (9 headers, as httpx does, with a trace to continue
and a request id to keep): the ``@service`` variants' load."""


# -- the servers (run in child processes) ------------------------------------------------------


def build_app(variant: str) -> Any:
    """The ASGI app of ``variant``, with an SDK tracer provider that drops its spans."""
    from opentelemetry import trace
    from opentelemetry.sdk.trace import TracerProvider
    from opentelemetry.sdk.trace.export import BatchSpanProcessor, SpanExporter, SpanExportResult
    from starlette.applications import Starlette
    from starlette.responses import PlainTextResponse
    from starlette.routing import Route

    class Drop(SpanExporter):
        def export(self, spans: Sequence[Any]) -> SpanExportResult:
            return SpanExportResult.SUCCESS

    provider = TracerProvider()
    provider.add_span_processor(BatchSpanProcessor(Drop()))
    trace.set_tracer_provider(provider)

    async def index(request: Any) -> PlainTextResponse:
        return PlainTextResponse("ok")

    variant = variant.partition("@")[0]  # the load, not the server, differs for "@service"
    app: Any = Starlette(routes=[Route("/", index)])
    if variant == "bare":
        return app
    from asgi_correlation_id import CorrelationIdMiddleware
    from opentelemetry.instrumentation.asgi import OpenTelemetryMiddleware

    import otel_ctxbridge as cb
    from otel_ctxbridge.asgi import instrument_asgi

    nospans: list[Literal["receive", "send"]] = ["receive", "send"]
    bridge = cb.ContextBridge(
        [
            cb.Field(
                "request_id", header="x-request-id", generate=cb.new_request_id, inbound="always"
            ),
            cb.Field("tenant_id", header="x-tenant-id", inbound="trusted"),
            cb.Field("user_id", propagate=False),
        ]
    )
    factories: dict[str, Callable[[], Any]] = {
        "otel": lambda: OpenTelemetryMiddleware(app),
        "otel-nospans": lambda: OpenTelemetryMiddleware(app, exclude_spans=nospans),
        "cid": lambda: CorrelationIdMiddleware(app),
        "otel+cid": lambda: OpenTelemetryMiddleware(CorrelationIdMiddleware(app)),
        "otel-nospans+cid": lambda: OpenTelemetryMiddleware(
            CorrelationIdMiddleware(app), exclude_spans=nospans
        ),
        "ctxbridge": lambda: instrument_asgi(app, bridge, access_log=False),
    }
    return factories[variant]()


def serve(variant: str, port: int) -> None:
    """Run ``variant`` under uvicorn (one worker, no access log) on 127.0.0.1:``port``."""
    import uvicorn

    uvicorn.run(
        build_app(variant),
        host="127.0.0.1",
        port=port,
        log_level="warning",
        access_log=False,
        lifespan="off",
    )


# -- the load generator ------------------------------------------------------------------------


async def _connection(port: int, deadline: float, counts: list[int], request: bytes) -> None:
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    done = 0
    try:
        while time.perf_counter() < deadline:
            writer.write(request)
            head = await reader.readuntil(b"\r\n\r\n")
            length = 0
            for line in head.split(b"\r\n"):
                if line[:15].lower() == b"content-length:":
                    length = int(line[15:])
            if length:
                await reader.readexactly(length)
            done += 1
    finally:
        counts.append(done)
        writer.close()


async def _load(port: int, seconds: float, request: bytes) -> tuple[int, float]:
    counts: list[int] = []
    started = time.perf_counter()
    deadline = started + seconds
    await asyncio.gather(
        *(_connection(port, deadline, counts, request) for _ in range(CONNECTIONS))
    )
    return sum(counts), time.perf_counter() - started


_TICKS = os.sysconf("SC_CLK_TCK") if hasattr(os, "sysconf") else 100


def _cpu_seconds(pid: int) -> float | None:
    """CPU time all threads of the process have used (ns-resolution schedstat, else stat)."""
    try:
        total = 0
        for task in os.listdir(f"/proc/{pid}/task"):
            with open(f"/proc/{pid}/task/{task}/schedstat", "rb") as stat:
                total += int(stat.read().split()[0])
        return total / 1e9
    except (OSError, ValueError, IndexError):
        pass
    try:
        with open(f"/proc/{pid}/stat", "rb") as stat:
            fields = stat.read().rsplit(b")", 1)[1].split()
    except OSError:
        return None
    return (int(fields[11]) + int(fields[12])) / _TICKS


def _round(port: int, pid: int, seconds: float, request: bytes = REQUEST) -> float:
    """Requests per second of server CPU time (wall clock where /proc is missing)."""
    before = _cpu_seconds(pid)
    done, wall = asyncio.run(_load(port, seconds, request))
    after = _cpu_seconds(pid)
    if before is None or after is None or after <= before:
        return done / wall
    return done / (after - before)


def _free_port() -> int:
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def _wait(port: int, process: subprocess.Popen[bytes]) -> None:
    import socket

    deadline = time.monotonic() + 20
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"benchmark server exited with {process.returncode}")
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=0.2):
                return
        except OSError:
            time.sleep(0.05)
    raise RuntimeError("benchmark server did not start")


def _pin() -> int | None:
    """With two CPUs or more: this process (the load) on one, and the CPU returned for the
    servers. Sharing a CPU with the load generator makes a server's CPU time per request
    swing by 20% from round to round; on CPUs of their own, by a few percent."""
    try:
        cpus = sorted(os.sched_getaffinity(0))
        if len(cpus) < 2:
            return None
        os.sched_setaffinity(0, {cpus[0]})
    except (AttributeError, OSError):  # not Linux, or not allowed
        return None
    return cpus[1]


def measure(variants: Sequence[str] = VARIANTS, rounds: int = ROUNDS) -> list[dict[str, float]]:
    """Per round, the requests per server-CPU-second of each variant, each round on the next
    of its :data:`SERVERS_PER_VARIANT` server processes. Rounds alternate the order (ABC,
    CBA, ...) so that drift in the machine's load hits every variant alike."""
    servers: dict[str, list[tuple[int, subprocess.Popen[bytes]]]] = {v: [] for v in variants}
    server_cpu = _pin()
    try:
        for variant in variants:
            for _ in range(SERVERS_PER_VARIANT):
                port = _free_port()
                process = subprocess.Popen(
                    [sys.executable, str(Path(__file__).resolve()), variant, str(port)]
                )
                servers[variant].append((port, process))
                if server_cpu is not None:
                    os.sched_setaffinity(process.pid, {server_cpu})
        for variant, group in servers.items():
            for port, process in group:
                _wait(port, process)
                _round(port, process.pid, WARMUP_S, _request(variant))
        results: list[dict[str, float]] = []
        for index in range(rounds):
            order = list(variants) if index % 2 == 0 else list(reversed(variants))
            turn = index % SERVERS_PER_VARIANT
            results.append(
                {v: _round(*_port_pid(servers[v][turn]), ROUND_S, _request(v)) for v in order}
            )
        return results
    finally:
        for _, process in _all(servers):
            process.terminate()
        for _, process in _all(servers):
            try:
                process.wait(timeout=10)
            except subprocess.TimeoutExpired:
                process.kill()


def _request(variant: str) -> bytes:
    return SERVICE_REQUEST if variant.endswith("@service") else REQUEST


def _all(
    servers: dict[str, list[tuple[int, subprocess.Popen[bytes]]]],
) -> list[tuple[int, subprocess.Popen[bytes]]]:
    return [server for group in servers.values() for server in group]


def _port_pid(server: tuple[int, subprocess.Popen[bytes]]) -> tuple[int, int]:
    return server[0], server[1].pid


def _median_ratio(rounds: list[dict[str, float]], top: str, bottom: str) -> float:
    return statistics.median(r[top] / r[bottom] for r in rounds)


def run() -> list[Row]:
    """Throughput ratios of ``instrument_asgi`` against the anchors, with their targets.

    Throughput is requests per second of server CPU time (the server is one single-threaded
    worker, so this is its saturated throughput), which other processes on the machine
    disturb far less than wall-clock requests per second. Each ratio is the median over
    rounds of the ratio within a round."""
    rounds = measure()
    print("  anchors (median over rounds, throughput / bare app):")
    for variant in VARIANTS:
        rps = statistics.median(r[variant] for r in rounds)
        ratio = _median_ratio(rounds, variant, "bare")
        print(f"    {variant:<20} {rps:8.0f} req/cpu-s  {ratio:5.2f}x")
    service = _median_ratio(rounds, "ctxbridge@service", "otel-nospans@service")
    print(
        "  service-to-service requests (traceparent, X-Request-ID, 9 headers): "
        f"instrument_asgi / OTel alone with the same spans: {service:.2f} (no target)"
    )
    return [
        (
            ">= instrument_asgi / (OTel + asgi-correlation-id) throughput",
            _median_ratio(rounds, "ctxbridge", "otel+cid"),
            1.3,
        ),
        (
            ">= instrument_asgi / OTel alone with the same spans, throughput",
            _median_ratio(rounds, "ctxbridge", "otel-nospans"),
            0.95,
        ),
    ]


if __name__ == "__main__":
    serve(sys.argv[1], int(sys.argv[2]))
