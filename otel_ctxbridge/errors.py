"""Exceptions raised by otel_ctxbridge.

The hierarchy::

    ContextBridgeError              base of everything this library raises
    ├── FieldConfigError            bad configuration, raised at construction (also a ValueError)
    ├── ContextValueError           a value refused at write time (also a ValueError)
    ├── UnknownFieldError           a name that no Field declares (also a KeyError)
    ├── MissingContextError         ``require()`` of a field that is unset (also a LookupError)
    └── AlreadyConfiguredError      ``configure()`` called twice without ``shutdown()``

Bad *data* that arrives from outside (inbound headers, carriers) never raises: it is dropped,
counted and logged without echoing the raw value.
"""

from __future__ import annotations

__all__ = [
    "AlreadyConfiguredError",
    "ContextBridgeError",
    "ContextValueError",
    "FieldConfigError",
    "MissingContextError",
    "UnknownFieldError",
]


class ContextBridgeError(Exception):
    """Base class of every exception raised by otel_ctxbridge."""


class FieldConfigError(ContextBridgeError, ValueError):
    """A :class:`~otel_ctxbridge.Field` or bridge is misconfigured; the message names the field."""


class ContextValueError(ContextBridgeError, ValueError):
    """A value written to the context was refused (type, length, validator or baggage limits).

    The message names the field and the reason, never the value itself.
    """

    def __init__(self, field: str, reason: str) -> None:
        super().__init__(f"field {field!r}: {reason}")
        self.field = field
        self.reason = reason


class UnknownFieldError(ContextBridgeError, KeyError):
    """A field name that the bridge does not declare."""

    def __str__(self) -> str:
        return str(self.args[0]) if self.args else "unknown field"


class MissingContextError(ContextBridgeError, LookupError):
    """``require()`` found no value for a field in the current context."""


class AlreadyConfiguredError(ContextBridgeError, RuntimeError):
    """``configure()`` was called while an earlier configuration is still installed."""
