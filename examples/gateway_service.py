"""A gateway (FastAPI + otel_ctxbridge) calling the downstream orders service over HTTP.

The gateway takes the request id and tenant from the request (``x-request-id``, and
``x-tenant-id`` from trusted peers), sets the user after "authentication" (process-local: it
never leaves), and calls:

- the orders service (``downstream_orders_service.py``, plain OpenTelemetry): it is in the
  egress policy, so it gets ``traceparent`` and ``baggage`` and reads ``request_id`` and
  ``tenant_id`` with ``opentelemetry.baggage.get_baggage``;
- optionally a third party (``PARTNER_URL``): outside the policy, it gets ``traceparent`` only.

Run both (from the repository root)::

    python examples/downstream_orders_service.py &                  # port 8002
    python examples/gateway_service.py &                            # port 8001
    curl -s localhost:8001/checkout/7 -H 'x-request-id: r-1' -H 'x-tenant-id: acme'

Settings: ``ORDERS_URL`` (``http://localhost:8002``), ``GATEWAY_EGRESS_HOSTS`` (comma-separated,
default: the host of ``ORDERS_URL``), ``PARTNER_URL`` (none), ``GATEWAY_TRUSTED_NETWORKS``
(``127.0.0.1/32,::1/128``), ``GATEWAY_PORT`` (8001), and the standard ``OTEL_*`` variables
(spans and logs go to ``OTEL_EXPORTER_OTLP_ENDPOINT`` if set).
"""

from __future__ import annotations

import logging
import os
from typing import Any
from urllib.parse import urlsplit

import httpx
import uvicorn
from fastapi import FastAPI, Request
from pythonjsonlogger.json import JsonFormatter

import otel_ctxbridge as cb
from otel_ctxbridge.asgi import instrument_asgi
from otel_ctxbridge.egress import EgressPolicy, instrument_http_clients
from otel_ctxbridge.logs import ContextLogFilter
from otel_ctxbridge.sdk import configure
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
        cb.Field("user_id", propagate=False),
    ],
    attribute_prefix="app.",
)
log = logging.getLogger("gateway")


def egress_policy(orders_url: str) -> EgressPolicy:
    """Baggage goes to the orders service's host (or ``GATEWAY_EGRESS_HOSTS``) only."""
    hosts = os.environ.get("GATEWAY_EGRESS_HOSTS") or urlsplit(orders_url).hostname or ""
    return EgressPolicy(hosts=[h.strip() for h in hosts.split(",") if h.strip()])


def create_app(
    orders_url: str, partner_url: str | None = None, trust: TrustPolicy | None = None
) -> Any:
    """The gateway app, wrapped by :func:`~otel_ctxbridge.asgi.instrument_asgi`.

    Outbound calls carry the context only once the HTTP clients are instrumented with an
    egress policy (:func:`main` does it: ``instrument_http_clients``)."""
    api = FastAPI(title="gateway")

    @api.get("/checkout/{order_id}")
    async def checkout(order_id: str, request: Request) -> dict[str, Any]:
        user = request.headers.get("x-user")
        if user:  # stands in for authentication; process-local, never sent downstream
            bridge.update(user_id=user)
        async with httpx.AsyncClient(timeout=10) as client:
            response = await client.get(f"{orders_url}/orders/{order_id}")
            response.raise_for_status()
            order = response.json()
            if partner_url:
                await client.get(partner_url)
        log.info("checkout of order %s", order_id)
        return {"gateway": dict(bridge.current()), "orders": order}

    trust = trust if trust is not None else TrustPolicy(networks=["127.0.0.1/32", "::1/128"])
    return instrument_asgi(api, bridge, trust=trust)


def main() -> None:
    """Run the gateway with JSON logs, OTel telemetry and the egress policy."""
    handler = logging.StreamHandler()
    handler.addFilter(ContextLogFilter(bridge))
    handler.setFormatter(JsonFormatter("%(levelname)s %(name)s %(message)s"))
    logging.basicConfig(level=logging.INFO, handlers=[handler], force=True)
    endpoint = bool(os.environ.get("OTEL_EXPORTER_OTLP_ENDPOINT"))
    telemetry = configure(bridge, service_name="gateway", otlp=endpoint, bridge_logging=endpoint)
    orders_url = os.environ.get("ORDERS_URL", "http://localhost:8002").rstrip("/")
    egress = instrument_http_clients(bridge, egress_policy(orders_url))
    networks = os.environ.get("GATEWAY_TRUSTED_NETWORKS", "127.0.0.1/32,::1/128")
    app = create_app(
        orders_url,
        partner_url=os.environ.get("PARTNER_URL") or None,
        trust=TrustPolicy(networks=[n.strip() for n in networks.split(",") if n.strip()]),
    )
    try:
        port = int(os.environ.get("GATEWAY_PORT", "8001"))
        uvicorn.run(app, host="127.0.0.1", port=port, log_config=None, access_log=False)
    finally:
        egress.uninstrument()
        telemetry.shutdown()


if __name__ == "__main__":
    main()
