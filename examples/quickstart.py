"""Quick start: declare fields once, set them in a scope, see them everywhere.

Run with ``python examples/quickstart.py``. It prints what a downstream service would receive
and what a downstream service reads back with the plain OpenTelemetry baggage API.
"""

from __future__ import annotations

import asyncio

from opentelemetry import baggage, propagate

import otel_ctxbridge as cb

bridge = cb.ContextBridge(
    fields=[
        cb.Field("request_id", header="x-request-id", generate=cb.new_request_id, inbound="always"),
        cb.Field("tenant_id", header="x-tenant-id", inbound="trusted"),
        cb.Field("user_id", propagate=False),  # spans and logs, never leaves the process
    ],
    attribute_prefix="app.",
)


def load_orders() -> str:
    """Deep in the call stack: no parameters needed to know the request."""
    return f"orders of tenant {bridge.require('tenant_id')} for user {bridge.get('user_id')}"


async def handle(request_id: str, tenant: str) -> None:
    """One request: a scope around the work, a value set mid-request, an outbound call."""
    with bridge.scope(request_id=request_id, tenant_id=tenant):
        bridge.update(user_id="u-7")  # e.g. after authentication
        await asyncio.sleep(0.01)  # other requests run meanwhile; nothing leaks between them
        print(f"[{bridge.get('request_id')}] {load_orders()}")
        headers = bridge.inject({})
        print(f"[{request_id}] outbound headers: {headers}")
        downstream = propagate.extract(headers)  # what a service without this library does
        print(
            f"[{request_id}] downstream reads request_id="
            f"{baggage.get_baggage('request_id', downstream)!r}, "
            f"tenant_id={baggage.get_baggage('tenant_id', downstream)!r}, "
            f"user_id={baggage.get_baggage('user_id', downstream)!r} (process-local)"
        )


async def main() -> None:
    """Run two concurrent requests."""
    await asyncio.gather(handle("req-1", "acme"), handle("req-2", "globex"))
    store = cb.AsyncLocalStorage[dict[str, str]]()
    print("AsyncLocalStorage:", store.run({"tx": "tx-1"}, store.get_store))


if __name__ == "__main__":
    asyncio.run(main())
