"""The optional compiled accelerator (``otel_ctxbridge._speedups``), when it is in use.

It is built from ``_speedups.c`` at install time when a C compiler is found, and is used
unless ``OTEL_CTXBRIDGE_NO_EXTENSIONS`` is set (to any non-empty value) or OpenTelemetry
runs on a runtime context other than its default ContextVar one. Everything it does has a
pure-Python form (``PyState``, ``PyScopeCore``) that behaves the same.
"""

from __future__ import annotations

import os
import warnings
from types import ModuleType

from . import _runtime as rt

__all__ = ["API", "speedups"]

API = 3
"""The ``SPEEDUPS_API`` of ``_speedups.c`` this Python code works with."""


def _load() -> ModuleType | None:
    if os.environ.get("OTEL_CTXBRIDGE_NO_EXTENSIONS") or rt._VAR is None:
        return None
    try:
        from . import _speedups  # noqa: PLC0415 - optional: built when a compiler was found
    except ImportError:
        return None
    if getattr(_speedups, "API", None) != API:  # a stale build left next to newer sources
        warnings.warn(
            "otel_ctxbridge: the compiled accelerator does not match this version (reinstall "
            "the package to rebuild it); running on the pure-Python code",
            RuntimeWarning,
            stacklevel=2,
        )
        return None
    return _speedups


speedups: ModuleType | None = _load()
"""The compiled module, or None when the pure-Python forms run."""
