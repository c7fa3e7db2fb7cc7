"""otel_ctxbridge: one request id, tenant and user in every span, log line and downstream call.

App-level context fields are stored as OpenTelemetry baggage (propagated) or under a private
OTel context key (process-local), stamped on spans and log records, and carried downstream as
W3C ``baggage``. ``AsyncLocalStorage`` offers Node's simpler store API on the same context.
"""

from __future__ import annotations

from .asgi import ContextBridgeMiddleware, instrument_asgi
from .bridge import ContextBridge
from .carriers import continue_from
from .egress import EgressConfigError, EgressPolicy, HttpEgress, instrument_http_clients
from .errors import (
    AlreadyConfiguredError,
    ContextBridgeError,
    ContextValueError,
    FieldConfigError,
    MissingContextError,
    MissingExtraError,
    UnknownFieldError,
)
from .executors import (
    ContextExecutor,
    ContextProcessExecutor,
    run_in_executor,
    submit_with_context,
)
from .fields import REQUEST_ID_PATTERN, Field, new_request_id
from .logs import ContextLogFilter, ContextLogRecordProcessor
from .propagation import BaggagePropagator, default_propagator
from .sdk import Telemetry, configure
from .spans import ContextSpanProcessor
from .storage import AsyncLocalStorage
from .structlog_processor import ContextStructlogProcessor
from .trust import TrustPolicy

__all__ = [
    "REQUEST_ID_PATTERN",
    "AlreadyConfiguredError",
    "AsyncLocalStorage",
    "BaggagePropagator",
    "ContextBridge",
    "ContextBridgeError",
    "ContextBridgeMiddleware",
    "ContextExecutor",
    "ContextLogFilter",
    "ContextLogRecordProcessor",
    "ContextProcessExecutor",
    "ContextSpanProcessor",
    "ContextStructlogProcessor",
    "ContextValueError",
    "EgressConfigError",
    "EgressPolicy",
    "Field",
    "FieldConfigError",
    "HttpEgress",
    "MissingContextError",
    "MissingExtraError",
    "Telemetry",
    "TrustPolicy",
    "UnknownFieldError",
    "configure",
    "continue_from",
    "default_propagator",
    "instrument_asgi",
    "instrument_http_clients",
    "new_request_id",
    "run_in_executor",
    "submit_with_context",
]

__version__ = "0.1.0"
