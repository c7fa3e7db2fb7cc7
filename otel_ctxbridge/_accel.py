"""The optional compiled accelerator (``otel_ctxbridge._speedups``), when it is in use.

It is built from ``_speedups.c`` at install time when a C compiler is found, and is used
unless ``OTEL_CTXBRIDGE_NO_EXTENSIONS`` is set (to any non-empty value) or OpenTelemetry
runs on a runtime context other than its default ContextVar one. Everything it does has a
pure-Python form (``PyState``, ``PyScopeCore``) that behaves the same.
"""

from __future__ import annotations

import os
from types import ModuleType

from . import _runtime as rt

__all__ = ["speedups"]


def _load() -> ModuleType | None:
    if os.environ.get("OTEL_CTXBRIDGE_NO_EXTENSIONS") or rt._VAR is None:
        return None
    try:
        from . import _speedups  # noqa: PLC0415 - optional: built when a compiler was found
    except ImportError:
        return None
    return _speedups


speedups: ModuleType | None = _load()
"""The compiled module, or None when the pure-Python forms run."""
