"""Writing attributes the bridge has already checked onto an SDK span, cheaply.

The SDK's public ``Span.set_attributes`` validates and copies every value (about 4x the cost
of the write itself). The bridge's attributes are already valid: keys are declared attribute
names, values plain ``str``/``bool``/``int``/``float`` (see ``fields.attribute_value``). When
the span's store is the SDK's ``BoundedAttributes`` and none of its limits could apply, they go
straight into it, under the span's lock and then the store's, as the SDK's own writes (the
compiled path skips taking locks nobody holds: under the GIL, with no Python code running
during its write, no other thread could enter what they guard). Anything else (a length
limit, a store of another shape, another SDK) takes the public path.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from opentelemetry.attributes import BoundedAttributes

from ._accel import speedups

__all__ = ["remove_attributes", "rename_span", "write_attributes"]

_write_span = speedups.write_span if speedups is not None else None
"""The compiled direct path (the same checks and writes as below, in one C call): True when
it wrote (or there was nothing to do), False when the span is not one it applies to, or
before the accelerator is configured."""


_NOTHING: dict[str, Any] = {}


def _fits(store: Any, existing: dict[str, Any], adding: int) -> bool:
    """True when ``adding`` attributes go in without the store's count limit dropping any
    (checked before taking the locks, and again under them: another thread may have added
    some)."""
    return store.maxlen is None or len(existing) + adding <= store.maxlen


def _write_direct(  # noqa: PLR0917 - private, the twin of the compiled write_span
    span: Any,
    attributes: Mapping[str, Any],
    overwrite: bool,
    expected: str | None,
    name: str,
    renamed: Mapping[str, Any],
) -> bool:
    """The direct path in Python (what the compiled ``write_span`` does): True when written,
    or nothing to do (the span has ended); False when the span is not one it applies to (a
    limit, another SDK): nothing written. ``renamed`` is written, and the span renamed to
    ``name``, only while it keeps the ``expected`` name."""
    store: Any = getattr(span, "_attributes", None)
    if type(store) is not BoundedAttributes:
        return False
    try:
        adding = len(attributes) + (len(renamed) if expected is not None else 0)
        if store.max_value_len is not None or not _fits(store, store._dict, adding):
            return False
        with span._lock:
            if span._end_time is not None:
                return True
            if expected is not None and span._name != expected:
                expected = None  # renamed since (by the application or a hook): kept
            with store._lock:  # BoundedAttributes' readers (deepcopy) take it
                if not _fits(store, store._dict, adding):
                    return False
                _update(store._dict, attributes, overwrite)
                if expected is not None:
                    store._dict.update(renamed)
            if expected is not None:
                span._name = name
        return True
    except AttributeError:  # the SDK changed: the public path
        return False


def _update(existing: dict[str, Any], attributes: Mapping[str, Any], overwrite: bool) -> None:
    if overwrite or not existing:
        existing.update(attributes)
    else:
        for key, value in attributes.items():
            existing.setdefault(key, value)


def write_attributes(span: Any, attributes: Mapping[str, Any], overwrite: bool = True) -> None:
    """Set ``attributes`` (checked attribute values) on ``span`` while it is recording.

    ``overwrite=False`` keeps an attribute the span already has. A span that has ended is left
    as it is (checked under the span's lock, which ``end()`` holds while it ends the span, as
    the SDK's own ``set_attributes`` does), so an exporter never sees its attributes change."""
    if _write_span is not None and _write_span(span, attributes, overwrite, None, None, None):
        return
    if _write_direct(span, attributes, overwrite, None, "", _NOTHING):
        return
    if not overwrite:
        present = span.attributes
        if present:
            attributes = {k: v for k, v in attributes.items() if k not in present}
    if attributes:
        span.set_attributes(attributes)


def rename_span(span: Any, expected: str, name: str, attributes: Mapping[str, Any]) -> None:
    """Rename ``span`` from ``expected`` to ``name`` and set ``attributes`` (checked values),
    in one write, if it is recording and still named ``expected`` (a span renamed since, by
    the application or a hook, is left as it is)."""
    if _write_span is not None and _write_span(span, _NOTHING, True, expected, name, attributes):
        return
    if _write_direct(span, _NOTHING, True, expected, name, attributes):
        return
    if getattr(span, "name", None) != expected or not span.is_recording():
        return
    span.set_attributes(attributes)
    if name != expected:
        span.update_name(name)


def remove_attributes(span: Any, expected: Mapping[str, object]) -> None:
    """Remove each key of ``expected`` from the attributes of ``span`` (an SDK span that has
    not ended) while its value is still the expected one (text cut to the span's attribute
    length limit, as the SDK stored it), under the span's lock and its store's. The API has
    no way to remove an attribute: on spans of another SDK this does nothing."""
    store: Any = getattr(span, "_attributes", None)
    if type(store) is not BoundedAttributes:
        return
    try:
        limit = store.max_value_len  # the SDK stored text cut to it
        with span._lock:
            if span._end_time is not None:
                return
            with store._lock:
                present = store._dict
                for key, value in expected.items():
                    if limit is not None and isinstance(value, str):
                        value = value[:limit]  # noqa: PLW2901 - as the SDK stored it
                    if key in present and present[key] == value:
                        del present[key]
    except AttributeError:  # the SDK changed: left as it is
        return
