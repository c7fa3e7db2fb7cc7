"""Writing attributes the bridge has already checked onto an SDK span, cheaply.

The SDK's public ``Span.set_attributes`` validates and copies every value (about 4x the cost
of the write itself). The bridge's attributes are already valid: keys are declared attribute
names, values plain ``str``/``bool``/``int``/``float`` (see ``fields.attribute_value``). When
the span's store is the SDK's ``BoundedAttributes`` and none of its limits could apply, they go
straight into it, under its lock like the SDK's own writes. Anything else (a length limit, a
store of another shape, another SDK) takes the public path.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from opentelemetry.attributes import BoundedAttributes

__all__ = ["write_attributes"]


def write_attributes(span: Any, attributes: Mapping[str, Any], overwrite: bool = True) -> None:
    """Set ``attributes`` (checked attribute values) on ``span`` while it is recording.

    ``overwrite=False`` keeps an attribute the span already has. A span that has ended is left
    as it is (checked under the span's lock, which ``end()`` holds while it ends the span, as
    the SDK's own ``set_attributes`` does), so an exporter never sees its attributes change."""
    store: Any = getattr(span, "_attributes", None)
    if (
        type(store) is BoundedAttributes
        and store.max_value_len is None
        and (store.maxlen is None or len(store) + len(attributes) <= store.maxlen)
    ):
        try:
            with span._lock:
                if span._end_time is not None:
                    return
                with store._lock:
                    existing = store._dict
                    if overwrite or not existing:
                        existing.update(attributes)
                    else:
                        for key, value in attributes.items():
                            if key not in existing:
                                existing[key] = value
            return
        except AttributeError:  # the SDK changed BoundedAttributes: the public path
            pass
    if not overwrite:
        present = span.attributes
        if present:
            attributes = {k: v for k, v in attributes.items() if k not in present}
    if attributes:
        span.set_attributes(attributes)
