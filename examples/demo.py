"""``make demo``: one request id in traces, logs and a downstream service, as a collector sees it.

It starts the embedded OpenTelemetry Collector (``rotel``) exporting to an in-memory recording
sink, then the two example services as their own processes, both exporting spans and logs over
OTLP to that collector: ``gateway_service.py`` (otel_ctxbridge) calling
``downstream_orders_service.py`` (plain OpenTelemetry, reading the baggage API). It sends a few
requests (some with an ``X-Request-ID``, some without, one that fails with a 500) and prints,
per request id, only what the collector forwarded: the spans of both services, their log
records, and what the downstream read from baggage. Exit code 0 when every request id is found
everywhere, 1 when anything is missing, 2 when the demo could not start. Every process it
started is stopped before it exits (Ctrl-C and SIGTERM included).

Run it with ``make demo`` or ``.venv/bin/python examples/demo.py``.
"""

from __future__ import annotations

import signal
import sys
import tempfile
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
from demo_stack import GATEWAY, ORDERS, DemoError, Stack

from otel_ctxbridge.collector import CollectorStartError, RecordingSink

RID = "app.request_id"
"""The gateway's span / OTel log attribute of the request id; the downstream's OTel baggage
processors name it ``request_id``, as the baggage key."""
FAILING_PATH = "/checkout/fail"
PLAN: list[tuple[str, dict[str, str]]] = [
    ("/checkout/1", {"x-request-id": "demo-checkout-1", "x-tenant-id": "acme", "x-user": "alice"}),
    ("/checkout/2", {"x-tenant-id": "globex", "x-user": "bob"}),
    ("/checkout/3", {"x-request-id": "demo-checkout-3", "x-tenant-id": "acme corp"}),
    ("/checkout/4", {}),
    (FAILING_PATH, {"x-request-id": "demo-checkout-fail", "x-tenant-id": "acme", "x-user": "eve"}),
    ("/checkout/5", {"x-tenant-id": "initech", "x-user": "carol"}),
]
"""The demo's requests: (path, headers). ``x-user`` stands in for authentication: the gateway
keeps it process-local, so it must never reach the downstream."""
LOCAL_FIELDS = ("user_id",)
"""The gateway's process-local fields: never a baggage key downstream."""
WAIT = 15.0
"""Seconds to wait for the collector to forward everything before reporting what is missing."""


@dataclass
class Sent:
    """One request the demo sent, and the request id the gateway answered with."""

    path: str
    headers: dict[str, str]
    status: int
    request_id: str | None
    spans: list[dict[str, Any]] = field(default_factory=list)
    logs: list[dict[str, Any]] = field(default_factory=list)

    def collect(self, sink: RecordingSink) -> None:
        """Pick what the collector forwarded for this request: the records of the traces that
        carry its request id (so a record of the same trace *without* the id shows up too)."""
        rid, spans, logs = self.request_id, sink.spans(), sink.logs()
        carrying = [r for r in (*spans, *logs) if _rid(r) == rid and rid is not None]
        traces = {r["trace_id"] for r in carrying if r["trace_id"]}
        self.spans = [s for s in spans if s["trace_id"] in traces]
        self.logs = [r for r in logs if r["trace_id"] in traces or r in carrying]

    def missing(self) -> list[str]:
        """What is absent: each service's server span, the gateway's client span and each
        service's log records, carrying the request id, all in one trace."""
        rid, want = self.request_id, []
        if rid is None:
            return ["the X-Request-ID response header"]
        for service, kind in ((GATEWAY, "SERVER"), (GATEWAY, "CLIENT"), (ORDERS, "SERVER")):
            if not any(
                s["service"] == service and s["kind"] == kind and _rid(s) == rid for s in self.spans
            ):
                want.append(f"{service} {kind.lower()} span")
        for service in (GATEWAY, ORDERS):
            if not any(r["service"] == service and _rid(r) == rid for r in self.logs):
                want.append(f"{service} log record")
        access = f"GET {self.path} "  # the access-log line, written after the response
        gateway_bodies = [str(r["body"]) for r in self.logs if r["service"] == GATEWAY]
        if not any(body.startswith(access) for body in gateway_bodies):
            want.append("the gateway's access-log line")
        if len({r["trace_id"] for r in (*self.spans, *self.logs)}) > 1:
            want.append("a single trace id")
        tenant = self.headers.get("x-tenant-id")
        if tenant is not None and self.downstream_read().get("tenant_id") != tenant:
            want.append("the tenant in the downstream's baggage")
        if self.leaked_user():
            want.append("the user id kept in the gateway (it reached orders-downstream)")
        return want

    def baggage_keys(self) -> list[str]:
        """The baggage keys the downstream's server span says arrived."""
        for s in self.spans:
            if s["service"] == ORDERS and s["kind"] == "SERVER":
                return list(s["attributes"].get("orders.baggage_keys") or ())
        return []

    def downstream_read(self) -> dict[str, Any]:
        """What the downstream logged having read with ``get_baggage`` (empty: no record)."""
        for r in self.logs:
            if r["service"] == ORDERS and "requested" in str(r["body"]):
                return dict(r["attributes"])
        return {}

    def leaked_user(self) -> bool:
        """True when the process-local user id reached the downstream: as a baggage entry
        (whatever its value), or its value in any downstream record of this request."""
        if any(key in LOCAL_FIELDS for key in self.baggage_keys()):
            return True
        user = self.headers.get("x-user")
        if not user:
            return False
        records = [r for r in (*self.spans, *self.logs) if r["service"] == ORDERS]
        return any(user in str(r["attributes"]) or user in str(r.get("body", "")) for r in records)


def _rid(record: Mapping[str, Any]) -> Any:
    """The request id a span or log record carries: the bridge's attribute, or the plain
    ``request_id`` key the downstream logs with."""
    attributes = record["attributes"]
    return attributes.get(RID, attributes.get("request_id"))


def send_requests(gateway_url: str, plan: list[tuple[str, dict[str, str]]] = PLAN) -> list[Sent]:
    """Send each planned request to the gateway with a plain (uninstrumented) client; a
    request that gets no answer is kept with status 0 and no request id."""
    sent = []
    # A new connection per request: after an unhandled exception (the 500) uvicorn closes the
    # kept-alive connection without saying so, and the next request on it would be reset.
    no_reuse = httpx.Limits(max_keepalive_connections=0)
    with httpx.Client(base_url=gateway_url, timeout=15, limits=no_reuse) as client:
        for path, headers in plan:
            try:
                response = client.get(path, headers=headers)
            except httpx.HTTPError as exc:
                print(f"GET {path}: no answer ({type(exc).__name__}: {exc})", file=sys.stderr)
                sent.append(Sent(path, headers, 0, None))
                continue
            rid = response.headers.get("x-request-id")
            sent.append(Sent(path, headers, response.status_code, rid))
    return sent


def _read_downstream(sent: Sent) -> list[str]:
    """What the downstream logged having read with ``get_baggage``, and the baggage keys its
    server span says arrived."""
    logged = sent.downstream_read()
    read = " ".join(f"{k}={logged.get(k)!r}" for k in ("request_id", "tenant_id"))
    arrived = ", ".join(sent.baggage_keys())
    return [read if logged else "(no log record)", f"(baggage keys it got: {arrived or 'none'})"]


def _cut(text: str, width: int) -> str:
    """``text`` on one line, at most ``width`` characters (``…`` marks a cut)."""
    text = text.replace("\n", " ")
    return text if len(text) <= width else text[: width - 1] + "…"


def report(sent: Sent) -> str:
    """A small readable table of one request's telemetry, as the collector forwarded it."""
    origin = "from the client" if "x-request-id" in sent.headers else "generated by the gateway"
    asked = ", ".join(
        f"{k.removeprefix('x-')}={v}" for k, v in sent.headers.items() if k != "x-request-id"
    )
    out = [
        f"request id {sent.request_id}  ({origin})",
        f"  GET {sent.path} -> {sent.status}    sent: {asked or 'no context headers'}",
    ]
    traces = sorted({r["trace_id"] for r in (*sent.spans, *sent.logs) if r["trace_id"]})
    out.append(f"  trace id {', '.join(traces) or '(none)'}")
    mark = {True: "yes", False: "NO"}
    out.append(f"  {'spans':<7}{'service':<19}{'kind':<9}{'name':<27}{'trace id':<34}has id")
    order = {"SERVER": 0, "CLIENT": 1}
    for s in sorted(sent.spans, key=lambda s: (s["service"] != GATEWAY, order.get(s["kind"], 2))):
        out.append(
            f"  {'':<7}{s['service']:<19}{s['kind']:<9}{_cut(s['name'], 26):<27}"
            f"{s['trace_id']:<34}{mark[_rid(s) == sent.request_id]}"
        )
    out.append(f"  {'logs':<7}{'service':<19}{'level':<9}{'message':<61}has id")
    for r in sorted(sent.logs, key=lambda r: r["service"] != GATEWAY):
        body = _cut(str(r["body"]).split(": request_id=")[0], 60)
        out.append(
            f"  {'':<7}{r['service']:<19}{r['severity']:<9}{body:<61}"
            f"{mark[_rid(r) == sent.request_id]}"
        )
    read, arrived = _read_downstream(sent)
    out.append(f"  downstream read from baggage: {read}\n{'':<32}{arrived}")
    where = "LEAKED to the downstream" if sent.leaked_user() else "never left the gateway"
    if "x-user" in sent.headers:
        records = (*sent.spans, *sent.logs)
        on = sorted({r["service"] for r in records if r["attributes"].get("app.user_id")})
        out.append(f"  user_id (process-local): in {', '.join(on) or 'no'} records; {where}")
    else:
        out.append(f"  user_id (process-local): not set (no x-user); {where}")
    missing = sent.missing()
    out.append(f"  MISSING: {', '.join(missing)}" if missing else "  complete")
    return "\n".join(out)


def run(workdir: Path, env: Mapping[str, str] | None = None, wait: float = WAIT) -> int:
    """The whole demo in ``workdir``; returns the exit code. ``env`` adds variables for both
    services; ``wait`` bounds the wait for the collector's data, in seconds."""
    with Stack(workdir, env=env) as stack:
        col = stack.collector
        print("otel_ctxbridge demo: gateway (otel_ctxbridge) -> orders-downstream (plain OTel)")
        print(
            f"  {'collector':<18} rotel-agent pid {col.pid}, OTLP/HTTP {col.otlp_http_endpoint}"
            f" -> recording sink {stack.sink.endpoint}"
        )
        for name, proc in stack.procs.items():
            print(f"  {name:<18} pid {proc.pid}, {stack.urls[name]}")
        started = time.monotonic()
        sent = send_requests(stack.gateway_url)
        print(f"\nsent {len(sent)} requests; waiting for the collector to forward their telemetry")

        def complete(sink: RecordingSink) -> bool:
            for s in sent:
                s.collect(sink)
            return not any(s.missing() for s in sent)

        stack.sink.wait_for(complete, timeout=wait)
        complete(stack.sink)
        print(
            f"received {len(stack.sink.spans())} spans and {len(stack.sink.logs())} log records"
            f" in {time.monotonic() - started:.1f} s\n"
        )
        for s in sent:
            print(report(s), end="\n\n")
        failed = [s for s in sent if s.missing()]
        wrong = [s for s in sent if s.status != (500 if s.path == FAILING_PATH else 200)]
        for s in wrong:
            print(f"unexpected status {s.status} for GET {s.path}")
        if failed or wrong:
            for name in stack.procs:
                print(f"--- {name} output ---\n{stack.output(name)}", file=sys.stderr)
            print(f"FAILED: {len(failed)} of {len(sent)} request ids incomplete")
            return 1
        print(
            f"OK: all {len(sent)} request ids are in both services' spans and log records, "
            "one trace each, as forwarded by the collector"
        )
        return 0


def _interrupt(signum: int, frame: object) -> None:
    raise KeyboardInterrupt


def main() -> int:
    """Run the demo; Ctrl-C or SIGTERM stop it cleanly (every child process is stopped)."""
    signal.signal(signal.SIGTERM, _interrupt)
    try:
        with tempfile.TemporaryDirectory(prefix="otel-ctxbridge-demo-") as workdir:
            return run(Path(workdir))
    except CollectorStartError as exc:
        print(f"demo could not start the collector: {exc}", file=sys.stderr)
        return 2
    except DemoError as exc:
        print(f"demo could not start: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted; everything the demo started is stopped", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
