"""A test service for the W3C Baggage test suite, on otel_ctxbridge's W3C baggage codec.

The W3C Baggage repository (github.com/w3c/baggage, ``test/``) ships unit tests of its own
reference parser; its ``test/README.md`` sketches, as not yet implemented, a service test that
calls two endpoints. This service answers them (``tests/test_w3c_baggage.py`` checks it on
a real server; the suite's own cases, ``test/test_baggage.py``, run there against the codec
it uses):

- ``GET /baggage/parse`` with a ``baggage`` header: answers the parsed list-members as JSON,
  ``[{"key": ..., "value": ..., "properties": [{"key": ..., "value": ...}, ...]}, ...]``
  (``value`` is left out of a property that has none);
- ``POST /baggage/serialize`` with that same JSON list: answers ``{"baggage": "<header>"}`` and
  sets the ``baggage`` response header.

Run: ``python examples/w3c_baggage_service.py`` (port 5001, or ``W3C_BAGGAGE_PORT``).

Limits: up to 180 list-members and 8192 bytes are kept (OpenTelemetry's limits): the
specification requires 64 members and 8192 bytes and lets a platform drop members past either
bound, so the suite's older ``test_serialize_many_entries`` case (512 members in 8192 bytes,
for its reference parser) is answered with the first 180.
"""

from __future__ import annotations

import os
from typing import Any

import uvicorn
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse
from starlette.routing import Route

from otel_ctxbridge.limits import BaggageEntry, format_baggage_entries, parse_baggage_entries


def _entry_json(entry: BaggageEntry) -> dict[str, Any]:
    properties = [
        {"key": key} if value is None else {"key": key, "value": value}
        for key, value in entry.properties
    ]
    return {"key": entry.key, "value": entry.value, "properties": properties}


async def parse(request: Request) -> JSONResponse:
    """Parse every ``baggage`` header of the request."""
    raw = [v.decode("latin-1") for k, v in request.scope["headers"] if k == b"baggage"]
    entries, _ = parse_baggage_entries(raw)
    return JSONResponse([_entry_json(e) for e in entries])


async def serialize(request: Request) -> JSONResponse:
    """Serialize a JSON list of entries into a ``baggage`` header."""
    try:
        items = await request.json()
        entries = [
            BaggageEntry(
                str(item["key"]),
                str(item["value"]),
                tuple(
                    (str(p["key"]), None if p.get("value") is None else str(p["value"]))
                    for p in item.get("properties", [])
                ),
            )
            for item in items
        ]
    except (ValueError, KeyError, TypeError, AttributeError):
        return JSONResponse({"error": "expected a JSON list of baggage entries"}, status_code=400)
    header = format_baggage_entries(entries)
    return JSONResponse({"baggage": header}, headers={"baggage": header})


app = Starlette(
    routes=[
        Route("/baggage/parse", parse, methods=["GET"]),
        Route("/baggage/serialize", serialize, methods=["POST"]),
    ]
)

if __name__ == "__main__":
    uvicorn.run(app, host="127.0.0.1", port=int(os.environ.get("W3C_BAGGAGE_PORT", "5001")))
