"""Request logging (the seed's use case 1): every log line of a request, as one JSON object,
carries its request id, tenant, user and trace ids, without passing them around.

- ``instrument_asgi`` reads or generates the request id (echoed in ``X-Request-ID``), takes the
  tenant only from trusted peers, starts the request context inside OTel's server span, and
  writes one access-log line per request on ``otel_ctxbridge.access``.
- ``ContextLogFilter`` on the handler puts the fields and ``trace_id``/``span_id`` on every
  record; python-json-logger's ``JsonFormatter`` writes them as JSON.
- ``bridge.update(user_id=...)`` in a (sync) FastAPI dependency reaches the handler's log
  lines, the access-log line and the server span, though it ran in a worker thread.

Run it and call it::

    python examples/request_logging_service.py            # port 8000 (REQUEST_LOGGING_PORT)
    curl -s localhost:8000/hello/ada -H 'x-request-id: demo-1' -H 'authorization: Bearer ada'

and read the lines it writes (one a line; shown wrapped here)::

    {"level": "INFO", "logger": "app", "message": "greeting ada", "request_id": "demo-1",
     "tenant_id": null, "user_id": "ada", "trace_id": "0af7...", "span_id": "b7ad...",
     "timestamp": "..."}
    {"level": "INFO", "logger": "otel_ctxbridge.access", "message": "GET /hello/ada 200 1.2ms",
     "request_id": "demo-1", "user_id": "ada", "method": "GET", "path": "/hello/ada",
     "status_code": 200, "duration_ms": 1.2, "client_addr": "127.0.0.1:52000", ...}

uvicorn's own access log is turned off here (the bridge's line replaces it); to keep it, run
uvicorn with ``access_log=True``: its ``uvicorn.access`` records go through the same handler
and carry the request id too. Spans and logs are exported over OTLP when
``OTEL_EXPORTER_OTLP_ENDPOINT`` is set. Localhost is the trusted network by default
(``REQUEST_LOGGING_TRUSTED_NETWORKS``), so ``-H 'x-tenant-id: acme'`` is honoured from curl.
"""

from __future__ import annotations

import logging
import os
import sys
from typing import IO, Any

from fastapi import Depends, FastAPI, Header
from pythonjsonlogger.json import JsonFormatter

import otel_ctxbridge as cb
from otel_ctxbridge.asgi import instrument_asgi
from otel_ctxbridge.trust import TrustPolicy

bridge = cb.ContextBridge(
    fields=[
        cb.Field(
            "request_id",
            header="x-request-id",
            generate=cb.new_request_id,
            inbound="always",
            validator=cb.REQUEST_ID_PATTERN,
        ),
        cb.Field("tenant_id", header="x-tenant-id", inbound="trusted"),
        cb.Field("user_id", propagate=False),  # logs and spans; never sent downstream
    ],
    attribute_prefix="app.",
)
log = logging.getLogger("app")


def json_handler(stream: IO[str] = sys.stdout) -> logging.Handler:
    """A handler writing each record as one JSON line with the request's fields.

    The filter goes on the handler (not on a logger), so records of every logger that reach
    it (``app``, ``otel_ctxbridge.access``, ``uvicorn.access``, libraries) are annotated."""
    handler = logging.StreamHandler(stream)
    handler.addFilter(cb.ContextLogFilter(bridge, default=None))
    handler.setFormatter(
        JsonFormatter(
            "%(levelname)s %(name)s %(message)s "
            "%(request_id)s %(tenant_id)s %(user_id)s %(trace_id)s %(span_id)s",
            rename_fields={"levelname": "level", "name": "logger"},
            timestamp=True,
        )
    )
    return handler


def current_user(authorization: str | None = Header(default=None)) -> str | None:
    """A sync dependency (FastAPI runs it in a worker thread) that identifies the user."""
    user = None
    if authorization and authorization.lower().startswith("bearer "):
        user = authorization[7:].strip() or None
    if user is not None:
        bridge.update(user_id=user)
    return user


def build_app(trust: TrustPolicy | None = None, **otel_kwargs: Any) -> Any:
    """The service as an ASGI app: FastAPI inside ``instrument_asgi``."""
    api = FastAPI(title="request logging")

    @api.get("/hello/{name}")
    async def hello(name: str, user: str | None = Depends(current_user)) -> dict[str, Any]:
        log.info("greeting %s", name)
        return {"hello": name, "request_id": bridge.get("request_id"), "user": user}

    @api.get("/fail")
    async def fail() -> None:
        log.warning("about to fail")
        raise RuntimeError("something broke")

    if trust is None:
        networks = os.environ.get("REQUEST_LOGGING_TRUSTED_NETWORKS", "127.0.0.1/32,::1/128")
        trust = TrustPolicy(networks=[n.strip() for n in networks.split(",") if n.strip()])
    return instrument_asgi(api, bridge, trust=trust, **otel_kwargs)


def main() -> None:
    """Log JSON lines to stdout, export over OTLP if configured, serve on 127.0.0.1."""
    import uvicorn  # noqa: PLC0415 - only when run as a script

    root = logging.getLogger()
    root.handlers[:] = [json_handler()]
    root.setLevel(logging.INFO)
    telemetry = cb.configure(
        bridge,
        service_name="request-logging",
        otlp=bool(os.environ.get("OTEL_EXPORTER_OTLP_ENDPOINT")),
    )
    try:
        port = int(os.environ.get("REQUEST_LOGGING_PORT", "8000"))
        uvicorn.run(build_app(), host="127.0.0.1", port=port, log_config=None, access_log=False)
    finally:
        telemetry.shutdown()


if __name__ == "__main__":
    main()
