"""Field declarations: names, where a value goes, and what counts as a valid value."""

from __future__ import annotations

import dataclasses
import hashlib
import os
import re
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Literal, TypeAlias, cast

from ._accel import speedups
from .errors import FieldConfigError
from .limits import MAX_MEMBER_BYTES, is_valid_key

__all__ = [
    "REQUEST_ID_PATTERN",
    "Field",
    "InboundPolicy",
    "Redaction",
    "Validator",
    "attribute_value",
    "new_request_id",
    "resolve_fields",
]

InboundPolicy: TypeAlias = Literal["always", "trusted", "never"]
"""Who may set a field from an inbound request: anyone, trusted peers only, or nobody."""
Validator: TypeAlias = "str | re.Pattern[str] | Callable[[str], bool]"
"""A regular expression (full match) or a predicate a string value must satisfy."""
Redaction: TypeAlias = "bool | Literal['hash', 'mask'] | Callable[[str], str]"
"""How a value is shown in spans and logs: in clear (False), hashed, masked, or a callable."""

REQUEST_ID_PATTERN = r"[A-Za-z0-9][A-Za-z0-9._:+/=@-]{0,127}"
"""Safe request-id tokens: UUIDs, 32-hex ids, nginx ``$request_id``, base64ish ids up to 128."""

_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_.\-]*")
_HEADER = re.compile(r"[!#$%&'*+\-.^_`|~0-9a-z]+")
_POLICIES = ("always", "trusted", "never")
_REFUSED_BY_DEFAULT = "has characters that are not printable (control characters, line breaks)"
"""Why the default check (``str.isprintable``) refuses a value."""
_EDGE_WHITESPACE = (
    "starts or ends with whitespace, which OTel's baggage propagators strip (downstream services "
    "would read another value)"
)
"""Why a propagated value with whitespace at either end is refused."""
_INT64 = (-(2**63), 2**63 - 1)


def new_request_id() -> str:
    """Return a fresh random request id (a UUID4 in its canonical text form)."""
    # Same text as str(uuid.uuid4()), from os.urandom, minted in batches: one system call per
    # batch instead of per request. Popping from a list is atomic, so threads never share an
    # id; a forked child drops the parent's batch (it would repeat the parent's ids).
    while True:
        try:
            return _minted.pop()
        except IndexError:
            _minted.extend(_mint_request_ids(_BATCH))


_BATCH = 64
_minted: list[str] = []
_VARIANT = {c: "89ab"[int(c, 16) & 3] for c in "0123456789abcdef"}  # RFC 4122 variant bits
if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_minted.clear)


def _mint_request_ids(count: int) -> list[str]:
    raw = os.urandom(16 * count)
    if speedups is not None:  # the same texts, formatted in C
        return cast(list[str], speedups.uuid4_texts(raw))
    return uuid4_texts(raw)


def uuid4_texts(raw: bytes) -> list[str]:
    """The canonical text of a version-4 UUID made of each 16 bytes of ``raw``."""
    digits = raw.hex()
    ids = []
    for start in range(0, len(digits), 32):
        h = digits[start : start + 32]  # version 4 in the 13th hex digit, the variant in the 17th
        ids.append(f"{h[:8]}-{h[8:12]}-4{h[13:16]}-{_VARIANT[h[16]]}{h[17:20]}-{h[20:]}")
    return ids


def attribute_value(value: object) -> str | bool | int | float | None:
    """``value`` as an OTel span/log attribute value, or None when it cannot be one.

    str, bool, int and float are kept (an int beyond 64 bits, which OTLP cannot encode and
    which would fail a whole export batch, as its decimal text); any other object (a
    connection, a dict) is not an attribute value: None."""
    if isinstance(value, (str, bool, float)):
        return value
    if isinstance(value, int):
        return value if _INT64[0] <= value <= _INT64[1] else str(value)
    return None


def _hash(value: str) -> str:
    return "sha256:" + hashlib.sha256(value.encode("utf-8", "surrogatepass")).hexdigest()[:16]


def _mask(value: str) -> str:
    return "****"


@dataclass(frozen=True)
class Field:
    """One context field, declared once.

    Args:
        name: the field's name in the store API (``bridge.get(name)``).
        header: inbound HTTP header the field is read from (the request id's is also echoed).
        inbound: who may set it from a request: ``"always"``, ``"trusted"`` peers, ``"never"``.
        propagate: True carries it downstream as baggage; False keeps it in this process.
        baggage_key: key in W3C baggage (default: ``name``).
        attribute: span and OTel-log attribute (default: the bridge's prefix + ``name``).
        log_key: attribute of stdlib log records and structlog events (default: ``name``);
            like a name, letters, digits, ``_``, ``.`` and ``-``.
        validator: a regex (full match) or predicate; replaces the default printable-text check.
        max_length: most characters a string value may have.
        generate: makes a value when an inbound request carries none (e.g. ``new_request_id``).
        redact: show the value in spans and logs hashed (True or ``"hash"``), masked, or through
            a callable (given the value's text, also for a non-str value); baggage still
            carries the real value (``propagate=False`` keeps a sensitive one here).

    Values of propagated fields must be str (they travel as baggage) without whitespace at
    either end (OTel's propagators strip it: a downstream service would read another value);
    process-local fields also hold any object (a connection, a transaction): spans get only
    str, bool, int and float values, logs get the object.
    """

    name: str
    header: str | None = None
    inbound: InboundPolicy = "trusted"
    propagate: bool = True
    baggage_key: str | None = None
    attribute: str | None = None
    log_key: str | None = None
    validator: Validator | None = None
    max_length: int = 256
    generate: Callable[[], str] | None = None
    redact: Redaction = False
    _check: Callable[[str], object] = field(init=False, repr=False, compare=False)
    _shown: Callable[[str], str] | None = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        def fail(reason: str) -> FieldConfigError:
            return FieldConfigError(f"field {self.name!r}: {reason}")

        if not isinstance(self.name, str) or not _NAME.fullmatch(self.name):
            raise fail("name must start with a letter or _ and hold only [A-Za-z0-9_.-]")
        if self.header is not None:
            if not isinstance(self.header, str) or not _HEADER.fullmatch(self.header.lower()):
                raise fail("header must be an HTTP header name")
            object.__setattr__(self, "header", self.header.lower())
        if self.inbound not in _POLICIES:
            raise fail(f"inbound must be one of {_POLICIES}, not {self.inbound!r}")
        if not isinstance(self.propagate, bool):
            raise fail("propagate must be True or False")
        if self.baggage_key is None:
            object.__setattr__(self, "baggage_key", self.name)
        if not isinstance(self.baggage_key, str) or not is_valid_key(self.baggage_key):
            raise fail("baggage_key must be a W3C baggage key (an RFC 7230 token)")
        if self.attribute is not None and (
            not isinstance(self.attribute, str)
            or not self.attribute.isprintable()
            or not self.attribute
        ):
            raise fail("attribute must be a non-empty printable str")
        if self.log_key is None:
            object.__setattr__(self, "log_key", self.name)
        if type(self.log_key) is not str or not _NAME.fullmatch(self.log_key):
            raise fail("log_key must start with a letter or _ and hold only [A-Za-z0-9_.-]")
        if (
            not isinstance(self.max_length, int)
            or isinstance(self.max_length, bool)
            or not 1 <= self.max_length <= MAX_MEMBER_BYTES
        ):
            raise fail(f"max_length must be an int from 1 to {MAX_MEMBER_BYTES}")
        if self.generate is not None and not callable(self.generate):
            raise fail("generate must be callable")
        object.__setattr__(self, "_check", self._compile_validator(fail))
        object.__setattr__(self, "_shown", self._compile_redaction(fail))

    def _compile_validator(
        self, fail: Callable[[str], FieldConfigError]
    ) -> Callable[[str], object]:
        """The check of a value: a truthy result means valid (a regex's match object)."""
        validator = self.validator
        if validator is None:
            return str.isprintable
        if isinstance(validator, str):
            try:
                validator = re.compile(validator)
            except re.error as exc:
                raise fail(f"validator is not a valid regular expression: {exc}") from None
        if isinstance(validator, re.Pattern):
            return validator.fullmatch
        if callable(validator):
            return validator
        raise fail("validator must be a regex string, a compiled pattern or a callable")

    def _compile_redaction(
        self, fail: Callable[[str], FieldConfigError]
    ) -> Callable[[str], str] | None:
        redact = self.redact
        if redact is False:
            return None
        if redact is True or redact == "hash":
            return _hash
        if redact == "mask":
            return _mask
        if callable(redact):
            return redact
        raise fail("redact must be a bool, 'hash', 'mask' or a callable")

    def problem(self, value: object) -> str | None:
        """Why ``value`` may not be stored in this field, or None when it may."""
        if not isinstance(value, str):
            if self.propagate:
                return f"must be a str to travel as baggage, not {type(value).__name__}"
            return None
        if len(value) > self.max_length:
            return f"longer than max_length={self.max_length}"
        return self._text_problem(value)

    def _text_problem(self, value: str) -> str | None:
        """:meth:`problem` for a str within ``max_length``."""
        if self.propagate and value and (value[0].isspace() or value[-1].isspace()):
            return _EDGE_WHITESPACE
        if not value.isascii():
            try:
                value.encode("utf-8")
            except UnicodeEncodeError:  # lone surrogates: no carrier nor exporter can encode them
                return "not encodable as UTF-8"
        try:
            ok = self._check(value)
        except Exception as exc:  # a user validator failing counts as "invalid", not a crash
            return f"validator raised {type(exc).__name__}"
        refused = _REFUSED_BY_DEFAULT if self.validator is None else "rejected by the validator"
        return None if ok else refused

    def shown(self, value: object) -> object:
        """The value as spans and logs show it: redacted when the field says so (a non-str
        value through its text, so that no value of a redacted field shows in clear)."""
        if self._shown is None:
            return value
        return self._shown(value if isinstance(value, str) else str(value))

    @property
    def redacted(self) -> bool:
        """True when spans and logs show this field's values redacted."""
        return self._shown is not None


def resolve_fields(fields: Iterable[Field], attribute_prefix: str) -> dict[str, Field]:
    """The fields by name with attribute names resolved; refuses clashes and an empty list."""
    if not isinstance(attribute_prefix, str) or not attribute_prefix.isprintable():
        raise FieldConfigError("attribute_prefix must be a printable str")
    resolved: dict[str, Field] = {}
    seen: dict[tuple[str, str], str] = {}
    for declared in fields:
        if not isinstance(declared, Field):
            raise FieldConfigError(f"fields must be Field instances, not {declared!r}")
        item = declared
        if item.attribute is None:
            item = dataclasses.replace(item, attribute=attribute_prefix + item.name)
        for kind, value in (
            ("name", item.name),
            ("baggage key", item.baggage_key if item.propagate else None),
            ("attribute", item.attribute),
            ("log key", item.log_key),
            ("header", item.header),
        ):
            if value is None:
                continue
            if (kind, value) in seen and seen[kind, value] == item.name and kind == "name":
                raise FieldConfigError(f"field {item.name!r} is declared twice")
            if (kind, value) in seen:
                raise FieldConfigError(
                    f"field {item.name!r}: {kind} {value!r} is already used by "
                    f"field {seen[kind, value]!r}"
                )
            seen[kind, value] = item.name
        resolved[item.name] = item
    if not resolved:
        raise FieldConfigError("a ContextBridge needs at least one Field")
    return resolved
