"""otel_ctxbridge: one request id, tenant and user in every span, log line and downstream call.

App-level context fields are stored as OpenTelemetry baggage (propagated) or under a private
OTel context key (process-local), stamped on spans and log records, and carried downstream as
W3C ``baggage``. ``AsyncLocalStorage`` offers Node's simpler store API on the same context.
"""

from __future__ import annotations

from .bridge import ContextBridge
from .errors import (
    AlreadyConfiguredError,
    ContextBridgeError,
    ContextValueError,
    FieldConfigError,
    MissingContextError,
    UnknownFieldError,
)
from .fields import REQUEST_ID_PATTERN, Field, new_request_id
from .propagation import BaggagePropagator, default_propagator
from .storage import AsyncLocalStorage

__all__ = [
    "REQUEST_ID_PATTERN",
    "AlreadyConfiguredError",
    "AsyncLocalStorage",
    "BaggagePropagator",
    "ContextBridge",
    "ContextBridgeError",
    "ContextValueError",
    "Field",
    "FieldConfigError",
    "MissingContextError",
    "UnknownFieldError",
    "default_propagator",
    "new_request_id",
]

__version__ = "0.1.0"
