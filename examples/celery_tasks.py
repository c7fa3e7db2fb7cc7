"""A Celery task that logs the request id and tenant of the request that published it.

Needs a broker: RabbitMQ (default ``amqp://guest:guest@127.0.0.1:5672//``) or any URL in
``CELERY_BROKER_URL``. From this directory::

    celery -A celery_tasks worker --pool=threads -Q ctxbridge-orders --loglevel=INFO
    python celery_tasks.py          # publishes three tasks from three "requests"

Each "processing order" line of the worker is one JSON object carrying the ``request_id``,
``tenant_id`` and ``trace_id`` that the publisher printed for that order; ``user_id`` is
process-local and stays behind (null).
"""

from __future__ import annotations

import logging
import logging.config
import os
from typing import Any

from celery import Celery, signals
from opentelemetry import trace

import otel_ctxbridge as cb
from otel_ctxbridge.integrations.celery import instrument_celery
from otel_ctxbridge.logs import ContextLogFilter

BROKER_URL = os.environ.get("CELERY_BROKER_URL", "amqp://guest:guest@127.0.0.1:5672//")
QUEUE = os.environ.get("CELERY_QUEUE", "ctxbridge-orders")

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
)

app = Celery("celery_tasks", broker=BROKER_URL)
app.conf.update(
    task_default_queue=QUEUE,
    task_ignore_result=True,
    worker_enable_remote_control=False,
    broker_connection_retry_on_startup=True,
)
# Only our own services publish to this broker, so the tenant is taken from messages too.
instrument_celery(bridge, app, trusted=True)

log = logging.getLogger("orders.tasks")


@signals.setup_logging.connect
def setup_logging(**_: Any) -> None:
    """JSON log lines (python-json-logger) with the bridge's fields, instead of Celery's."""
    logging.config.dictConfig(
        {
            "version": 1,
            "disable_existing_loggers": False,
            "filters": {"ctx": {"()": ContextLogFilter, "bridge": bridge, "default": None}},
            "formatters": {
                "json": {
                    "()": "pythonjsonlogger.json.JsonFormatter",
                    "fmt": "%(levelname)s %(name)s %(message)s "
                    "%(request_id)s %(tenant_id)s %(user_id)s %(trace_id)s",
                },
            },
            "handlers": {
                "stdout": {
                    "class": "logging.StreamHandler",
                    "stream": "ext://sys.stdout",
                    "filters": ["ctx"],
                    "formatter": "json",
                },
            },
            "root": {"level": "INFO", "handlers": ["stdout"]},
        }
    )


@signals.worker_ready.connect
def announce_ready(**_: Any) -> None:
    """One line saying the worker consumes (tests wait for it)."""
    log.info("worker ready")


@app.task(name="orders.process")
def process_order(order_id: str) -> None:
    """Process an order; the log line carries the publishing request's id and tenant."""
    log.info("processing order %s", order_id)


def main(queue: str | None = None) -> dict[str, str]:
    """Publish three tasks, each from its own "request" (a span and a scope), to ``queue``
    (default: ``CELERY_QUEUE``); returns each order's trace id."""
    tracer = trace.get_tracer("celery_tasks")
    published = {}
    for n, tenant in enumerate(("acme", "globex", "initech")):
        with (
            tracer.start_as_current_span(f"request {n}") as span,
            bridge.scope(request_id=f"req-{n}", tenant_id=tenant, user_id="u-secret"),
        ):
            process_order.apply_async((f"order-{n}",), queue=queue)
            published[f"order-{n}"] = trace_id = f"{span.get_span_context().trace_id:032x}"
        print(f"published order-{n} for request req-{n} (tenant {tenant}, trace {trace_id})")
    return published


if __name__ == "__main__":
    from opentelemetry.sdk.trace import TracerProvider

    trace.set_tracer_provider(TracerProvider())  # spans (not exported): their ids travel
    main()
