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

__all__ = ["API", "speedups"]

API = 14
"""The ``SPEEDUPS_API`` of ``_speedups.c`` this Python code works with."""


def _load() -> ModuleType | None:
    if os.environ.get("OTEL_CTXBRIDGE_NO_EXTENSIONS") or rt._VAR is None:
        return None
    try:
        from . import _speedups  # noqa: PLC0415 - optional: built when a compiler was found
    except ModuleNotFoundError as exc:
        if exc.name != __package__ + "._speedups":
            _unusable(exc)
        return None  # not built: the pure-Python code, as installed
    except ImportError as exc:  # built, but not loadable here (another platform, say)
        _unusable(exc)
        return None
    if getattr(_speedups, "API", None) != API:  # a stale build left next to newer sources
        _unusable(f"built for another version of the package (API {_speedups.API!r})")
        return None
    return _speedups


def _unusable(reason: object) -> None:
    rt._logger.warning(
        "otel_ctxbridge: the compiled accelerator cannot be used (%s); running on the "
        "pure-Python code (reinstall the package to rebuild it)",
        reason,
    )


speedups: ModuleType | None = _load()
"""The compiled module, or None when the pure-Python forms run."""
