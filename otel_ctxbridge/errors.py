"""Exceptions raised by otel_ctxbridge.

The hierarchy (each class is also the standard exception named beside it, so ``except
ValueError`` and the like keep working)::

    ContextBridgeError              base of everything this library raises on purpose
    ├── FieldConfigError            ValueError: a Field, bridge, TrustPolicy or log filter
    │                               misconfigured, raised at construction
    ├── ContextValueError           ValueError: a value refused at write time (type, length,
    │                               validator, UTF-8, baggage limits); names the field
    ├── UnknownFieldError           KeyError: a name that no Field declares
    ├── MissingContextError         LookupError: ``require()`` of an unset field, or
    │                               ``update()`` outside any scope or request
    ├── MissingExtraError           ImportError: a feature's optional extra is not installed;
    │                               the message names the ``pip install`` to run
    ├── AlreadyConfiguredError      RuntimeError: ``configure()`` while one is installed, or
    │                               once OTel's global providers are set (also after shutdown)
    ├── EgressConfigError           ValueError: an EgressPolicy or HTTP client
    │                               instrumentation misconfigured (otel_ctxbridge.egress)
    ├── UnknownTenantError          LookupError: no database for the context's tenant
    │                               (otel_ctxbridge.integrations.tenants)
    ├── TenantPoolError             RuntimeError: the tenant registry is closed or full
    │                               (otel_ctxbridge.integrations.tenants)
    └── TransactionScopeError       RuntimeError: the context's transaction may not be used
                                    here (otel_ctxbridge.integrations.transactions)

Outside the tree: ``otel_ctxbridge.collector.CollectorStartError`` (a RuntimeError: the
embedded collector did not start) and ``otel_ctxbridge.testing.LeakError`` (an
AssertionError failing a test that leaked a context).

Bad *data* that arrives from outside (inbound headers, carriers) never raises: it is dropped,
counted and logged without echoing the raw value.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

__all__ = [
    "AlreadyConfiguredError",
    "ContextBridgeError",
    "ContextValueError",
    "FieldConfigError",
    "MissingContextError",
    "MissingExtraError",
    "UnknownFieldError",
    "requires_extra",
]


class ContextBridgeError(Exception):
    """Base class of every exception raised by otel_ctxbridge."""


class FieldConfigError(ContextBridgeError, ValueError):
    """A :class:`~otel_ctxbridge.Field`, bridge or log filter is misconfigured; the message
    names the field."""


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
    """``require()`` found no value for a field in the current context, or ``update()``
    found no scope or request to change."""


class AlreadyConfiguredError(ContextBridgeError, RuntimeError):
    """``configure()`` was called while an earlier configuration is installed, or after OTel's
    global providers were set (by another library, or by an earlier ``configure()``: OTel
    sets them once per process, so ``shutdown()`` does not allow a second one)."""


class MissingExtraError(ContextBridgeError, ImportError):
    """A feature needs an optional extra that is not installed; the message says which."""


@contextmanager
def requires_extra(extra: str, feature: str) -> Iterator[None]:
    """Turn a missing optional dependency imported inside the block into a
    :class:`MissingExtraError` that names ``pip install 'otel_ctxbridge[extra]'``."""
    try:
        yield
    except ModuleNotFoundError as exc:
        raise MissingExtraError(
            f"{feature} needs the {extra!r} extra ({exc.name} is not installed): "
            f"pip install 'otel_ctxbridge[{extra}]'"
        ) from exc
